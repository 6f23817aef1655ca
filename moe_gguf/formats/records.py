"""Routing records: how often and how strongly each expert was chosen, per layer.

A RoutingRecord is additive: two records of the same model merge by addition, so probes run in
pieces or on several machines combine exactly. It is saved as ``.npz`` (arrays) plus a JSON
sidecar (metadata), both written atomically.
"""

from __future__ import annotations

import ctypes
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from moe_gguf._io import atomic_write_all
from moe_gguf.errors import CountFileError

FORMAT = "moe-gguf-routing"
VERSION = 1

# (seq_id, pos) -> count this token?
TokenFilter = Callable[[np.ndarray, np.ndarray], np.ndarray]


class RouteSink(Protocol):
    """What receives routing capture: ``on_route(route)`` once per MoE layer and ubatch, with a
    ``llama_moe_route`` (valid only during the call; copy what you keep). RoutingRecorder is one."""

    def on_route(self, route: Any) -> None: ...


class RouteTee:
    """One capture feeding several sinks (e.g. a recorder per sequence), or plain functions of the route."""

    def __init__(self, *sinks: RouteSink | Callable[[Any], None]) -> None:
        self.sinks = [s.on_route if hasattr(s, "on_route") else s for s in sinks]

    def on_route(self, route: Any) -> None:
        for sink in self.sinks:
            sink(route)


@dataclass
class TokenTrace:
    """Routing of one token in one layer."""

    layer: int
    seq_id: int
    pos: int
    token: int
    experts: np.ndarray  # [n_expert_used] int32
    weights: np.ndarray  # [n_expert_used] float32


