"""The MoE shape of a GGUF model, read from its metadata and tensor names (no tensor data is loaded).

    topo = ModelTopology.from_gguf("model.gguf")
    topo.moe_layers, topo.n_expert, topo.n_expert_used, topo.gating
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe_gguf.errors import ModelFileError
from moe_gguf.formats.gguf_header import GGUFHeader, GGUFHeaderError, array_len, decode, read_header, string_items

# llama_expert_gating_func_type (src/llama-hparams.h); 0 (NONE) means "not set"
_GATING_CODES = {1: "softmax", 2: "sigmoid", 3: "softmax_weight", 4: "sqrt_softplus"}

# Arches whose graph passes a fixed gating function to build_moe_ffn, ignoring `%s.expert_gating_func`
# (src/models/*.cpp). Arches not listed here read the key.
_FIXED_GATING = {
    **dict.fromkeys(("llama4", "mimo2", "nemotron_h", "nemotron_h_moe"), "sigmoid"),
    "gpt-oss": "softmax_weight",
    **dict.fromkeys(
        ("arctic", "bailingmoe", "dbrx", "deepseek", "ernie4_5-moe", "gemma4", "granite", "granitemoe", "minicpm",
         "granite_swa", "granitehybrid", "grok", "grovemoe", "hunyuan-moe", "jamba", "llada-moe", "llama",
         "maple", "mellum", "minimax-01", "mistral3", "nomic-bert-moe", "olmoe", "phimoe", "qwen2moe",
         "qwen35moe", "qwen3moe", "qwen3next", "qwen3vlmoe", "qwen4exp", "rnd1"),
        "softmax"),
}
# Arches that read the key and fall back to sigmoid when it is absent; every other arch falls back to
# softmax (deepseek2 has a special case for GLM-4.7-Lite, see _gating()).
_SIGMOID_WHEN_ABSENT = frozenset(("afmoe", "cohere2moe", "glm-dsa", "glm4moe", "glm5-next", "hy_v3", "laguna", "step35"))

# Arches whose graph passes a fixed norm_w to build_moe_ffn instead of `%s.expert_weights_norm`.
_FIXED_NORM = {
    **dict.fromkeys(
        ("arctic", "dbrx", "ernie4_5-moe", "gemma4", "granite", "granitemoe", "minicpm", "granite_swa", "granitehybrid",
         "grok", "grovemoe", "hunyuan-moe", "kimi-linear", "lfm2", "lfm2moe", "llama", "maple", "mellum", "mimo2",
         "minimax-01", "minimax-m2", "mistral3", "phimoe", "qwen35moe", "qwen3moe", "qwen3next", "qwen3vlmoe",
         "qwen4exp", "rnd1", "smallthinker"),
        True),
    **dict.fromkeys(("deepseek", "jamba", "llada-moe", "llama4", "nomic-bert-moe", "olmoe", "qwen2moe"), False),
}

# Arches whose llama.cpp graph never routes, whatever expert tensors the file holds (src/models/*.cpp: no
# build_moe_ffn call): llama.cpp loads the tensors and ignores them, so for moe-gguf the model is dense.
_DENSE_GRAPH = {
    "refact": "llama.cpp's refact graph runs a dense FFN in every layer and ignores the file's expert tensors",
}

_MOE_TENSOR = re.compile(r"blk\.(\d+)\.(?:ffn_gate_inp|ffn_down_exps)\.weight")
_SPLIT_NAME = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")


@dataclass(frozen=True)
class ModelTopology:
    arch: str  # GGUF general.architecture
    n_layer: int  # transformer blocks, without next-token-prediction (MTP) blocks, as llama.cpp counts them
    n_embd: int
    n_expert: int  # routed experts per MoE layer (0 for dense models)
    n_expert_used: int  # experts selected per token
    moe_layers: tuple[int, ...]  # layers with routed experts (leading / interleaved dense layers excluded)
    n_shared_expert: int
    gating: str  # "softmax" | "sigmoid" | "softmax_weight" | "sqrt_softplus"
    norm_weights: bool  # top-k weights renormalised
    n_expert_groups: int  # 0/1 = no group-limited routing
    n_group_used: int
    name: str  # general.name or file stem
    # digest of the router weights (sampled bytes of each layer's ffn_gate_inp), telling same-shape models apart
    weights: str | None = field(default=None, compare=False)
    note: str = field(default="", compare=False)  # why a file with expert tensors or metadata is still not MoE for llama.cpp

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and self.n_expert_used > 0 and bool(self.moe_layers)

    def fingerprint(self) -> dict[str, Any]:
        """What a steering profile is checked against: the shape of the expert tables (must match), the router
        weights' digest (a differing one is a warning: a fine-tune of the same model) and the model's name."""
        fp: dict[str, Any] = {
            "arch": self.arch,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "moe_layers": list(self.moe_layers),
        }
        if self.weights:
            fp["weights"] = self.weights
            fp["name"] = self.name
        return fp

    def fingerprint_id(self) -> str:
        """A short id of the shape part of the fingerprint (the same for a model and its fine-tunes)."""
        shape = {k: v for k, v in self.fingerprint().items() if k not in ("weights", "name")}
        blob = json.dumps(shape, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def describe(self) -> str:
        lines = [f"{self.name} ({self.arch})"]
        if not self.is_moe:
            lines.append(f"  layers:      {self.n_layer}, none with routed experts (dense model)")
            lines.append(f"  embedding:   {self.n_embd}")
            if self.note:
                lines.append(f"  note:        {self.note}")
            return "\n".join(lines)
        dense = self.n_layer - len(self.moe_layers)
        lines += [
            f"  layers:      {self.n_layer} ({len(self.moe_layers)} MoE: {format_layers(self.moe_layers)}"
            + (f"; {dense} dense)" if dense else ")"),
            f"  experts:     {self.n_expert} routed, {self.n_expert_used} used per token, {self.n_shared_expert} shared",
            f"  gating:      {self.gating}" + (", top-k weights renormalised" if self.norm_weights else ""),
            "  groups:      "
            + (f"{self.n_expert_groups} expert groups, {self.n_group_used} used per token" if self.n_expert_groups > 1 else "none"),
            f"  embedding:   {self.n_embd}",
            f"  fingerprint: {self.fingerprint_id()}" + (f", router weights {self.weights}" if self.weights else ""),
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d["is_moe"] = self.is_moe
        d["fingerprint_id"] = self.fingerprint_id()
        return d

    @classmethod
    def from_gguf(cls, path: str | Path, *, expert_used_override: int | None = None) -> ModelTopology:
        """Read a GGUF's MoE topology; `expert_used_override` is the top-k the model will be run with."""
        path = Path(path)
        head = _open(path)
        fields = head.kv

        def get(key: str, default: Any = None) -> Any:
            f = fields.get(key)
            try:
                return default if f is None else decode(f)
            except Exception as e:  # a damaged value: UnicodeDecodeError for a string that is not UTF-8, ...
                raise ModelFileError(f"{path}: GGUF key {key!r} cannot be read ({type(e).__name__}: {e}); the file is "
                                     "corrupted. Re-download or re-convert the model.") from e

        def get_int(key: str, default: int | None = None) -> int:
            v = get(key, default)
            if v is None:
                raise ModelFileError(f"{path}: GGUF key {key!r} is missing; the file is incomplete or was not "
                                     "written by a llama.cpp converter. Re-convert the model.")
            if isinstance(v, bool) or not isinstance(v, int):
                raise ModelFileError(f"{path}: GGUF key {key!r} should be an integer, found {v!r}. Re-convert the model.")
            return v

        arch = get("general.architecture")
        if not arch and get("split.no", 0):
            raise ModelFileError(f"{path}: split {get('split.no') + 1} of a model split into several files; "
                                 "open the first one (<name>-00001-of-0000N.gguf), which holds the metadata.")
        if not isinstance(arch, str) or not arch:
            raise ModelFileError(f"{path}: GGUF key 'general.architecture' is missing, so the model type is unknown. "
                                 "Re-convert the model with llama.cpp's convert_hf_to_gguf.py.")
        # MTP blocks come after the regular ones; llama.cpp steers only layers below n_layer()
        n_layer = get_int(f"{arch}.block_count") - get_int(f"{arch}.nextn_predict_layers", 0)
        n_expert = get_int(f"{arch}.expert_count", 0)

        tensor_names = [t.name for t in head.tensors]
        n_split = get_int("split.count", 1)
        if n_split > 1:
            tensor_names += _split_tensor_names(path, n_split)
        moe_layers: tuple[int, ...] = ()
        if n_expert > 0 and arch not in _DENSE_GRAPH:
            found = {int(m.group(1)) for m in map(_MOE_TENSOR.fullmatch, tensor_names) if m}
            moe_layers = tuple(sorted(il for il in found if il < n_layer))

        # expert_used_count may be a per-layer array; a single number is the largest, as llama.cpp's n_expert_used_max
        used = get(f"{arch}.expert_used_count", 0)
        if isinstance(used, list):
            used = max((used[il] for il in moe_layers if il < len(used)), default=max(used, default=0))
        if expert_used_override is not None:
            used = int(expert_used_override)
        if isinstance(used, bool) or not isinstance(used, int):
            raise ModelFileError(f"{path}: GGUF key '{arch}.expert_used_count' should be an integer, found {used!r}.")

        _check_llama_limits(path, arch, get, get_int)
        _check_vocab(path, fields.get("tokenizer.ggml.tokens"))

        gating_code = get_int(f"{arch}.expert_gating_func", 0)
        n_vocab = get(f"{arch}.vocab_size")
        if n_vocab is None and "tokenizer.ggml.tokens" in fields:
            n_vocab = array_len(fields["tokenizer.ggml.tokens"])
        gating = _gating(arch, gating_code, n_layer, n_vocab)
        if gating is None:
            raise ModelFileError(f"{path}: unknown '{arch}.expert_gating_func' value {gating_code}; this model needs a "
                                 "newer moe-gguf (or the file is corrupted).")
        norm = bool(get(f"{arch}.expert_weights_norm", False))
        norm = _FIXED_NORM.get(arch, norm) or gating == "softmax_weight"  # softmax_weight: softmax over the top-k

        name = get("general.name")
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=get_int(f"{arch}.embedding_length", 0),
            n_expert=n_expert if moe_layers else 0,
            n_expert_used=used if moe_layers else 0,
            moe_layers=moe_layers,
            n_shared_expert=get_int(f"{arch}.expert_shared_count", 0),
            gating=gating,
            norm_weights=norm,
            n_expert_groups=get_int(f"{arch}.expert_group_count", 0),
            n_group_used=get_int(f"{arch}.expert_group_used_count", 0),
            name=name if isinstance(name, str) and name else _stem(path),
            weights=_router_digest(path, head, n_split) if moe_layers else None,
            note=_DENSE_GRAPH.get(arch, "") if n_expert > 0 else "",
        )


