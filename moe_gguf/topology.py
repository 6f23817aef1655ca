"""The MoE shape of a GGUF model, read from its metadata and tensor names (no tensor data is loaded).

    topo = ModelTopology.from_gguf("model.gguf")
    topo.moe_layers, topo.n_expert, topo.n_expert_used, topo.gating
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_gguf.errors import ModelFileError

# llama_expert_gating_func_type (src/llama-hparams.h); 0 (NONE) means "not set"
_GATING_CODES = {1: "softmax", 2: "sigmoid", 3: "softmax_weight", 4: "sqrt_softplus"}

# Arches whose graph passes a fixed gating function to build_moe_ffn, ignoring `%s.expert_gating_func`
# (src/models/*.cpp). Arches not listed here read the key.
_FIXED_GATING = {
    **dict.fromkeys(("llama4", "mimo2", "nemotron_h", "nemotron_h_moe"), "sigmoid"),
    "gpt-oss": "softmax_weight",
    **dict.fromkeys(
        ("arctic", "bailingmoe", "dbrx", "deepseek", "ernie4_5-moe", "gemma4", "granite", "granitemoe",
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
        ("arctic", "dbrx", "ernie4_5-moe", "gemma4", "granite", "granitemoe", "granite_swa", "granitehybrid",
         "grok", "grovemoe", "hunyuan-moe", "kimi-linear", "lfm2", "lfm2moe", "llama", "maple", "mellum", "mimo2",
         "minimax-01", "minimax-m2", "mistral3", "phimoe", "qwen35moe", "qwen3moe", "qwen3next", "qwen3vlmoe",
         "qwen4exp", "rnd1", "smallthinker"),
        True),
    **dict.fromkeys(("deepseek", "jamba", "llada-moe", "llama4", "nomic-bert-moe", "olmoe", "qwen2moe"), False),
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

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and self.n_expert_used > 0 and bool(self.moe_layers)

    def fingerprint(self) -> dict[str, Any]:
        """What a steering profile must match: the shape of the expert tables, not the weights."""
        return {
            "arch": self.arch,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "moe_layers": list(self.moe_layers),
        }

    def fingerprint_id(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def describe(self) -> str:
        lines = [f"{self.name} ({self.arch})"]
        if not self.is_moe:
            lines.append(f"  layers:      {self.n_layer}, none with routed experts (dense model)")
            lines.append(f"  embedding:   {self.n_embd}")
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
            f"  fingerprint: {self.fingerprint_id()}",
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
        reader = _open(path)
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            f = fields.get(key)
            return default if f is None else f.contents()

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

        tensor_names = [t.name for t in reader.tensors]
        n_split = get_int("split.count", 1)
        if n_split > 1:
            tensor_names += _split_tensor_names(path, n_split)
        moe_layers: tuple[int, ...] = ()
        if n_expert > 0:
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

        gating_code = get_int(f"{arch}.expert_gating_func", 0)
        n_vocab = get(f"{arch}.vocab_size")
        if n_vocab is None and "tokenizer.ggml.tokens" in fields:
            n_vocab = len(fields["tokenizer.ggml.tokens"].data)
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
        )


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


def _open(path: Path):
    """GGUFReader on `path` (memory-mapped), with every failure turned into a ModelFileError."""
    from gguf import GGUFReader  # imported here: gguf is slow to import and only needed for model files

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
        reader = GGUFReader(path, "r")
    except Exception as e:  # GGUFReader raises ValueError, IndexError, KeyError... on a damaged file
        raise ModelFileError(f"{path}: truncated or corrupted GGUF ({type(e).__name__}: {e}). The download or copy "
                             "was probably interrupted; download the file again and compare its size or checksum.") from e
    size = path.stat().st_size
    for t in reader.tensors:  # the tensor data must all be in the file, even though we never read it
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(f"{path}: truncated GGUF: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} "
                                 f"but the file has {size} bytes. Download the file again.")
    return reader


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
