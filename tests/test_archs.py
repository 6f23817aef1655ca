"""A fast subset of the architecture coverage suite (tests/archs/suite.py) on llama.cpp's own GGUFs.

The files are written by llama.cpp's tests/test-llama-archs (built once from the vendored sources, cached
like the wheel: the first run builds it, minutes), 8 experts, 2 used per token. Each file is checked in
a child process through the real patched library; `python -m tests.archs.suite` runs every architecture.
"""

from __future__ import annotations

import pytest

from tests.archs import suite

pytestmark = pytest.mark.native

SUBSET = ("qwen3moe", "llama", "olmoe", "gpt-oss", "llama4", "deepseek2", "grovemoe", "llada-moe")
# what `prune` answers with a clear PruneError instead of pruning (moe_gguf/formats/prune.py _REFUSED_ARCHS)
PRUNE_REFUSED = {"grovemoe"}


@pytest.fixture(scope="session")
def arch_files():
    from tests.archs import build

    folder = build.generate(8, 2, "^(" + "|".join(SUBSET) + ")$")
    files = {f.name.removesuffix("-moe.gguf"): f for f in folder.glob("*-moe.gguf")}
    assert set(files) == set(SUBSET), f"test-llama-archs wrote {sorted(files)}"
    return files


@pytest.fixture(scope="session")
def results(arch_files):
    return {}


def _result(arch_files, results, arch):
    if arch not in results:
        results[arch] = suite.run_one(arch_files[arch])
    return results[arch]


@pytest.mark.parametrize("arch", SUBSET)
def test_load_and_topology_match_llama_cpp(arch_files, results, arch):
    r = _result(arch_files, results, arch)
    assert r["load"]["ok"], r["load"]["why"]
    topo, llama = r["topology"], r["llama"]
    assert topo["n_expert"] == 8 and topo["n_expert_used"] == 2
    assert topo["moe_layers"] == llama["cb_eval_layers"] != []  # the stock view: ffn_moe_topk-<il>
    assert llama["n_expert_used_ctx"] == [2] and llama["expert_count_meta"] == "8"


@pytest.mark.parametrize("arch", SUBSET)
def test_route_callback_sees_every_moe_layer(arch_files, results, arch):
    # llada-moe runs llama_encode under llama_decode: its routes are reported since patch API 3
    r = _result(arch_files, results, arch)
    assert r["load"]["ok"], r["load"]["why"]
    assert r["llama"]["capture_layers"] == r["topology"]["moe_layers"]
    assert r["llama"]["n_expert"] == [8] and r["llama"]["n_expert_used"] == [2]


def test_grovemoe_records_say_which_of_its_two_routers(arch_files, results):
    # llama_moe_route.router (patch API 3): grovemoe's chunk experts are a second top-k in the same layer
    r = _result(arch_files, results, "grovemoe")
    assert r["llama"]["routers_per_layer"] == [2]  # two build_moe_ffn calls per layer
    assert all(v == [0, 1] for v in r["llama"]["routers"].values()), r["llama"]["routers"]


@pytest.mark.parametrize("arch", SUBSET)
def test_profile_is_honoured_in_capture_and_cb_eval(arch_files, results, arch):
    r = _result(arch_files, results, arch)
    assert r["load"]["ok"], r["load"]["why"]
    assert r["steer"]["ok"], r["steer"]["why"]
    assert r["steer"]["plan"]  # one disabled and one forced expert per MoE layer


@pytest.mark.parametrize("arch", SUBSET)
def test_no_profile_is_bit_identical(arch_files, results, arch):
    r = _result(arch_files, results, arch)
    assert r["load"]["ok"], r["load"]["why"]
    assert r["capture"]["identical"] == {"capture_on": True, "steered_then_cleared": True}


@pytest.mark.parametrize("arch", SUBSET)
def test_capture_equals_cb_eval_token_by_token(arch_files, results, arch):
    r = _result(arch_files, results, arch)
    assert r["load"]["ok"], r["load"]["why"]
    assert r["capture"]["ok"], r["capture"]["why"]


@pytest.mark.parametrize("arch", SUBSET)
def test_prune_equals_disable_or_refuses_clearly(arch_files, results, arch):
    r = _result(arch_files, results, arch)
    assert r["load"]["ok"], r["load"]["why"]
    p = r["prune"]
    if arch in PRUNE_REFUSED:
        assert p["ok"] is None and p["why"].startswith("refused: ") and f"cannot prune {arch}" in p["why"]
    else:
        assert p["ok"] and p["exact"], p["why"]


def _edited(src, dst, **values):
    """A copy of `src` with some integer metadata values changed in place."""
    import shutil

    from gguf import GGUFReader

    shutil.copy(src, dst)
    r = GGUFReader(dst, "r+")
    for key, v in values.items():
        f = r.fields[key.replace("__", ".")]
        f.parts[f.data[0]][0] = v
    del r
    return dst


def test_a_file_llama_cpp_refuses_gets_its_reason(arch_files, tmp_path):
    from moe_gguf.engine.model import MoEModel
    from moe_gguf.errors import ModelFileError

    # deepseek2 without MLA runs plain multi-head attention, with other tensor shapes: llama.cpp refuses, clearly
    bad = _edited(arch_files["deepseek2"], tmp_path / "ds2.gguf", deepseek2__attention__key_length_mla=0,
                  deepseek2__attention__value_length_mla=0)
    with pytest.raises(ModelFileError, match="llama.cpp could not load the model: .*tensor 'blk.0.attn_q_b.weight' has wrong shape") as e:
        MoEModel(bad, n_ctx=64, n_threads=1)
    assert "ds2.gguf" in str(e.value) and "re-convert" in str(e.value)
    bad = _edited(arch_files["qwen3moe"], tmp_path / "q3.gguf", qwen3moe__expert_feed_forward_length=100)
    with pytest.raises(ModelFileError, match="tensor 'blk.0.ffn_gate_exps.weight' has wrong shape"):
        MoEModel(bad, n_ctx=64, n_threads=1)