@dataclass
class RoutingRecord:
    """Counts per [layer, expert]: selections, summed routing weights; tokens routed per layer."""

    n_layer: int
    n_expert: int
    selections: np.ndarray = None  # type: ignore[assignment]  # int64 [n_layer, n_expert]
    weight_sum: np.ndarray = None  # type: ignore[assignment]  # float64 [n_layer, n_expert]
    tokens: np.ndarray = None  # type: ignore[assignment]  # int64 [n_layer]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.selections is None:
            self.selections = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)
        if self.weight_sum is None:
            self.weight_sum = np.zeros((self.n_layer, self.n_expert), dtype=np.float64)
        if self.tokens is None:
            self.tokens = np.zeros(self.n_layer, dtype=np.int64)

    def frequency(self) -> np.ndarray:
        """Fraction of routed tokens that selected each expert, [n_layer, n_expert]."""
        return self.selections / np.maximum(self.tokens, 1)[:, None]

    def __add__(self, other: RoutingRecord) -> RoutingRecord:
        self._check_compatible(other)
        meta = dict(self.meta)
        runs = merge_run_ids(self.meta, other.meta, what="routing record")
        if runs:
            meta["run_ids"] = runs
        return RoutingRecord(
            self.n_layer, self.n_expert,
            self.selections + other.selections, self.weight_sum + other.weight_sum, self.tokens + other.tokens,
            meta,
        )

    def _check_compatible(self, other: RoutingRecord) -> None:
        if (self.n_layer, self.n_expert) != (other.n_layer, other.n_expert):
            raise ValueError(
                f"cannot merge routing records of shape {self.n_layer}x{self.n_expert} and {other.n_layer}x{other.n_expert}"
            )
        a, b = self.meta.get("model"), other.meta.get("model")
        if a and b and a != b:
            raise ValueError(f"cannot merge routing records of different models: {a} vs {b}")

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.npz) and ``path.json`` atomically.

        The metadata is also stored inside the .npz (``record_meta``), which load() prefers: the pair of files
        cannot be renamed into place as one, so a process killed between the two renames leaves a sidecar
        that may be one save behind, but the .npz is always whole and self-consistent.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        self.meta.setdefault("run_ids", [new_run_id()])  # the identity merges check: one run is never added twice
        meta = {"format": FORMAT, "version": VERSION, "n_layer": self.n_layer, "n_expert": self.n_expert, **self.meta}
        blob = json.dumps(meta, indent=2).encode()
        atomic_write_all(make_dirs=True, files=[
            (path, lambda f: np.savez(f, selections=self.selections, weight_sum=self.weight_sum, tokens=self.tokens,
                                      record_meta=np.frombuffer(blob, dtype=np.uint8))),
            (path.with_suffix(".json"), lambda f: f.write(blob)),
        ])
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingRecord:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        try:
            with np.load(path, allow_pickle=False) as z:
                sel, ws, tok = z["selections"], z["weight_sum"], z["tokens"]
                # not "meta.json": that names a probe result (moe_gguf.formats.prune.load_counts tells them apart by it)
                inner = z["record_meta"].tobytes() if "record_meta" in z.files else None
        except FileNotFoundError as e:
            raise CountFileError(f"routing record not found: {path}") from e
        except Exception as e:  # a damaged or foreign file fails in zipfile, numpy's npy parser, ... in many ways
            raise CountFileError(f"{path}: not a moe-gguf routing record ({type(e).__name__}: {e})") from e
        meta: dict = {}
        side = path.with_suffix(".json")
        if inner is not None or side.exists():  # the copy inside the .npz (newer files) wins over the sidecar
            where = f"{path} (record_meta)" if inner is not None else str(side)
            try:
                meta = json.loads(inner.decode("utf-8") if inner is not None else side.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise CountFileError(f"{where}: unreadable routing record metadata ({e})") from e
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                fmt = meta.get("format") if isinstance(meta, dict) else None
                raise CountFileError(f"{where}: not a moe-gguf routing record (format {fmt!r})")
        if sel.ndim != 2 or ws.shape != sel.shape or tok.shape != (sel.shape[0],):
            raise CountFileError(f"{path}: inconsistent array shapes {sel.shape}, {ws.shape}, {tok.shape}")
        for k in ("n_layer", "n_expert"):
            if k in meta and meta[k] != sel.shape[k == "n_expert"]:
                raise CountFileError(f"{path}: arrays of shape {sel.shape} but its metadata says {k} = {meta[k]!r}")
        sel, ws, tok = check_counts(path, sel, ws, tok)
        for k in ("format", "version", "n_layer", "n_expert"):
            meta.pop(k, None)
        return cls(sel.shape[0], sel.shape[1], sel, ws, tok, meta)


def new_run_id() -> str:
    """A fresh id for the counts of one run (a probe, a recording), stored in its file's metadata."""
    return uuid.uuid4().hex[:16]


def run_ids(meta: dict) -> list[str]:
    """The runs whose counts a file holds (older files: none recorded)."""
    ids = meta.get("run_ids")
    return [x for x in ids if isinstance(x, str)] if isinstance(ids, list) else []


def merge_run_ids(a: dict, b: dict, *, what: str) -> list[str]:
    """The run ids of a + b; ValueError if a run is in both (its counts would be added twice)."""
    ra, rb = run_ids(a), run_ids(b)
    twice = sorted(set(ra) & set(rb))
    if twice:
        raise ValueError(f"the same {what} run ({', '.join(twice)}) is in both: merging would count it twice; "
                         "merge each run's file once")
    return ra + [x for x in rb if x not in ra]


def check_counts(where: Path | str, sel: np.ndarray, ws: np.ndarray, tok: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts read from a file, as int64 / float64 / int64; CountFileError naming `where` if they cannot be counts."""
    for name, a, kinds in (("selections", sel, "iu"), ("weight_sum", ws, "iuf"), ("tokens", tok, "iu")):
        if a.dtype.kind not in kinds:
            raise CountFileError(f"{where}: '{name}' holds {a.dtype} values, not counts")
        if a.size and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CountFileError(f"{where}: '{name}' holds non-finite values")
        if a.size and a.min() < 0:
            raise CountFileError(f"{where}: '{name}' holds negative values")
        if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
            raise CountFileError(f"{where}: '{name}' holds values beyond the int64 range")
    return sel.astype(np.int64), ws.astype(np.float64), tok.astype(np.int64)


class RoutingRecorder:
    """Receives the patched library's routing callback and accumulates a RoutingRecord.

    ``token_filter(seq_ids, positions) -> bool mask`` picks which tokens count (e.g. only the
    prompt, or only response tokens); ``traces=True`` also keeps every token's routing.
    """

    def __init__(self, n_layer: int, n_expert: int, *, token_filter: TokenFilter | None = None,
                 traces: bool = False, meta: dict | None = None) -> None:
        self.record = RoutingRecord(n_layer, n_expert, meta=dict(meta or {}))
        self.token_filter = token_filter
        self.keep_traces = traces
        self.traces: list[TokenTrace] = []
        self.errors: list[str] = []

    def on_route(self, route: ctypes.Structure) -> None:
        """Handle one llama_moe_route (called from llama_decode's thread)."""
        n, k, layer = route.n_tokens, route.n_expert_used, route.il
        if n <= 0 or not (0 <= layer < self.record.n_layer):
            return
        ids = np.ctypeslib.as_array(route.ids, shape=(n, k))
        weights = np.ctypeslib.as_array(route.weights, shape=(n, k))
        seq = np.ctypeslib.as_array(route.seq_id, shape=(n,))
        pos = np.ctypeslib.as_array(route.pos, shape=(n,))
        toks = np.ctypeslib.as_array(route.token, shape=(n,)) if route.token else np.full(n, -1, dtype=np.int32)
        if self.token_filter is not None:
            mask = np.asarray(self.token_filter(seq, pos), dtype=bool)
            ids, weights, seq, pos, toks = ids[mask], weights[mask], seq[mask], pos[mask], toks[mask]
            n = len(seq)
            if n == 0:
                return
        rec = self.record
        rec.selections[layer] += np.bincount(ids.ravel(), minlength=rec.n_expert)[: rec.n_expert]
        rec.weight_sum[layer] += np.bincount(ids.ravel(), weights=weights.ravel(), minlength=rec.n_expert)[: rec.n_expert]
        rec.tokens[layer] += n
        if self.keep_traces:
            for i in range(n):
                self.traces.append(TokenTrace(layer, int(seq[i]), int(pos[i]), int(toks[i]), ids[i].copy(), weights[i].copy()))
