"""Ranking experts for a behaviour: observational scores (as in the papers) and a causal ranking.

Every score here is oriented the same way: **positive = associated with the behaviour to reduce**
(the "away" label, e.g. refusal), so positive experts are candidates to disable and negative ones
to force. The methods' native scores are kept beside it where they differ (SteerMoE's RD is
p_target - p_away).

- risk difference (SteerMoE): p(expert in the token's top-k | label), RD = p_target - p_away.
- fTRI (MoTE): per-prompt layer x expert activation maps, averaged per label, difference.
- nPMI (RICE): normalised pointwise mutual information between "expert selected" and the away label.
- frequency x magnitude (STA-style): selection frequency times mean routing weight, difference.
- causal (:func:`causal_select`): disable each candidate and measure directly, with per-sequence steering
  (prefill only, shared batches), how much less likely the away continuations become (the effect) and how far
  the next-token distributions on the target label's items move (the damage, a KL); a set grows greedily only
  while the effect gains and the damage stays under a budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.topology import ModelTopology
from moe_gguf.study.items import StudyItem
from moe_gguf.study.probe import ProbeResult

if TYPE_CHECKING:
    from moe_gguf.engine.model import MoEModel

METHODS = ("rd", "ftri", "npmi", "freq_mag")


@dataclass
class ExpertScore:
    layer: int
    expert: int
    score: float  # oriented: > 0 associated with the away behaviour
    ci_low: float
    ci_high: float
    p_target: float  # selection frequency on target-label tokens
    p_away: float
    action: str  # "disable" (score > 0) or "force"


@dataclass
class Ranking:
    method: str
    target: str
    away: str
    scores: np.ndarray  # [n_layer, n_expert], oriented
    ranked: list[ExpertScore]
    stability: float | None = None  # mean overlap of the top-N across bootstrap resamples
    top_n: int = 10
    warnings: list[str] | None = None

    def top(self, n: int | None = None, action: str | None = "disable") -> list[ExpertScore]:
        rows = [r for r in self.ranked if action is None or r.action == action]
        return rows[: n or self.top_n]

    def profile(self, topology, n: int | None = None, *, action: str | None = "disable", name: str = "") -> SteeringProfile:
        """A profile disabling (and/or forcing) the top-n experts, respecting each layer's limits."""
        prof = SteeringProfile.for_model(topology, name=name or f"{self.method}-top{n or self.top_n}",
                                         description=f"{self.method}: reduce '{self.away}' towards '{self.target}'")
        forced: dict[int, int] = {}
        disabled: dict[int, int] = {}
        for r in self.top(n, action):
            if r.action == "force":
                if forced.get(r.layer, 0) >= topology.n_expert_used:
                    continue
                forced[r.layer] = forced.get(r.layer, 0) + 1
                prof.force(r.layer, r.expert)
            else:
                if disabled.get(r.layer, 0) >= topology.n_expert - topology.n_expert_used:
                    continue
                disabled[r.layer] = disabled.get(r.layer, 0) + 1
                prof.disable(r.layer, r.expert)
        return prof

    def to_rows(self) -> list[dict]:
        return [asdict(r) for r in self.ranked]


def _freq(sel: np.ndarray, tok: np.ndarray) -> np.ndarray:
    return sel / np.maximum(tok, 1)[..., None]


