"""Probing: routing counts per condition over a JSONL dataset, batched, resumable, mergeable.

Input: the study JSONL format (moe_gguf.study.items): prompt, label, and optional response, answer,
target, pair_id, chat; other fields are kept as metadata.

Which tokens count (the study must say which it used):
- "prompt":    the prompt's tokens (the request as the model reads it);
- "response":  the given response, teacher-forced after the prompt;
- "generated": the model's own greedy continuation (generated, then re-read teacher-forced).

The result holds, per label, a RoutingRecord (selections, summed weights, tokens per layer) and
per item its own [layer, expert] selection map (for fTRI-style per-prompt maps and bootstrap).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_gguf._io import atomic_write
from moe_gguf.engine.model import MoEModel
from moe_gguf.errors import CountFileError, ProbeInputError
from moe_gguf.formats.records import RouteTee, RoutingRecord, check_counts, merge_run_ids, new_run_id
from moe_gguf.study.items import MAX_LABEL, StudyItem, load_items, parse_item  # noqa: F401  (re-exported)

FORMAT = "moe-gguf-probe"
VERSION = 1
TOKEN_MODES = ("prompt", "response", "generated")



ProbeItem = StudyItem  # the probe's name for a line of the study JSONL format
load_jsonl = load_items


@dataclass
class ProbeResult:
    """Routing counts per label plus per-item maps; additive across runs of the same model and mode."""

    n_layer: int
    n_expert: int
    token_mode: str
    records: dict[str, RoutingRecord] = field(default_factory=dict)
    item_labels: list[str] = field(default_factory=list)
    item_pairs: list[str | None] = field(default_factory=list)
    item_maps: np.ndarray | None = None  # int32 [n_items, n_layer, n_expert] selections per item
    item_tokens: np.ndarray | None = None  # int32 [n_items, n_layer] tokens routed per item
    item_wsum: np.ndarray | None = None  # float32 [n_items, n_layer, n_expert] summed routing weights per item
    meta: dict = field(default_factory=dict)

    def record(self, label: str) -> RoutingRecord:
        if label not in self.records:
            self.records[label] = RoutingRecord(self.n_layer, self.n_expert)
        return self.records[label]

    @property
    def labels(self) -> list[str]:
        return sorted(self.records)

    def __add__(self, other: ProbeResult) -> ProbeResult:
        if (self.n_layer, self.n_expert, self.token_mode) != (other.n_layer, other.n_expert, other.token_mode):
            raise ValueError(f"cannot merge probes of {self.n_layer}x{self.n_expert} ({self.token_mode} tokens) and "
                             f"{other.n_layer}x{other.n_expert} ({other.token_mode} tokens)")
        a, b = self.meta.get("model"), other.meta.get("model")
        if a and b and a != b:
            raise ValueError(f"cannot merge probes of different models: {a} vs {b}")
        runs = merge_run_ids(self.meta, other.meta, what="probe")
        if not runs and self.meta.get("input_hash") and self.meta.get("input_hash") == other.meta.get("input_hash"):
            raise ValueError("both hold the counts of the same probe inputs and options (input hash "
                             f"{self.meta['input_hash']}): merging would count them twice; merge each run's file once")
        out = ProbeResult(self.n_layer, self.n_expert, self.token_mode, meta=dict(self.meta))
        out.meta.pop("input_hash", None)  # a merge is no probe run: `probe -o` never resumes into it
        out.meta["run_ids"] = runs
        for lab in set(self.records) | set(other.records):
            zero = RoutingRecord(self.n_layer, self.n_expert)
            out.records[lab] = self.records.get(lab, zero) + other.records.get(lab, zero)
        out.item_labels = self.item_labels + other.item_labels
        out.item_pairs = self.item_pairs + other.item_pairs
        out.item_maps = _cat(self.item_maps, other.item_maps)
        out.item_tokens = _cat(self.item_tokens, other.item_tokens)
        out.item_wsum = _cat(self.item_wsum, other.item_wsum)
        out.meta["n_items"] = len(out.item_labels)
        return out

    # -- files: one .npz, written atomically --

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        for lab in self.records:  # refused before anything is written: such a file could not be read back
            if not isinstance(lab, str) or "\0" in lab or len(lab.encode("utf-8", "surrogatepass")) > 65000:
                raise ProbeInputError(f"{path}: label {lab!r:.80} cannot be saved: a label names zip entries, so it "
                                      "must be a string without NUL characters, of at most 65,000 bytes")
        for lab, rec in self.records.items():
            arrays[f"selections/{lab}"] = rec.selections
            arrays[f"weight_sum/{lab}"] = rec.weight_sum
            arrays[f"tokens/{lab}"] = rec.tokens
        if self.item_maps is not None:
            arrays["item_maps"] = self.item_maps
            arrays["item_tokens"] = self.item_tokens
            arrays["item_wsum"] = self.item_wsum
        meta = {"format": FORMAT, "version": VERSION, "n_layer": self.n_layer, "n_expert": self.n_expert,
                "token_mode": self.token_mode, "labels": self.labels, "item_labels": self.item_labels,
                "item_pairs": self.item_pairs, "meta": self.meta}
        arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write(path, buf.getvalue(), make_dirs=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProbeResult:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta.json"]).decode())
                _check_meta(meta)
                res = cls(meta["n_layer"], meta["n_expert"], meta["token_mode"], meta=meta.get("meta", {}))
                for lab in meta["labels"]:
                    sel, ws, tok = z[f"selections/{lab}"], z[f"weight_sum/{lab}"], z[f"tokens/{lab}"]
                    if sel.shape != (res.n_layer, res.n_expert) or ws.shape != sel.shape or tok.shape != (res.n_layer,):
                        raise ValueError(f"label {lab!r}: arrays of shape {sel.shape}, {ws.shape}, {tok.shape}")
                    res.records[lab] = RoutingRecord(res.n_layer, res.n_expert, *check_counts(f"{path}: label {lab!r}", sel, ws, tok))
                res.item_labels = list(meta["item_labels"])
                res.item_pairs = list(meta["item_pairs"])
                if "item_maps" in z:
                    res.item_maps, res.item_tokens, res.item_wsum = z["item_maps"], z["item_tokens"], z["item_wsum"]
        except FileNotFoundError as e:
            raise CountFileError(f"probe result not found: {path}") from e
        except CountFileError:
            raise
        except Exception as e:  # a damaged or foreign file fails in zipfile, numpy's npy parser, json... in many ways
            raise CountFileError(f"{path}: not a readable moe-gguf probe result ({type(e).__name__}: {e})") from e
        n = len(res.item_labels)
        if res.item_maps is not None:
            shapes = (res.item_maps.shape, res.item_tokens.shape, res.item_wsum.shape)
            if shapes != ((n, res.n_layer, res.n_expert), (n, res.n_layer), (n, res.n_layer, res.n_expert)):
                raise CountFileError(f"{path}: per-item arrays of shapes {shapes} for {n} items")
            maps, wsum, tokens = check_counts(f"{path}: per-item arrays", res.item_maps, res.item_wsum, res.item_tokens)
            res.item_maps, res.item_wsum, res.item_tokens = maps.astype(np.int32), wsum.astype(np.float32), tokens.astype(np.int32)
        return res


def _check_meta(meta: object) -> None:
    """ValueError unless `meta` (a probe file's meta.json) has the fields and types ProbeResult needs."""
    if not isinstance(meta, dict):
        raise ValueError(f"meta.json is {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"version {version!r}")
    if version > VERSION:
        raise ValueError(f"version {version} is newer than this moe-gguf ({VERSION}): upgrade")
    for k in ("n_layer", "n_expert"):
        if not isinstance(meta.get(k), int) or isinstance(meta[k], bool) or meta[k] < 0:
            raise ValueError(f"{k} {meta.get(k)!r} is not a count")
    if meta.get("token_mode") not in TOKEN_MODES:
        raise ValueError(f"token_mode {meta.get('token_mode')!r}")
    labels, items, pairs = meta.get("labels"), meta.get("item_labels"), meta.get("item_pairs")
    for k, v in (("labels", labels), ("item_labels", items)):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"{k} is not a list of strings")
    if not isinstance(pairs, list) or len(pairs) != len(items) or not all(x is None or isinstance(x, str) for x in pairs):
        raise ValueError("item_pairs is not a list of strings or nulls, one per item")
    if not set(items) <= set(labels):
        raise ValueError(f"items of unknown labels {sorted(set(items) - set(labels))[:5]}")
    if not isinstance(meta.get("meta", {}), dict):
        raise ValueError("meta is not an object")


def _cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    if b is None:
        return a
    return np.concatenate([a, b])


def dataset_hash(items: Sequence[ProbeItem], **options) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it.prompt, it.label, it.response, it.pair_id, it.chat]).encode())
    return h.hexdigest()[:16]


