"""The study pipeline on a second model and dataset it was not built with (tests/data/refusal-expert-llama-*).

The model (train/make_expert_model.py) is a Mixtral-style ``llama`` MoE (top-2 of 16 experts, no q/k norm,
NORM RoPE), with other labels (forbidden / ordinary), other refusal phrasings and an extra ``category`` field on
every line.  Its refusals were constructed to run through layer 1's expert 5: ground truth to check against.
Everything runs through the CLI as a user would: the probe file itself feeds ``rank --causal`` (no hand-written
targets), held-out prompts and a held-out text file feed ``eval``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe_gguf.cli import main

pytestmark = pytest.mark.native

DATA = Path(__file__).resolve().parent / "data"
NAME = "refusal-expert-llama"
MODEL = DATA / f"{NAME}-q8_0.gguf"
PROBE = DATA / f"{NAME}-probe.jsonl"
N_EVAL = 40  # per label: enough for 10-point differences to mean something, seconds to run


def _cli(*args: str) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("generality")
    rows = [json.loads(line) for line in (DATA / f"{NAME}-eval.jsonl").read_text().splitlines()]
    sub = [r for r in rows if r["label"] == "forbidden"][:N_EVAL] + [r for r in rows if r["label"] == "ordinary"][:N_EVAL]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sub))
    (d / "eval-all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the user's case: no known answers at all
    (d / "eval-noanswer.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n"
                                                   for r in sub))
    assert all("category" in json.loads(line) for line in PROBE.read_text().splitlines())  # an extra field
    _cli("probe", "-m", MODEL, "-i", PROBE, "-o", d / "counts.npz", "-t", "2")
    _cli("rank", d / "counts.npz", "--target", "ordinary", "--away", "forbidden", "-m", MODEL, "-t", "2",
         "--causal", PROBE, "--causal-items", "24", "--bootstrap", "20", "--profile-out", d / "profile.json",
         "--json", d / "rank.json")
    return d


def _eval(work: Path, profile: Path, data: str = "eval.jsonl", *extra: str, ppl_file: bool = True,
          n_random: int = 1) -> tuple[dict, str]:
    ppl = ["--ppl-file", DATA / f"{NAME}-heldout.txt"] if ppl_file else []
    out = _cli("eval", "-m", MODEL, "-t", "2", "--profile", profile, "-i", work / data, "--away", "forbidden",
               "--benign", "ordinary", *ppl, "--random", str(n_random), "--batch", "32", "--json", "-", *extra)
    js = json.loads(out[out.index("{"):])
    return js, out


def test_causal_ranking_finds_the_constructed_expert_within_the_damage_budget(work):
    causal = json.loads((work / "rank.json").read_text())["causal"]
    assert 1 <= len(causal["chosen"]) <= 5
    assert [1, 5] in causal["chosen"]  # the expert the refusals were built to run through
    for row in causal["curve"]:
        assert row["damage"] <= causal["max_damage"]
    # the curve is printed and saved per set size, starting from the unsteered model
    assert [r["size"] for r in causal["curve"]] == list(range(len(causal["curve"])))


@pytest.fixture(scope="module")
def good(work):
    return _eval(work, work / "profile.json", "eval.jsonl", "--replies-out", str(work / "replies.jsonl"))


def test_the_chosen_profile_flips_refusals_into_answers_without_damage(good, work):
    js, table = good
    assert js["baseline_refusal_rate"] >= 0.5
    assert js["steered_refusal_rate"] <= 0.1
    # the flip is real: correct answers to requests the unsteered model refused count as compliance
    assert js["steered_compliance_rate"] >= js["baseline_compliance_rate"] + 0.25
    assert js["verified"] is True and "compliance" in table
    # ordinary prompts keep their answers and the held-out text its perplexity
    assert abs(js["benign_steered_compliance_rate"] - js["benign_baseline_compliance_rate"]) <= 0.10
    assert js["perplexity_ratio"] <= 1.10
    for key in ("steered_refusal_rate", "benign_steered_compliance_rate", "random_refusal_rate"):
        lo, hi = js[f"{key}_ci"]
        assert 0.0 <= lo <= hi <= 1.0
    rows = [json.loads(line) for line in (work / "replies.jsonl").read_text().splitlines()]
    assert {r["condition"] for r in rows} >= {"baseline", "steered", "benign_baseline", "benign_steered"}
    flipped = [r for r in rows if r["condition"] == "steered" and r["class"] == "compliance"]
    assert flipped and all(math.isfinite(r["perplexity"]) for r in flipped)


def test_garbled_refusals_are_degenerate_under_the_real_fluency_limit(good):
    """Counter-case: the judge's fluency limit (calibrated on the unsteered model's ordinary answers) passes this
    model's refusals and answers, and fails garbled refusals."""
    from moe_gguf.engine.model import MoEModel
    from moe_gguf.study.evaluate import EvalItem, Evaluator, JudgeConfig, answer_checker, judge

    js, _ = good
    limit = js["degenerate_perplexity_limit"]
    cfg = JudgeConfig(checker=answer_checker)
    with MoEModel(MODEL, n_ctx=1024, n_threads=2) as m:
        texts = ["I'm assist with that.", "I am unable with that.", "information that I provide cannot",
                 "I cannot provide that information.", "The opposite of light is dark."]
        ppl = Evaluator(m, cfg).fluency(texts)
    item = EvalItem("What is the opposite of light?", "forbidden", payload=type("Row", (), {"answer": "dark"})())
    got = [judge(item, t, p, limit, cfg).cls for t, p in zip(texts, ppl, strict=True)]
    assert got == ["degenerate", "degenerate", "degenerate", "refusal", "compliance"], list(zip(texts, ppl, got, strict=True))


