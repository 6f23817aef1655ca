"""Bake disabled experts into a smaller GGUF: the pruned model has fewer routed experts per MoE layer.

    report = prune_gguf("model.gguf", "model-pruned.gguf", profile=SteeringProfile.load("quiet.json"))
    report = prune_gguf("model.gguf", "model-75.gguf", counts=RoutingRecord.load("counts.npz"), keep_fraction=0.75)
    print(report.summary())

What is removed, per MoE layer, comes from one of:

- a steering profile's ``disable`` entries (or an explicit ``remove={layer: [expert, ...]}``), and/or
- a routing-count file (a RoutingRecord ``.npz``, or a ``moe-gguf probe`` result, all labels summed) with
  ``keep_fraction``: experts are ranked per layer by ``selections × weight_sum`` (how often an expert is
  chosen times how much routing weight it gets in total) and the lowest-ranked are removed. This is a
  REAP-like *proxy* from routing statistics alone, not REAP's score (which also weighs each expert's
  output norm, needing activations moe-gguf does not capture).

llama.cpp needs the same expert count in every MoE layer (and, with group-limited routing, in every
expert group), so every layer (group) loses the same number of experts: a layer whose list is shorter
is padded with its least-used experts from the counts; without counts, with the experts whose router rows
have the smallest L2 norm (a weight-only proxy read from the model itself: such experts get the smallest router
logits on average; give counts for measured usage). The report names every padded expert and how it was chosen.

The file is rewritten tensor by tensor without requantizing: per-expert tensors (``ffn_{gate,up,down}_exps``,
fused ``ffn_gate_up_exps``, their ``.bias``/``.scale``/``.input_scale``, the router ``ffn_gate_inp`` weight
rows and bias, the selection bias ``exp_probs_b``) are stored expert-major (the expert is ggml's outermost
dimension), so every expert is one contiguous byte range that holds whole quantization blocks, and the kept
experts' ranges are copied as they are. Every other tensor and all metadata are copied byte for byte, except
``<arch>.expert_count``; a ``moe_gguf.formats.prune`` key (JSON) records which original experts each layer kept.
Data is streamed through a fixed 16 MiB buffer, so memory stays bounded whatever the model size.

Equivalence: the patched llama.cpp disables an expert by adding -inf to its router logit (and -1e30 to its
selection score), so with every gating function (softmax: it leaves the normalisation; sigmoid and
sqrt_softplus: per-expert; softmax_weight: the softmax runs over the selected experts only), with the
selection bias and, when every group keeps >= 2 experts, with group-limited routing, the pruned model
computes what the original computes with those experts disabled. On CPU, decoding token by token, the
logits are bit-identical; in a batch the router matmul's kernel depends on its row count (n_expert), so
router logits can differ in the last bit (tests/test_prune.py has the numbers).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from moe_gguf._io import atomic_path
from moe_gguf.errors import CountFileError, PruneError
from moe_gguf.formats.gguf_header import GGUFHeader, GGUFHeaderError
from moe_gguf.formats.gguf_header import read_header as _read_header
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.records import RoutingRecord
from moe_gguf.formats.topology import ModelTopology, format_layers

__all__ = ["GGUFHeader", "PruneError", "PruneReport", "load_counts", "main_prune", "plan_prune", "prune_gguf", "read_header"]

_CHUNK = 16 << 20  # bytes copied at a time
_META_KEY = "moe_gguf.formats.prune"

# Per-expert tensors of a MoE layer (the part after "blk.N."), expert = ggml's outermost dimension.
# From llama.cpp's loaders (src/llama-model.cpp, src/models/*.cpp): every tensor created with an
# n_expert dimension.
_PER_EXPERT = re.compile(
    r"ffn_(?:gate|up|down|gate_up)_exps\.(?:weight|bias|scale|input_scale)"
    r"|ffn_gate_inp\.(?:weight|bias)"
    r"|exp_probs_b(?:_vl)?(?:\.bias)?"
)
_BLK = re.compile(r"blk\.(\d+)\.(.+)")
# architectures whose routing ties experts to something pruning cannot rewrite
_REFUSED_ARCHS = {
    "grovemoe": "its chunk experts (ffn_*_chexps) serve fixed blocks of experts_per_group routed experts",
    "deepseek4": "its hash-routed layers pick experts from a token -> expert-id table (ffn_gate_tid2eid)",
}


def read_header(path: str | os.PathLike) -> GGUFHeader:
    try:
        return _read_header(path)
    except GGUFHeaderError as e:
        raise PruneError(str(e)) from e



@dataclass
class PruneReport:
    """What prune_gguf did (or, from plan_prune, will do)."""

    src: str
    dst: str
    arch: str
    n_expert_in: int
    n_expert_out: int
    kept: dict[int, list[int]]  # per MoE layer, the original ids of the kept experts (new id = position)
    removed: dict[int, list[int]]  # per MoE layer, the original ids removed (asked for + padded)
    padded: dict[int, list[int]]  # per MoE layer, the removed experts that were added as least used
    source: str  # what chose the experts, e.g. "profile 'quiet'" or "counts.npz, keep 0.75"
    size_in: int = 0
    size_out: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        layers = sorted(self.kept)
        lines = [f"pruned {self.src} -> {self.dst}: {self.n_expert_in} -> {self.n_expert_out} experts in each of "
                 f"{len(layers)} MoE layers ({format_layers(layers)}), chosen by {self.source}"]
        if self.size_in:
            pct = 100.0 * (self.size_out - self.size_in) / self.size_in
            lines.append(f"  size: {_mib(self.size_in)} -> {_mib(self.size_out)} ({pct:+.1f}%)")
        for il in layers:
            pad = set(self.padded.get(il, ()))
            asked = [e for e in self.removed[il] if e not in pad]
            line = f"  layer {il}: removed {_ids(asked) or '-'}"
            if pad:
                line += f"; padded with {'weakest router rows' if 'router-row norms' in self.source else 'least used'} {_ids(sorted(pad))}"
            lines.append(line)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": self.src, "dst": self.dst, "arch": self.arch, "n_expert_in": self.n_expert_in,
            "n_expert_out": self.n_expert_out, "source": self.source, "size_in": self.size_in,
            "size_out": self.size_out, "notes": list(self.notes),
            "kept": {str(k): v for k, v in self.kept.items()},
            "removed": {str(k): v for k, v in self.removed.items()},
            "padded": {str(k): v for k, v in self.padded.items()},
        }


# -- choosing the experts ------------------------------------------------------------------------------


def load_counts(path: str | os.PathLike) -> RoutingRecord:
    """A RoutingRecord .npz, or a `moe-gguf probe` result (its labels' records summed)."""
    path = Path(path)
    if path.suffix != ".npz" and not path.exists():
        path = path.with_suffix(".npz")  # as RoutingRecord.save names it
    try:
        with np.load(path, allow_pickle=False) as z:
            is_probe = "meta.json" in z.files
    except FileNotFoundError as e:
        raise CountFileError(f"{path}: no such routing-count file; check the path") from e
    except Exception as e:  # zipfile, numpy's npy parser, ... fail in many ways on a foreign file
        raise CountFileError(f"{path}: not a routing-count file (.npz) ({type(e).__name__}: {e}); give a file "
                             "written by RoutingRecord.save or `moe-gguf probe`") from e
    if not is_probe:
        return RoutingRecord.load(path)
    from moe_gguf.study.probe import ProbeResult

    res = ProbeResult.load(path)
    total = RoutingRecord(res.n_layer, res.n_expert, meta=dict(res.meta))
    for lab in res.labels:
        total = total + res.records[lab]
    return total


def plan_prune(topo: ModelTopology, *, remove: Mapping[int, Sequence[int]] | None = None,
               profile: SteeringProfile | None = None, counts: RoutingRecord | None = None,
               keep_fraction: float | None = None, src: str = "", dst: str = "",
               allow_mismatch: bool = False) -> PruneReport:
    """Which experts each MoE layer keeps; PruneError if the model cannot be pruned that way. No file I/O.

    Uneven lists without counts raise UnevenPruneError (prune_gguf then pads by router-row norms)."""
    if not topo.is_moe:
        raise PruneError(f"{src or topo.name}: {topo.arch} model without routed experts (dense); there is nothing "
                         "to prune. Use a Mixture-of-Experts GGUF.")
    if topo.arch in _REFUSED_ARCHS:
        raise PruneError(f"{src or topo.name}: cannot prune {topo.arch} models: {_REFUSED_ARCHS[topo.arch]}. "
                         "Disable experts at run time with a steering profile instead.")
    if remove is not None and profile is not None:
        raise PruneError("give either a profile or an explicit remove list, not both")
    if keep_fraction is not None:
        if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, numbers.Real) \
                or not 0 < keep_fraction < 1:
            raise PruneError(f"keep fraction must be a number between 0 and 1 (exclusive), got {keep_fraction!r}; "
                             "e.g. 0.75 keeps three quarters of the experts")
        if counts is None:
            raise PruneError("a keep fraction needs routing counts to rank the experts: record them with "
                             "`moe-gguf probe` (or RoutingRecorder) and pass the .npz file")
    if remove is None and profile is None and keep_fraction is None:
        raise PruneError("nothing says which experts to remove: give a profile (its 'disable' entries), "
                         "an explicit remove list, or routing counts with a keep fraction")

    n, layers = topo.n_expert, topo.moe_layers
    notes: list[str] = []
    asked: dict[int, set[int]] = {il: set() for il in layers}
    sources = []
    if profile is not None:
        asked.update(_profile_removals(profile, topo, notes, allow_mismatch))
        sources.append(f"profile {profile.name!r}" if profile.name else "profile")
    elif remove is not None:
        for il, experts in remove.items():
            if not _is_int(il) or il not in asked:
                raise PruneError(f"remove: layer {il!r} is not a MoE layer; the MoE layers are {format_layers(layers)}")
            for e in experts:
                if not _is_int(e) or not 0 <= e < n:
                    raise PruneError(f"remove: layer {il}: expert {e!r} does not exist (experts 0-{n - 1})")
            asked[int(il)] = {int(e) for e in experts}
        sources.append("remove list")
    if counts is not None:
        _check_counts(counts, topo)
        label = counts.meta.get("source") or "routing counts"
        sources.append(f"{label}" + (f", keep {keep_fraction:g}" if keep_fraction is not None else " (padding)"))

    groups = topo.n_expert_groups if topo.n_expert_groups > 1 else 1
    per_group = n // groups
    grouped = {il: [sorted(e for e in asked[il] if e // per_group == g) for g in range(groups)] for il in layers}
    r = max(len(g) for il in layers for g in grouped[il])  # experts removed from every group of every layer
    if keep_fraction is not None:
        r_kf = per_group - math.floor(keep_fraction * per_group + 0.5)
        if r_kf > r:
            r = r_kf
        elif r_kf < r:
            notes.append(f"the listed experts need {r} removed per {'group' if groups > 1 else 'layer'}, more than "
                         f"the keep fraction {keep_fraction:g} asks ({r_kf}); removed {r}")
        if keep_fraction * per_group != per_group - r:
            notes.append(f"keep fraction {keep_fraction:g} rounded: {per_group - r} of {per_group} experts kept"
                         + (f" in each of the {groups} expert groups (every group must keep the same number)"
                            if groups > 1 else ""))
    if r == 0:
        raise PruneError("no expert to remove: the list / profile disables none"
                         + (f" and keep fraction {keep_fraction:g} keeps all {per_group}" if keep_fraction is not None else "")
                         + (" per expert group" if groups > 1 and keep_fraction is not None else "")
                         + "; disable some experts or give a smaller keep fraction")

    # every layer (and group) must lose exactly r experts: pad short lists with the least-used experts
    short = [(il, g) for il in layers for g in range(groups) if len(grouped[il][g]) < r]
    padded: dict[int, list[int]] = {}
    if short and counts is None:
        where = "; ".join(f"layer {il}" + (f" group {g}" if groups > 1 else "") + f": {len(grouped[il][g])}"
                          for il, g in short[:8]) + ("; ..." if len(short) > 8 else "")
        unit = "expert group of every MoE layer" if groups > 1 else "MoE layer"
        raise UnevenPruneError(f"uneven pruning: llama.cpp needs the same number of experts in every {unit}, but {r} would be "
                         f"removed from some and fewer from others ({where}). Disable the same number in each, or pass "
                         "routing counts (--counts COUNTS.npz) to remove the least-used experts to even them out (prune_gguf / "
                         "`moe-gguf prune` without counts pad with the experts of weakest router rows).")
    for il, g in short:
        need = r - len(grouped[il][g])
        if counts.tokens[il] <= 0:
            raise PruneError(f"the routing counts have no tokens for layer {il}, so its least-used experts are "
                             "unknown; record counts over some text (all layers) and try again")
        score = counts.selections[il].astype(np.float64) * counts.weight_sum[il]
        cands = [e for e in range(g * per_group, (g + 1) * per_group) if e not in asked[il]]
        cands.sort(key=lambda e: (score[e], counts.selections[il][e], e))
        grouped[il][g] = sorted(grouped[il][g] + cands[:need])
        if profile is not None or remove is not None:  # a list was padded (else the ranking chose them all)
            padded.setdefault(il, []).extend(cands[:need])

    n_keep = n - groups * r
    keep_per_group = per_group - r
    used = topo.n_expert_used
    if n_keep < used:
        raise PruneError(f"{n_keep} experts per layer would be left, fewer than the {used} the model selects per token; "
                         f"remove at most {n - used - (n - used) % groups} experts per layer"
                         + (f" ({(n - used) // groups} per expert group)" if groups > 1 else ""))
    if groups > 1:
        if keep_per_group < 2:
            raise PruneError(f"each of the {groups} expert groups would keep {keep_per_group} expert(s), but llama.cpp "
                             f"scores a group by its best two experts; keep at least 2 per group (remove at most "
                             f"{per_group - 2} per group, {groups * (per_group - 2)} per layer)")
        if topo.n_group_used * keep_per_group < used:
            raise PruneError(f"tokens route within {topo.n_group_used} groups of {keep_per_group} experts, fewer than "
                             f"the {used} experts selected per token; remove fewer experts per group")
        notes.append(f"expert groups kept even: {groups} groups of {keep_per_group} (was {per_group}), "
                     f"{topo.n_group_used} used per token")

    removed = {il: sorted(e for g in grouped[il] for e in g) for il in layers}
    kept = {il: [e for e in range(n) if e not in set(removed[il])] for il in layers}
    padded = {il: sorted(v) for il, v in sorted(padded.items())}
    if profile is None and remove is None:
        notes.append("experts ranked per layer by selections x summed routing weight (a REAP-like proxy from "
                     "routing counts, not REAP's output-norm score); the lowest-ranked were removed")
    if padded:
        how = "weakest-router-row" if "router-row norms" in str(counts.meta.get("source")) else "least-used"
        notes.append(f"{sum(map(len, padded.values()))} {how} experts added in {len(padded)} layers so that every "
                     f"layer keeps {n_keep} experts (see 'padded')")
    return PruneReport(src=src, dst=dst, arch=topo.arch, n_expert_in=n, n_expert_out=n_keep, kept=kept,
                       removed=removed, padded=padded, source=" + ".join(sources), notes=notes)


def _profile_removals(profile: SteeringProfile, topo: ModelTopology, notes: list[str],
                      allow_mismatch: bool = False) -> dict[int, set[int]]:
    profile.validate(topo, allow_mismatch=allow_mismatch)  # ProfileError / ModelMismatchError name the problem
    label = f"profile {profile.name!r}" if profile.name else "the profile"
    forced = [e for e in profile.entries if e.action == "force"]
    if forced:
        raise PruneError(f"{label} forces {len(forced)} expert(s) (e.g. layer {forced[0].layer} expert "
                         f"{forced[0].expert}); a forced expert cannot be baked into the file, only disabled ones can. "
                         "Remove the 'force' entries (and keep forcing at run time) or prune with a profile that only "
                         "disables experts.")
    other = [e for e in profile.entries if e.action in ("bias", "scale")]
    if other:
        raise PruneError(f"{label} has {len(other)} bias/scale entries (e.g. {other[0].action} layer {other[0].layer} "
                         f"expert {other[0].expert}); only 'disable' entries can be baked into the file, and expert ids "
                         "change in the pruned model. Prune with a profile that only disables experts, then steer the "
                         "pruned model with a profile made for it.")
    sc = profile.schedule
    if sc.apply_to != "all" or sc.after_tokens or sc.after_text:
        notes.append(f"{label}'s schedule (from {sc.apply_to!r} tokens, after {sc.after_tokens} tokens"
                     + (f", after text {sc.after_text!r}" if sc.after_text else "")
                     + ") is not baked in: the pruned experts are gone for every token")
    out: dict[int, set[int]] = {}
    for e in profile.entries:
        out.setdefault(e.layer, set()).add(e.expert)
    return out


class UnevenPruneError(PruneError):
    """The lists remove different numbers of experts per layer and no counts were given to even them out."""


def router_norm_counts(src: str | os.PathLike, head: GGUFHeader, topo: ModelTopology) -> RoutingRecord:
    """Pseudo routing counts from the model's own router weights: per MoE layer, each expert's router-row L2 norm
    (as weight_sum, one selection and token each), so padding removes the experts with the weakest router rows."""
    rec = RoutingRecord(topo.n_layer, topo.n_expert, meta={"source": "router-row norms (no counts given)"})
    routers = {t.name: t for t in head.tensors}
    with open(src, "rb") as f:
        for il in topo.moe_layers:
            t = routers.get(f"blk.{il}.ffn_gate_inp.weight")
            if t is None:
                raise PruneError(f"{src}: layer {il} has no router tensor, so its weakest experts are unknown; pass "
                                 "routing counts (--counts COUNTS.npz) to choose the experts that even out the layers")
            f.seek(t.data_offset)
            raw = np.frombuffer(f.read(t.n_bytes), dtype=np.uint8)
            qt = gguf.GGMLQuantizationType(t.ggml_type)
            if qt == gguf.GGMLQuantizationType.F32:
                w = raw.view(np.float32)
            elif qt == gguf.GGMLQuantizationType.F16:
                w = raw.view(np.float16).astype(np.float32)
            else:
                w = gguf.quants.dequantize(raw, qt)
            rows = np.asarray(w, dtype=np.float64).reshape(topo.n_expert, -1)
            rec.selections[il] = 1
            rec.weight_sum[il] = np.linalg.norm(rows, axis=1)
            rec.tokens[il] = 1
    return rec


def _check_counts(counts: RoutingRecord, topo: ModelTopology) -> None:
    if (counts.n_layer, counts.n_expert) != (topo.n_layer, topo.n_expert):
        raise PruneError(f"the routing counts are for {counts.n_layer} layers x {counts.n_expert} experts, the model has "
                         f"{topo.n_layer} x {topo.n_expert}; record counts on this model")
    fp = counts.meta.get("model")
    mine = topo.fingerprint()
    if isinstance(fp, dict) and any(k in fp and k in mine and fp[k] != mine[k] for k in ("arch", "n_layer", "n_expert", "n_expert_used",
                                                                          "moe_layers", "weights")):
        raise PruneError(f"the routing counts were recorded on another model ({fp}); record counts on this model")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# -- writing -------------------------------------------------------------------------------------------


def prune_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, remove: Mapping[int, Sequence[int]] | None = None,
               profile: SteeringProfile | str | os.PathLike | None = None,
               counts: RoutingRecord | str | os.PathLike | None = None,
               keep_fraction: float | None = None, allow_mismatch: bool = False) -> PruneReport:
    """Write ``dst``: ``src`` without the chosen experts. See the module docstring; returns the report.

    profile: its 'disable' entries are removed (force/bias/scale entries are refused). remove: explicit
    {layer: [experts]}. counts (RoutingRecord or path): ranks experts for keep_fraction and pads layers
    whose list is shorter. ``dst`` is written atomically: on any error it is left as it was.
    """
    src, dst = Path(src), Path(dst)
    if isinstance(profile, (str, os.PathLike)):
        profile = SteeringProfile.load(profile)
    if isinstance(counts, (str, os.PathLike)):
        path = counts
        counts = load_counts(path)
        counts.meta.setdefault("source", Path(path).name)
    topo = ModelTopology.from_gguf(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise PruneError(f"{dst}: is the source model; write the pruned model to a new file")
    if dst.is_dir():
        raise PruneError(f"{dst}: is a directory; give the path of the .gguf file to write")
    head = read_header(src)
    try:
        report = plan_prune(topo, remove=remove, profile=profile, counts=counts, keep_fraction=keep_fraction,
                            src=str(src), dst=str(dst), allow_mismatch=allow_mismatch)
    except UnevenPruneError:
        report = plan_prune(topo, remove=remove, profile=profile, counts=router_norm_counts(src, head, topo),
                            keep_fraction=keep_fraction, src=str(src), dst=str(dst), allow_mismatch=allow_mismatch)
    n_split = head.value("split.count", 1)
    if n_split > 1:
        raise PruneError(f"{src}: a model split into {n_split} files; merge it into one first "
                         "(llama-gguf-split --merge FIRST.gguf MERGED.gguf), prune, then split again if needed")
    jobs = _tensor_jobs(head, topo, report)

    with atomic_path(dst, what="write the pruned model") as tmp:
        _write(head, src, tmp, topo, report, jobs)
        _check_written(tmp, topo, report, jobs)
    report.size_in, report.size_out = src.stat().st_size, dst.stat().st_size
    return report


@dataclass
class _Job:
    name: str
    shape: tuple[int, ...]  # numpy order (reversed ggml ne) of the written tensor
    dtype: int  # ggml type
    ranges: list[tuple[int, int]]  # (absolute offset in src, length) copied in order
    nbytes: int


def _tensor_jobs(head: GGUFHeader, topo: ModelTopology, report: PruneReport) -> list[_Job]:
    """For each tensor of the source, in order: the byte ranges of the file that make up its pruned version."""
    n = topo.n_expert
    moe = set(topo.moe_layers)
    sliced: dict[int, set[str]] = {il: set() for il in moe}
    jobs = []
    for t in head.tensors:
        ne = list(t.ne)
        shape = tuple(reversed(ne))
        ranges = [(t.data_offset, t.n_bytes)]
        m = _BLK.fullmatch(t.name)
        if m:
            il, part = int(m.group(1)), m.group(2)
            if "tid2eid" in part:
                raise PruneError(f"tensor {t.name!r} maps tokens to expert ids (hash routing); pruning would leave it "
                                 "pointing at removed experts. Disable experts at run time with a profile instead.")
            if _PER_EXPERT.fullmatch(part):
                if il not in moe:
                    raise PruneError(f"tensor {t.name!r}: layer {il} has routed experts but is not one of the model's "
                                     f"{topo.n_layer} steerable layers (a next-token-prediction / MTP block?), so its "
                                     "experts cannot be chosen; pruning such models is not supported")
                if ne[-1] != n:
                    raise PruneError(f"tensor {t.name!r} has shape {ne} (ggml order), expected the {n} experts as its "
                                     "last dimension; this layout is unknown, so the model is not pruned")
                if t.n_bytes % n:
                    raise PruneError(f"tensor {t.name!r}: {t.n_bytes} bytes do not split into {n} experts")
                per = t.n_bytes // n
                ranges = _runs(report.kept[il], t.data_offset, per)
                shape = (len(report.kept[il]), *shape[1:])
                sliced[il].add(part)
            elif _looks_per_expert(part) and n in ne:
                raise PruneError(f"tensor {t.name!r} (shape {ne}, ggml order) looks per-expert, but moe-gguf does not "
                                 "know how to slice it; refusing rather than writing a wrong model")
        jobs.append(_Job(t.name, shape, t.ggml_type, ranges, sum(b for _, b in ranges)))
    missing = [il for il, parts in sliced.items() if not any(p.startswith("ffn_gate_inp.") for p in parts)]
    if missing:
        raise PruneError(f"layers {format_layers(missing)} have expert tensors but no router (ffn_gate_inp.weight); "
                         "this layout is unknown, so the model is not pruned")
    return jobs


def _looks_per_expert(part: str) -> bool:
    stem = part.split(".")[0]
    return "shexp" not in stem and ("exp" in stem or "gate_inp" in stem or "router" in stem)


def _runs(kept: list[int], base: int, per: int) -> list[tuple[int, int]]:
    """Byte ranges of the kept experts' slabs, adjacent ones merged."""
    out: list[list[int]] = []
    for e in kept:
        off = base + e * per
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += per
        else:
            out.append([off, per])
    return [(a, b) for a, b in out]


def _write(head: GGUFHeader, src: Path, path: Path, topo: ModelTopology, report: PruneReport,
           jobs: list[_Job]) -> None:
    w = _Writer(path, topo.arch)
    w.data_alignment = head.alignment
    key_count = f"{topo.arch}.expert_count"
    for key, kv in head.kv.items():
        if key == gguf.Keys.General.ARCHITECTURE or key == _META_KEY:
            continue  # written by GGUFWriter itself / by us below (a re-pruned model)
        if key == key_count:
            w.add_key_value(key, report.n_expert_out, gguf.GGUFValueType(kv.vtype))
            continue
        # the encoded value (type + payload), byte for byte: no re-encoding of strings or arrays
        w.add_key_value(key, _Raw(kv.raw), gguf.GGUFValueType(kv.vtype))
    w.add_string(_META_KEY, json.dumps({"n_expert_in": report.n_expert_in, "n_expert_out": report.n_expert_out,
                                        "kept": {str(k): v for k, v in report.kept.items()}}, separators=(",", ":")))
    for j in jobs:
        # raw_dtype: the bytes are written as they are; the shape is the logical (element) shape
        w.add_tensor_info(j.name, j.shape, np.dtype(np.float32), j.nbytes, raw_dtype=gguf.GGMLQuantizationType(j.dtype))
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        fout = w.fout[0]
        with open(src, "rb", buffering=0) as fin:
            for j in jobs:
                w.write_padding(fout, fout.tell())
                for off, length in j.ranges:
                    fin.seek(off)
                    while length:
                        k = fin.readinto(view[:min(length, _CHUNK)])
                        if not k:
                            raise PruneError(f"{src}: ends inside tensor {j.name!r}; the file is truncated")
                        fout.write(view[:k])
                        length -= k
                w.write_padding(fout, j.nbytes)
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        w.close()


def _check_written(path: Path, topo: ModelTopology, report: PruneReport, jobs: list[_Job]) -> None:
    """Read the new file's header back: tensor table, sizes and expert count as planned."""
    head = read_header(path)
    got = [(t.name, t.n_bytes) for t in head.tensors]
    if got != [(j.name, j.nbytes) for j in jobs] or head.value(f"{topo.arch}.expert_count") != report.n_expert_out:
        raise PruneError(f"internal error: {path} does not hold the planned tensors; the output was not written")
    end = max((t.data_offset + t.n_bytes for t in head.tensors), default=head.data_start)
    if path.stat().st_size < end:
        raise PruneError(f"{path}: written file is truncated ({path.stat().st_size} of {end} bytes); is the disk full?")


class _Raw(bytes):
    """An already encoded GGUF metadata value (type tag + payload), copied from the source file."""


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that writes _Raw metadata values as they are (strings need not be valid UTF-8, arrays
    may be empty or nested: whatever the source holds is copied exactly)."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if isinstance(val, _Raw):
            return bytes(val) if add_vtype else bytes(val)[4:]
        return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(map(str, ids))


# -- CLI -----------------------------------------------------------------------------------------------


def main_prune(src: str | os.PathLike, dst: str | os.PathLike, profile_path: str | os.PathLike | None = None,
               counts_path: str | os.PathLike | None = None, keep_fraction: float | None = None) -> PruneReport:
    """The pruning `moe-gguf prune` does (it prints ``report.summary()``); errors are ValueErrors with the fix."""
    return prune_gguf(src, dst, profile=profile_path, counts=counts_path, keep_fraction=keep_fraction)
