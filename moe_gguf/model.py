"""A MoE GGUF on the patched llama.cpp: steering profiles, per-sequence steering, routing capture.

    model = MoEModel("model.gguf")                   # a llama_cpp.Llama inside (chat, templates)
    model.steer(profile)                             # steer model.llama's own context
    ctx = model.context(n_seq_max=2)                 # a context for batched / A-B work
    ctx.set_profile(profile, seq_id=0)               # seq 0 steered, seq 1 not
    out = ctx.generate_many([Request(toks, profile=p), Request(toks)])
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_gguf import _lib
from moe_gguf.errors import ModelFileError, NotMoEError
from moe_gguf.offload import Placement, model_params, override_array
from moe_gguf.profile import Schedule, SteeringProfile
from moe_gguf.recorder import RoutingRecorder
from moe_gguf.topology import ModelTopology


def _low():
    _lib.lib()  # raises PatchMissingError with the fixing command
    from llama_cpp import llama_cpp as low

    return low


class DecodeError(RuntimeError):
    """llama_decode failed (context full, allocation failure, ...)."""


class ContextClosedError(RuntimeError):
    """A context (or the model it was made on) was closed and cannot be used any more."""


class MoEModel:
    """A MoE GGUF loaded with llama-cpp-python (``self.llama``), plus what moe-gguf adds."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, n_gpu_layers: int = 0,
                 n_threads: int | None = None, n_batch: int = 512, expert_used_count: int | None = None,
                 placement: Placement | None = None, extra_bufts: bool = True,
                 rpc_servers: Sequence[str] | None = None,
                 seed: int = 0, verbose: bool = False, **llama_kwargs) -> None:
        """Load a MoE GGUF.

        placement: where expert weights live (llama.cpp's --cpu-moe / --n-cpu-moe / -ot).
        extra_bufts: llama.cpp's CPU weight repacking buffers (False: plain CPU buffers).
        rpc_servers: "host:port" of ``moe-gguf rpc-server`` processes (llama.cpp's --rpc); layers are
            spread over their devices and this machine's GPUs. n_gpu_layers=0 then means all layers.
        """
        self.path = Path(path)
        self.topology = ModelTopology.from_gguf(self.path, expert_used_override=expert_used_count)
        if not self.topology.is_moe:
            raise NotMoEError(f"{self.path}: {self.topology.arch} model without routed experts; moe-gguf needs a MoE model")
        low = _low()
        import jinja2
        from llama_cpp import Llama

        kv = dict(llama_kwargs.pop("kv_overrides", None) or {})
        if expert_used_count is not None:
            if not 1 <= expert_used_count <= self.topology.n_expert:
                raise ValueError(f"expert_used_count must be in [1, {self.topology.n_expert}], got {expert_used_count}")
            kv[f"{self.topology.arch}.expert_used_count"] = int(expert_used_count)
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2))
        self.placement = placement or Placement()
        # the override array must outlive the model: llama.cpp keeps the pointer
        self._overrides = override_array(self.placement.rules(self.topology.n_layer))
        fields: dict = {}
        self._devices = None  # like the override array, llama.cpp keeps this pointer
        if rpc_servers:
            from moe_gguf import rpc

            try:
                self._devices = rpc.device_list(list(rpc_servers))
            except rpc.RPCError as e:
                raise ModelFileError(f"{self.path}: {e}") from e
            fields["devices"] = ctypes.cast(self._devices, ctypes.c_void_p)
            n_gpu_layers = n_gpu_layers or -1
        if self._overrides is not None:
            fields["tensor_buft_overrides"] = ctypes.cast(self._overrides, ctypes.c_void_p)
        if not extra_bufts:
            fields["use_extra_bufts"] = False
        try:
            with model_params(**fields):
                self.llama = Llama(model_path=str(self.path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                                   n_threads=self.n_threads, n_batch=n_batch, seed=seed, kv_overrides=kv or None,
                                   verbose=verbose, **llama_kwargs)
        except ValueError as e:
            raise ModelFileError(f"{self.path}: llama.cpp could not load the model ({e})") from e
        except jinja2.TemplateError as e:  # llama-cpp-python compiles the GGUF's chat templates on load
            raise ModelFileError(f"{self.path}: the model's chat template is broken ({type(e).__name__}: {e})") from e
        self._low = low
        self._contexts = _ContextRegistry(low)
        # LIFO: runs before llama-cpp-python frees the model, however that happens (close(), or a GC cycle
        # finalizing the model before a SteerContext still holding a context on it)
        self.llama._model._exit_stack.callback(self._contexts.free_all)
        self._chat = _Steering(self, self.llama.ctx)

    # -- steering of the Llama's own context (create_completion, create_chat_completion) --

    def steer(self, profile: SteeringProfile | None, *, strength: float = 1.0, allow_mismatch: bool = False) -> None:
        """Steer every later call on ``self.llama`` with ``profile`` (None: stop steering)."""
        self._check_open()
        self._chat.set_profile(profile, seq_id=-1, strength=strength, allow_mismatch=allow_mismatch)
        # Llama keeps a prefix cache of evaluated tokens: they were computed with the old steering
        self.llama.reset()
        self._low.llama_memory_clear(self._low.llama_get_memory(self.llama.ctx), True)

    def set_n_expert_used(self, n: int, *, layer: int = -1) -> None:
        """Experts per token on ``self.llama``'s context (0: the model's value); no reload."""
        self._check_open()
        _set_n_expert_used(self.llama.ctx, n, layer)
        self.llama.reset()
        self._low.llama_memory_clear(self._low.llama_get_memory(self.llama.ctx), True)

    def context(self, *, n_ctx: int | None = None, n_seq_max: int = 1, n_batch: int | None = None,
                n_ubatch: int | None = None, cb_eval=None) -> SteerContext:
        """A new context on this model for batched, per-sequence steered decoding."""
        self._check_open()
        return SteerContext(self, n_ctx=n_ctx or self.llama.n_ctx(), n_seq_max=n_seq_max,
                            n_batch=n_batch or self.llama.n_batch, n_ubatch=n_ubatch, cb_eval=cb_eval)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        self._check_open()
        return self.llama.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        self._check_open()
        return self.llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own chat template (sandboxed Jinja)."""
        self._check_open()
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelFileError(f"{self.path}: the GGUF has no chat template (tokenizer.chat_template)")
        vocab = self.llama._model
        eos = self.detokenize([vocab.token_eos()]) if vocab.token_eos() >= 0 else ""
        bos = self.detokenize([vocab.token_bos()]) if vocab.token_bos() >= 0 else ""
        try:  # the template comes from the file: sandboxed, but it may still fail in any way
            fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                      add_generation_prompt=add_generation_prompt)
            return fmt(messages=messages).prompt
        except Exception as e:  # jinja2.TemplateError (SecurityError for sandbox escapes), raise_exception's ValueError...
            raise ModelFileError(f"{self.path}: the model's chat template failed ({type(e).__name__}: {e})") from e

    @property
    def closed(self) -> bool:
        return self.llama._model.model is None

    def _check_open(self) -> None:
        if self.closed:
            raise ContextClosedError(f"{self.path}: the model is closed; load it again")

    def close(self) -> None:
        self.llama.close()

    def __enter__(self) -> MoEModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ContextRegistry:
    """The llama_contexts made on one model, so that each is freed once and always before the model.

    Holds raw pointers only: weak references to SteerContexts would already be cleared when a GC cycle
    finalizes the model, and strong ones would keep closed contexts alive as long as the model.
    """

    def __init__(self, low) -> None:
        self._low = low
        self._open: dict[int, tuple] = {}
        self._next = 0
        self._lock = threading.Lock()

    def add(self, ctx, batch) -> int:
        with self._lock:
            self._next += 1
            self._open[self._next] = (ctx, batch)
            return self._next

    def free(self, key: int) -> None:
        with self._lock:
            item = self._open.pop(key, None)
        if item is not None:
            ctx, batch = item
            if batch is not None:
                self._low.llama_batch_free(batch)
            self._low.llama_free(ctx)

    def free_all(self) -> None:
        for key in list(self._open):
            self.free(key)

    def is_open(self, key: int) -> bool:
        return key in self._open


class _Steering:
    """Profiles uploaded to one llama_context (ids 1, 2, ...), and which sequence uses which."""

    def __init__(self, model: MoEModel, ctx, key: int | None = None) -> None:
        self.model = model
        self._raw_ctx = ctx
        self._key = key  # None: the Llama's own context
        self._ids: dict[tuple, int] = {}  # (id(profile), strength, entries) -> profile id
        self._profiles: dict[int, SteeringProfile] = {}
        self._default = 0  # profile of every sequence not listed in _seq
        self._seq: dict[int, int] = {}

    @property
    def ctx(self):
        if self._key is not None:
            open_ = self.model._contexts.is_open(self._key)
        else:
            open_ = self.model.llama._ctx is not None and self.model.llama._ctx.ctx is not None
        if not open_:
            raise ContextClosedError("this context (or its model) was closed; make a new one")
        return self._raw_ctx

    def upload(self, profile: SteeringProfile, strength: float, allow_mismatch: bool) -> int:
        topo = self.model.topology
        # validated on every call: an allow_mismatch override holds for that call only
        profile.validate(topo, allow_mismatch=allow_mismatch)
        # keyed by the entries too, so a profile edited after an upload is uploaded again
        key = (id(profile), float(strength), tuple(profile.entries))
        if key in self._ids and self._profiles.get(self._ids[key]) is profile:
            return self._ids[key]
        lib = _lib.lib()
        pid = max(self._profiles, default=0) + 1
        f32p, i32p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)
        for layer, (action, bias, scale) in profile.layer_arrays(topo, strength=strength).items():
            action = np.ascontiguousarray(action, dtype=np.int32)
            bias = np.ascontiguousarray(bias, dtype=np.float32)
            scale = np.ascontiguousarray(scale, dtype=np.float32)
            rc = lib.llama_moe_steer_set_layer(self.ctx, pid, layer, action.ctypes.data_as(i32p), bias.ctypes.data_as(f32p),
                                               scale.ctypes.data_as(f32p), topo.n_expert)
            if rc != 0:
                lib.llama_moe_steer_clear(self.ctx, pid)
                _lib.check(rc, f"profile {profile.name or '(unnamed)'}, layer {layer}")
        self._ids[key] = pid
        self._profiles[pid] = profile
        return pid

    def set_profile(self, profile: SteeringProfile | None, *, seq_id: int, strength: float = 1.0,
                    allow_mismatch: bool = False) -> None:
        lib = _lib.lib()
        pid = 0 if profile is None else self.upload(profile, strength, allow_mismatch)
        _lib.check(lib.llama_moe_steer_seq(self.ctx, seq_id, pid), f"sequence {seq_id}")
        if seq_id == -1:
            self._default, self._seq = pid, {}
        else:
            self._seq[seq_id] = pid
        # drop uploaded profiles no sequence uses any more, so they do not pile up in the context
        used = {self._default, *self._seq.values()}
        for old in [p for p in self._profiles if p not in used]:
            lib.llama_moe_steer_clear(self.ctx, old)
            del self._profiles[old]
            self._ids = {k: v for k, v in self._ids.items() if v != old}

    def clear(self) -> None:
        lib = _lib.lib()
        _lib.check(lib.llama_moe_steer_seq(self.ctx, -1, 0), "clear")
        _lib.check(lib.llama_moe_steer_clear(self.ctx, -1), "clear")
        self._ids.clear()
        self._profiles.clear()
        self._default, self._seq = 0, {}


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


class SteerContext:
    """A llama_context with n_seq_max sequences, per-sequence profiles and routing capture."""

    def __init__(self, model: MoEModel, *, n_ctx: int, n_seq_max: int, n_batch: int, n_ubatch: int | None = None,
                 cb_eval=None) -> None:
        low = _low()
        self.model = model
        self._low = low
        p = low.llama_context_default_params()
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
        ctx = low.llama_init_from_model(model.llama.model, p)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq_max={n_seq_max})")
        self._batch = low.llama_batch_init(n_batch, 0, 1)
        self._key = model._contexts.add(ctx, self._batch)
        self._ctx = ctx
        self.n_ctx, self.n_batch, self.n_seq_max = n_ctx, n_batch, n_seq_max
        self.n_vocab = low.llama_vocab_n_tokens(low.llama_model_get_vocab(model.llama.model))
        self._steering = _Steering(model, ctx, self._key)
        self._route_cb = None
        vocab = low.llama_model_get_vocab(model.llama.model)
        self._eog = {t for t in range(self.n_vocab) if low.llama_vocab_is_eog(vocab, t)}
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
        _set_n_expert_used(self.ctx, n, layer)
        self._kv.clear()  # cached tokens were routed with the old count: no prefix reuse across the change

    def n_expert_used(self, layer: int) -> int:
        n = _lib.lib().llama_moe_get_n_expert_used(self.ctx, layer)
        _lib.check(min(n, 0), f"layer {layer}")
        return n

    # -- routing capture --

    def set_recorder(self, recorder: RoutingRecorder | None, *, with_probs: bool = False) -> None:
        lib = _lib.lib()
        if recorder is None:
            self._route_cb = None
            _lib.check(lib.llama_moe_set_route_callback(self.ctx, _lib.ROUTE_CALLBACK(), None, False), "capture off")
            return
        cb = _lib.ROUTE_CALLBACK(lambda route, _ud: recorder.on_route(route.contents))
        _lib.check(lib.llama_moe_set_route_callback(self.ctx, cb, None, with_probs), "capture on")
        self._route_cb = cb

    @contextmanager
    def recording(self, recorder: RoutingRecorder, *, with_probs: bool = False) -> Iterator[RoutingRecorder]:
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
        low, b = self._low, self._batch
        every = logits in ("all", "route")
        flat = [(s, t, p0 + i, every or (logits == "last" and i == len(toks) - 1))
                for s, toks, p0 in items for i, t in enumerate(toks)]
        for s, _, _ in items:
            if not 0 <= s < self.n_seq_max:
                raise ValueError(f"sequence id {s} out of range [0, {self.n_seq_max})")
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
            rc = low.llama_decode(ctx, b)
            if rc != 0:
                raise DecodeError(f"llama_decode returned {rc} (context of {self.n_ctx} tokens full, or out of memory)")
            for i, (s, _, _, want) in enumerate(chunk):
                if want and logits != "route":
                    ptr = low.llama_get_logits_ith(self.ctx, i)
                    out.setdefault(s, []).append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        if logits == "last":
            return {s: v[-1] for s, v in out.items()}
        return {s: np.stack(v) for s, v in out.items()}

    def generate_many(self, requests: Sequence[Request], *, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0) -> list[Completion]:
        """Generate for several sequences in the same batches, each with its own profile and schedule."""
        outs: list[Completion] = []
        for ev in self.stream(requests, temperature=temperature, top_p=top_p, seed=seed):
            outs = ev.completions
        return outs

    def stream(self, requests: Sequence[Request], *, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, reuse_prefix: bool = False) -> Iterator[StreamEvent]:
        """Like generate_many, yielding after every decode step; stop iterating to stop generating.

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
        outs = [Completion() for _ in requests]
        scheds = [r.schedule or (r.profile.schedule if r.profile else Schedule()) for r in requests]
        # prompt: steered when the schedule covers it; "generated" steers from the last prompt token on,
        # whose output predicts the first generated token
        now = [r.profile is not None and sc.after_tokens == 0 and not sc.after_text for r, sc in zip(requests, scheds, strict=True)]
        whole = [now[s] and scheds[s].apply_to == "all" for s in range(len(requests))]
        # the steering every token of the sequence gets, if it is the same for all of them
        keys: list[object] = [None if r.profile is None else (tuple(r.profile.entries), float(r.strength)) if whole[s]
                              else _MIXED for s, r in enumerate(requests)]
        if reuse_prefix:
            keep = self._keep_prefix(requests, keys)
        else:
            self.clear_memory()
            keep = [0] * len(requests)
        fed = [list(r.tokens) for r in requests]
        consistent = False
        self._kv.clear()
        try:
            for s, r in enumerate(requests):
                self.set_profile(r.profile if whole[s] else None, seq_id=s, strength=r.strength)
            head = [(s, (r.tokens if whole[s] else r.tokens[:-1])[keep[s]:], keep[s]) for s, r in enumerate(requests)]
            logits = self._decode([h for h in head if h[1]])
            tail = [(s, r.tokens[-1:], len(r.tokens) - 1) for s, r in enumerate(requests)
                    if keep[s] + len(head[s][1]) < len(r.tokens)]
            for s, _, _ in tail:
                if now[s]:
                    self.set_profile(requests[s].profile, seq_id=s, strength=requests[s].strength)
            logits.update(self._decode(tail) if tail else {})
            consistent = True
            for s in range(len(requests)):
                if now[s]:
                    outs[s].steered_from = 0
            pos = [len(r.tokens) for r in requests]
            active = set(range(len(requests)))
            while active:
                step = []
                new: dict[int, int] = {}
                for s in sorted(active):
                    r, o, sc = requests[s], outs[s], scheds[s]
                    tok = _sample(logits[s], temperature, top_p, rng)
                    if tok in self._eog:
                        o.finish_reason = "stop"
                        active.discard(s)
                        continue
                    o.tokens.append(tok)
                    o.text = self.model.detokenize(o.tokens)
                    new[s] = tok
                    if any(x in o.text for x in r.stop) or len(o.tokens) >= r.max_tokens:
                        o.finish_reason = "stop" if any(x in o.text for x in r.stop) else "length"
                        active.discard(s)
                        continue
                    if r.profile is not None and o.steered_from is None and _schedule_due(sc, o):
                        self.set_profile(r.profile, seq_id=s, strength=r.strength)
                        o.steered_from = len(o.tokens)
                        keys[s] = _MIXED
                    step.append((s, [tok], pos[s]))
                    pos[s] += 1
                yield StreamEvent(new, outs, not active)
                if step:
                    consistent = False
                    logits = self._decode(step)
                    for s, toks, _ in step:
                        fed[s] += toks
                    consistent = True
        finally:
            # remember what the cache holds, for the next reuse_prefix call (not after a failed decode)
            self._kv = {s: (fed[s], keys[s]) for s in range(len(requests))} if consistent else {}

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


def _set_n_expert_used(ctx, n: int, layer: int) -> None:
    _lib.check(_lib.lib().llama_moe_set_n_expert_used(ctx, layer, n), f"{n} experts per token in layer {layer}")


def _schedule_due(sc: Schedule, o: Completion) -> bool:
    if len(o.tokens) < sc.after_tokens:
        return False
    if sc.after_text:
        return sc.after_text in o.text
    return True


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))