# llama.cpp's src/llama-hparams.h
LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS = 512, 1024
# MLA arches whose graph stores one K-cache head of [kv_lora_rank latent | rope part] when MLA is on
# (src/models/*.cpp: ggml_reshape_3d(kv_cmpr, kv_lora_rank, 1, n_tokens), then ggml_concat(kv_cmpr, k_pe)).
# The hybrid MLA arches (kimi-linear, kimi-k3, glm5-next, bailingmoe3) size their caches otherwise and are not checked.
_MLA_CACHE = frozenset(("deepseek2", "deepseek2-ocr", "mistral4", "deepseek32", "glm-dsa", "dots3note", "hy_v4"))
_MLA_REQUIRED = frozenset(("hy_v4",))  # its loader GGML_ASSERTs is_mla() (an abort, not an error)
# arches whose graph asserts head size == rotary dimension == key head size (src/models/*.cpp), or sizes the
# attention tensors by the rotary dimension (gpt-oss); llama.cpp's GGML_ASSERT aborts the whole process, so a
# corrupted file is refused here first
_ROT_IS_HEAD = frozenset((
    "arctic", "cohere2moe", "dbrx", "deepseek", "dots1", "ernie4_5-moe", "exaone-moe", "gpt-oss", "granite", "granitemoe",
    "granite_swa", "grok", "grovemoe", "hunyuan-moe", "hy_v3", "llada-moe", "llama", "llama4", "minimax-01",
    "minimax-m2", "mistral3", "olmoe", "qwen2moe", "qwen3moe", "qwen3vlmoe", "rnd1", "smallthinker",
))


