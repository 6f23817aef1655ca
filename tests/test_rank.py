"""Ranking: observational methods find a planted expert; causal effects match unbatched runs."""

from __future__ import annotations

import numpy as np
import pytest

from moe_gguf.engine.model import MoEModel
from moe_gguf.formats.records import RoutingRecord
from moe_gguf.study.probe import ProbeResult
from moe_gguf.study.rank import METHODS, agreement, rank


def planted(n_items=40, L=3, E=8, k=2, seed=0, hot=(1, 3), cold=(2, 5)) -> ProbeResult:
    """Random routing, except expert `hot` fires on most 'refuse' tokens and `cold` on most 'comply' ones."""
    rng = np.random.default_rng(seed)
    res = ProbeResult(L, E, "prompt")
    maps = np.zeros((n_items, L, E), np.int32)
    wsum = np.zeros((n_items, L, E), np.float32)
    toks = np.zeros((n_items, L), np.int32)
    for i in range(n_items):
        lab = "refuse" if i % 2 else "comply"
        n = int(rng.integers(8, 16))
        for _ in range(n):
            for layer in range(L):
                p = np.ones(E)
                if layer == hot[0]:
                    p[hot[1]] = 6.0 if lab == "refuse" else 0.5
                if layer == cold[0]:
                    p[cold[1]] = 6.0 if lab == "comply" else 0.5
                ids = rng.choice(E, k, replace=False, p=p / p.sum())
                maps[i, layer, ids] += 1
                wsum[i, layer, ids] += 0.5
                toks[i, layer] += 1
        res.item_labels.append(lab)
        res.item_pairs.append(str(i // 2))
        rec = res.records.setdefault(lab, RoutingRecord(L, E))
        rec.selections += maps[i]
        rec.weight_sum += wsum[i]
        rec.tokens += toks[i]
    res.item_maps, res.item_wsum, res.item_tokens = maps, wsum, toks
    return res


@pytest.mark.parametrize("method", METHODS)
def test_every_method_finds_the_planted_experts(method):
    r = rank(planted(), target="comply", away="refuse", method=method, top_n=3, n_boot=50)
    assert (r.ranked[0].layer, r.ranked[0].expert) in {(1, 3), (2, 5)}
    hot = next(x for x in r.ranked if (x.layer, x.expert) == (1, 3))
    cold = next(x for x in r.ranked if (x.layer, x.expert) == (2, 5))
    assert hot.action == "disable" and hot.ci_low > 0
    assert cold.action == "force" and cold.ci_high < 0
    assert r.stability is not None and r.stability > 0.3


def test_rd_is_steermoe_risk_difference():
    res = planted()
    r = rank(res, target="comply", away="refuse", method="rd", n_boot=0)
    a, t = res.records["refuse"], res.records["comply"]
    p_away = a.selections[1, 3] / a.tokens[1]
    p_target = t.selections[1, 3] / t.tokens[1]
    assert r.scores[1, 3] == pytest.approx(p_away - p_target)  # oriented: -(SteerMoE RD = p_target - p_away)


def test_profile_from_ranking_respects_layer_limits():
    res = planted()
    r = rank(res, target="comply", away="refuse", method="rd", n_boot=0)
    from moe_gguf.formats.topology import ModelTopology

    topo = ModelTopology("qwen3moe", 3, 64, 8, 2, (0, 1, 2), 0, "softmax", True, 0, 0, "t")
    prof = r.profile(topo, 10)
    prof.validate(topo)
    assert ("disable" in {e.action for e in prof.entries}) and (1, 3) in {(e.layer, e.expert) for e in prof.entries}


def test_unknown_label_or_method():
    with pytest.raises(ValueError, match="label"):
        rank(planted(), target="comply", away="nope")
    with pytest.raises(ValueError, match="method"):
        rank(planted(), target="comply", away="refuse", method="magic")


@pytest.mark.native
def test_causal_select_scores_are_batch_independent_and_damage_is_measured(synth_model):
    """score_profiles in one shared batch equals one sequence at a time; the damage of the unsteered model is 0 and
    that of a profile disabling most experts of every layer is larger than one disabling a single expert."""
    from moe_gguf.formats.profile import SteeringProfile
    from moe_gguf.study.rank import AwayItem, KeepItem, causal_select, score_profiles

    with MoEModel(synth_model("qwen3moe", "f32"), n_ctx=512, n_threads=2) as m:
        topo = m.topology
        away = [AwayItem(list(range(30 + i, 45 + i)), [70, 71, 72]) for i in range(3)]
        keep = [KeepItem(list(range(100 + i, 112 + i)), [5, 6]) for i in range(2)] + [KeepItem(list(range(60, 70)))]
        one = SteeringProfile.for_model(topo).disable(0, 1)
        many = SteeringProfile.for_model(topo)
        for layer in topo.moe_layers:
            for e in range(topo.n_expert - topo.n_expert_used):
                many.disable(layer, e)
        cache: list = []
        batched = score_profiles(m, away, keep, [None, one, many], n_seq=8, base_cache=cache)
        single = score_profiles(m, away, keep, [None, one, many], n_seq=1, base_cache=[])
        for a, b in zip(batched, single, strict=True):
            assert a.away_p == pytest.approx(b.away_p, abs=1e-3)
            assert a.damage == pytest.approx(b.damage, abs=1e-3)
        assert batched[0].damage == pytest.approx(0.0, abs=1e-6)
        assert batched[2].damage > batched[1].damage >= 0.0
        sel = causal_select(m, away, keep, [(0, 1), (1, 2), (0, 3)], max_set=2, max_damage=float("inf"))
        assert len(sel.chosen) <= 2 and sel.curve[0]["size"] == 0
        ag = agreement(rank(planted(L=topo.n_layer, E=topo.n_expert), target="comply", away="refuse", n_boot=0), sel)
        assert ag["n_candidates"] == 3 and ag["top_n"] == 10
        with pytest.raises(ValueError, match="response"):
            causal_select(m, [AwayItem([1, 2, 3], None)], keep, [(0, 1)])
