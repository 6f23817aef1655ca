"""Random-weight Mixture-of-Experts GGUF files that the real llama.cpp loads and runs.

Used by tests and benchmarks: every file is a valid model of one of four MoE architectures
(tensor names, shapes and metadata keys as llama.cpp's loaders read them), with a small
byte-level BPE tokenizer and a ChatML chat template, so ``llama_cpp.Llama`` can tokenize,
decode and chat with it.  Weights are deterministic given ``SynthSpec.seed``.

Tensors are generated and written one chunk at a time, so even a multi-GB file is written
with a small, bounded amount of memory.  Quantized files are made by writing an F32/F16 file
first and handing it to llama.cpp's own quantizer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

ARCHS = ("qwen3moe", "mixtral", "deepseek2", "gpt-oss")
DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k")

# GGUF `general.architecture` per arch: Mixtral is llama.cpp's "llama" with experts.
GGUF_ARCH = {"qwen3moe": "qwen3moe", "mixtral": "llama", "deepseek2": "deepseek2", "gpt-oss": "gpt-oss"}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CHUNK_ELEMS = 1 << 24  # 16M values (64 MiB as f32) generated at a time
_F32_TEMP_MAX_PARAMS = 50_000_000  # above this the pre-quantization temp file is F16


@dataclass(frozen=True)
class SynthSpec:
    """Shape of a synthetic MoE model.

    ``head_dim`` is the attention head size; for deepseek2 it is both the no-RoPE part of the
    query/key head (qk_nope) and the value head size of MLA attention.  deepseek2 always uses a
    single KV head (MLA), so ``n_head_kv`` is ignored there; its shared expert has
    ``n_ff_exp * n_shared_expert`` units (llama.cpp derives that size), and ``n_ff_dense`` is the
    FFN size of the leading dense layer(s).
    """

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff_exp: int
    n_expert: int
    n_expert_used: int
    n_vocab: int = 512
    n_ctx_train: int = 4096
    n_ff_dense: int = 0  # deepseek2: leading dense layer FFN size
    n_shared_expert: int = 0  # deepseek2
    n_leading_dense: int = 0  # deepseek2: first layer(s) dense
    n_expert_groups: int = 0  # deepseek2 group-limited routing
    n_group_used: int = 0
    kv_lora_rank: int = 0  # deepseek2 MLA: compressed KV width (0 = 2 * head_dim)
    rope_dim: int = 0  # deepseek2 MLA: RoPE part of the q/k head (0 = head_dim // 2)
    sliding_window: int = 128  # gpt-oss: window of the even (SWA) layers
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError("need 0 < n_expert_used <= n_expert")
        if self.n_vocab < 256 + len(SPECIAL_TOKENS) + 1:
            raise ValueError("n_vocab must leave room for 256 byte tokens, the special tokens and a merge")
        if self.arch == "deepseek2":
            if self.n_shared_expert < 1:
                raise ValueError("deepseek2 needs n_shared_expert >= 1 (llama.cpp requires the shexp tensors)")
            if not 0 <= self.n_leading_dense < self.n_layer:
                raise ValueError("deepseek2 needs 0 <= n_leading_dense < n_layer")
            if self.n_leading_dense and self.n_ff_dense <= 0:
                raise ValueError("deepseek2 with leading dense layers needs n_ff_dense > 0")
            if self.n_expert_groups > 1:
                # llama.cpp: groups divide the experts, 0 < group_used < groups, and it scores a
                # group by its top-2 experts
                if self.n_expert % self.n_expert_groups or self.n_expert // self.n_expert_groups < 2:
                    raise ValueError("n_expert_groups must divide n_expert into groups of >= 2")
                if not 0 < self.n_group_used < self.n_expert_groups:
                    raise ValueError("need 0 < n_group_used < n_expert_groups")
        elif self.n_expert_groups or self.n_leading_dense or self.n_shared_expert:
            raise ValueError("expert groups, shared experts and dense layers are deepseek2-only here")

    def replace(self, **changes: object) -> SynthSpec:
        """A copy with some fields changed, e.g. ``spec.replace(n_layer=4, seed=1)``."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def mla_kv_lora_rank(self) -> int:
        return self.kv_lora_rank or 2 * self.head_dim

    @property
    def mla_rope_dim(self) -> int:
        return self.rope_dim or self.head_dim // 2


