"""MoEModel: a MoE GGUF loaded on the patched llama.cpp, steerable, making SteerContexts.

    model = MoEModel("model.gguf")                   # a llama_cpp.Llama inside (chat, templates)
    model.steer(profile)                             # steer model.llama's own context
    ctx = model.context(n_seq_max=2)                 # a context for batched / A-B work
    ctx.set_profile(profile, seq_id=0)               # seq 0 steered, seq 1 not
    out = ctx.generate_many([Request(toks, profile=p), Request(toks)])
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from moe_gguf.engine.context import SteerContext
from moe_gguf.engine.handles import ContextRegistry, Steering, low, set_n_expert_used
from moe_gguf.engine.offload import Placement, model_params, override_array
from moe_gguf.errors import ContextClosedError, ModelFileError, NotMoEError
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.topology import ModelTopology


@contextmanager
def llama_errors() -> Iterator[list[str]]:
    """llama.cpp's ERROR log lines while the block runs (what it says when it refuses a file, e.g. "error loading
    model: ... tensor 'blk.0.ffn_gate_inp.weight' has wrong shape"), still printed as llama-cpp-python does."""
    from llama_cpp import _logger
    from llama_cpp import llama_cpp as lc

    lines: list[str] = []

    def on_log(level: int, text: bytes, user) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            line = text.decode("utf-8", "replace").strip()
            if line:
                lines.append(line.split(": ", 1)[1] if line.startswith("llama_") and ": " in line else line)
        _logger.llama_log_callback(level, text, user)

    callback = lc.llama_log_callback(on_log)
    lc.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        lc.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class MoEModel:
    """A MoE GGUF loaded with llama-cpp-python (``self.llama``), plus what moe-gguf adds."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, n_gpu_layers: int = 0,
                 n_threads: int | None = None, n_batch: int = 512, expert_used_count: int | None = None,
                 placement: Placement | None = None, extra_bufts: bool = True,
                 rpc_servers: Sequence[str] | None = None,
                 seed: int = 0, verbose: bool = False, **llama_kwargs) -> None:
        """Load a MoE GGUF.

        placement: where expert weights live (llama.cpp's --cpu-moe / --n-cpu-moe / -ot).
        extra_bufts: llama.cpp's CPU weight repacking buffers (False: plain CPU buffers).
        rpc_servers: "host:port" of ``moe-gguf rpc-server`` processes (llama.cpp's --rpc); layers are
            spread over their devices and this machine's GPUs. n_gpu_layers=0 then means all layers.
        """
        self.path = Path(path)
        self.topology = ModelTopology.from_gguf(self.path, expert_used_override=expert_used_count)
        if not self.topology.is_moe:
            why = f" ({self.topology.note})" if self.topology.note else ""
            raise NotMoEError(f"{self.path}: {self.topology.arch} model without routed experts{why}; moe-gguf needs a MoE model")
        low_ = low()
        import jinja2
        from llama_cpp import Llama

        kv = dict(llama_kwargs.pop("kv_overrides", None) or {})
        if expert_used_count is not None:
            if not 1 <= expert_used_count <= self.topology.n_expert:
                raise ValueError(f"expert_used_count must be in [1, {self.topology.n_expert}], got {expert_used_count}")
            kv[f"{self.topology.arch}.expert_used_count"] = int(expert_used_count)
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2))
        self.placement = placement or Placement()
        # the override array must outlive the model: llama.cpp keeps the pointer
        self._overrides = override_array(self.placement.rules(self.topology.n_layer))
        fields: dict = {}
        self._devices = None  # like the override array, llama.cpp keeps this pointer
        if rpc_servers:
            from moe_gguf.engine import rpc

            try:
                self._devices = rpc.device_list(list(rpc_servers))
            except rpc.RPCError as e:
                raise ModelFileError(f"{self.path}: {e}") from e
            fields["devices"] = ctypes.cast(self._devices, ctypes.c_void_p)
            n_gpu_layers = n_gpu_layers or -1
        if self._overrides is not None:
            fields["tensor_buft_overrides"] = ctypes.cast(self._overrides, ctypes.c_void_p)
        if not extra_bufts:
            fields["use_extra_bufts"] = False
        try:
            with model_params(**fields), llama_errors() as errors:
                self.llama = Llama(model_path=str(self.path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                                   n_threads=self.n_threads, n_batch=n_batch, seed=seed, kv_overrides=kv or None,
                                   verbose=verbose, **llama_kwargs)
        except ValueError as e:
            said = "; ".join(dict.fromkeys(errors)) or str(e)
            raise ModelFileError(f"{self.path}: llama.cpp could not load the model: {said}. The file is damaged or "
                                 "not a model this llama.cpp supports: re-download or re-convert it.") from e
        except jinja2.TemplateError as e:  # llama-cpp-python compiles the GGUF's chat templates on load
            raise ModelFileError(f"{self.path}: the model's chat template is broken ({type(e).__name__}: {e})") from e
        self._low = low_
        self._contexts = ContextRegistry(low_)
        # LIFO: runs before llama-cpp-python frees the model, however that happens (close(), or a GC cycle
        # finalizing the model before a SteerContext still holding a context on it)
        self.llama._model._exit_stack.callback(self._contexts.free_all)
        self._chat = Steering(self, self.llama.ctx)

    # -- steering of the Llama's own context (create_completion, create_chat_completion) --

    def steer(self, profile: SteeringProfile | None, *, strength: float = 1.0, allow_mismatch: bool = False) -> None:
        """Steer every later call on ``self.llama`` with ``profile`` (None: stop steering)."""
        self._check_open()
        self._chat.set_profile(profile, seq_id=-1, strength=strength, allow_mismatch=allow_mismatch)
        # Llama keeps a prefix cache of evaluated tokens: they were computed with the old steering
        self.llama.reset()
        self._low.llama_memory_clear(self._low.llama_get_memory(self.llama.ctx), True)

    def set_n_expert_used(self, n: int, *, layer: int = -1) -> None:
        """Experts per token on ``self.llama``'s context (0: the model's value); no reload."""
        self._check_open()
        set_n_expert_used(self.llama.ctx, n, layer)
        self.llama.reset()
        self._low.llama_memory_clear(self._low.llama_get_memory(self.llama.ctx), True)

    def context(self, *, n_ctx: int | None = None, n_seq_max: int = 1, n_batch: int | None = None,
                n_ubatch: int | None = None, cb_eval=None) -> SteerContext:
        """A new context on this model for batched, per-sequence steered decoding."""
        self._check_open()
        return SteerContext(self, n_ctx=n_ctx or self.llama.n_ctx(), n_seq_max=n_seq_max,
                            n_batch=n_batch or self.llama.n_batch, n_ubatch=n_ubatch, cb_eval=cb_eval)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        self._check_open()
        return self.llama.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        self._check_open()
        return self.llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own chat template (sandboxed Jinja)."""
        self._check_open()
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelFileError(f"{self.path}: the GGUF has no chat template (tokenizer.chat_template)")
        vocab = self.llama._model
        eos = self.detokenize([vocab.token_eos()]) if vocab.token_eos() >= 0 else ""
        bos = self.detokenize([vocab.token_bos()]) if vocab.token_bos() >= 0 else ""
        try:  # the template comes from the file: sandboxed, but it may still fail in any way
            fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                      add_generation_prompt=add_generation_prompt)
            return fmt(messages=messages).prompt
        except Exception as e:  # jinja2.TemplateError (SecurityError for sandbox escapes), raise_exception's ValueError...
            raise ModelFileError(f"{self.path}: the model's chat template failed ({type(e).__name__}: {e})") from e

    @property
    def closed(self) -> bool:
        return self.llama._model.model is None

    def _check_open(self) -> None:
        if self.closed:
            raise ContextClosedError(f"{self.path}: the model is closed; load it again")

    def close(self) -> None:
        self.llama.close()

    def __enter__(self) -> MoEModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
