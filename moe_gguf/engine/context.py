"""SteerContext: a llama_context for batched decoding with per-sequence steering profiles and routing capture.

    with model.context(n_seq_max=2) as ctx:
        steered, plain = ctx.generate_many([Request(toks, profile), Request(toks)])   # A/B in one batch
        with ctx.recording(RoutingRecorder(n_layer, n_expert)) as rec:
            ctx.decode([(0, toks, 0)], logits="all")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from moe_gguf.engine import _lib
from moe_gguf.engine.handles import Steering, low, set_n_expert_used
from moe_gguf.engine.sampling import sample
from moe_gguf.errors import ContextClosedError, DecodeError
from moe_gguf.formats.profile import Schedule, SteeringProfile
from moe_gguf.formats.records import RouteSink

if TYPE_CHECKING:
    from moe_gguf.engine.model import MoEModel

_Sink = TypeVar("_Sink", bound=RouteSink)


@dataclass
class Request:
    """One sequence to generate: prompt tokens, its profile and when steering starts."""

    tokens: list[int]
    profile: SteeringProfile | None = None
    max_tokens: int = 64
    strength: float = 1.0
    schedule: Schedule | None = None  # None: the profile's own schedule
    stop: Sequence[str] = ()


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    steered_from: int | None = None  # index of the first generated token decoded with steering
    finish_reason: str = "length"


@dataclass
class StreamEvent:
    """One generation step: the new token of each sequence that produced one, all completions so far."""

    new_tokens: dict[int, int]
    completions: list[Completion]
    done: bool


_MIXED = object()  # steering key of a sequence whose tokens were not all steered alike: never reused


@dataclass
class _Seq:
    """One sequence of a stream(): its request, schedule, what the cache holds and where it continues."""

    s: int  # sequence id
    req: Request
    sched: Schedule
    now: bool  # steered from the last prompt token on (the schedule starts at once)
    whole: bool  # every prompt token steered (apply_to "all")
    key: object  # the steering every token got, if the same for all of them; _MIXED otherwise
    out: Completion = field(default_factory=Completion)
    keep: int = 0  # leading tokens kept in the KV cache from the previous reuse_prefix stream
    fed: list[int] = field(default_factory=list)  # tokens the cache holds for this sequence
    pos: int = 0  # position of the next token

    @classmethod
    def start(cls, s: int, r: Request) -> _Seq:
        sched = r.schedule or (r.profile.schedule if r.profile else Schedule())
        # prompt: steered when the schedule covers it; "generated" steers from the last prompt token on,
        # whose output predicts the first generated token
        now = r.profile is not None and sched.after_tokens == 0 and not sched.after_text
        whole = now and sched.apply_to == "all"
        key = None if r.profile is None else (tuple(r.profile.entries), float(r.strength)) if whole else _MIXED
        return cls(s, r, sched, now, whole, key, fed=list(r.tokens), pos=len(r.tokens))

    def prefill_head(self) -> tuple[int, list[int], int]:
        """The prompt tokens decoded before the last one (all of them when the whole prompt is steered)."""
        toks = self.req.tokens if self.whole else self.req.tokens[:-1]
        return self.s, list(toks[self.keep:]), self.keep

    def needs_tail(self) -> bool:
        return self.keep + len(self.prefill_head()[1]) < len(self.req.tokens)

    def prefill_tail(self) -> tuple[int, list[int], int]:
        return self.s, list(self.req.tokens[-1:]), len(self.req.tokens) - 1

    def prefilled(self) -> None:
        if self.now:
            self.out.steered_from = 0

    def step(self, tok: int, eog: set[int], detokenize) -> tuple[tuple[int, list[int], int] | None, bool]:
        """Take the sampled token: (what to decode next or None when finished, whether steering starts now)."""
        o, r = self.out, self.req
        if tok in eog:
            o.finish_reason = "stop"
            return None, False
        o.tokens.append(tok)
        o.text = detokenize(o.tokens)
        if any(x in o.text for x in r.stop) or len(o.tokens) >= r.max_tokens:
            o.finish_reason = "stop" if any(x in o.text for x in r.stop) else "length"
            return None, False
        steer_now = r.profile is not None and o.steered_from is None and _schedule_due(self.sched, o)
        if steer_now:
            o.steered_from = len(o.tokens)
            self.key = _MIXED
        item = (self.s, [tok], self.pos)
        self.pos += 1
        return item, steer_now


class SteerContext:
    """A llama_context with n_seq_max sequences, per-sequence profiles and routing capture."""

    def __init__(self, model: MoEModel, *, n_ctx: int, n_seq_max: int, n_batch: int, n_ubatch: int | None = None,
                 cb_eval=None) -> None:
        low_ = low()
        self.model = model
        self._low = low_
        p = low_.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = min(n_batch, n_ubatch or n_batch)
        p.n_seq_max = n_seq_max
        p.n_threads = p.n_threads_batch = model.n_threads
        p.kv_unified = True  # sequences of any length share the cache
        if cb_eval is not None:
            p.cb_eval = cb_eval
            p.cb_eval_user_data = None
        self._cb_eval = cb_eval  # keep the ctypes callback alive
        self._ctx = None
        if model.llama._model.model is None:
            raise ValueError(f"{model.path}: the model is closed; load it again to make a context")
        ctx = low_.llama_init_from_model(model.llama.model, p)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq_max={n_seq_max})")
        self._batch = low_.llama_batch_init(n_batch, 0, 1)
        self._key = model._contexts.add(ctx, self._batch)
        self._ctx = ctx
        self.n_ctx, self.n_batch, self.n_seq_max = n_ctx, n_batch, n_seq_max
        self.n_vocab = low_.llama_vocab_n_tokens(low_.llama_model_get_vocab(model.llama.model))
        self._steering = Steering(model, ctx, self._key)
        self._route_cb = None
        vocab = low_.llama_model_get_vocab(model.llama.model)
        self._eog = {t for t in range(self.n_vocab) if low_.llama_vocab_is_eog(vocab, t)}
        # what stream(reuse_prefix=True) left in the KV cache: seq -> (tokens decoded, steering key)
        self._kv: dict[int, tuple[list[int], object]] = {}

    # -- steering --

    def set_profile(self, profile: SteeringProfile | None, *, seq_id: int = -1, strength: float = 1.0,
                    allow_mismatch: bool = False) -> None:
        """Use ``profile`` for ``seq_id`` (-1: every sequence); None: no steering."""
        self._steering.set_profile(profile, seq_id=seq_id, strength=strength, allow_mismatch=allow_mismatch)

    def clear_steering(self) -> None:
        self._steering.clear()

    def set_n_expert_used(self, n: int, *, layer: int = -1) -> None:
        """Experts per token from the next decode on (0: the model's value; layer -1: every MoE layer).

        Refused below the number of experts a profile in use forces in a layer.
        """
        set_n_expert_used(self.ctx, n, layer)
        self._kv.clear()  # cached tokens were routed with the old count: no prefix reuse across the change

    def n_expert_used(self, layer: int) -> int:
        n = _lib.lib().llama_moe_get_n_expert_used(self.ctx, layer)
        _lib.check(min(n, 0), f"layer {layer}")
        return n

    # -- routing capture --

    def set_recorder(self, recorder: RouteSink | None, *, with_probs: bool = False) -> None:
        """Capture routing into ``recorder`` (a RoutingRecorder, a RouteTee, any RouteSink); None: stop."""
        lib = _lib.lib()
        if recorder is None:
            self._route_cb = None
            _lib.check(lib.llama_moe_set_route_callback(self.ctx, _lib.ROUTE_CALLBACK(), None, False), "capture off")
            return
        cb = _lib.ROUTE_CALLBACK(lambda route, _ud: recorder.on_route(route.contents))
        _lib.check(lib.llama_moe_set_route_callback(self.ctx, cb, None, with_probs), "capture on")
        self._route_cb = cb

    @contextmanager
    def recording(self, recorder: _Sink, *, with_probs: bool = False) -> Iterator[_Sink]:
        self.set_recorder(recorder, with_probs=with_probs)
        try:
            yield recorder
        finally:
            self.set_recorder(None)

    # -- memory --

    def clear_memory(self, seq_id: int = -1) -> None:
        mem = self._low.llama_get_memory(self.ctx)
        if seq_id < 0:
            self._kv.clear()
        else:
            self._kv.pop(seq_id, None)
        if seq_id < 0:
            self._low.llama_memory_clear(mem, True)
        else:
            self._low.llama_memory_seq_rm(mem, seq_id, -1, -1)

    # -- decoding --

    def decode(self, items: Sequence[tuple[int, Sequence[int], int]], *, logits: str = "last") -> dict[int, np.ndarray]:
        """Decode tokens of several sequences together.

        items: (seq_id, tokens, first position). logits: "last" (per sequence, [n_vocab]),
        "all" (per sequence, [n_tokens, n_vocab]; also makes every layer's routing captured for
        every token), "route" (outputs for every token so that every layer routes every token, but
        no logits copied: for routing capture) or "none".
        """
        self._kv.clear()  # the cache no longer holds only what stream() put there
        return self._decode(items, logits=logits)

    def _decode(self, items: Sequence[tuple[int, Sequence[int], int]], *, logits: str = "last") -> dict[int, np.ndarray]:
        """Decode tokens of several sequences together.

        items: (seq_id, tokens, first position). logits: "last" (per sequence, [n_vocab]),
        "all" (per sequence, [n_tokens, n_vocab]; also makes every layer's routing captured for
        every token), "route" (outputs for every token so that every layer routes every token, but
        no logits copied: for routing capture) or "none".
        """
        if logits not in ("last", "all", "route", "none"):
            raise ValueError(f"logits must be 'last', 'all', 'route' or 'none', got {logits!r}")
        ctx = self.ctx  # ContextClosedError before the (then freed) batch is touched
        lo, b = self._low, self._batch
        every = logits in ("all", "route")
        flat = [(s, t, p0 + i, every or (logits == "last" and i == len(toks) - 1))
                for s, toks, p0 in items for i, t in enumerate(toks)]
        mem = lo.llama_get_memory(ctx)
        seen: set[int] = set()
        for s, toks, p0 in items:
            if not 0 <= s < self.n_seq_max:
                raise ValueError(f"sequence id {s} out of range [0, {self.n_seq_max})")
            if s in seen or not toks:
                continue
            seen.add(s)
            last = lo.llama_memory_seq_pos_max(mem, s)  # -1: empty, any first position will do
            if last >= 0 and p0 != last + 1:
                raise DecodeError(f"sequence {s} still holds positions up to {last} in the KV cache, so it continues at "
                                  f"position {last + 1}, not {p0}; continue at {last + 1}, or remove the sequence "
                                  f"first with ctx.clear_memory({s})")
        out: dict[int, list[np.ndarray]] = {}
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start:start + self.n_batch]
            for i, (s, t, pos, want) in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = s
                b.logits[i] = want
            b.n_tokens = len(chunk)
            rc = lo.llama_decode(ctx, b)
            if rc != 0:
                raise DecodeError(_decode_error(rc, self.n_ctx))
            for i, (s, _, _, want) in enumerate(chunk):
                if want and logits != "route":
                    ptr = lo.llama_get_logits_ith(self.ctx, i)
                    out.setdefault(s, []).append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        if logits == "last":
            return {s: v[-1] for s, v in out.items()}
        return {s: np.stack(v) for s, v in out.items()}

    def generate_many(self, requests: Sequence[Request], *, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0) -> list[Completion]:
        """Generate for several sequences in the same batches, each with its own profile and schedule.

        Leaves the context as it found it: the sequences used are removed from the KV cache and their steering
        is reset, so ``decode([(0, toks, 0)])`` afterwards starts sequence 0 afresh, unsteered.
        """
        outs: list[Completion] = []
        try:
            for ev in self.stream(requests, temperature=temperature, top_p=top_p, seed=seed):
                outs = ev.completions
        finally:
            if not self.closed:
                for s in range(len(requests)):
                    self.clear_memory(s)
        return outs

    def stream(self, requests: Sequence[Request], *, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, reuse_prefix: bool = False) -> Iterator[StreamEvent]:
        """Like generate_many, yielding after every decode step; stop iterating to stop generating.

        The sequences' tokens stay in the KV cache afterwards (``clear_memory(seq)`` removes them); their
        steering does not: each sequence goes back to the context's default profile (``set_profile(p)``).

        reuse_prefix: keep the KV cache of the longest prefix request s shares with what the previous
        reuse_prefix stream left in sequence s (a chat's earlier turns), if that was decoded with the same
        steering throughout (no profile, or the same profile and strength on every token); only the rest of
        the prompt is decoded (so a routing recorder sees only that part). A profile applied by a schedule
        is never reused.
        """
        if not requests:
            return
        if len(requests) > self.n_seq_max:
            raise ValueError(f"{len(requests)} requests for a context of {self.n_seq_max} sequences")
        for r in requests:
            if not r.tokens:
                raise ValueError("empty prompt: give at least one token")
        total = sum(len(r.tokens) + r.max_tokens for r in requests)
        if total > self.n_ctx:  # the sequences share one cache (kv_unified)
            raise ValueError(f"{len(requests)} request(s) of {total} prompt + new tokens in all exceed the context of "
                             f"{self.n_ctx} tokens; use a larger n_ctx, fewer max_tokens or fewer sequences at once")
        rng = np.random.default_rng(seed)
        seqs = [_Seq.start(s, r) for s, r in enumerate(requests)]
        if reuse_prefix:
            for q, n in zip(seqs, self._keep_prefix(requests, [q.key for q in seqs]), strict=True):
                q.keep = n
        else:
            self.clear_memory()
        outs = [q.out for q in seqs]
        consistent = False
        self._kv.clear()
        try:
            for q in seqs:
                self.set_profile(q.req.profile if q.whole else None, seq_id=q.s, strength=q.req.strength)
            logits = self._decode([h for h in (q.prefill_head() for q in seqs) if h[1]])
            tails = [q for q in seqs if q.needs_tail()]
            for q in tails:
                if q.now:
                    self.set_profile(q.req.profile, seq_id=q.s, strength=q.req.strength)
            logits.update(self._decode([q.prefill_tail() for q in tails]) if tails else {})
            consistent = True
            for q in seqs:
                q.prefilled()
            active = list(seqs)
            while active:
                step = []
                new: dict[int, int] = {}
                for q in list(active):
                    tok = sample(logits[q.s], temperature, top_p, rng)
                    item, steer_now = q.step(tok, self._eog, self.model.detokenize)
                    if tok not in self._eog:
                        new[q.s] = tok
                    if item is None:
                        active.remove(q)
                        continue
                    if steer_now:
                        self.set_profile(q.req.profile, seq_id=q.s, strength=q.req.strength)
                    step.append(item)
                yield StreamEvent(new, outs, not active)
                if step:
                    consistent = False
                    logits = self._decode(step)
                    for s, toks, _ in step:
                        seqs[s].fed += toks
                    consistent = True
        finally:
            # remember what the cache holds, for the next reuse_prefix call (not after a failed decode)
            self._kv = {q.s: (q.fed, q.key) for q in seqs} if consistent else {}
            if not self.closed:  # no per-sequence steering left behind for later decodes
                for q in seqs:
                    self._steering.reset_seq(q.s)

    def _keep_prefix(self, requests: Sequence[Request], keys: list[object]) -> list[int]:
        """Per request: how many leading tokens of its sequence's KV cache can stay; the rest is removed."""
        mem = self._low.llama_get_memory(self.ctx)
        keep = []
        for s in range(self.n_seq_max):
            n = 0
            if s < len(requests) and s in self._kv and keys[s] is not _MIXED and self._kv[s][1] == keys[s]:
                cached, toks = self._kv[s][0], requests[s].tokens
                lim = min(len(cached), len(toks) - 1)  # at least one prompt token is decoded, for its logits
                while n < lim and cached[n] == toks[n]:
                    n += 1
            if not n or not self._low.llama_memory_seq_rm(mem, s, n, -1):
                self._low.llama_memory_seq_rm(mem, s, -1, -1)
                n = 0
            if s < len(requests):
                keep.append(n)
        return keep

    def generate(self, tokens: Sequence[int], *, profile: SteeringProfile | None = None, max_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, schedule: Schedule | None = None,
                 stop: Sequence[str] = (), strength: float = 1.0) -> Completion:
        return self.generate_many([Request(list(tokens), profile, max_tokens, strength, schedule, stop)],
                                  temperature=temperature, top_p=top_p, seed=seed)[0]

    @property
    def ctx(self):
        """The llama_context pointer; ContextClosedError once this context or its model is closed."""
        if self.closed:
            raise ContextClosedError("this context (or its model) was closed; make a new one with model.context()")
        return self._ctx

    @property
    def closed(self) -> bool:
        return self._ctx is None or not self.model._contexts.is_open(self._key)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx = None
            self.model._contexts.free(self._key)  # a no-op if closing the model freed it already

    def __enter__(self) -> SteerContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _decode_error(rc: int, n_ctx: int) -> str:
    """llama_decode's return codes (llama.h), in words."""
    if rc == 1:
        return (f"llama_decode returned 1: no room in the KV cache (the context of {n_ctx} tokens is full); "
                "use a larger n_ctx, or remove finished sequences with clear_memory(seq)")
    if rc == 2:
        return "llama_decode returned 2: aborted"
    if rc == -1:
        return "llama_decode returned -1: the batch was refused as invalid (llama.cpp's log names the reason)"
    if rc == -2:
        return "llama_decode returned -2: could not allocate the compute buffers (out of memory)"
    return f"llama_decode returned {rc}: failed while computing the graph (llama.cpp's log names the reason)"


def _schedule_due(sc: Schedule, o: Completion) -> bool:
    if len(o.tokens) < sc.after_tokens:
        return False
    if sc.after_text:
        return sc.after_text in o.text
    return True