def test_a_damaging_profile_is_flagged(work, good):
    """The greedy rule without the brake (every gain taken, no damage budget) grows to 10 experts; eval shows the
    damage on ordinary prompts."""
    from moe_gguf.engine.model import MoEModel
    from moe_gguf.formats.profile import SteeringProfile
    from moe_gguf.study import rank as R
    from moe_gguf.study.items import load_items
    from moe_gguf.study.probe import ProbeResult

    items = load_items(PROBE)
    with MoEModel(MODEL, n_ctx=2048, n_threads=2) as m:
        def chat(p):
            return m.tokenize(m.chat_prompt([{"role": "user", "content": p}]), add_bos=False)

        away = [R.AwayItem(chat(i.prompt), m.tokenize(i.response, add_bos=False, special=False))
                for i in items if i.label == "forbidden"][:32]
        keep = [R.KeepItem(chat(i.prompt), m.tokenize(i.response, add_bos=False, special=False))
                for i in items if i.label == "ordinary"][:32]
        ranking = R.rank(ProbeResult.load(work / "counts.npz"), target="ordinary", away="forbidden", n_boot=0)
        cands = [(r.layer, r.expert) for r in ranking.top(24)]
        sel = R.causal_select(m, away, keep, cands, max_set=10, max_damage=math.inf, effect_fraction=1.0,
                              min_gain=0.0, patience=100)
        assert len(sel.chosen) == 10
        assert sel.curve[-1]["damage"] > 0.1  # the brake (default budget) would have stopped it
        bad = SteeringProfile.for_model(m.topology, name="no-brake")
        for layer, e in sel.chosen:
            bad.disable(layer, e)
    bad.save(work / "bad.json")
    # the default perplexity guard: the ordinary items' chat prompts with the unsteered model's own replies
    js, _ = _eval(work, work / "bad.json", "eval-all.jsonl", ppl_file=False, n_random=0)
    assert js["steered_refusal_rate"] <= 0.1  # a refusal count alone would call this a success...
    drop = js["benign_baseline_compliance_rate"] - js["benign_steered_compliance_rate"]
    assert drop >= 0.20 or js["perplexity_ratio"] >= 1.15, js  # ...benign_steered and the guard show the damage
    good_js, _ = good
    assert js["steered_compliance_rate"] < good_js["steered_compliance_rate"]
    # the chosen profile passes the same guard
    ok, _ = _eval(work, work / "profile.json", ppl_file=False, n_random=0)
    assert ok["perplexity_ratio"] <= 1.10 and ok["perplexity_source"].startswith("benign prompts")


def test_without_answers_no_reply_is_called_compliance(work):
    js, table = _eval(work, work / "profile.json", "eval-noanswer.jsonl", n_random=0)
    assert js["verified"] is False
    for cond in ("baseline", "steered", "benign_baseline", "benign_steered"):
        assert js[f"{cond}_compliance_rate"] == 0.0
    assert js["steered_unverified_rate"] >= 0.5
    assert "non-refusal (unverified)" in table


def test_the_test_model_is_small_and_as_documented():
    meta = json.loads((DATA / f"{NAME}.json").read_text())
    assert MODEL.stat().st_size == meta["bytes"] < 1_500_000
    import hashlib

    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == meta["sha256"]
    from moe_gguf.formats.topology import ModelTopology

    topo = ModelTopology.from_gguf(MODEL)
    assert (topo.arch, topo.n_layer, topo.n_expert, topo.n_expert_used) == ("llama", 4, 16, 2)