def _score(method: str, maps: np.ndarray, wsum: np.ndarray, toks: np.ndarray, is_away: np.ndarray) -> np.ndarray:
    """Oriented score from per-item arrays (items x layer x expert)."""
    a, t = is_away, ~is_away
    if method == "ftri":
        f = _freq(maps, toks)  # per-prompt activation map
        return f[a].mean(0) - f[t].mean(0)
    sel_a, sel_t = maps[a].sum(0), maps[t].sum(0)
    tok_a, tok_t = toks[a].sum(0), toks[t].sum(0)
    if method == "rd":
        return _freq(sel_a, tok_a) - _freq(sel_t, tok_t)
    if method == "freq_mag":
        return _freq(wsum[a].sum(0), tok_a) - _freq(wsum[t].sum(0), tok_t)
    if method == "npmi":
        total = np.maximum(tok_a + tok_t, 1)[:, None]
        p_eb = sel_a / total
        p_e = (sel_a + sel_t) / total
        p_b = (tok_a / np.maximum(tok_a + tok_t, 1))[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            pmi = np.log(p_eb / (p_e * p_b))
            out = pmi / -np.log(p_eb)
        # never selected together: nPMI is -1 by definition; never selected at all: no association
        out = np.where(p_eb > 0, out, np.where(p_e > 0, -1.0, 0.0))
        return np.nan_to_num(out, nan=0.0)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def rank(res: ProbeResult, *, target: str, away: str, method: str = "rd", top_n: int = 10,
         moe_layers: Sequence[int] | None = None, n_boot: int = 200, seed: int = 0,
         n_expert_used: int | None = None) -> Ranking:
    """Rank every expert of the MoE layers by ``method``, with bootstrap CIs and top-N stability."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    for lab in (target, away):
        if lab not in res.records:
            raise ValueError(f"label {lab!r} not in the probe (labels: {', '.join(res.labels)})")
    if res.item_maps is None or res.item_wsum is None:
        raise ValueError("the probe result has no per-item maps (made by an older moe-gguf?): probe again")
    labels = np.array(res.item_labels)
    keep = (labels == target) | (labels == away)
    maps = res.item_maps[keep].astype(np.float64)
    wsum = res.item_wsum[keep].astype(np.float64)
    toks = res.item_tokens[keep].astype(np.float64)
    is_away = labels[keep] == away
    layers = list(moe_layers) if moe_layers is not None else [int(i) for i in np.flatnonzero(toks.sum(0) > 0)]
    scores = _score(method, maps, wsum, toks, is_away)
    mask = np.zeros_like(scores, dtype=bool)
    mask[layers] = True

    # bootstrap: resample items within each label
    rng = np.random.default_rng(seed)
    ia, it = np.flatnonzero(is_away), np.flatnonzero(~is_away)
    boots = np.empty((n_boot,) + scores.shape)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(ia, len(ia)), rng.choice(it, len(it))])
        boots[b] = _score(method, maps[idx], wsum[idx], toks[idx], is_away[idx])
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0) if n_boot else (scores, scores)

    p_away = _freq(maps[is_away].sum(0), toks[is_away].sum(0))
    p_target = _freq(maps[~is_away].sum(0), toks[~is_away].sum(0))
    flat = [(abs(scores[li, e]), li, e) for li in layers for e in range(scores.shape[1])]
    flat.sort(key=lambda x: (-x[0], x[1], x[2]))
    ranked = [ExpertScore(li, e, float(scores[li, e]), float(lo[li, e]), float(hi[li, e]), float(p_target[li, e]),
                          float(p_away[li, e]), "disable" if scores[li, e] > 0 else "force") for _, li, e in flat]

    def top_set(s: np.ndarray) -> set[tuple[int, int]]:
        s = np.where(mask, s, 0.0)
        order = np.argsort(-s, axis=None)[:top_n]  # the disable candidates
        return {tuple(int(v) for v in np.unravel_index(i, s.shape)) for i in order}

    ref = top_set(scores)
    stability = float(np.mean([len(ref & top_set(bs)) / max(len(ref), 1) for bs in boots])) if n_boot else None

    warnings = []
    if n_expert_used:
        forced = [r for r in ranked[:top_n] if r.action == "force"]
        per_layer: dict[int, int] = {}
        for r in forced:
            per_layer[r.layer] = per_layer.get(r.layer, 0) + 1
        for layer, n in sorted(per_layer.items()):
            if n > n_expert_used:
                warnings.append(f"layer {layer}: {n} experts in the top {top_n} would be forced, but only "
                                f"{n_expert_used} are used per token; a profile keeps the first {n_expert_used}")
    return Ranking(method, target, away, scores, ranked, stability, top_n, warnings)


def agreement(ranking: Ranking, causal: SelectionResult, top_n: int = 10) -> dict:
    """How an observational ranking and the causal one agree on the candidates both scored."""
    benefit = causal.benefits()  # > 0: disabling reduces the away behaviour
    cands = list(benefit)
    obs = np.array([ranking.scores[layer, e] for layer, e in cands])
    cau = np.array([benefit[c] for c in cands])
    rho = _spearman(obs, cau) if len(cands) > 2 else math.nan
    top_obs = {(r.layer, r.expert) for r in ranking.top(top_n)}
    top_cau = {c for c, _ in sorted(benefit.items(), key=lambda kv: -kv[1])[:top_n]}
    return {"spearman": rho, "top_overlap": len(top_obs & top_cau), "top_n": top_n, "n_candidates": len(cands)}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


# -- causal selection with a damage brake -----------------------------------------------------------

@dataclass(frozen=True)
class AwayItem:
    """An item of the away label: its prompt tokens, its away continuation (e.g. the refusal) and,
    where known, a wanted continuation (``target`` or ``answer``)."""

    prompt: list[int]
    away: list[int] | None
    target: list[int] | None = None


@dataclass(frozen=True)
class KeepItem:
    """An item of the target label, on which the model must not change: prompt tokens and, where known,
    its reference response (damage is then measured on the response; else on the prompt's last tokens)."""

    prompt: list[int]
    response: list[int] | None = None


@dataclass
class SetScore:
    """A profile's scores against the unsteered model (all means over items)."""

    away_p: float  # per-token geometric-mean probability of the away continuations
    target_p: float | None  # ... of the wanted continuations (None: no item has one)
    damage: float  # mean KL(unsteered || steered) of next-token distributions on the keep items, nats/token
    keep_nll: float | None  # mean NLL per token of the keep items' reference responses (None: none given)


@dataclass
class SelectionResult:
    """The outcome of :func:`causal_select` (``effects``: single expert disabled, > 0 = less away behaviour)."""

    base: SetScore
    effects: dict[tuple[int, int], float]
    damages: dict[tuple[int, int], float]
    curve: list[dict]  # per accepted set size: experts, effect, damage, away_p, target_p, keep_nll_delta
    rejected: list[dict]  # candidates the greedy rule tried and refused, with the reason
    chosen: list[tuple[int, int]]  # the smallest greedy prefix reaching effect_fraction of the best effect
    max_damage: float
    effect_fraction: float

    def ranked(self) -> list[tuple[tuple[int, int], float]]:
        return sorted(self.effects.items(), key=lambda kv: -kv[1])

    def benefits(self) -> dict[tuple[int, int], float]:
        return dict(self.effects)

    def to_json(self) -> dict:
        return {"base": asdict(self.base), "chosen": [list(c) for c in self.chosen], "curve": self.curve,
                "rejected": self.rejected, "max_damage": self.max_damage, "effect_fraction": self.effect_fraction,
                "effects": [[*c, fx, self.damages[c]] for c, fx in self.ranked()],
                "effect_definition": "fall of the away continuations' per-token probability (+ rise of the "
                                     "wanted continuations' where given), unsteered minus steered",
                "damage_definition": "mean KL(unsteered || steered) of next-token distributions on the target "
                                     "label's items, nats per token (top-32 tokens + the rest lumped)"}


_TOPK = 32  # tokens of the unsteered distribution kept per position for the KL (the rest is lumped: a lower bound)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _keep_positions(it: KeepItem) -> tuple[list[int], slice]:
    """(tokens to decode, logits rows scored) of a keep item."""
    if it.response:
        n = len(it.prompt)
        return it.prompt + it.response, slice(n - 1, n - 1 + len(it.response))
    n = len(it.prompt)
    return list(it.prompt), slice(max(0, n - 8), n)


def score_profiles(model: MoEModel, away: Sequence[AwayItem], keep: Sequence[KeepItem],
                   profiles: Sequence[SteeringProfile | None], *, n_seq: int = 16,
                   base_cache: list | None = None) -> list[SetScore]:
    """Score each profile on every item, all in shared batches (one profile per sequence).

    ``base_cache`` (a list, filled on the first call that scores ``None``) holds the unsteered model's
    top-32 next-token distributions on the keep items, for the KL of later calls.
    """
    seqs: list[tuple[int, str, int, list[int]]] = []  # (profile index, kind, item index, tokens)
    for pi in range(len(profiles)):
        for qi, q in enumerate(away):
            if q.away:
                seqs.append((pi, "away", qi, q.prompt + q.away))
            if q.target:
                seqs.append((pi, "target", qi, q.prompt + q.target))
        for ki, k in enumerate(keep):
            seqs.append((pi, "keep", ki, _keep_positions(k)[0]))
    if base_cache is None:
        base_cache = []
    need_base = not base_cache
    if need_base and profiles and profiles[0] is not None:
        raise ValueError("score_profiles: the first call must score the unsteered model (None) first")
    away_lp = np.full((len(profiles), len(away)), np.nan)
    target_lp = np.full((len(profiles), len(away)), np.nan)
    kl = np.zeros((len(profiles), len(keep)))
    nll = np.full((len(profiles), len(keep)), np.nan)
    longest = max((len(s[3]) for s in seqs), default=1)
    n_ctx = max(512, -(-(n_seq * longest + 16) // 256) * 256)  # the batch's sequences share one cache
    cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    with model.context(n_seq_max=n_seq, n_batch=max(512, min(n_ctx, 4096)), n_ctx=n_ctx) as ctx:
        for b0 in range(0, len(seqs), n_seq):
            batch = seqs[b0:b0 + n_seq]
            ctx.clear_memory()
            for s, (pi, *_rest) in enumerate(batch):
                ctx.set_profile(profiles[pi], seq_id=s)
            logits = ctx.decode([(s, toks, 0) for s, (_, _, _, toks) in enumerate(batch)], logits="all")
            for s, (pi, kind, qi, _toks) in enumerate(batch):
                if kind in ("away", "target"):
                    q = away[qi]
                    cont = q.away if kind == "away" else q.target
                    n = len(q.prompt)
                    lp = _log_softmax(logits[s][n - 1:n - 1 + len(cont)])
                    mean_lp = float(lp[np.arange(len(cont)), cont].mean())
                    (away_lp if kind == "away" else target_lp)[pi, qi] = mean_lp
                    continue
                k = keep[qi]
                _, rows = _keep_positions(k)
                lp = _log_softmax(logits[s][rows])
                if k.response:
                    nll[pi, qi] = -float(lp[np.arange(len(k.response)), k.response].mean())
                if profiles[pi] is None and need_base:
                    ids = np.argsort(-lp, axis=1)[:, :_TOPK]
                    top = np.take_along_axis(lp, ids, 1)
                    rest = np.log(np.clip(1 - np.exp(top).sum(1), 1e-12, None))
                    cache[qi] = (ids, top, rest)
                    continue
                ids, top, rest = base_cache[qi] if base_cache else cache[qi]
                st = np.take_along_axis(lp, ids, 1)
                st_rest = np.log(np.clip(1 - np.exp(st).sum(1), 1e-12, None))
                pb, pr = np.exp(top), np.exp(rest)
                kl[pi, qi] = float(((pb * (top - st)).sum(1) + pr * (rest - st_rest)).clip(min=0).mean())
            for s in range(len(batch)):
                ctx.set_profile(None, seq_id=s)
    if need_base and cache:
        base_cache.extend(cache[i] for i in range(len(keep)))

    def gmean(lp: np.ndarray) -> float | None:
        lp = lp[~np.isnan(lp)]
        return float(np.exp(lp).mean()) if len(lp) else None

    out = []
    for pi in range(len(profiles)):
        nl = nll[pi][~np.isnan(nll[pi])]
        out.append(SetScore(gmean(away_lp[pi]) or 0.0, gmean(target_lp[pi]), float(kl[pi].mean()) if len(keep) else 0.0,
                            float(nl.mean()) if len(nl) else None))
    return out


def causal_items(model: MoEModel, items: Sequence[StudyItem], *, target: str, away: str, n_items: int = 32,
                 seed: int = 0, chat: bool = True) -> tuple[list[AwayItem], list[KeepItem]]:
    """Tokenized items for :func:`causal_select` from a study JSONL (the probe file will do).

    Away items: the ``away`` label's items with a ``response`` (the behaviour to reduce) or a
    ``target``/``answer`` (the wanted reply); keep items: the ``target`` label's items. At most ``n_items`` of
    each, a seeded sample. Prompts use the chat template unless ``chat`` is False or an item's ``chat`` says
    otherwise. Raises ValueError naming what is missing.
    """
    import random

    away_rows = [it for it in items if it.label == away and (it.response or it.target or it.answer)]
    keep_rows = [it for it in items if it.label == target]
    if not away_rows:
        raise ValueError(f"no '{away}' item has a 'response' (the behaviour to reduce, e.g. the refusal) or a "
                         f"'target'/'answer'; add the model's {away} replies as 'response'")
    if not keep_rows:
        raise ValueError(f"no '{target}' items: they measure the damage a profile does")
    rng = random.Random(seed)
    away_rows = rng.sample(away_rows, min(n_items, len(away_rows)))
    keep_rows = rng.sample(keep_rows, min(n_items, len(keep_rows)))

    def prompt(it: StudyItem) -> list[int]:
        if (chat if it.chat is None else it.chat):
            return model.tokenize(model.chat_prompt([{"role": "user", "content": it.prompt}]), add_bos=False)
        return model.tokenize(it.prompt)

    def text(s: str | None) -> list[int] | None:
        return (model.tokenize(s, add_bos=False, special=False) or None) if s else None

    return ([AwayItem(prompt(it), text(it.response), text(it.target or it.answer)) for it in away_rows],
            [KeepItem(prompt(it), text(it.response)) for it in keep_rows])


def selection_profile(topology: ModelTopology, sel: SelectionResult, *, away: str) -> SteeringProfile:
    """The profile disabling a causal selection's chosen set (empty if no expert passed the test)."""
    prof = SteeringProfile.for_model(topology, name=f"causal-{len(sel.chosen)}",
                                     description=f"disable: reduce '{away}' (causal, damage budget {sel.max_damage})")
    for layer, e in sel.chosen:
        prof.disable(layer, e)
    return prof


def causal_select(model: MoEModel, away: Sequence[AwayItem], keep: Sequence[KeepItem],
                  candidates: Sequence[tuple[int, int]], *, max_set: int = 10, max_damage: float = 0.1,
                  effect_fraction: float = 0.9, min_gain: float = 0.005, patience: int = 3, n_seq: int = 16,
                  progress: Callable[[str], None] | None = None) -> SelectionResult:
    """Causal ranking of ``candidates`` and a disable set grown greedily with a damage brake.

    Effect of a profile: how much it lowers the away continuations' per-token probability (geometric mean
    over tokens, averaged over items), plus how much it raises the wanted continuations' where given; a
    probability, so a set that merely breaks the model cannot grow it without bound.  Damage: the mean
    KL(unsteered || steered) of the next-token distributions on the keep items (the target label).

    The set grows in order of the single-expert effects, adding an expert only when the set's effect
    rises by more than ``min_gain`` and its damage stays at most ``max_damage``; it stops after
    ``patience`` refusals in a row or at ``max_set``.  The chosen set is the smallest prefix of the grown
    set that reaches ``effect_fraction`` of its best effect.
    """
    if not any(q.away or q.target for q in away):
        raise ValueError("causal ranking needs away items with a 'response' (the behaviour to reduce) or a "
                         "'target'/'answer' (the wanted reply)")
    topo = model.topology

    def prof(experts: Sequence[tuple[int, int]]) -> SteeringProfile:
        p = SteeringProfile.for_model(topo, name="causal")
        for layer, e in experts:
            p.disable(layer, e)
        return p

    cache: list = []
    base = score_profiles(model, away, keep, [None], n_seq=n_seq, base_cache=cache)[0]

    def effect(s: SetScore) -> float:
        fx = base.away_p - s.away_p
        if base.target_p is not None and s.target_p is not None:
            fx += s.target_p - base.target_p
        return float(fx)

    singles = score_profiles(model, away, keep, [prof([c]) for c in candidates], n_seq=n_seq, base_cache=cache)
    effects = {c: effect(s) for c, s in zip(candidates, singles, strict=True)}
    damages = {c: s.damage for c, s in zip(candidates, singles, strict=True)}
    if progress:
        progress(f"single-expert effects of {len(candidates)} candidates measured")

    def row(experts: list, s: SetScore) -> dict:
        return {"size": len(experts), "experts": [list(c) for c in experts], "effect": effect(s), "damage": s.damage,
                "away_p": s.away_p, "target_p": s.target_p,
                "keep_nll_delta": None if s.keep_nll is None or base.keep_nll is None else s.keep_nll - base.keep_nll}

    curve = [row([], base)]
    rejected: list[dict] = []
    chosen: list[tuple[int, int]] = []
    per_layer: dict[int, int] = {}
    misses = 0
    for c in sorted(candidates, key=lambda c: -effects[c]):
        if len(chosen) >= max_set or misses >= patience or effects[c] <= 0:
            break
        if per_layer.get(c[0], 0) >= topo.n_expert - topo.n_expert_used:
            continue
        s = singles[candidates.index(c)] if not chosen else \
            score_profiles(model, away, keep, [prof(chosen + [c])], n_seq=n_seq, base_cache=cache)[0]
        fx = effect(s)
        reason = None
        if fx <= curve[-1]["effect"] + min_gain:
            reason = "no gain"
        elif s.damage > max_damage:
            reason = "damage over budget"
        if reason:
            rejected.append({"expert": list(c), "effect": fx, "damage": s.damage, "reason": reason})
            misses += 1
            continue
        misses = 0
        chosen.append(c)
        per_layer[c[0]] = per_layer.get(c[0], 0) + 1
        curve.append(row(chosen, s))
        if progress:
            progress(f"set of {len(chosen)}: effect {fx:+.3f}, damage {s.damage:.4f}")
    best = max(r["effect"] for r in curve)
    k = next((r["size"] for r in curve if r["effect"] >= effect_fraction * best), 0) if best > 0 else 0
    return SelectionResult(base, effects, damages, curve, rejected, chosen[:k], max_damage, effect_fraction)
