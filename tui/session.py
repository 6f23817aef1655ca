"""The chat UI's controller: owns the MoEModel, its SteerContext and the working steering profile.

Screens call these methods and never touch llama.cpp or the model themselves. ``load`` and ``generate`` are
slow and run in worker threads; everything else is quick and runs on the UI thread. ``generate`` is a generator
of ReplyUpdate snapshots (text, speed, context use, routing counts), one per decode step.
"""

from __future__ import annotations

import copy
import os
import secrets
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_gguf.errors import ModelMismatchError, ModelWeightsWarning, ProfileError
from moe_gguf.formats.profile import ACTIONS, Schedule, SteeringProfile
from moe_gguf.formats.records import RouteTee, RoutingRecorder, TokenTrace
from moe_gguf.tui.config import Sampling
from moe_gguf.tui.paths import cache_dir
from moe_gguf.tui.thinking import THINK_CLOSE, THINK_OPEN

DEMO_PRESET = "tiny-qwen3moe"
# per-token routes are stored with a reply when it has at most this many (token, MoE layer) pairs (a few hundred KB
# of JSON); longer replies keep their per-layer counts only
MAX_STORED_ROUTES = 4096


def default_model_path() -> tuple[Path, str]:
    """The shipped demo model (moe_gguf.demo.model) and "", or, when it is not installed, a tiny random-weight
    model made once in the cache dir and a notice saying so."""
    notice = ""
    from moe_gguf.demo import model as demo_model

    try:
        return Path(demo_model.default_model_path()), ""
    except (OSError, ValueError) as e:  # DemoModelMissingError: the package data is not there
        notice = f"{e}. Using a tiny random-weight model instead (its text is gibberish)."
    from moe_gguf._io import atomic_path
    from moe_gguf.formats.synth import PRESETS, write_gguf

    path = cache_dir() / "demo" / f"{DEMO_PRESET}-q8_0.gguf"
    if not path.exists():
        with atomic_path(path, make_dirs=True) as tmp:
            write_gguf(PRESETS[DEMO_PRESET], tmp, dtype="q8_0", name=DEMO_PRESET)
    return path, notice


@dataclass
class ReplyUpdate:
    """A snapshot of the reply being generated (one per decode step); seq 0 is the main (steered) reply."""

    texts: list[str]
    tokens: list[list[int]]
    n_prompt: int
    max_tokens: int
    elapsed: float
    tokens_per_s: float | None  # generated tokens per second (decode speed once two steps are done)
    ctx_used: int
    n_ctx: int
    selections: list[np.ndarray]  # per sequence: [n_layer, n_expert] selections of the generated tokens so far
    routed: list[np.ndarray]  # per sequence: [n_layer] tokens routed
    done: bool
    stopped: bool = False
    finish: list[str] = field(default_factory=list)
    steered_from: list[int | None] = field(default_factory=list)
    dropped: int = 0  # oldest messages left out to fit the context
    seed: int = 0  # the seed this reply was sampled with
    think_end: list[int | None] = field(default_factory=list)  # per sequence: generated tokens up to </think>


@dataclass
class _Reply:
    n_prompt: int
    recorders: list[RoutingRecorder]
    tokens: list[list[int]] = field(default_factory=list)
    think_end: list[int | None] = field(default_factory=list)
    _index: dict[int, tuple[int, dict[int, list[TokenTrace]]]] = field(default_factory=dict)  # seq -> (n, pos -> traces)

    def routes(self, seq: int, pos: int) -> list[TokenTrace]:
        if not 0 <= seq < len(self.recorders):
            return []
        traces = self.recorders[seq].traces  # appended to by the worker thread: index what is there now
        n = len(traces)
        cached = self._index.get(seq)
        if cached is None or cached[0] != n:
            by_pos: dict[int, list[TokenTrace]] = {}
            for t in traces[:n]:
                by_pos.setdefault(t.pos, []).append(t)
            cached = self._index[seq] = (n, by_pos)
        return sorted(cached[1].get(pos, []), key=lambda t: t.layer)


