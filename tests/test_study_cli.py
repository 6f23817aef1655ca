"""CLI details of the study commands: --checker from the current directory, clear input errors, the demo on
another model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe_gguf.cli import main

DATA = Path(__file__).resolve().parent / "data"
MODEL = DATA / "refusal-expert-llama-q8_0.gguf"


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in (DATA / "refusal-expert-llama-eval.jsonl").read_text().splitlines()]
    sub = [r for r in rows if r["label"] == "forbidden"][:3] + [r for r in rows if r["label"] == "ordinary"][:3]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sub))
    (tmp_path / "p.json").write_text(json.dumps({"format": "moe-gguf-profile", "version": 1, "name": "v1", "entries": [
        {"layer": 1, "expert": 5, "action": "disable"}]}))  # a format-version-1 profile file, no model fingerprint
    return tmp_path


@pytest.mark.native
def test_checker_module_in_the_current_directory(small, monkeypatch):
    """--checker mod:fn finds mod.py beside the data without PYTHONPATH; it receives (EvalItem, reply), the
    EvalItem's payload being the JSONL line (StudyItem: prompt, label, answer, meta...)."""
    (small / "mychecks.py").write_text(
        "SEEN = []\n"
        "def strict(item, reply):\n"
        "    SEEN.append((item.payload.meta['category'], item.payload.answer))\n"
        "    return item.payload.answer in reply\n")
    monkeypatch.chdir(small)
    r = CliRunner().invoke(main, ["eval", "-m", str(MODEL), "-t", "2", "--profile", "p.json", "-i", "eval.jsonl",
                                  "--away", "forbidden", "--benign", "ordinary", "--random", "0", "-n", "16",
                                  "--checker", "mychecks:strict", "--json", "out.json", "--replies-out", "r.jsonl"])
    assert r.exit_code == 0, r.output
    js = json.loads((small / "out.json").read_text())
    assert js["verified"] is True
    rows = [json.loads(line) for line in (small / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 5  # baseline, steered, benign_baseline, benign_steered, benign_forced: 3 items each
    import mychecks  # imported by the command from the current directory

    assert mychecks.SEEN and all(isinstance(a, str) for _, a in mychecks.SEEN)


def test_checker_errors_are_clear(small, monkeypatch):
    monkeypatch.chdir(small)
    r = CliRunner().invoke(main, ["eval", "-m", str(MODEL), "--profile", "p.json", "-i", "eval.jsonl",
                                  "--away", "forbidden", "--checker", "nosuchmodule:fn"])
    assert r.exit_code != 0 and "--checker nosuchmodule:fn" in r.output and "ModuleNotFoundError" in r.output


def test_eval_input_errors_name_file_and_line(small):
    bad = small / "bad.jsonl"
    bad.write_text('{"prompt": "a", "label": "forbidden"}\n{"prompt": "b"}\n')
    r = CliRunner().invoke(main, ["eval", "-m", str(MODEL), "--profile", str(small / "p.json"), "-i", str(bad),
                                  "--away", "forbidden"])
    assert r.exit_code != 0 and "bad.jsonl:2: 'label' must be a non-empty string (missing)" in r.output
    r = CliRunner().invoke(main, ["eval", "-m", str(MODEL), "--profile", str(small / "p.json"), "-i",
                                  str(small / "eval.jsonl"), "--away", "refuse"])
    assert r.exit_code != 0 and "no items with label 'refuse'" in r.output and "forbidden" in r.output


@pytest.mark.native
def test_rank_causal_needs_away_responses(small, tmp_path):
    rows = [{"prompt": f"q{i}", "label": "forbidden" if i % 2 else "ordinary"} for i in range(8)]
    data = tmp_path / "noresp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = tmp_path / "c.npz"
    assert CliRunner().invoke(main, ["probe", "-m", str(MODEL), "-i", str(data), "-o", str(counts)]).exit_code == 0
    r = CliRunner().invoke(main, ["rank", str(counts), "--target", "ordinary", "--away", "forbidden", "-m", str(MODEL),
                                  "--causal", str(data), "--bootstrap", "0"])
    assert r.exit_code != 0 and "no 'forbidden' item has a 'response'" in r.output


@pytest.mark.native
def test_demo_on_another_model_sizes_its_context(synth_model, tmp_path):
    """A byte-level tokenizer makes the demo's prompts ~3x longer than on the demo model: the demo sizes its
    context for them instead of failing in llama_decode."""
    from moe_gguf.demo.run import run_demo
    from moe_gguf.errors import DemoSetupError

    try:
        r = run_demo(synth_model("mixtral", "q8_0"), out_dir=tmp_path, n_probe=16, n_eval=8, n_candidates=4,
                     n_causal=4, n_random=0, max_tokens=8, log=lambda m: None)
    except DemoSetupError as e:  # a random model may refuse nothing: said plainly, not a traceback
        assert "refus" in str(e)
    else:
        assert not all(r.checks.values())  # a random model does not show the behaviour: the checks say so