def _tokens_for(model: MoEModel, it: ProbeItem, chat: bool) -> tuple[list[int], int]:
    """(prompt tokens, and the response tokens appended), as the model would see them."""
    use_chat = chat if it.chat is None else it.chat
    if use_chat:
        text = model.chat_prompt([{"role": "user", "content": it.prompt}])
        toks = model.tokenize(text, add_bos=False)
    else:
        toks = model.tokenize(it.prompt)
    return toks, len(toks)


def probe(model: MoEModel, items: Sequence[ProbeItem], *, token_mode: str = "prompt", chat: bool = True,
          n_seq: int = 8, max_new_tokens: int = 32, out: str | os.PathLike | None = None,
          progress: Callable[[int, int], None] | None = None, overwrite: bool = False) -> ProbeResult:
    """Route ``items`` through the model and count, per label, the experts chosen on the chosen tokens.

    With ``out``, the result is saved after every batch together with the position reached; a
    probe started again with the same inputs and options continues from there, so an interrupted
    probe loses at most one batch of work and never counts an item twice. An existing ``out`` from other
    inputs, options or model (or a merge) raises CountFileError unless ``overwrite`` (then it is replaced; a file
    of the same run is still resumed).
    """
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"token_mode must be one of {TOKEN_MODES}, got {token_mode!r}")
    if token_mode == "response":
        missing = [i for i, it in enumerate(items) if not it.response]
        if missing:
            raise ProbeInputError(f"token_mode 'response' needs a 'response' in every item; item(s) {missing[:5]} have none")
    topo = model.topology
    key = dataset_hash(items, token_mode=token_mode, chat=chat, max_new_tokens=max_new_tokens,
                       model=topo.fingerprint_id())
    res: ProbeResult | None = None
    if out is not None and Path(out).exists():
        try:
            prev = ProbeResult.load(out)
        except CountFileError as e:
            if not overwrite:
                raise CountFileError(f"{e}; it would be overwritten: pass --overwrite (overwrite=True) to replace "
                                     "it, or write to another file") from e
            prev = None
        if prev is not None and prev.meta.get("input_hash") == key:
            res = prev  # the same run: resumed
        elif prev is not None and not overwrite:
            raise CountFileError(f"{out}: holds counts from other inputs, options or model "
                                 f"({len(prev.item_labels)} items, {prev.token_mode} tokens); resuming needs the same "
                                 "ones. Pass --overwrite (overwrite=True) to replace it, or write to another file and "
                                 "`moe-gguf merge` the two")
    if res is None:
        res = ProbeResult(topo.n_layer, topo.n_expert, token_mode,
                          meta={"model": topo.fingerprint(), "input_hash": key, "chat": chat, "n_items": 0,
                                "run_ids": [new_run_id()]},
                          item_maps=np.zeros((0, topo.n_layer, topo.n_expert), np.int32),
                          item_tokens=np.zeros((0, topo.n_layer), np.int32),
                          item_wsum=np.zeros((0, topo.n_layer, topo.n_expert), np.float32))
    start = len(res.item_labels)
    n_seq = max(1, min(n_seq, len(items)))
    with model.context(n_seq_max=n_seq, n_ctx=model.llama.n_ctx(), n_batch=max(512, model.llama.n_batch)) as ctx:
        for b0 in range(start, len(items), n_seq):
            batch = list(items[b0:b0 + n_seq])
            seqs, spans = [], []
            for it in batch:
                toks, n_prompt = _tokens_for(model, it, chat)
                if token_mode == "response":
                    toks = toks + model.tokenize(it.response or "", add_bos=False)
                    spans.append((n_prompt, len(toks)))
                elif token_mode == "prompt":
                    spans.append((0, n_prompt))
                seqs.append(toks)
            if token_mode == "generated":
                for s, toks in enumerate(seqs):
                    gen = ctx.generate(toks, max_tokens=max_new_tokens)
                    spans.append((len(toks), len(toks) + len(gen.tokens)))
                    seqs[s] = toks + gen.tokens
            for s, toks in enumerate(seqs):
                if len(toks) > ctx.n_ctx:
                    raise ProbeInputError(f"item {b0 + s}: {len(toks)} tokens do not fit the context of {ctx.n_ctx}")
            maps = np.zeros((len(batch), topo.n_layer, topo.n_expert), np.int64)
            wsum = np.zeros((len(batch), topo.n_layer, topo.n_expert), np.float64)
            ntok = np.zeros((len(batch), topo.n_layer), np.int64)

            def on_route(route, spans=spans, maps=maps, wsum=wsum, ntok=ntok) -> None:
                if getattr(route, "router", 0):  # a second top-k of the layer (grovemoe's chunk experts): not the steerable experts
                    return
                n, k, layer = route.n_tokens, route.n_expert_used, route.il
                ids = np.ctypeslib.as_array(route.ids, shape=(n, k))
                w = np.ctypeslib.as_array(route.weights, shape=(n, k))
                seq = np.ctypeslib.as_array(route.seq_id, shape=(n,))
                pos = np.ctypeslib.as_array(route.pos, shape=(n,))
                for s, (lo, hi) in enumerate(spans):
                    m = (seq == s) & (pos >= lo) & (pos < hi)
                    if m.any():
                        maps[s, layer] += np.bincount(ids[m].ravel(), minlength=topo.n_expert)
                        wsum[s, layer] += np.bincount(ids[m].ravel(), weights=w[m].ravel(), minlength=topo.n_expert)
                        ntok[s, layer] += int(m.sum())

            ctx.set_recorder(RouteTee(on_route))
            ctx.clear_memory()
            ctx.decode([(s, toks, 0) for s, toks in enumerate(seqs)], logits="route")
            ctx.set_recorder(None)
            for s, it in enumerate(batch):
                rec = res.record(it.label)
                rec.selections += maps[s]
                rec.weight_sum += wsum[s]
                rec.tokens += ntok[s]
            res.item_labels += [it.label for it in batch]
            res.item_pairs += [it.pair_id for it in batch]
            res.item_maps = np.concatenate([res.item_maps, maps.astype(np.int32)])
            res.item_tokens = np.concatenate([res.item_tokens, ntok.astype(np.int32)])
            res.item_wsum = np.concatenate([res.item_wsum, wsum.astype(np.float32)])
            res.meta["n_items"] = len(res.item_labels)
            if out is not None:
                res.save(out)
            if progress:
                progress(len(res.item_labels), len(items))
    return res
