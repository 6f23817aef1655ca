"""ModelTopology.from_gguf on small hand-written GGUFs (metadata + tiny tensors; not loadable by llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from moe_gguf.errors import ModelFileError
from moe_gguf.formats.topology import ModelTopology, format_layers


def write_gguf(path: Path, arch: str = "qwen3moe", *, n_layer: int = 4, n_expert: int = 8, n_used: int = 2,
               moe_layers: tuple[int, ...] | None = None, keys: dict | None = None, name: str | None = "tiny",
               drop: tuple[str, ...] = ()) -> Path:
    """A GGUF with `arch` metadata and, per layer, either router + expert tensors (MoE) or a dense FFN."""
    moe_layers = tuple(range(n_layer)) if moe_layers is None else moe_layers
    w = gguf.GGUFWriter(path, arch)
    if name is not None:
        w.add_name(name)
    w.add_block_count(n_layer)
    w.add_embedding_length(16)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_used)
    for key, value in (keys or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)
    for key in drop:
        w.kv_data[0].pop(key)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    for il in range(n_layer):
        if il in moe_layers:
            w.add_tensor(f"blk.{il}.ffn_gate_inp.weight", np.zeros((n_expert, 16), np.float32))
            w.add_tensor(f"blk.{il}.ffn_down_exps.weight", np.zeros((n_expert, 16, 4), np.float32))
        else:
            w.add_tensor(f"blk.{il}.ffn_down.weight", np.zeros((16, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_all_moe_layers(tmp_path):
    t = ModelTopology.from_gguf(write_gguf(tmp_path / "m.gguf"))
    assert (t.arch, t.n_layer, t.n_embd, t.n_expert, t.n_expert_used) == ("qwen3moe", 4, 16, 8, 2)
    assert t.moe_layers == (0, 1, 2, 3)
    assert t.is_moe and t.name == "tiny"
    assert t.gating == "softmax" and t.norm_weights  # qwen3moe: fixed in the llama.cpp graph
    assert t.n_shared_expert == 0 and t.n_expert_groups == 0


def test_leading_and_interleaved_dense_layers(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "deepseek2", n_layer=5, moe_layers=(1, 2, 4),
                      keys={"deepseek2.leading_dense_block_count": 1, "deepseek2.expert_shared_count": 2})
    t = ModelTopology.from_gguf(path)
    assert t.moe_layers == (1, 2, 4) and t.n_layer == 5 and t.n_shared_expert == 2
    assert t.fingerprint() == {"arch": "deepseek2", "n_layer": 5, "n_expert": 8, "n_expert_used": 2, "moe_layers": [1, 2, 4],
                               "weights": t.weights, "name": t.name}
    assert t.weights and len(t.weights) == 16
    text = t.describe()
    assert "1-2, 4" in text and "2 dense" in text and t.fingerprint_id() in text


def test_router_only_or_experts_only_layer_counts_as_moe(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_block_count(3)
    w.add_expert_count(4)
    w.add_expert_used_count(1)
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((4, 2), np.float32))
    w.add_tensor("blk.2.ffn_down_exps.weight", np.zeros((4, 2, 2), np.float32))
    w.add_tensor("blk.1.ffn_gate_inp_shexp.weight", np.zeros((2,), np.float32))  # not a router
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert ModelTopology.from_gguf(path).moe_layers == (0, 2)


@pytest.mark.parametrize("arch, keys, gating, norm", [
    ("gpt-oss", {}, "softmax_weight", True),                                # fixed in the graph
    ("gpt-oss", {"gpt-oss.expert_gating_func": 2}, "softmax_weight", True),  # ...even if the key says otherwise
    ("llama4", {}, "sigmoid", False),
    ("deepseek2", {}, "softmax", False),                                     # key absent: softmax
    ("deepseek2", {"deepseek2.expert_gating_func": 2, "deepseek2.expert_weights_norm": True}, "sigmoid", True),
    ("glm4moe", {}, "sigmoid", False),                                       # key absent: sigmoid
    ("deepseek4", {"deepseek4.expert_gating_func": 4}, "sqrt_softplus", False),
    ("someday-moe", {}, "softmax", False),                                   # unknown arch: softmax
    ("minicpm", {}, "softmax", True),                                        # granite's graph: fixed
])
def test_gating_defaults(tmp_path, arch, keys, gating, norm):
    t = ModelTopology.from_gguf(write_gguf(tmp_path / "m.gguf", arch, keys=keys))
    assert (t.gating, t.norm_weights) == (gating, norm)


def test_groups_mtp_layers_and_per_layer_expert_used(tmp_path):
    keys = {"glm4moe.expert_group_count": 4, "glm4moe.expert_group_used_count": 2,
            "glm4moe.nextn_predict_layers": 1, "glm4moe.expert_used_count": [0, 2, 2, 2]}
    path = write_gguf(tmp_path / "m.gguf", "glm4moe", moe_layers=(1, 2, 3), keys=keys, drop=())
    t = ModelTopology.from_gguf(path)
    assert t.n_layer == 3 and t.moe_layers == (1, 2)  # the MTP block (3) is not steerable
    assert (t.n_expert_groups, t.n_group_used, t.n_expert_used) == (4, 2, 2)


def test_expert_used_override(tmp_path):
    t = ModelTopology.from_gguf(write_gguf(tmp_path / "m.gguf"), expert_used_override=3)
    assert t.n_expert_used == 3 and t.fingerprint()["n_expert_used"] == 3


def test_dense_model(tmp_path):
    t = ModelTopology.from_gguf(write_gguf(tmp_path / "dense.gguf", "llama", n_expert=0, moe_layers=(), name=None))
    assert not t.is_moe and t.n_expert == 0 and t.moe_layers == () and t.n_expert_used == 0
    assert t.name == "dense"  # no general.name: the file stem
    assert "dense model" in t.describe()


def test_to_dict(tmp_path):
    d = ModelTopology.from_gguf(write_gguf(tmp_path / "m.gguf")).to_dict()
    assert d["moe_layers"] == [0, 1, 2, 3] and d["is_moe"] and len(d["fingerprint_id"]) == 12


def test_fingerprint_id_is_stable_and_shape_sensitive(tmp_path):
    a = ModelTopology.from_gguf(write_gguf(tmp_path / "a.gguf", name="a"))
    b = ModelTopology.from_gguf(write_gguf(tmp_path / "b.gguf", name="b"))
    c = ModelTopology.from_gguf(write_gguf(tmp_path / "c.gguf", n_expert=16))
    assert a.fingerprint_id() == b.fingerprint_id() != c.fingerprint_id()


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file") as e:
        ModelTopology.from_gguf(tmp_path / "nope.gguf")
    assert "nope.gguf" in str(e.value)


def test_directory(tmp_path):
    with pytest.raises(ModelFileError, match="directory"):
        ModelTopology.from_gguf(tmp_path)


def test_bad_magic(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(64))
    with pytest.raises(ModelFileError, match="not a GGUF") as e:
        ModelTopology.from_gguf(path)
    assert str(path) in str(e.value) and "convert" in str(e.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.touch()
    with pytest.raises(ModelFileError, match="not a GGUF"):
        ModelTopology.from_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_file(tmp_path, keep):
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="truncated") as e:
        ModelTopology.from_gguf(path)
    assert str(path) in str(e.value) and "download" in str(e.value)


def test_missing_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", drop=("general.architecture",))
    with pytest.raises(ModelFileError, match="general.architecture") as e:
        ModelTopology.from_gguf(path)
    assert str(path) in str(e.value)


def test_missing_block_count(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", drop=("qwen3moe.block_count",))
    with pytest.raises(ModelFileError, match="qwen3moe.block_count"):
        ModelTopology.from_gguf(path)


def test_split_model_reads_every_split(tmp_path):
    first = write_gguf(tmp_path / "big-00001-of-00002.gguf", n_layer=4, moe_layers=(0, 1), keys={"split.count": 2})
    w = gguf.GGUFWriter(tmp_path / "big-00002-of-00002.gguf", "qwen3moe")
    w.add_uint32("split.no", 1)
    for il in (2, 3):
        w.add_tensor(f"blk.{il}.ffn_gate_inp.weight", np.zeros((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = ModelTopology.from_gguf(first)
    assert t.moe_layers == (0, 1, 2, 3) and t.name == "tiny"
    (tmp_path / "big-00002-of-00002.gguf").unlink()
    with pytest.raises(ModelFileError, match="big-00002-of-00002.gguf"):
        ModelTopology.from_gguf(first)


def test_format_layers():
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert format_layers(()) == "none"


# What llama.cpp's own model saver writes (tests/test-llama-archs -o): every hyper-parameter, 0 where the arch
# does not use it. llama.cpp loads these files, so moe-gguf must too.
_SAVER_ZEROS = {"attention.kv_lora_rank": 0, "attention.q_lora_rank": 0, "attention.key_length_mla": 0,
                "attention.value_length_mla": 0, "attention.kv_lora_rank_swa": 0, "expert_group_count": 0,
                "expert_group_used_count": 0, "expert_gating_func": 0, "nextn_predict_layers": 0}


@pytest.mark.parametrize("arch", ["qwen3moe", "llama", "olmoe", "gpt-oss", "granitemoe", "phimoe", "qwen2moe", "dbrx",
                                  "llama4", "deepseek", "glm4moe", "minimax-m2", "qwen3next"])
def test_unused_mla_keys_at_zero_are_accepted(tmp_path, arch):
    keys = {f"{arch}.{k}": v for k, v in _SAVER_ZEROS.items()}
    keys |= {f"{arch}.attention.key_length": 4, f"{arch}.attention.value_length": 4, f"{arch}.rope.dimension_count": 4,
             f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 4}
    t = ModelTopology.from_gguf(write_gguf(tmp_path / "m.gguf", arch, keys=keys))
    assert t.is_moe and t.n_expert_groups == 0


def test_mla_keys_of_an_arch_without_mla_are_ignored(tmp_path):
    # qwen3moe's loader never reads them: values that would be wrong for deepseek2 mean nothing here
    keys = {"qwen3moe.attention.kv_lora_rank": 512, "qwen3moe.attention.key_length_mla": 192,
            "qwen3moe.attention.value_length_mla": 128, "qwen3moe.attention.head_count": 4,
            "qwen3moe.attention.key_length": 4, "qwen3moe.attention.value_length": 4}
    assert ModelTopology.from_gguf(write_gguf(tmp_path / "m.gguf", keys=keys)).is_moe


def _deepseek2(tmp_path, **kw):
    keys = {"deepseek2.attention.kv_lora_rank": 512, "deepseek2.attention.key_length": 576,
            "deepseek2.attention.value_length": 512, "deepseek2.rope.dimension_count": 64,
            "deepseek2.attention.key_length_mla": 192, "deepseek2.attention.value_length_mla": 128,
            "deepseek2.attention.head_count": 4, "deepseek2.attention.head_count_kv": 1}
    keys.update({f"deepseek2.{k.replace('__', '.')}": v for k, v in kw.items()})
    return write_gguf(tmp_path / "ds.gguf", "deepseek2", keys=keys)


def test_mla_geometry_is_checked_where_llama_cpp_uses_mla(tmp_path):
    assert ModelTopology.from_gguf(_deepseek2(tmp_path)).is_moe
    with pytest.raises(ModelFileError, match=r"'deepseek2.attention.key_length' == kv_lora_rank \+ rope") as e:
        ModelTopology.from_gguf(_deepseek2(tmp_path, attention__key_length=512))
    assert "ds.gguf" in str(e.value) and "found key length 512" in str(e.value) and "re-convert" in str(e.value)
    with pytest.raises(ModelFileError, match="'deepseek2.attention.head_count_kv' == 1, found \\[4\\]"):
        ModelTopology.from_gguf(_deepseek2(tmp_path, attention__head_count_kv=4))


def test_deepseek2_without_mla_or_without_a_latent_is_not_checked(tmp_path):
    # key_length_mla == 0: llama.cpp's is_mla() is false and deepseek2 runs plain multi-head attention
    assert ModelTopology.from_gguf(_deepseek2(tmp_path, attention__key_length_mla=0, attention__key_length=192,
                                              attention__head_count_kv=4)).is_moe
    # kv_lora_rank 0: llama.cpp refuses the tensor shapes itself, with an error (not an abort)
    assert ModelTopology.from_gguf(_deepseek2(tmp_path, attention__kv_lora_rank=0)).is_moe


def test_hy_v4_needs_mla(tmp_path):
    # its loader asserts is_mla(): an abort of the whole process, so moe-gguf says it first
    path = write_gguf(tmp_path / "hy.gguf", "hy_v4", keys={"hy_v4.attention.key_length_mla": 0,
                                                          "hy_v4.attention.value_length_mla": 0})
    with pytest.raises(ModelFileError, match="hy_v4 needs MLA attention.*key_length_mla"):
        ModelTopology.from_gguf(path)


def test_expert_tensors_that_llama_cpps_graph_ignores_make_a_dense_model(tmp_path):
    # refact's loader creates expert tensors, its graph never routes (no build_moe_ffn): dense, with the reason
    t = ModelTopology.from_gguf(write_gguf(tmp_path / "r.gguf", "refact"))
    assert not t.is_moe and t.moe_layers == () and "ignores the file's expert tensors" in t.note
    assert "ignores" in t.describe()
