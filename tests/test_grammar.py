"""One grammar for every command: the same option names and defaults, old spellings still work with a note."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moe_gguf.cli import main
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.synth import PRESETS, write_gguf
from moe_gguf.formats.topology import ModelTopology

# the commands this grammar covers that load a model
MODEL_COMMANDS = ("info", "generate", "sweep", "chat", "probe", "prune", "rank", "eval", "demo")


def _help(cmd: str) -> str:
    r = CliRunner().invoke(main, [cmd, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("cmd", MODEL_COMMANDS)
def test_model_is_dash_m_everywhere(cmd):
    assert "-m, --model FILE" in _help(cmd)


@pytest.mark.parametrize("cmd", ["generate", "chat", "prune", "eval"])
def test_commands_taking_a_profile_allow_a_mismatch(cmd):
    assert "--allow-model-mismatch" in _help(cmd)


def test_shared_names_and_defaults():
    for cmd in ("generate", "probe"):
        assert "-n, --max-tokens INTEGER RANGE" in _help(cmd) and "[default: 64" in _help(cmd)
        assert "--raw" in _help(cmd)
    assert "-n, --max-tokens INTEGER RANGE" in _help("eval") and "[default: 32" in _help("eval")
    for cmd in ("rank", "eval"):
        assert "--raw" in _help(cmd)
    for cmd in ("generate", "synth", "rank", "eval", "demo"):
        assert "-s, --seed INTEGER" in _help(cmd)
    for cmd in ("info", "generate", "sweep", "prune", "rank", "eval", "demo"):
        assert "--json FILE" in _help(cmd)
    assert "-p, --prompt" in _help("generate") and "-p," not in _help("rpc-server")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("g")
    spec = PRESETS["tiny-qwen3moe"]
    return write_gguf(spec, d / "a.gguf", name="base"), write_gguf(spec.replace(seed=5), d / "b.gguf", name="tuned")


def test_info_positional_or_dash_m_and_json_to_stdout_or_file(models, tmp_path):
    a, _ = models
    r1 = CliRunner().invoke(main, ["info", str(a), "--json"])
    r2 = CliRunner().invoke(main, ["info", "-m", str(a), "--json", "-"])
    assert r1.exit_code == r2.exit_code == 0 and json.loads(r1.output) == json.loads(r2.output)
    r3 = CliRunner().invoke(main, ["info", "-m", str(a), "--json", str(tmp_path / "i.json")])
    assert r3.exit_code == 0 and json.loads((tmp_path / "i.json").read_text())["weights"]
    r4 = CliRunner().invoke(main, ["info"])
    assert r4.exit_code != 0 and "-m/--model" in r4.output
    r5 = CliRunner().invoke(main, ["info", str(a), "-m", str(tmp_path / "other.gguf")])
    assert r5.exit_code != 0 and "two models given" in r5.output


@pytest.mark.native
def test_old_spellings_work_with_a_note(models, tmp_path):
    a, _ = models
    runner = CliRunner()
    new = runner.invoke(main, ["generate", "-m", str(a), "-p", "hi", "-n", "4", "-t", "2"])
    old = runner.invoke(main, ["generate", "-m", str(a), "-p", "hi", "-n", "4", "-t", "2", "--chat"])
    assert new.exit_code == old.exit_code == 0, old.output
    assert "--chat is deprecated and does nothing" in old.stderr and new.stdout == old.stdout
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "label": "x"}\n')
    r = runner.invoke(main, ["probe", "-m", str(a), "-i", str(data), "-o", str(tmp_path / "c.npz"), "-t", "2",
                             "--tokens", "generated", "--max-new-tokens=3"])
    assert r.exit_code == 0, r.output
    assert "--max-new-tokens is deprecated, use --max-tokens" in r.stderr


@pytest.mark.native
def test_generate_chat_template_by_default_raw_opts_out(models):
    a, _ = models
    base = ["generate", "-m", str(a), "-p", "hello", "-n", "6", "-t", "2", "--json", "-"]
    chat = json.loads(CliRunner().invoke(main, base).stdout)
    raw = json.loads(CliRunner().invoke(main, base + ["--raw"]).stdout)
    assert chat["text"]["tokens"] >= 1 and raw["text"]["tokens"] >= 1
    assert chat != raw  # another prompt: the template wraps it


@pytest.mark.native
def test_a_profile_on_a_fine_tune_warns_on_stderr_naming_both(models, tmp_path):
    a, b = models
    topo = ModelTopology.from_gguf(a)
    SteeringProfile.for_model(topo).disable(topo.moe_layers[0], 1).save(tmp_path / "p.json")
    r = CliRunner().invoke(main, ["generate", "-m", str(b), "-p", "hi", "-n", "2", "-t", "2",
                                  "--profile", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("warning: ") and "base" in r.stderr and "tuned" in r.stderr


@pytest.mark.native
def test_prune_synopsis_pads_without_counts_and_accepts_old_flag(models, tmp_path):
    a, _ = models
    topo = ModelTopology.from_gguf(a)
    SteeringProfile.for_model(topo).disable(topo.moe_layers[0], 1).save(tmp_path / "p.json")
    r = CliRunner().invoke(main, ["prune", str(a), "-o", str(tmp_path / "o.gguf"), "--profile", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "router-row norms" in r.output
    assert ModelTopology.from_gguf(tmp_path / "o.gguf").n_expert == topo.n_expert - 1
