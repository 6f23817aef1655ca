"""Synthetic MoE GGUFs: metadata and tensors as llama.cpp expects, and the real llama.cpp runs them."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

from moe_gguf.formats.synth import ARCHS, GGUF_ARCH, PRESETS, SynthSpec, build_vocab, main_synth, n_params, write_gguf

TEXT = b"Hello world, the quick brown fox jumps over the lazy dog."


def _kv(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _types(reader: gguf.GGUFReader) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in reader.tensors}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def llama(synth_model):
    """llama(arch, dtype) -> a loaded llama_cpp.Llama with logits for every token."""
    import llama_cpp

    loaded: dict = {}

    def get(arch: str, dtype: str, path: Path | None = None):
        if (arch, dtype) not in loaded:
            loaded[(arch, dtype)] = llama_cpp.Llama(
                model_path=str(path or synth_model(arch, dtype)), n_ctx=128, n_threads=2, verbose=False, logits_all=True
            )
        return loaded[(arch, dtype)]

    yield get
    for llm in loaded.values():
        llm.close()


def test_presets_shape_rules():
    for name, spec in PRESETS.items():
        assert spec.arch in ARCHS, name
        n_moe = spec.n_layer - spec.n_leading_dense
        assert n_moe >= 2, name
        if name.startswith("tiny-"):
            assert name == f"tiny-{spec.arch}"
            assert 8 <= spec.n_expert <= 16 and 2 <= spec.n_expert_used <= 4, name
            assert spec.n_embd % 256 == 0, name  # Q8_0/Q4_0/Q4_K rows
            assert n_params(spec) * 4 < 6 * 2**20, name  # ~5 MB as F32
    big = PRESETS["qwen3-30b-a3b"]
    assert (big.n_layer, big.n_embd, big.n_head, big.n_head_kv, big.head_dim) == (48, 2048, 32, 4, 128)
    assert (big.n_expert, big.n_expert_used, big.n_ff_exp) == (128, 8, 768)
    assert 29e9 < n_params(big) < 31e9  # the real model has 30.5B (with a bigger vocab)
    oss = PRESETS["gpt-oss-20b"]
    assert (oss.n_layer, oss.n_embd, oss.n_head, oss.n_head_kv, oss.head_dim) == (24, 2880, 64, 8, 64)
    assert (oss.n_expert, oss.n_expert_used, oss.n_ff_exp) == (32, 4, 2880)
    assert PRESETS["tiny-qwen3moe"].replace(n_layer=4).n_layer == 4


def test_spec_validation():
    with pytest.raises(ValueError, match="arch"):
        SynthSpec("olmoe", 2, 256, 4, 2, 32, 64, 8, 2)
    with pytest.raises(ValueError, match="n_expert_used"):
        PRESETS["tiny-mixtral"].replace(n_expert_used=9)
    with pytest.raises(ValueError, match="shared"):
        PRESETS["tiny-deepseek2"].replace(n_shared_expert=0)
    with pytest.raises(ValueError, match="groups"):
        PRESETS["tiny-deepseek2"].replace(n_expert_groups=3)
    with pytest.raises(ValueError, match="deepseek2-only"):
        PRESETS["tiny-qwen3moe"].replace(n_shared_expert=1)


def test_vocab_is_byte_level_bpe():
    tokens, types, merges = build_vocab(512)
    assert len(tokens) == len(types) == 512 and len(set(tokens)) == 512
    assert tokens[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[-1] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.NORMAL
    vocab = set(tokens)
    for m in merges:  # every merge joins two existing tokens into an existing token
        left, right = m.split(" ")
        assert left in vocab and right in vocab and left + right in vocab
    assert len(build_vocab(32000)[0]) == 32000


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_and_tensors(arch, synth_model):
    spec = PRESETS[f"tiny-{arch}"]
    r = gguf.GGUFReader(synth_model(arch, "f32"))
    ga = GGUF_ARCH[arch]
    assert _kv(r, "general.architecture") == ga
    assert _kv(r, f"{ga}.expert_count") == spec.n_expert
    assert _kv(r, f"{ga}.expert_used_count") == spec.n_expert_used
    assert _kv(r, f"{ga}.block_count") == spec.n_layer
    assert len(_kv(r, "tokenizer.ggml.tokens")) == spec.n_vocab
    assert "<|im_start|>" in _kv(r, "tokenizer.chat_template")
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml order (ne0 first)
    last = spec.n_layer - 1
    assert shapes[f"blk.{last}.ffn_gate_exps.weight"] == (spec.n_embd, spec.n_ff_exp, spec.n_expert)
    assert shapes[f"blk.{last}.ffn_down_exps.weight"] == (spec.n_ff_exp, spec.n_embd, spec.n_expert)
    assert shapes[f"blk.{last}.ffn_gate_inp.weight"] == (spec.n_embd, spec.n_expert)
    assert set(_types(r).values()) == {"F32"}
    if arch == "qwen3moe":
        assert f"blk.{last}.attn_q_norm.weight" in shapes
    if arch == "deepseek2":
        assert _kv(r, "deepseek2.expert_gating_func") == 2  # sigmoid
        assert _kv(r, "deepseek2.expert_group_count") == spec.n_expert_groups
        assert _kv(r, "deepseek2.expert_group_used_count") == spec.n_group_used
        assert _kv(r, "deepseek2.leading_dense_block_count") == 1
        assert _kv(r, "deepseek2.expert_shared_count") == 1
        assert "blk.0.ffn_gate.weight" in shapes and "blk.0.ffn_gate_inp.weight" not in shapes
        assert shapes["blk.1.exp_probs_b.bias"] == (spec.n_expert,)
        assert "blk.1.ffn_gate_shexp.weight" in shapes and "blk.1.attn_k_b.weight" in shapes
    if arch == "gpt-oss":
        assert _kv(r, "gpt-oss.attention.sliding_window") == spec.sliding_window
        assert shapes["blk.0.attn_sinks.weight"] == (spec.n_head,)
        assert shapes["blk.0.ffn_gate_exps.bias"] == (spec.n_ff_exp, spec.n_expert)


def test_f16_keeps_small_tensors_f32(tmp_path):
    for arch in ("deepseek2", "gpt-oss"):
        types = _types(gguf.GGUFReader(write_gguf(PRESETS[f"tiny-{arch}"], tmp_path / f"{arch}.gguf", dtype="f16")))
        assert types["blk.1.ffn_gate_exps.weight"] == "F16" and types["token_embd.weight"] == "F16"
        assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["output_norm.weight"] == "F32"
        assert all(t == "F32" for n, t in types.items() if n.endswith(".bias"))


def test_deterministic_per_seed(tmp_path):
    spec = PRESETS["tiny-qwen3moe"]
    a = write_gguf(spec, tmp_path / "a.gguf")
    b = write_gguf(spec, tmp_path / "b.gguf")
    c = write_gguf(spec.replace(seed=1), tmp_path / "c.gguf")
    assert _sha(a) == _sha(b) != _sha(c)
    ra, rc = gguf.GGUFReader(a), gguf.GGUFReader(c)
    wa = next(t for t in ra.tensors if t.name == "blk.0.ffn_up_exps.weight").data
    wc = next(t for t in rc.tensors if t.name == "blk.0.ffn_up_exps.weight").data
    assert not np.array_equal(wa, wc)
    assert 0.5 < float(np.std(wa)) * np.sqrt(spec.n_embd) < 1.5  # std ~ 1/sqrt(fan_in)


def _check_decodes(llm) -> None:
    toks = llm.tokenize(TEXT)
    assert llm.detokenize(toks) == TEXT
    llm.reset()
    llm.eval(toks)
    logits = np.asarray(llm.scores[: len(toks)])
    assert np.isfinite(logits).all()
    assert logits.std(axis=-1).min() > 0.1  # not all equal within a position
    assert len(set(logits.argmax(-1).tolist())) > len(toks) // 4  # predictions vary with the input


@pytest.mark.native
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_runs(arch, dtype, llama, synth_model):
    if dtype != "f32":
        types = _types(gguf.GGUFReader(synth_model(arch, dtype)))
        assert types["blk.1.ffn_up_exps.weight"] == "Q8_0"
        assert types["blk.1.ffn_gate_inp.weight"] == "F32"  # llama.cpp never quantizes routers
    _check_decodes(llama(arch, dtype))


@pytest.mark.native
@pytest.mark.parametrize(("arch", "dtype", "qtype"), [("qwen3moe", "q4_k", "Q4_K"), ("gpt-oss", "q4_0", "Q4_0")])
def test_llama_cpp_runs_4bit(arch, dtype, qtype, llama, tmp_path):
    path = write_gguf(PRESETS[f"tiny-{arch}"], tmp_path / f"{arch}-{dtype}.gguf", dtype=dtype)
    assert _types(gguf.GGUFReader(path))["blk.0.ffn_gate_exps.weight"] == qtype
    assert not list(tmp_path.glob(".*.tmp"))  # the pre-quantization temp file is gone
    _check_decodes(llama(arch, dtype, path))


@pytest.mark.native
def test_chat_completion(llama):
    llm = llama("qwen3moe", "f32")
    assert llm.tokenize(b"<|im_start|>", special=True) == [llm.n_vocab() - 2]
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=4, seed=0)
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_main_synth(tmp_path, capsys):
    path = main_synth("deepseek2", tmp_path / "m.gguf", "f32", n_layer=4, seed=3)
    r = gguf.GGUFReader(path)
    assert _kv(r, "deepseek2.block_count") == 4
    assert _kv(r, "general.name") == "synth-deepseek2"
    assert capsys.readouterr().out == ""  # library code prints nothing; the command prints the summary
    from click.testing import CliRunner

    from moe_gguf.cli import main

    res = CliRunner().invoke(main, ["synth", "deepseek2", "-o", str(tmp_path / "c.gguf"), "--n-layer", "4", "-s", "3"])
    assert res.exit_code == 0 and "4 layers" in res.output
    with pytest.raises(ValueError, match="unknown preset"):
        main_synth("nope", tmp_path / "x.gguf")


def test_write_memory_is_bounded(tmp_path):
    """A ~200 MB F16 file is written with a small, chunk-sized amount of memory."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        import moe_gguf.formats.synth as synth
        synth._CHUNK_ELEMS = 1 << 20  # 1M-value chunks, so any whole-tensor buffering shows
        spec = synth.PRESETS["tiny-qwen3moe"].replace(n_embd=1024, n_expert=32, n_ff_exp=512, n_vocab=4096)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        path = synth.write_gguf(spec, {str(tmp_path / "mid.gguf")!r}, dtype="f16")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(path.stat().st_size, (peak - base) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    size, growth = map(int, out.split())
    assert size > 180e6
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB writing a {size / 2**20:.0f} MiB file"