def _seq_filter(seq: int, n_prompt: int):
    return lambda seqs, pos: (seqs == seq) & (pos >= n_prompt)


class ChatSession:
    def __init__(self, model_path: str | os.PathLike | None = None, *, n_gpu_layers: int = 0, n_ctx: int = 2048,
                 threads: int | None = None, expert_used_count: int | None = None, cpu_moe: bool = False,
                 n_cpu_moe: int = 0, override_tensor: Sequence[str] = (), no_repack: bool = False,
                 **model_kwargs: Any) -> None:
        """Options as llama.cpp users know them (-ngl, -c, -t, --cpu-moe, --n-cpu-moe, -ot, --no-repack);
        model_kwargs go to MoEModel (and on to llama_cpp.Llama)."""
        self.model_path = None if model_path is None else Path(model_path)
        self.n_gpu_layers, self.n_ctx, self.threads = n_gpu_layers, n_ctx, threads
        self.expert_used_count = expert_used_count
        self.cpu_moe, self.n_cpu_moe, self.override_tensor = cpu_moe, n_cpu_moe, tuple(override_tensor)
        self.no_repack = no_repack
        self.model_kwargs = model_kwargs
        self.model = None
        self.ctx = None
        self.profile: SteeringProfile = SteeringProfile(name="untitled")
        self.profile_path: Path | None = None
        self.steering_enabled = True
        self.strength = 1.0
        self.allow_mismatch = False  # apply a profile made for another model when its entries fit this one
        self._frozen: SteeringProfile | None = None  # copy handed to the context; remade after every edit
        self._frozen_key: tuple | None = None
        self._lock = threading.Lock()  # one generation at a time
        self.last: _Reply | None = None
        self.notice = ""  # something the UI should tell after load() (e.g. the demo model fallback)
        self.profile_notice = ""  # after load(): the working profile was dropped (made for another model)
        self.warnings: list[str] = []  # profile warnings not yet shown (take_warnings)

    # -- model --

    def load(self) -> None:
        """Load the model (slow: call from a worker thread). Raises ModelFileError, NotMoEError, ..."""
        from moe_gguf.engine.model import MoEModel

        self.notice = ""
        path = self.model_path
        if path is None:
            path, self.notice = default_model_path()
        kw = dict(self.model_kwargs)
        if self.cpu_moe or self.n_cpu_moe or self.override_tensor:
            from moe_gguf.engine.offload import Placement

            kw["placement"] = Placement(self.override_tensor, self.cpu_moe, self.n_cpu_moe)
        if self.no_repack:
            kw["extra_bufts"] = False
        model = MoEModel(path, n_ctx=self.n_ctx, n_gpu_layers=self.n_gpu_layers, n_threads=self.threads,
                         expert_used_count=self.expert_used_count, **kw)
        try:
            ctx = model.context(n_seq_max=2)
        except Exception:
            model.close()
            raise
        self.close()
        self.model, self.ctx, self.model_path = model, ctx, Path(path)
        self.profile_notice = self._fit_profile()
        self._frozen = None

    def _fit_profile(self) -> str:
        """After loading a model: keep the working profile if it fits; a profile made for another model is dropped
        (or, with allow_mismatch, kept when every entry fits). Returns what the user should be told, or ""."""
        topo = self.topology
        if not self.profile.entries:
            if self.profile.model is None or self.profile.model != topo.fingerprint():
                self.profile = SteeringProfile.for_model(topo, name=self.profile.name or "untitled")
                self.profile_path = None
            return ""
        try:
            self._validate(self.profile)
        except ModelMismatchError:
            name = self.profile.name or "untitled"
            self.new_profile()
            return (f"Profile {name!r} was made for another model and is no longer applied. To apply it anyway, "
                    "switch on 'allow other model' in the Steer tab and load it again.")
        except ProfileError as e:
            name = self.profile.name or "untitled"
            self.new_profile()
            return f"Profile {name!r} does not fit {topo.name} and is no longer applied: {e}"
        if self.profile.model is not None and self.profile._mismatches(topo):
            return f"Profile {self.profile.name or 'untitled'!r} was made for another model; applied (allow other model is on)."
        return ""

    @property
    def ready(self) -> bool:
        return self.model is not None

    @property
    def topology(self):
        return None if self.model is None else self.model.topology

    @property
    def model_name(self) -> str:
        if self.model is not None:
            return self.model.topology.name
        return self.model_path.name if self.model_path else "demo model"

    def close(self, timeout: float = 10.0) -> None:
        """Free the model; waits (up to `timeout` s) for a generation that is stopping to let go of it."""
        got = self._lock.acquire(timeout=timeout)
        try:
            if self.ctx is not None:
                self.ctx.close()
                self.ctx = None
            if self.model is not None:
                self.model.close()
                self.model = None
        finally:
            if got:
                self._lock.release()

    # -- steering profile --

    def new_profile(self, name: str = "untitled") -> None:
        self.profile = SteeringProfile.for_model(self.topology, name=name) if self.topology else SteeringProfile(name=name)
        self.profile_path = None
        self._frozen = None

    def load_profiles(self, paths: Sequence[str | os.PathLike]) -> SteeringProfile:
        """Load, combine and check profiles against the model; the working profile is unchanged on error.
        Warnings (a profile made for a same-shape model with other weights) are left in self.warnings."""
        profiles = [SteeringProfile.load(p) for p in paths]
        profile = SteeringProfile.combine(profiles)
        if self.topology is not None:
            self._validate(profile)
        self.profile = profile
        self.profile_path = Path(paths[0]) if len(paths) == 1 else None
        self._frozen = None
        return profile

    def _validate(self, profile: SteeringProfile) -> None:
        """Check `profile` against the model; its warnings (ModelWeightsWarning) go to self.warnings, in words."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ModelWeightsWarning)
            profile.validate(self.topology, allow_mismatch=self.allow_mismatch)
        self.warnings += [str(w.message) for w in caught if issubclass(w.category, ModelWeightsWarning)]

    def take_warnings(self) -> list[str]:
        out, self.warnings = self.warnings, []
        return out

    def save_profile(self, path: str | os.PathLike) -> Path:
        path = Path(path).expanduser()
        if path.suffix != ".json":
            path = path.with_name(path.name + ".json")
        if self.profile.model is None and self.topology is not None:
            self.profile.model = self.topology.fingerprint()
        if not self.profile.name or self.profile.name == "untitled":
            self.profile.name = path.stem
        self.profile.save(path)
        self.profile_path = path
        return path

    def _edit(self, change) -> None:
        candidate = copy.deepcopy(self.profile)
        change(candidate)
        candidate.validate(self.topology) if self.topology is not None else candidate.validate()
        self.profile = candidate
        self._frozen = None

    def add_entry(self, layer: int, expert: int, action: str, value: float | None = None) -> None:
        """Add a steering entry; ProfileError (naming the problem) if it does not fit the model or the profile."""
        if action not in ACTIONS:
            raise ProfileError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
        if action in ("bias", "scale"):
            if value is None:
                raise ProfileError(f"action {action!r} needs a value")
            self._edit(lambda p: getattr(p, action)(layer, expert, value))
        else:
            self._edit(lambda p: getattr(p, action)(layer, expert))

    def remove_entry(self, index: int) -> None:
        self._edit(lambda p: p.entries.pop(index))

    def set_schedule(self, apply_to: str = "all", after_tokens: int = 0, after_text: str | None = None) -> None:
        self._edit(lambda p: setattr(p, "schedule", Schedule(apply_to, after_tokens, after_text or None)))

    def set_strength(self, strength: float) -> None:
        self.profile.with_strength(strength)  # ProfileError if it makes a value leave the float range
        self.strength = float(strength)

    @property
    def steering_active(self) -> bool:
        """Whether the next reply is steered (steering on and the profile has entries)."""
        return self.steering_enabled and bool(self.profile.entries)

    def active_profile(self) -> SteeringProfile | None:
        """The profile the next reply is steered with (a frozen copy), or None when steering is off / empty.

        Called by generate() on the worker thread: it may clear the context's uploaded profiles."""
        if not self.steering_active:
            return None
        if self._frozen is None:
            self._frozen = copy.deepcopy(self.profile)
            topo = self.topology
            frozen = self._frozen
            if topo is not None and frozen.model is not None and frozen.model != topo.fingerprint():
                # made for another model (allowed by the user) or a same-shape one with other weights (the user
                # was warned when it was loaded): its entries were checked against this model then, so the copy
                # that steers carries this model's fingerprint (stream() validates without an allow_mismatch
                # switch, and would warn again on every reply)
                if frozen._mismatches(topo) and self.allow_mismatch:
                    frozen.validate(topo, allow_mismatch=True)
                    frozen.model = topo.fingerprint()
                elif not frozen._mismatches(topo):
                    frozen.model = topo.fingerprint()
            if self.ctx is not None:
                self.ctx.clear_steering()  # forget tables uploaded for earlier versions of the profile
        return self._frozen

    def steering_info(self) -> dict[str, Any]:
        """What a reply was steered with, for the conversation store."""
        return {"enabled": self.steering_active, "strength": self.strength,
                "profile": self.profile.to_dict() if self.profile.entries else None,
                "profile_path": str(self.profile_path) if self.profile_path else None}

    def chat_settings(self) -> dict[str, Any]:
        """What a conversation owns of the session (stored with it, restored on resume)."""
        return {"model_path": str(self.model_path) if self.model_path else None,
                "steering": {"enabled": self.steering_enabled, "strength": self.strength,
                             "allow_mismatch": self.allow_mismatch,
                             "profile": self.profile.to_dict(),
                             "profile_path": str(self.profile_path) if self.profile_path else None}}

    def restore_steering(self, saved: dict[str, Any]) -> list[str]:
        """Restore steering saved by chat_settings (or a reply's steering_info); returns what could not be
        restored, in words (the working profile is then an empty one: never one the chat did not use)."""
        problems: list[str] = []
        self.steering_enabled = bool(saved.get("enabled", True))
        path = saved.get("profile_path")
        if path is not None and not isinstance(path, str):
            saved = {**saved, "profile_path": None}
        self.allow_mismatch = bool(saved.get("allow_mismatch", False))
        strength = saved.get("strength", 1.0)
        ok = isinstance(strength, (int, float)) and not isinstance(strength, bool) and np.isfinite(strength)
        self.strength = float(strength) if ok else 1.0
        raw, path = saved.get("profile"), saved.get("profile_path")
        profile: SteeringProfile | None = None
        if isinstance(raw, dict) and not raw.get("entries"):  # an empty profile: nothing to restore but its name
            self.new_profile(str(raw.get("name") or "untitled"))
            return problems
        if raw:
            try:
                profile = SteeringProfile.from_dict(raw, source=path or "the chat's profile")
                if self.topology is not None:
                    self._validate(profile)
            except ProfileError as e:
                problems.append(f"its steering profile could not be restored: {e}")
                profile = None
        elif raw is not None and not isinstance(raw, dict):
            problems.append("its steering profile could not be read")
        elif path:  # only a path (an older store): read the file again
            try:
                profile = SteeringProfile.load(path)
                if self.topology is not None:
                    self._validate(profile)
            except ProfileError as e:
                problems.append(f"its steering profile could not be restored: {e}")
                profile = None
        if profile is None:
            self.new_profile()
            if problems:
                self.steering_enabled = False
        else:
            self.profile, self._frozen = profile, None
            self.profile_path = Path(path) if path else None
            if self.profile_path is not None and not self.profile_path.exists():
                problems.append(f"its profile file {self.profile_path} no longer exists (the chat's copy is used)")
                self.profile_path = None
        return problems

    def steered_cells(self) -> dict[tuple[int, int], str]:
        """(layer, expert) -> action of the working profile (for marking the heatmap)."""
        return {(e.layer, e.expert): e.action for e in self.profile.entries}

    # -- generation --

    def chat_messages(self, history: Sequence[dict], system_prompt: str | None) -> list[dict]:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return msgs + [{"role": m["role"], "content": m["content"]} for m in history]

    def prompt_tokens(self, history: Sequence[dict], system_prompt: str | None, max_tokens: int, n_seq: int = 1
                      ) -> tuple[list[int], int, int]:
        """Tokens of the chat prompt that fit the context with room for the reply: (tokens, dropped, max_tokens).

        n_seq sequences (compare mode: 2) share the context, each holding the prompt and its reply, so each gets
        1/n_seq of it. The oldest turns are left out when the conversation no longer fits; max_tokens shrinks
        to what is left.
        """
        assert self.model is not None, "load() first"
        history = list(history)
        dropped = 0
        per_seq = self.n_ctx_actual // n_seq
        while True:
            text = self.model.chat_prompt(self.chat_messages(history, system_prompt))
            tokens = self.model.tokenize(text, add_bos=False)
            if len(tokens) + max_tokens <= per_seq or len(history) <= 1:
                break
            history.pop(0)
            dropped += 1
        room = per_seq - len(tokens)
        if room < 1:
            where = f"the context of {self.n_ctx_actual}" + (f" shared by {n_seq} replies (compare mode)" if n_seq > 1 else "")
            raise ValueError(f"the message is {len(tokens)} tokens, more than {where}; "
                             "shorten it or restart with a larger context (-c)")
        return tokens, dropped, min(max_tokens, room)

    @property
    def n_ctx_actual(self) -> int:
        return self.ctx.n_ctx if self.ctx is not None else self.n_ctx

    def generate(self, history: Sequence[dict], *, system_prompt: str | None = None, sampling: Sampling | None = None,
                 compare: bool = False, stop: threading.Event | None = None) -> Iterator[ReplyUpdate]:
        """Stream a reply to `history` (dicts with role, content); with compare, also an unsteered one in the same batch.

        Runs on the worker thread. Set `stop` to end early: the last update has done=True, stopped=True.
        """
        from moe_gguf.engine.context import Request

        if self.model is None or self.ctx is None:
            raise RuntimeError("no model loaded")
        sampling = sampling or Sampling()
        seed = sampling.seed if sampling.seed is not None else secrets.randbelow(2**31)
        with self._lock:
            tokens, dropped, max_tokens = self.prompt_tokens(history, system_prompt, sampling.max_tokens,
                                                             2 if compare else 1)
            profile = self.active_profile()
            requests = [Request(tokens, profile, max_tokens, self.strength)]
            if compare:
                requests.append(Request(tokens, None, max_tokens))
            topo = self.model.topology
            n_prompt = len(tokens)
            recorders = [RoutingRecorder(topo.n_layer, topo.n_expert, token_filter=_seq_filter(s, n_prompt), traces=True)
                         for s in range(len(requests))]
            reply = self.last = _Reply(n_prompt, recorders)
            think_end: list[int | None] = [None] * len(requests)
            t0 = time.perf_counter()
            t_first: float | None = None
            n_first = 0
            with self.ctx.recording(RouteTee(*recorders)):
                # a chat's earlier turns stay in the KV cache while the steering is unchanged
                events = self.ctx.stream(requests, temperature=sampling.temperature, top_p=sampling.top_p,
                                         seed=seed, reuse_prefix=True)
                try:
                    for ev in events:
                        now = time.perf_counter()
                        n_gen = sum(len(c.tokens) for c in ev.completions)
                        if t_first is None:
                            t_first, n_first = now, n_gen
                        if now > t_first and n_gen > n_first:  # decode speed, once two steps are done
                            rate = (n_gen - n_first) / (now - t_first)
                        else:  # until then: including the prompt
                            rate = n_gen / (now - t0) if n_gen and now > t0 else None
                        stopped = stop is not None and stop.is_set() and not ev.done
                        reply.tokens = [list(c.tokens) for c in ev.completions]
                        for i, c in enumerate(ev.completions):  # one token per step: the one completing </think>
                            if think_end[i] is None and THINK_CLOSE in c.text:
                                think_end[i] = len(c.tokens)
                        reply.think_end = list(think_end)
                        yield ReplyUpdate(
                            texts=[c.text for c in ev.completions], tokens=reply.tokens, n_prompt=n_prompt,
                            max_tokens=max_tokens, elapsed=now - t0, tokens_per_s=rate,
                            ctx_used=n_prompt + max(len(c.tokens) for c in ev.completions), n_ctx=self.n_ctx_actual,
                            selections=[r.record.selections.copy() for r in recorders],
                            routed=[r.record.tokens.copy() for r in recorders],
                            done=ev.done or stopped, stopped=stopped,
                            finish=["stopped" if stopped else c.finish_reason for c in ev.completions],
                            steered_from=[c.steered_from for c in ev.completions], dropped=dropped, seed=seed,
                            think_end=list(think_end))
                        if stopped:
                            break
                finally:
                    events.close()

    def token_routes(self, index: int, seq: int = 0) -> list[TokenTrace] | None:
        """Routing of generated token `index` of the last reply, per layer; None if it was never decoded
        (the last token of a reply cut by max tokens is sampled but not fed back)."""
        if self.last is None:
            return None
        routes = self.last.routes(seq, self.last.n_prompt + index)
        return routes or None

    def routing_summary(self, texts: Sequence[str] = ()) -> dict[str, Any] | None:
        """The last reply's routing, for the store: per MoE layer × expert selection counts of its generated
        tokens, thinking and answer apart, the token ids, and (when small) each token's experts per layer.

        texts: the reply texts; a reply that thinks from its first token (its template opened <think>) but
        never closed it counts as thinking throughout."""
        if self.last is None or self.model is None:
            return None
        topo = self.model.topology
        layers = list(topo.moe_layers)
        reply = self.last
        out: dict[str, Any] = {"version": 1, "moe_layers": layers, "n_expert": topo.n_expert, "seqs": []}
        for seq, rec in enumerate(reply.recorders):
            tokens = reply.tokens[seq] if seq < len(reply.tokens) else []
            end = reply.think_end[seq] if seq < len(reply.think_end) else None
            text = texts[seq] if seq < len(texts) else ""
            if end is None and text.lstrip().startswith(THINK_OPEN):
                end = len(tokens)  # still thinking when it stopped
            n_think = 0 if end is None else end
            sel = np.zeros((2, topo.n_layer, topo.n_expert), np.int64)
            routed = np.zeros((2, topo.n_layer), np.int64)
            routes: dict[int, list[list[int]]] = {}
            traces = rec.traces[:len(rec.traces)]
            keep_routes = len(tokens) * len(layers) <= MAX_STORED_ROUTES
            for t in traces:
                i = t.pos - reply.n_prompt
                if not 0 <= i < len(tokens):
                    continue
                part = 0 if i < n_think else 1
                sel[part, t.layer, t.experts] += 1
                routed[part, t.layer] += 1
                if keep_routes:
                    routes.setdefault(i, []).append([int(t.layer), [int(e) for e in t.experts],
                                                     [round(float(w), 2) for w in t.weights]])
            entry: dict[str, Any] = {
                "tokens": [int(x) for x in tokens], "think_end": end,
                "think": {"sel": sel[0][layers].tolist(), "routed": routed[0][layers].tolist()},
                "answer": {"sel": sel[1][layers].tolist(), "routed": routed[1][layers].tolist()},
            }
            if keep_routes:
                entry["routes"] = [routes.get(i, []) for i in range(len(tokens))]
            out["seqs"].append(entry)
        return out

    def token_text(self, token: int) -> str:
        """The text of one token; "" without a model, "�" for an id this model does not have (a stored reply
        made on another model)."""
        if self.model is None:
            return ""
        if not isinstance(token, int) or not 0 <= token < self.model.llama.n_vocab():
            return "\ufffd"
        return self.model.detokenize([token])
