"""The chat UI's controller: owns the MoEModel, its SteerContext and the working steering profile.

Screens call these methods and never touch llama.cpp or the model themselves. ``load`` and ``generate`` are
slow and run in worker threads; everything else is quick and runs on the UI thread. ``generate`` is a generator
of ReplyUpdate snapshots (text, speed, context use, routing counts), one per decode step.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from moe_gguf.tui.config import Sampling
from moe_gguf.tui.paths import cache_dir

from moe_gguf.errors import ProfileError
from moe_gguf.formats.profile import ACTIONS, Schedule, SteeringProfile
from moe_gguf.formats.records import RouteTee, RoutingRecorder, TokenTrace

DEMO_PRESET = "tiny-qwen3moe"


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


@dataclass
class _Reply:
    n_prompt: int
    recorders: list[RoutingRecorder]
    tokens: list[list[int]] = field(default_factory=list)
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
        self._frozen: SteeringProfile | None = None  # copy handed to the context; remade after every edit
        self._frozen_key: tuple | None = None
        self._lock = threading.Lock()  # one generation at a time
        self.last: _Reply | None = None
        self.notice = ""  # something the UI should tell after load() (e.g. the demo model fallback)

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
        if self.profile.model is None and not self.profile.entries:
            self.profile = SteeringProfile.for_model(model.topology, name="untitled")
        self._frozen = None

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
        """Load, combine and check profiles against the model; the working profile is unchanged on error."""
        profiles = [SteeringProfile.load(p) for p in paths]
        profile = SteeringProfile.combine(profiles)
        if self.topology is not None:
            profile.validate(self.topology)
        self.profile = profile
        self.profile_path = Path(paths[0]) if len(paths) == 1 else None
        self._frozen = None
        return profile

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
            if self.ctx is not None:
                self.ctx.clear_steering()  # forget tables uploaded for earlier versions of the profile
        return self._frozen

    def steering_info(self) -> dict[str, Any]:
        """What a reply was steered with, for the conversation store."""
        return {"enabled": self.steering_active, "strength": self.strength,
                "profile": self.profile.to_dict() if self.profile.entries else None,
                "profile_path": str(self.profile_path) if self.profile_path else None}

    def steered_cells(self) -> dict[tuple[int, int], str]:
        """(layer, expert) -> action of the working profile (for marking the heatmap)."""
        return {(e.layer, e.expert): e.action for e in self.profile.entries}

    # -- generation --

    def chat_messages(self, history: Sequence[dict], system_prompt: str | None) -> list[dict]:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return msgs + [{"role": m["role"], "content": m["content"]} for m in history]

    def prompt_tokens(self, history: Sequence[dict], system_prompt: str | None, max_tokens: int
                      ) -> tuple[list[int], int, int]:
        """Tokens of the chat prompt that fit the context with room for the reply: (tokens, dropped, max_tokens).

        The oldest turns are left out when the conversation no longer fits; max_tokens shrinks to what is left.
        """
        assert self.model is not None, "load() first"
        history = list(history)
        dropped = 0
        while True:
            text = self.model.chat_prompt(self.chat_messages(history, system_prompt))
            tokens = self.model.tokenize(text, add_bos=False)
            if len(tokens) + max_tokens <= self.n_ctx_actual or len(history) <= 1:
                break
            history.pop(0)
            dropped += 1
        room = self.n_ctx_actual - len(tokens)
        if room < 1:
            raise ValueError(f"the message is {len(tokens)} tokens, more than the context of {self.n_ctx_actual}; "
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
        with self._lock:
            tokens, dropped, max_tokens = self.prompt_tokens(history, system_prompt, sampling.max_tokens)
            profile = self.active_profile()
            requests = [Request(tokens, profile, max_tokens, self.strength)]
            if compare:
                requests.append(Request(tokens, None, max_tokens))
            topo = self.model.topology
            n_prompt = len(tokens)
            recorders = [RoutingRecorder(topo.n_layer, topo.n_expert, token_filter=_seq_filter(s, n_prompt), traces=True)
                         for s in range(len(requests))]
            reply = self.last = _Reply(n_prompt, recorders)
            t0 = time.perf_counter()
            t_first: float | None = None
            n_first = 0
            with self.ctx.recording(RouteTee(*recorders)):
                # a chat's earlier turns stay in the KV cache while the steering is unchanged
                events = self.ctx.stream(requests, temperature=sampling.temperature, top_p=sampling.top_p,
                                         seed=sampling.seed, reuse_prefix=True)
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
                        yield ReplyUpdate(
                            texts=[c.text for c in ev.completions], tokens=reply.tokens, n_prompt=n_prompt,
                            max_tokens=max_tokens, elapsed=now - t0, tokens_per_s=rate,
                            ctx_used=n_prompt + max(len(c.tokens) for c in ev.completions), n_ctx=self.n_ctx_actual,
                            selections=[r.record.selections.copy() for r in recorders],
                            routed=[r.record.tokens.copy() for r in recorders],
                            done=ev.done or stopped, stopped=stopped,
                            finish=["stopped" if stopped else c.finish_reason for c in ev.completions],
                            steered_from=[c.steered_from for c in ev.completions], dropped=dropped)
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

    def token_text(self, token: int) -> str:
        return self.model.detokenize([token]) if self.model is not None else ""