_TINY = dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=32, n_ff_exp=64, n_expert=8, n_expert_used=2)

PRESETS: dict[str, SynthSpec] = {
    "tiny-qwen3moe": SynthSpec("qwen3moe", **_TINY),
    "tiny-mixtral": SynthSpec("mixtral", **_TINY),
    "tiny-deepseek2": SynthSpec(
        "deepseek2", n_layer=3, n_embd=256, n_head=4, n_head_kv=1, head_dim=32, n_ff_exp=32,
        n_expert=16, n_expert_used=4, n_ff_dense=64, n_shared_expert=1, n_leading_dense=1,
        n_expert_groups=4, n_group_used=2, kv_lora_rank=32, rope_dim=16,
    ),
    "tiny-gpt-oss": SynthSpec(
        "gpt-oss", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=32, n_ff_exp=64,
        n_expert=8, n_expert_used=4, sliding_window=32,
    ),
    # real-scale shapes (small vocab keeps the files a little smaller); use .replace(n_layer=...)
    "qwen3-30b-a3b": SynthSpec(
        "qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff_exp=768,
        n_expert=128, n_expert_used=8, n_vocab=32000, n_ctx_train=40960,
    ),
    "gpt-oss-20b": SynthSpec(
        "gpt-oss", n_layer=24, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64, n_ff_exp=2880,
        n_expert=32, n_expert_used=4, n_vocab=32000, n_ctx_train=131072,
    ),
}