def _check_llama_limits(path: Path, arch: str, get: Any, get_int: Any) -> None:
    """ModelFileError for the hyper-parameters llama.cpp's loader and graphs assert on (an abort, not an error).

    Mirrors the GGML_ASSERTs of llama_model::load_hparams and of the MoE arches' graphs, so a corrupted or
    hand-edited file gets a clear error instead of killing the process.
    """

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{path}: {what}. llama.cpp cannot run such a file (it would stop the process on it): "
                              "the file is corrupted or its converter wrote wrong metadata. Re-download or re-convert "
                              "the model.")

    def ints(key: str) -> list[int]:  # a number or a per-layer array, as llama.cpp's get_key_or_arr reads them
        v = get(key, 0)
        vals = v if isinstance(v, list) else [v]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            raise bad(f"GGUF key {key!r} should be an integer or a list of integers, found {v!r}")
        return vals or [0]

    n_layer = get_int(f"{arch}.block_count")
    if not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise bad(f"{arch}.block_count is {n_layer}; llama.cpp supports 1-{LLAMA_MAX_LAYERS} layers")
    n_nextn = get_int(f"{arch}.nextn_predict_layers", 0)
    if not 0 <= n_nextn <= n_layer:
        raise bad(f"{arch}.nextn_predict_layers is {n_nextn}, with {n_layer} layers")
    n_expert = get_int(f"{arch}.expert_count", 0)
    used = max(ints(f"{arch}.expert_used_count"))
    groups, group_used = get_int(f"{arch}.expert_group_count", 0), get_int(f"{arch}.expert_group_used_count", 0)
    if not 0 <= n_expert <= LLAMA_MAX_EXPERTS:
        raise bad(f"{arch}.expert_count is {n_expert}; llama.cpp supports at most {LLAMA_MAX_EXPERTS} experts")
    if not 0 <= used <= n_expert or (n_expert > 0) != (used > 0):
        raise bad(f"{arch}.expert_used_count is {used} with {n_expert} experts")
    if n_expert > 0 and not 0 <= groups < n_expert or n_expert == 0 and groups != 0:
        raise bad(f"{arch}.expert_group_count is {groups} with {n_expert} experts")
    if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
        raise bad(f"{n_expert} experts in {groups} groups, {group_used} used per token")
    scaling = get(f"{arch}.rope.scaling.type", "linear")
    if scaling not in ("none", "linear", "yarn", "longrope"):
        raise bad(f"unknown {arch}.rope.scaling.type {scaling!r}")
    for key in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"):
        eps = get(key, 0.0)
        if not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
            raise bad(f"{key} is {eps!r}, it must be a finite number >= 0")
    if arch in _MLA_CACHE:
        _check_mla(arch, get, get_int, ints, bad)
    if arch in _ROT_IS_HEAD:
        n_embd, n_head = get_int(f"{arch}.embedding_length", 0), ints(f"{arch}.attention.head_count")[0]
        if n_head > 0:
            head_k = get_int(f"{arch}.attention.key_length", n_embd // n_head)
            head_v = get_int(f"{arch}.attention.value_length", n_embd // n_head)
            n_rot = get_int(f"{arch}.rope.dimension_count", head_k)
            if not head_k == head_v == n_rot:
                raise bad(f"{arch} needs key length == value length == rope dimension count, found {head_k}, "
                          f"{head_v} and {n_rot}")


def _check_mla(arch: str, get: Any, get_int: Any, ints: Any, bad: Any) -> None:
    """The MLA geometry the `_MLA_CACHE` arches' graphs assume, checked only where llama.cpp uses MLA.

    llama.cpp's `llama_hparams::is_mla()` is `key_length_mla != 0 && value_length_mla != 0`; without it these
    graphs take the plain multi-head path (deepseek2), or the loader refuses the file with a clear error
    (deepseek32, glm-dsa, dots3note: "requires MLA"), except hy_v4, whose loader asserts. With MLA, the K cache
    holds one head of [kv_lora_rank latent | rope part] and V is the latent: other sizes make ggml assert.
    """
    k_mla, v_mla = get_int(f"{arch}.attention.key_length_mla", 0), get_int(f"{arch}.attention.value_length_mla", 0)
    if k_mla == 0 or v_mla == 0:
        if arch in _MLA_REQUIRED:
            raise bad(f"{arch} needs MLA attention: '{arch}.attention.key_length_mla' and "
                      f"'{arch}.attention.value_length_mla' must both be > 0, found {k_mla} and {v_mla}")
        return
    rank = get_int(f"{arch}.attention.kv_lora_rank", 0)
    if rank == 0:
        return  # llama.cpp sizes the attention tensors by it: a file with 0 is refused by its loader (clearly)
    n_embd, n_head = get_int(f"{arch}.embedding_length", 0), max(ints(f"{arch}.attention.head_count"))
    head_k = get_int(f"{arch}.attention.key_length", n_embd // n_head if n_head else 0)
    head_v = get_int(f"{arch}.attention.value_length", n_embd // n_head if n_head else 0)
    n_rot = get_int(f"{arch}.rope.dimension_count", head_k)
    if head_k != rank + n_rot or head_v != rank:
        raise bad(f"MLA attention needs '{arch}.attention.key_length' == kv_lora_rank + rope dimension count and "
                  f"'{arch}.attention.value_length' == kv_lora_rank, found key length {head_k}, value length "
                  f"{head_v}, kv_lora_rank {rank}, rope dimension count {n_rot}")
    kv_heads = set(ints(f"{arch}.attention.head_count_kv")) if get(f"{arch}.attention.head_count_kv") is not None \
        else set(ints(f"{arch}.attention.head_count"))
    if kv_heads != {1}:  # the compressed KV is one head shared by all query heads
        raise bad(f"MLA attention needs '{arch}.attention.head_count_kv' == 1, found {sorted(kv_heads)}")


def _check_vocab(path: Path, field: Any) -> None:
    """ModelFileError for a vocabulary with a repeated token, which llama.cpp asserts on (an abort)."""
    if field is None:
        return
    seen: dict[bytes, int] = {}
    for i, raw in enumerate(string_items(field)):
        tok = raw.split(b"\0", 1)[0]  # llama.cpp reads the token as a C string
        if tok in seen:
            raise ModelFileError(f"{path}: tokens {seen[tok]} and {i} of the vocabulary are the same ({tok[:40]!r}); "
                                 "the file is corrupted. Re-download or re-convert the model.")
        seen[tok] = i


def format_layers(layers: tuple[int, ...] | list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for il in sorted(layers):
        if runs and il == runs[-1][1] + 1:
            runs[-1][1] = il
        else:
            runs.append([il, il])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _gating(arch: str, code: int, n_layer: int, n_vocab: int | None) -> str | None:
    if arch in _FIXED_GATING:
        return _FIXED_GATING[arch]
    if code:
        return _GATING_CODES.get(code)
    if arch in _SIGMOID_WHEN_ABSENT:
        return "sigmoid"
    if arch in ("deepseek2", "mistral4") and n_layer in (47, 48) and n_vocab == 154880:
        return "sigmoid"  # GLM-4.7-Lite GGUFs written before the key existed (src/models/deepseek2.cpp)
    return "softmax"


def _stem(path: Path) -> str:
    m = _SPLIT_NAME.fullmatch(path.name)
    return m.group(1) if m else path.stem


def _open(path: Path) -> GGUFHeader:
    """The GGUF's metadata and tensor table (not the data), with every failure turned into a ModelFileError."""
    if not path.exists():
        raise ModelFileError(f"{path}: no such file. Check the path to the .gguf model.")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, not a GGUF file. Point at the .gguf file inside it.")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the file ({e.strerror or e}). Check its permissions.") from e
    if magic != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'). moe-gguf needs a "
                             "llama.cpp GGUF model; convert it with llama.cpp's convert_hf_to_gguf.py.")
    try:
        head = read_header(path)
    except GGUFHeaderError as e:
        raise ModelFileError(str(e)) from e
    except Exception as e:  # struct.error, OSError, ... on a damaged file
        raise ModelFileError(f"{path}: truncated or corrupted GGUF ({type(e).__name__}: {e}). The download or copy "
                             "was probably interrupted; download the file again and compare its size or checksum.") from e
    size = path.stat().st_size
    for t in head.tensors:  # the tensor data must all be in the file, even though we never read it
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(f"{path}: truncated GGUF: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} "
                                 f"but the file has {size} bytes; the download or copy was interrupted: download the file again.")
    return head


def _split_tensor_names(path: Path, n_split: int) -> list[str]:
    """Tensor names of the other files of a split GGUF (model-00001-of-00003.gguf, ...)."""
    m = _SPLIT_NAME.fullmatch(path.name)
    if not m:
        raise ModelFileError(f"{path}: part of a model split into {n_split} files, but not named like "
                             "'<name>-00001-of-0000N.gguf'. Open the first split file of the model.")
    names: list[str] = []
    for i in range(1, n_split + 1):
        part = path.with_name(f"{m.group(1)}-{i:05d}-of-{n_split:05d}.gguf")
        if part.name != path.name:
            names += [t.name for t in _open(part).tensors]
    return names


_ROUTER = re.compile(r"blk\.(\d+)\.ffn_gate_inp\.weight")
_SAMPLE = 16 << 10  # bytes read at the start, middle and end of each router tensor


def _router_digest(path: Path, head: GGUFHeader, n_split: int) -> str:
    """sha256 (16 hex digits) of every router tensor's name, type, shape and sampled bytes: a fine-tune changes
    them all, so a few KiB per layer tell two same-shape models apart; the read stays small for any model size."""
    parts = [(path, head)]
    m = _SPLIT_NAME.fullmatch(path.name) if n_split > 1 else None
    if m:
        for i in range(2, n_split + 1):
            part = path.with_name(f"{m.group(1)}-{i:05d}-of-{n_split:05d}.gguf")
            parts.append((part, _open(part)))
    h = hashlib.sha256()
    for file, hd in parts:
        routers = sorted((t for t in hd.tensors if _ROUTER.fullmatch(t.name)),
                         key=lambda t: int(_ROUTER.fullmatch(t.name).group(1)))
        if not routers:
            continue
        try:
            with open(file, "rb") as f:
                for t in routers:
                    h.update(f"{t.name}:{t.ggml_type}:{t.ne}:".encode())
                    n = t.n_bytes
                    offs = [0] if n <= 3 * _SAMPLE else [0, (n - _SAMPLE) // 2, n - _SAMPLE]
                    for off in offs:
                        f.seek(t.data_offset + off)
                        h.update(f.read(min(n, _SAMPLE) if len(offs) > 1 else n))
        except OSError as e:
            raise ModelFileError(f"{file}: cannot read the router weights ({e.strerror or e}); check the file") from e
    return h.hexdigest()[:16]
