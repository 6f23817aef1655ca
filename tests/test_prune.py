"""moe-gguf prune: the pruned GGUF computes what the original computes with the same experts disabled.

Checked on the real patched llama.cpp for every synthetic architecture (softmax, softmax_weight and
sigmoid gating, selection bias, expert groups), plus the byte layout of the written file, padding
with routing counts, the refusals, atomic output and bounded memory.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from moe_gguf.engine.model import MoEModel
from moe_gguf.errors import CountFileError, FileWriteError, ProfileError
from moe_gguf.formats import prune as prune_mod
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.prune import (
    PruneError,
    load_counts,
    main_prune,
    plan_prune,
    prune_gguf,
    read_header,
    router_norm_counts,
)
from moe_gguf.formats.records import RoutingRecord, RoutingRecorder
from moe_gguf.formats.synth import SynthSpec, write_gguf
from moe_gguf.formats.topology import ModelTopology

from .conftest import ARCHS

PROMPT = list(range(40, 104))  # 64 tokens, byte-level ids
N_GREEDY = 300

# per arch: experts removed per MoE layer (different per layer; deepseek2: one from each group of 4)
REMOVE = {
    "qwen3moe": {0: [1, 6], 1: [0, 3]},
    "mixtral": {0: [1, 6], 1: [0, 3]},
    "gpt-oss": {0: [1, 6], 1: [0, 3]},
    "deepseek2": {1: [1, 6, 11, 12], 2: [0, 7, 9, 14]},
}


def disabling(topo: ModelTopology, removed: dict[int, list[int]]) -> SteeringProfile:
    p = SteeringProfile.for_model(topo, name="off")
    for il, experts in removed.items():
        for e in experts:
            p.disable(il, e)
    return p


def prompt_logits(path: Path, profile: SteeringProfile | None = None, *, batched: bool = False) -> np.ndarray:
    """All-token logits of PROMPT, [64, n_vocab]: decoded token by token, or as one batch."""
    with MoEModel(path, n_ctx=512, n_threads=2) as m, m.context(n_ubatch=None if batched else 1) as ctx:
        ctx.set_profile(profile)
        return ctx.decode([(0, PROMPT, 0)], logits="all")[0]


def greedy(path: Path, profile: SteeringProfile | None = None, n: int = N_GREEDY) -> tuple[list[int], np.ndarray]:
    """PROMPT token by token, then n greedy tokens (end-of-generation tokens do not stop it)."""
    with MoEModel(path, n_ctx=512, n_threads=2) as m, m.context(n_ubatch=1) as ctx:
        ctx.set_profile(profile)
        logits = [ctx.decode([(0, PROMPT, 0)])[0]]
        toks: list[int] = []
        for i in range(n):
            toks.append(int(np.argmax(logits[-1])))
            logits.append(ctx.decode([(0, toks[-1:], len(PROMPT) + i)])[0])
    return toks, np.stack(logits)


def record_counts(path: Path, tokens: list[int] = PROMPT) -> RoutingRecord:
    with MoEModel(path, n_ctx=512, n_threads=2) as m, m.context() as ctx:
        rec = RoutingRecorder(m.topology.n_layer, m.topology.n_expert, meta={"model": m.topology.fingerprint()})
        with ctx.recording(rec):
            ctx.decode([(0, tokens, 0)], logits="all")
    return rec.record


@pytest.fixture(scope="module")
def pruned(synth_model, tmp_path_factory):
    """pruned(arch, dtype) -> (source, pruned file, the disabling profile, report), made once."""
    out_dir = tmp_path_factory.mktemp("pruned")
    cache: dict = {}

    def make(arch: str, dtype: str):
        if (arch, dtype) not in cache:
            src = synth_model(arch, dtype)
            prof = disabling(ModelTopology.from_gguf(src), REMOVE[arch])
            dst = out_dir / f"{arch}-{dtype}-pruned.gguf"
            cache[(arch, dtype)] = (src, dst, prof, prune_gguf(src, dst, profile=prof))
        return cache[(arch, dtype)]

    return make


# -- the defining property ---------------------------------------------------------------------------------


@pytest.mark.native
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_pruned_logits_equal_disabled(pruned, arch):
    src, dst, prof, report = pruned(arch, "f32")
    n = ModelTopology.from_gguf(src).n_expert
    per_layer = len(next(iter(REMOVE[arch].values())))
    assert report.n_expert_out == ModelTopology.from_gguf(dst).n_expert == n - per_layer
    assert report.removed == REMOVE[arch] and not report.padded

    base = prompt_logits(src)
    off = prompt_logits(src, prof)
    out = prompt_logits(dst)
    assert np.abs(off - base).max() > 0.1  # the removed experts matter: the comparison is not vacuous
    diff = float(np.abs(out - off).max())
    print(f"{arch} f32: max |pruned - disabled| = {diff:.3g} token by token (vs unsteered {np.abs(out - base).max():.3g})")
    assert diff <= 1e-4  # in fact 0 on CPU: every kernel sees the same numbers in the same order
    np.testing.assert_array_equal(out.argmax(-1), off.argmax(-1))

    # one batch of 64 tokens: the router matmul (n_expert rows) takes a kernel path that depends on its row
    # count, so router logits may differ in the last bit (everything else is bit-identical); through the
    # layers this stays at float noise
    batched = float(np.abs(prompt_logits(dst, batched=True) - prompt_logits(src, prof, batched=True)).max())
    print(f"{arch} f32: max |pruned - disabled| = {batched:.3g} batched")
    assert batched <= 1e-3


@pytest.mark.native
@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_pruned_greedy_equals_disabled(pruned, arch):
    src, dst, prof, _ = pruned(arch, "q8_0")
    toks_off, logits_off = greedy(src, prof)
    toks_out, logits_out = greedy(dst)
    toks_base, _ = greedy(src)
    assert toks_base != toks_off  # disabling changes the output
    agree = sum(a == b for a, b in zip(toks_out, toks_off, strict=True))
    print(f"{arch} q8_0: greedy agreement {agree}/{N_GREEDY}, max |logit diff| token by token "
          f"{np.abs(logits_out - logits_off).max():.3g}")
    assert toks_out == toks_off
    assert np.abs(logits_out - logits_off).max() <= 1e-4  # token by token: same kernels, same order

    # a batched prompt: the router matmul's accumulation order depends on its row count (n_expert), so
    # router logits differ in the last bit; q8_0 activation quantization can round such a difference up
    # to one quantization step (~1e-2 in the logits) - noise, far below a wrong expert's effect (>1)
    batched = float(np.abs(prompt_logits(dst, batched=True) - prompt_logits(src, prof, batched=True)).max())
    print(f"{arch} q8_0: max |logit diff| batched prompt {batched:.3g}")
    assert batched < 0.3


# -- the file ---------------------------------------------------------------------------------------------


def _raw_kv(field) -> bytes:
    return b"".join(p.tobytes() for p in field.parts[2:])


@pytest.mark.native
@pytest.mark.parametrize("dtype", ["f32", "q4_k"])
@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss", "deepseek2"])
def test_file_slices_bytes_and_keeps_metadata(synth_model, tmp_path, arch, dtype):
    src = synth_model(arch, dtype)
    topo = ModelTopology.from_gguf(src)
    dst = tmp_path / "p.gguf"
    report = prune_gguf(src, dst, remove=REMOVE[arch])
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    n, kept = topo.n_expert, report.kept

    # metadata: byte-identical except the expert count, plus the provenance key
    fa = {k: f for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert set(fb) == set(fa) | {"moe_gguf.formats.prune"}
    for k, f in fa.items():
        if k == f"{topo.arch}.expert_count":
            assert fb[k].contents() == report.n_expert_out and fb[k].types == f.types
        else:
            assert _raw_kv(fb[k]) == _raw_kv(f), k
    info = json.loads(fb["moe_gguf.formats.prune"].contents())
    assert info["n_expert_in"] == n and {int(k): v for k, v in info["kept"].items()} == kept

    # tensors: same order and types; per-expert ones hold the kept experts' bytes, the others are unchanged
    assert [t.name for t in b.tensors] == [t.name for t in a.tensors]
    types = set()
    n_sliced = 0
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert tb.tensor_type == ta.tensor_type
        types.add(ta.tensor_type.name)
        ra = np.asarray(a.data[ta.data_offset:ta.data_offset + ta.n_bytes])
        rb = np.asarray(b.data[tb.data_offset:tb.data_offset + tb.n_bytes])
        part = ta.name.split(".", 2)[-1]
        if ta.name.startswith("blk.") and prune_mod._PER_EXPERT.fullmatch(part):
            il = int(ta.name.split(".")[1])
            assert list(tb.shape[:-1]) == list(ta.shape[:-1]) and tb.shape[-1] == len(kept[il])
            np.testing.assert_array_equal(rb.reshape(len(kept[il]), -1), ra.reshape(n, -1)[kept[il]])
            n_sliced += 1
        else:
            assert list(tb.shape) == list(ta.shape)
            np.testing.assert_array_equal(rb, ra)
    per_layer = {"qwen3moe": 4, "gpt-oss": 8, "deepseek2": 5}[arch]  # gate_inp(+bias), 3 exps(+3 biases), probs_b
    assert n_sliced == per_layer * len(topo.moe_layers)
    if dtype == "q4_k":
        assert {"Q4_K", "Q6_K"} & types  # the quantized blocks were copied, not requantized
    assert report.size_out == dst.stat().st_size < report.size_in == src.stat().st_size


# -- padding and counts ---------------------------------------------------------------------------------


@pytest.mark.native
def test_uneven_profile_needs_counts_then_pads_least_used(synth_model, tmp_path):
    src = synth_model("qwen3moe", "f32")
    topo = ModelTopology.from_gguf(src)
    prof = SteeringProfile.for_model(topo).disable(0, 1).disable(0, 6).disable(1, 0)
    dst = tmp_path / "p.gguf"
    with pytest.raises(PruneError, match=r"uneven pruning.*layer 1: 1.*--counts"):
        plan_prune(topo, profile=prof)
    # without counts: padded with the expert of weakest router row, read from the model itself
    norms = router_norm_counts(src, read_header(src), topo).weight_sum[1]
    weakest = min((e for e in range(8) if e != 0), key=lambda e: (norms[e], e))
    report = prune_gguf(src, tmp_path / "by-norm.gguf", profile=prof)
    assert report.padded == {1: [weakest]} and "router-row norms" in report.summary()
    diff = np.abs(prompt_logits(tmp_path / "by-norm.gguf") - prompt_logits(src, disabling(topo, report.removed))).max()
    assert diff <= 1e-4

    rec = record_counts(src)
    rec.save(tmp_path / "counts.npz")
    report = prune_gguf(src, dst, profile=prof, counts=tmp_path / "counts.npz")
    score = rec.selections[1] * rec.weight_sum[1]
    least = min((e for e in range(8) if e != 0), key=lambda e: (score[e], rec.selections[1][e], e))
    assert report.padded == {1: [least]}
    assert report.removed == {0: [1, 6], 1: sorted([0, least])}
    assert f"padded with least used {least}" in report.summary()
    # the padded model is the original with the padded experts disabled too
    diff = np.abs(prompt_logits(dst) - prompt_logits(src, disabling(topo, report.removed))).max()
    assert diff <= 1e-4


@pytest.mark.native
def test_keep_fraction_ranks_by_frequency_times_weight(synth_model, tmp_path, capsys):
    src = synth_model("mixtral", "f32")
    rec = record_counts(src)
    counts = tmp_path / "counts.npz"
    rec.save(counts)
    dst = tmp_path / "half.gguf"
    report = main_prune(src, dst, counts_path=counts, keep_fraction=0.5)
    assert capsys.readouterr().out == ""  # library code prints nothing
    out = report.summary()
    assert "8 -> 4 experts" in out and "counts.npz, keep 0.5" in out and "REAP-like proxy" in out
    assert not report.padded  # ranked, not padded
    for il, kept in report.kept.items():
        score = rec.selections[il] * rec.weight_sum[il]
        assert sorted(kept) == kept and len(kept) == 4
        assert min(score[kept]) >= max(np.delete(score, kept))  # the 4 best-scored experts stay
    topo = ModelTopology.from_gguf(src)
    diff = np.abs(prompt_logits(dst) - prompt_logits(src, disabling(topo, report.removed))).max()
    assert diff <= 1e-4


def test_count_file_errors(tmp_path):
    with pytest.raises(CountFileError, match="no such routing-count file"):
        load_counts(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CountFileError, match="not a routing-count file"):
        load_counts(tmp_path / "bad.npz")


def test_probe_result_counts_are_summed(tmp_path):
    from moe_gguf.study.probe import ProbeResult

    res = ProbeResult(2, 8, "prompt")
    a, b = res.record("a"), res.record("b")
    a.selections[:] = 1
    b.selections[:, 3] = 5
    a.tokens[:] = b.tokens[:] = 4
    res.save(tmp_path / "probe.npz")
    total = load_counts(tmp_path / "probe.npz")
    assert total.selections[0, 3] == 6 and total.selections[1, 0] == 1 and total.tokens[0] == 8


@pytest.mark.native
def test_deepseek2_groups_stay_even(synth_model, tmp_path):
    src = synth_model("deepseek2", "f32")
    topo = ModelTopology.from_gguf(src)
    rec = record_counts(src)

    # keep half: two experts of each group of four, in every layer
    dst = tmp_path / "half.gguf"
    report = prune_gguf(src, dst, counts=rec, keep_fraction=0.5)
    assert report.n_expert_out == 8
    for kept in report.kept.values():
        assert [sum(e // 4 == g for e in kept) for g in range(4)] == [2, 2, 2, 2]
    pt = ModelTopology.from_gguf(dst)
    assert (pt.n_expert, pt.n_expert_groups, pt.n_group_used) == (8, 4, 2)
    diff = np.abs(prompt_logits(dst) - prompt_logits(src, disabling(topo, report.removed))).max()
    assert diff <= 1e-4

    # two experts of group 0 of layer 1 only: uneven groups are refused, or padded from counts
    prof = SteeringProfile.for_model(topo).disable(1, 0).disable(1, 2)
    with pytest.raises(PruneError, match="every expert group"):
        plan_prune(topo, profile=prof)
    report = prune_gguf(src, tmp_path / "pad.gguf", profile=prof, counts=rec)
    assert report.n_expert_out == 8 and {0, 2} <= set(report.removed[1])
    assert sum(map(len, report.padded.values())) == 2 * 8 - 2
    diff = np.abs(prompt_logits(tmp_path / "pad.gguf") - prompt_logits(src, disabling(topo, report.removed))).max()
    assert diff <= 1e-4


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.native
def test_refuses_what_cannot_be_baked(synth_model, tmp_path):
    src = synth_model("gpt-oss", "f32")
    topo = ModelTopology.from_gguf(src)
    dst = tmp_path / "p.gguf"
    rec = record_counts(src)
    cases = [
        (dict(profile=SteeringProfile.for_model(topo).disable(0, 1).disable(1, 1).force(0, 2)), "forces 1 expert"),
        (dict(profile=SteeringProfile.for_model(topo).disable(0, 1).disable(1, 1).bias(0, 2, -1.0)), "bias/scale"),
        (dict(counts=rec, keep_fraction=0.25), "fewer than the 4 the model selects"),
        (dict(keep_fraction=0.5), "needs routing counts"),
        (dict(counts=rec, keep_fraction=1.5), "between 0 and 1"),
        (dict(counts=rec, keep_fraction=0.99), "no expert to remove"),
        (dict(counts=rec), "nothing says which experts"),
        (dict(remove={5: [1]}), "not a MoE layer"),
        (dict(remove={0: [8]}, counts=rec), "does not exist"),
        (dict(remove={0: [1]}, profile=SteeringProfile()), "not both"),
        (dict(remove={0: [1], 1: [1]}, counts=RoutingRecord(2, 16)), "16 experts"),
    ]
    for kw, msg in cases:
        with pytest.raises(PruneError, match=msg):
            prune_gguf(src, dst, **kw)
    assert not dst.exists()
    with pytest.raises(PruneError, match="is the source model"):
        prune_gguf(src, src, remove={0: [1], 1: [1]})
    other = SteeringProfile(model={**topo.fingerprint(), "n_expert": 16}).disable(0, 1).disable(1, 1)
    with pytest.raises(ProfileError, match="different model"):
        prune_gguf(src, dst, profile=other)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp file left behind


def test_refuses_uneven_groups_and_too_small_groups(synth_model):
    topo = ModelTopology.from_gguf(synth_model("deepseek2", "f32"))
    with pytest.raises(PruneError, match="keep at least 2 per group"):
        plan_prune(topo, remove={1: [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14], 2: [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]})
    wide = dataclasses.replace(topo, n_expert_used=6)  # 2 groups of 2 left per token < 6 experts per token
    half = [0, 1, 4, 5, 8, 9, 12, 13]
    with pytest.raises(PruneError, match="route within 2 groups of 2"):
        plan_prune(wide, remove={1: half, 2: half})


def _rewrite(src: Path, dst: Path, extra: dict[str, np.ndarray]) -> None:
    """``src`` plus ``extra`` tensors (tiny f32 models only: tensors are read whole)."""
    r = gguf.GGUFReader(src)
    w = prune_mod._Writer(dst, r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, prune_mod._Raw(_raw_kv(f)), f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, arr in extra.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(("name", "shape", "msg"), [
    ("blk.0.ffn_mystery_exps.weight", (8, 4), "does not know how to slice"),
    ("blk.0.exp_probs_b.bias", (7,), "expected the 8 experts"),
    ("blk.1.ffn_gate_tid2eid.weight", (512, 2), "maps tokens to expert ids"),
    ("blk.2.ffn_gate_inp.weight", (8, 256), "not one of the model's 2 steerable layers"),
])
def test_refuses_unknown_per_expert_tensors(synth_model, tmp_path, name, shape, msg):
    odd = tmp_path / "odd.gguf"
    _rewrite(synth_model("qwen3moe", "f32"), odd, {name: np.zeros(shape, np.float32)})
    with pytest.raises(PruneError, match=msg):
        prune_gguf(odd, tmp_path / "p.gguf", remove={0: [1], 1: [1]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]


def test_refuses_dense_model(tmp_path):
    dense = tmp_path / "dense.gguf"
    w = gguf.GGUFWriter(dense, "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PruneError, match="dense"):
        prune_gguf(dense, tmp_path / "p.gguf", remove={0: [0]})


# -- atomic output, memory --------------------------------------------------------------------------------


def test_failed_write_leaves_existing_output(synth_model, tmp_path, monkeypatch):
    src = synth_model("qwen3moe", "f32")
    dst = tmp_path / "p.gguf"
    dst.write_bytes(b"previous")

    def boom(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prune_mod._Writer, "write_ti_data_to_file", boom)
    with pytest.raises(FileWriteError, match=r"p\.gguf: cannot write the pruned model \(No space") as err:
        prune_gguf(src, dst, remove={0: [1], 1: [1]})
    assert isinstance(err.value, OSError) and isinstance(err.value, ValueError) and err.value.errno == 28
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gguf"]
    monkeypatch.undo()
    prune_gguf(src, dst, remove={0: [1], 1: [1]})  # success replaces it
    assert ModelTopology.from_gguf(dst).n_expert == 7


_CHILD = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from moe_gguf.formats.prune import prune_gguf
base = status("VmRSS:")
rep = prune_gguf(sys.argv[1], sys.argv[2], remove={0: list(range(0, 64, 2)), 1: list(range(1, 64, 2))})
print(json.dumps({"base": base, "peak": status("VmHWM:"), "size_in": rep.size_in, "size_out": rep.size_out}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_memory_stays_bounded(tmp_path):
    # ~315 MB f16; each expert tensor is 64 x 384 x 1024 x 2 B = 48 MiB
    spec = SynthSpec("qwen3moe", n_layer=2, n_embd=1024, n_head=8, n_head_kv=2, head_dim=128, n_ff_exp=384,
                     n_expert=64, n_expert_used=8)
    src = write_gguf(spec, tmp_path / "big.gguf", dtype="f16")
    dst = tmp_path / "big-pruned.gguf"
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], capture_output=True, text=True,
                             check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        n_expert = ModelTopology.from_gguf(dst).n_expert
    finally:  # pytest keeps recent temp dirs: do not leave ~0.5 GB behind
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    grew = m["peak"] - m["base"]
    print(f"prune of {m['size_in'] / 2**20:.0f} MiB -> {m['size_out'] / 2**20:.0f} MiB: peak RSS {m['peak'] / 2**20:.0f} MiB "
          f"({grew / 2**20:.0f} MiB above the interpreter with moe_gguf.formats.prune imported)")
    assert grew < 40 * 2**20  # less than one expert tensor: data is streamed, never held whole
    assert m["size_out"] < 0.55 * m["size_in"]
    assert n_expert == 32


@pytest.mark.native
def test_read_header_matches_gguf_reader(synth_model):
    src = synth_model("deepseek2", "q4_k")
    head, r = prune_mod.read_header(src), gguf.GGUFReader(src)
    assert [(t.name, list(t.ne), t.ggml_type, t.data_offset, t.n_bytes) for t in head.tensors] == \
        [(t.name, [int(x) for x in t.shape], int(t.tensor_type), int(t.data_offset), int(t.n_bytes)) for t in r.tensors]
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(head.kv) == list(fields)
    assert all(head.kv[k].raw == _raw_kv(f) for k, f in fields.items())
    assert head.value("deepseek2.expert_count") == 16 and head.value("general.architecture") == "deepseek2"
