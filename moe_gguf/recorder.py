"""Routing records: how often and how strongly each expert was chosen, per layer.

A RoutingRecord is additive: two records of the same model merge by addition, so probes run in
pieces or on several machines combine exactly. It is saved as ``.npz`` (arrays) plus a JSON
sidecar (metadata), both written atomically.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "moe-gguf-routing"
VERSION = 1

# (seq_id, pos) -> count this token?
TokenFilter = Callable[[np.ndarray, np.ndarray], np.ndarray]


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
        return RoutingRecord(
            self.n_layer, self.n_expert,
            self.selections + other.selections, self.weight_sum + other.weight_sum, self.tokens + other.tokens,
            dict(self.meta),
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
        """Write ``path`` (.npz) and ``path.json`` atomically."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        meta = {"format": FORMAT, "version": VERSION, "n_layer": self.n_layer, "n_expert": self.n_expert, **self.meta}
        _atomic_write(path, lambda f: np.savez(f, selections=self.selections, weight_sum=self.weight_sum, tokens=self.tokens))
        _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingRecord:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        try:
            with np.load(path, allow_pickle=False) as z:
                sel, ws, tok = z["selections"], z["weight_sum"], z["tokens"]
        except FileNotFoundError as e:
            raise ValueError(f"routing record not found: {path}") from e
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path}: not a moe-gguf routing record ({e})") from e
        meta: dict = {}
        side = path.with_suffix(".json")
        if side.exists():
            meta = json.loads(side.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"{side}: not a moe-gguf routing record (format {meta.get('format')!r})")
        if sel.ndim != 2 or ws.shape != sel.shape or tok.shape != (sel.shape[0],):
            raise ValueError(f"{path}: inconsistent array shapes {sel.shape}, {ws.shape}, {tok.shape}")
        for k in ("format", "version", "n_layer", "n_expert"):
            meta.pop(k, None)
        return cls(sel.shape[0], sel.shape[1], sel.astype(np.int64), ws.astype(np.float64), tok.astype(np.int64), meta)


def _atomic_write(path: Path, write: Callable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
