"""What every command shares: the model option, llama.cpp's loading options, loading a model, failing clearly."""

from __future__ import annotations

import click

from moe_gguf.errors import ModelFileError

MODEL_OPTION = click.option("-m", "--model", "model_path", required=True, type=click.Path(dir_okay=False),
                            help="MoE GGUF file.")


def fail(msg: str) -> None:
    raise click.ClickException(msg)


def load_model(model_path: str, *, n_gpu_layers: int = 0, n_ctx: int = 2048, threads: int | None = None,
                expert_used: int | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
                override_tensor: tuple[str, ...] = (), no_repack: bool = False, rpc_servers: tuple[str, ...] | None = None,
                **kw):
    from moe_gguf.engine import _lib
    from moe_gguf.engine.model import MoEModel
    from moe_gguf.engine.offload import Placement

    if not _lib.STATUS.ok:
        fail(_lib.STATUS.error or "patched library missing")
    try:
        return MoEModel(model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=threads,
                        expert_used_count=expert_used, extra_bufts=not no_repack,
                        placement=Placement(tuple(override_tensor), cpu_moe, n_cpu_moe),
                        rpc_servers=list(rpc_servers) if rpc_servers else None, **kw)
    except (ModelFileError, ValueError) as e:
        fail(str(e))


def _split_servers(_ctx, _param, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    servers = tuple(v.strip() for v in value.split(",") if v.strip())
    if not servers:
        raise click.BadParameter("expected HOST:PORT[,HOST:PORT...]")
    return servers


def llama_options(f):
    """Loading options named as llama.cpp users know them; the command receives them as keywords."""
    for opt in reversed([
        click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", default=0, show_default=True,
                     help="Layers to offload to the GPU (-1: all)."),
        click.option("-c", "--ctx-size", "n_ctx", default=2048, show_default=True, help="Context size."),
        click.option("-t", "--threads", "threads", type=int, default=None, help="CPU threads (default: all cores)."),
        click.option("--expert-used-count", "expert_used", type=int, default=None,
                     help="Experts per token (llama.cpp's <arch>.expert_used_count override, at load time)."),
        click.option("--cpu-moe", is_flag=True, help="Keep all expert weights in host memory (llama.cpp --cpu-moe)."),
        click.option("--n-cpu-moe", type=int, default=0, show_default=True,
                     help="Keep the expert weights of the first N layers in host memory."),
        click.option("-ot", "--override-tensor", multiple=True,
                     help="PATTERN=BUFFER[,...]: weights matching the regex go to that buffer type (e.g. CPU, CUDA0)."),
        click.option("--no-repack", is_flag=True, help="Do not use llama.cpp's CPU weight-repacking buffers."),
        click.option("--rpc", "rpc_servers", default=None, metavar="HOST:PORT[,...]", callback=_split_servers,
                     help="Spread layers over `moe-gguf rpc-server` processes (llama.cpp --rpc); all layers unless -ngl."),
    ]):
        f = opt(f)
    return f


# -- shared options (the `cli` branch defines the same names; the lead dedupes on merge) ---------------------

allow_mismatch_option = click.option(
    "--allow-model-mismatch", "allow_model_mismatch", is_flag=True,
    help="Use a profile made for another model if every entry fits this one.")
json_out_option = click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), default=None,
                               help="Write the result as JSON to FILE ('-': print it).")
seed_option = click.option("-s", "--seed", "seed", type=int, default=0, show_default=True, help="Random seed.")
raw_option = click.option("--raw", "raw", is_flag=True, help="Use prompts as raw text, without the chat template.")


def max_tokens_option(default: int):
    return click.option("-n", "--max-tokens", "max_tokens", type=int, default=default, show_default=True,
                        help="Tokens to generate per reply.")