# ---------------------------------------------------------------------------------------------
# tokenizer


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable unicode character map (index = byte value)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocab of exactly ``n_vocab`` tokens: (tokens, token types, merges).

    Ids 0..255 are the byte tokens, the special tokens are the last ids, and the rest are
    merged letter strings ("Ġt", "th", "Ġth", ...) made from an explicit merge list, so every
    token is reachable and decodes to plain text.
    """
    tokens = _byte_chars()
    n_merge = n_vocab - len(tokens) - len(SPECIAL_TOKENS)
    letters = "etaoinsrhldcumfpgwybvkxjqz"
    merges: list[str] = []
    frontier = ["Ġ", *letters]  # "Ġ" is the byte char for a space
    while len(merges) < n_merge:
        grown: list[str] = []
        for left in frontier:
            for c in letters:
                if len(merges) == n_merge:
                    break
                merges.append(f"{left} {c}")
                grown.append(left + c)
        tokens += grown
        frontier = grown
    tokens += SPECIAL_TOKENS
    types = [int(gguf.TokenType.NORMAL)] * (n_vocab - len(SPECIAL_TOKENS)) + [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    assert len(tokens) == n_vocab
    return tokens, types, merges


def _add_tokenizer(w: gguf.GGUFWriter, n_vocab: int) -> None:
    add_tokenizer(w, *build_vocab(n_vocab))


def add_tokenizer(w: gguf.GGUFWriter, tokens: list[str], types: list[int], merges: list[str]) -> None:
    """Byte-level BPE tokenizer metadata + ChatML template; the special tokens are the last ids."""
    n_vocab = len(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eot, _, im_end = (n_vocab - len(SPECIAL_TOKENS) + i for i in range(len(SPECIAL_TOKENS)))
    w.add_bos_token_id(eot)
    w.add_eos_token_id(im_end)  # end of a chat turn, so chat completions stop there
    w.add_pad_token_id(eot)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# tensor plan


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: reversed ggml ne, e.g. (n_expert, n_ff, n_embd)
    std: float  # 0 -> constant `fill`
    fill: float = 0.0
    keep_f32: bool = False  # norms, biases, sinks and routers stay F32 (as convert_hf_to_gguf does)


def _w(name: str, *shape: int, gain: float = 1.0) -> _Tensor:
    """A weight matrix; std 1/sqrt(fan_in) keeps activations O(1) through every layer."""
    return _Tensor(name, shape, gain / math.sqrt(shape[-1]))


def _norm(name: str, n: int) -> _Tensor:
    return _Tensor(name, (n,), 0.0, fill=1.0, keep_f32=True)


def _small(name: str, *shape: int, std: float = 0.02) -> _Tensor:
    return _Tensor(name, shape, std, keep_f32=True)


def _tensor_plan(s: SynthSpec) -> list[_Tensor]:
    E, V = s.n_embd, s.n_vocab
    # A wide router (std 4/sqrt(n_embd) -> router logits of std ~4) makes top-k choices differ
    # from token to token; rows are i.i.d., so experts are used about evenly on average.
    # Sigmoid gating saturates sooner, so deepseek2 gets a narrower one.
    router_gain = 2.0 if s.arch == "deepseek2" else 4.0
    plan = [_Tensor("token_embd.weight", (V, E), 1.0)]
    for i in range(s.n_layer):
        b = f"blk.{i}"
        plan.append(_norm(f"{b}.attn_norm.weight", E))
        if s.arch == "deepseek2":
            # MLA, "lite" form (q_lora_rank 0): one q projection, compressed KV + a shared RoPE key,
            # and the per-head k/v up-projections split into attn_k_b / attn_v_b as llama.cpp wants.
            r, kv = s.mla_rope_dim, s.mla_kv_lora_rank
            plan += [
                _w(f"{b}.attn_q.weight", s.n_head * (s.head_dim + r), E),
                _w(f"{b}.attn_kv_a_mqa.weight", kv + r, E),
                _norm(f"{b}.attn_kv_a_norm.weight", kv),
                _w(f"{b}.attn_k_b.weight", s.n_head, kv, s.head_dim),
                _w(f"{b}.attn_v_b.weight", s.n_head, s.head_dim, kv),
                _w(f"{b}.attn_output.weight", E, s.n_head * s.head_dim),
            ]
        else:
            q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
            plan += [_w(f"{b}.attn_q.weight", q, E), _w(f"{b}.attn_k.weight", kv, E), _w(f"{b}.attn_v.weight", kv, E)]
            plan.append(_w(f"{b}.attn_output.weight", E, q))
            if s.arch == "qwen3moe":
                plan += [_norm(f"{b}.attn_q_norm.weight", s.head_dim), _norm(f"{b}.attn_k_norm.weight", s.head_dim)]
            if s.arch == "gpt-oss":
                plan += [_small(f"{b}.attn_q.bias", q), _small(f"{b}.attn_k.bias", kv), _small(f"{b}.attn_v.bias", kv)]
                plan += [_small(f"{b}.attn_output.bias", E), _small(f"{b}.attn_sinks.weight", s.n_head, std=0.5)]
        # gpt-oss names its pre-FFN norm post_attention_norm
        plan.append(_norm(f"{b}.post_attention_norm.weight" if s.arch == "gpt-oss" else f"{b}.ffn_norm.weight", E))
        if i < s.n_leading_dense:  # deepseek2 dense lead layer
            F = s.n_ff_dense
            plan += [_w(f"{b}.ffn_gate.weight", F, E), _w(f"{b}.ffn_up.weight", F, E), _w(f"{b}.ffn_down.weight", E, F)]
            continue
        X, F = s.n_expert, s.n_ff_exp
        plan.append(dataclasses.replace(_w(f"{b}.ffn_gate_inp.weight", X, E, gain=router_gain), keep_f32=True))
        plan += [
            _w(f"{b}.ffn_gate_exps.weight", X, F, E),
            _w(f"{b}.ffn_up_exps.weight", X, F, E),
            _w(f"{b}.ffn_down_exps.weight", X, E, F),
        ]
        if s.arch == "gpt-oss":
            plan += [
                _small(f"{b}.ffn_gate_inp.bias", X, std=0.1),
                _small(f"{b}.ffn_gate_exps.bias", X, F),
                _small(f"{b}.ffn_up_exps.bias", X, F),
                _small(f"{b}.ffn_down_exps.bias", X, E),
            ]
        if s.arch == "deepseek2":
            S = F * s.n_shared_expert
            plan.append(_small(f"{b}.exp_probs_b.bias", X, std=0.1))  # selection-only bias
            plan += [_w(f"{b}.ffn_gate_shexp.weight", S, E), _w(f"{b}.ffn_up_shexp.weight", S, E)]
            plan.append(_w(f"{b}.ffn_down_shexp.weight", E, S))
    plan += [_norm("output_norm.weight", E), _w("output.weight", V, E)]
    return plan


def n_params(spec: SynthSpec) -> int:
    """Total number of weights in the model."""
    return sum(math.prod(t.shape) for t in _tensor_plan(spec))


# ---------------------------------------------------------------------------------------------
# metadata


def _add_hparams(w: gguf.GGUFWriter, s: SynthSpec) -> None:
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_vocab_size(s.n_vocab)
    w.add_head_count(s.n_head)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    if s.arch == "deepseek2":
        r, kv = s.mla_rope_dim, s.mla_kv_lora_rank
        w.add_head_count_kv(1)  # MLA caches one shared compressed "head"
        w.add_feed_forward_length(s.n_ff_dense)
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_leading_dense_block_count(s.n_leading_dense)
        w.add_expert_shared_count(s.n_shared_expert)
        w.add_q_lora_rank(0)  # required key; 0 selects the plain attn_q projection
        w.add_kv_lora_rank(kv)
        # cache layout as llama.cpp's MLA path wants: K = [compressed kv, rope], V = compressed kv;
        # the *_mla lengths are the per-head sizes after decompression
        w.add_key_length(kv + r)
        w.add_value_length(kv)
        w.add_key_length_mla(s.head_dim + r)
        w.add_value_length_mla(s.head_dim)
        w.add_rope_dimension_count(r)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_norm(True)
        w.add_expert_weights_scale(2.5)
        w.add_expert_group_count(s.n_expert_groups)
        w.add_expert_group_used_count(s.n_group_used)
        return
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    if s.arch == "mixtral":
        w.add_feed_forward_length(s.n_ff_exp)  # "llama" reads the expert size from here
        w.add_rope_freq_base(1e6)
        w.add_layer_norm_rms_eps(1e-5)
    elif s.arch == "qwen3moe":
        w.add_feed_forward_length(s.n_ff_exp * s.n_expert_used)
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_rope_freq_base(1e6)
        w.add_layer_norm_rms_eps(1e-6)
    else:  # gpt-oss: even layers use a sliding window (llama.cpp's default pattern of 2)
        w.add_feed_forward_length(s.n_ff_exp)
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_sliding_window(s.sliding_window)
        w.add_rope_freq_base(150000.0)
        w.add_layer_norm_rms_eps(1e-5)


# ---------------------------------------------------------------------------------------------
# writing


def _chunks(t: _Tensor, arch: str, seed: int, np_dtype: type[np.floating]) -> Iterator[np.ndarray]:
    """The tensor's values in row-major chunks of at most ~_CHUNK_ELEMS values.

    Each tensor has its own generator keyed by (seed, arch, name), so values do not depend on
    chunking or on the other tensors.
    """
    if t.std == 0.0:
        yield np.full(t.shape, t.fill, dtype=np_dtype)
        return
    rng = np.random.default_rng([seed, zlib.crc32(f"{arch}/{t.name}".encode())])
    row = math.prod(t.shape[1:])
    step = max(1, _CHUNK_ELEMS // max(row, 1))
    for start in range(0, t.shape[0], step):
        n = min(step, t.shape[0] - start)
        x = rng.standard_normal((n, *t.shape[1:]), dtype=np.float32)
        x *= t.std
        yield x.astype(np_dtype, copy=False)


def _write_plain(spec: SynthSpec, path: Path, dtype: str, name: str) -> None:
    """Write an F32 or F16 GGUF, generating tensor data on the fly."""
    arch = GGUF_ARCH[spec.arch]
    plan = _tensor_plan(spec)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    _add_hparams(w, spec)
    _add_tokenizer(w, spec.n_vocab)

    dtypes: list[type[np.floating]] = []
    for t in plan:
        np_dtype = np.float32 if dtype == "f32" or t.keep_f32 else np.float16
        dtypes.append(np_dtype)
        w.add_tensor_info(t.name, t.shape, np.dtype(np_dtype), math.prod(t.shape) * np.dtype(np_dtype).itemsize)

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # Tensor data is streamed straight to the file: GGUFWriter.write_tensor_data wants each
        # tensor whole, which for a real-scale expert tensor would be GBs in RAM.
        assert w.fout is not None
        fout = w.fout[0]
        for t, np_dtype in zip(plan, dtypes, strict=True):
            w.write_padding(fout, fout.tell())  # each tensor starts aligned
            for chunk in _chunks(t, spec.arch, spec.seed, np_dtype):
                fout.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
    finally:
        w.close()


_LLAMA_FTYPE = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def _quantize(src: Path, dst: Path, dtype: str) -> None:
    """Quantize with llama.cpp itself (same tensor-type choices as `llama-quantize`).

    The quantizer's log (one line per tensor, fallback warnings) is captured instead of
    printed, and quoted in the exception if quantization fails.
    """
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPE[dtype])
    params.nthread = os.cpu_count() or 1
    params.max_buf_size = 512 << 20  # bound the quantizer's row buffers (default is 8 GiB)

    log: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        log.append(text.decode("utf-8", "replace"))

    prev_cb, prev_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_data))
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(prev_cb, prev_data)
    if rc != 0:
        tail = "".join(log).strip().splitlines()[-20:]
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {dtype}) failed ({rc}):\n" + "\n".join(tail))


def write_gguf(spec: SynthSpec, path: str | Path, *, dtype: str = "f32", name: str | None = None) -> Path:
    """Write ``spec`` as a GGUF file at ``path`` and return the path.

    dtype: "f32" | "f16" (written directly, memory bounded) or "q8_0" | "q4_0" | "q4_k"
    (Q4_K_M), made by llama.cpp's quantizer from a temporary F32 (small models) or F16 file
    next to ``path``.  Norms, biases, sinks and routers (ffn_gate_inp) stay F32.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = name or f"synth-{spec.arch}"
    if dtype in ("f32", "f16"):
        _write_plain(spec, path, dtype, name)
        return path
    tmp_dtype = "f32" if n_params(spec) <= _F32_TEMP_MAX_PARAMS else "f16"
    tmp = path.with_name(f".{path.name}.{tmp_dtype}.tmp")
    try:
        _write_plain(spec, tmp, tmp_dtype, name)
        _quantize(tmp, path, dtype)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def resolve_spec(preset_or_arch: str, *, n_layer: int | None = None, seed: int = 0) -> SynthSpec:
    """A preset by name, or an arch name for its tiny preset; optionally with n_layer/seed changed."""
    if preset_or_arch in PRESETS:
        spec = PRESETS[preset_or_arch]
    elif preset_or_arch in ARCHS:
        spec = PRESETS[f"tiny-{preset_or_arch}"]
    else:
        raise ValueError(f"unknown preset or arch {preset_or_arch!r}; presets: {sorted(PRESETS)}, archs: {ARCHS}")
    changes: dict[str, object] = {"seed": seed}
    if n_layer is not None:
        changes["n_layer"] = n_layer
    return spec.replace(**changes)


def main_synth(preset_or_arch: str, out: str | Path, dtype: str = "f32", n_layer: int | None = None, seed: int = 0) -> Path:
    """What `moe-gguf synth` does: write a synthetic model (the command prints ``synth_summary``).

    ``preset_or_arch`` is a PRESETS key or an arch name (its tiny preset); ``dtype`` one of
    DTYPES; ``n_layer`` overrides the preset's depth (e.g. 4 layers of a real-scale shape).
    """
    spec = resolve_spec(preset_or_arch, n_layer=n_layer, seed=seed)
    name = f"synth-{preset_or_arch}"
    path = write_gguf(spec, out, dtype=dtype, name=name)
    return path


def synth_summary(path: Path, spec: SynthSpec, dtype: str, name: str) -> str:
    """The one line `moe-gguf synth` prints about a written model."""
    return (f"wrote {path} ({name}, {spec.arch}, {spec.n_layer} layers, {spec.n_expert} experts "
            f"top-{spec.n_expert_used}, {n_params(spec) / 1e6:.1f}M params, {dtype}, {path.stat().st_size / 2**20:.1f} MiB)")
