"""The raw llama.cpp handles behind a MoEModel: its contexts (freed once, before the model) and the steering
profiles uploaded to each context."""

from __future__ import annotations

import ctypes
import threading
from typing import TYPE_CHECKING

import numpy as np

from moe_gguf.engine import _lib
from moe_gguf.errors import ContextClosedError
from moe_gguf.formats.profile import SteeringProfile

if TYPE_CHECKING:
    from moe_gguf.engine.model import MoEModel


def low():
    _lib.lib()  # raises PatchMissingError with the fixing command
    from llama_cpp import llama_cpp as low

    return low




class ContextRegistry:
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


class Steering:
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
        self._drop_unused()

    def _drop_unused(self) -> None:
        """Free uploaded profiles no sequence uses any more, so they do not pile up in the context."""
        lib = _lib.lib()
        used = {self._default, *self._seq.values()}
        for old in [p for p in self._profiles if p not in used]:
            lib.llama_moe_steer_clear(self.ctx, old)
            del self._profiles[old]
            self._ids = {k: v for k, v in self._ids.items() if v != old}

    def reset_seq(self, seq_id: int) -> None:
        """Sequence ``seq_id`` goes back to the default profile (the one set for every sequence, or none)."""
        if seq_id not in self._seq:
            return
        lib = _lib.lib()
        _lib.check(lib.llama_moe_steer_seq(self.ctx, seq_id, self._default), f"sequence {seq_id}")
        del self._seq[seq_id]
        self._drop_unused()

    def clear(self) -> None:
        lib = _lib.lib()
        _lib.check(lib.llama_moe_steer_seq(self.ctx, -1, 0), "clear")
        _lib.check(lib.llama_moe_steer_clear(self.ctx, -1), "clear")
        self._ids.clear()
        self._profiles.clear()
        self._default, self._seq = 0, {}


def set_n_expert_used(ctx, n: int, layer: int) -> None:
    _lib.check(_lib.lib().llama_moe_set_n_expert_used(ctx, layer, n), f"{n} experts per token in layer {layer}")
