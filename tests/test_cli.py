"""The click CLI over the Python API, on real synthetic models."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moe_gguf.cli import main
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.topology import ModelTopology
from moe_gguf.native import PATCH_API_VERSION

pytestmark = pytest.mark.native  # every test here runs the patched llama.cpp


def test_info(synth_model):
    path = synth_model("deepseek2", "q8_0")
    r = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["arch"] == "deepseek2" and d["gating"] == "sigmoid" and d["moe_layers"] == [1, 2]
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 0 and "deepseek2" in r.output


def test_info_on_a_missing_file_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(main, ["info", str(tmp_path / "none.gguf")])
    assert r.exit_code != 0 and "none.gguf" in r.output and "Traceback" not in r.output


def test_doctor():
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0, r.output
    assert f"moe-gguf patch API {PATCH_API_VERSION} (ok)" in r.output


def test_synth_and_generate_steered_vs_unsteered(tmp_path):
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["synth", "tiny-qwen3moe", "-o", str(out), "--dtype", "q8_0"])
    assert r.exit_code == 0, r.output
    topo = ModelTopology.from_gguf(out)
    prof = SteeringProfile.for_model(topo)
    for layer in topo.moe_layers:
        for e in range(topo.n_expert - topo.n_expert_used):
            prof.disable(layer, e)
    prof.save(tmp_path / "p.json")
    args = ["generate", "-m", str(out), "-p", "hello there", "-n", "12", "-t", "2"]
    plain = CliRunner().invoke(main, args)
    steered = CliRunner().invoke(main, args + ["--profile", str(tmp_path / "p.json")])
    both = CliRunner().invoke(main, args + ["--profile", str(tmp_path / "p.json"), "--compare"])
    assert plain.exit_code == steered.exit_code == both.exit_code == 0, both.output
    assert plain.output != steered.output
    assert both.output == f"steered:\n{steered.output}unsteered:\n{plain.output}"


def test_generate_with_a_bad_profile_is_a_clear_error(tmp_path, synth_model):
    bad = tmp_path / "p.json"
    bad.write_text("{")
    r = CliRunner().invoke(main, ["generate", "-m", str(synth_model("qwen3moe")), "-p", "x", "--profile", str(bad)])
    assert r.exit_code != 0 and "p.json" in r.output and "Traceback" not in r.output


def test_generate_with_expert_used_override(synth_model):
    path = synth_model("qwen3moe", "f32")
    r = CliRunner().invoke(main, ["generate", "-m", str(path), "-p", "hi", "-n", "4", "--expert-used-count", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", "-m", str(path), "-p", "hi", "--expert-used-count", "99"])
    assert r.exit_code != 0 and "expert_used_count" in r.output
