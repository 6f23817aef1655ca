"""What every command shares: one grammar of options, loading a model, writing JSON, failing clearly.

The grammar (README, "Command grammar"): the model is ``-m/--model`` everywhere (a positional model is still
accepted by info, chat and prune); ``-n/--max-tokens``, ``-s/--seed``, ``--raw`` (the chat template is the
default), ``--json FILE`` (``-`` or no value: print), llama.cpp's loading options and ``--allow-model-mismatch``
mean the same on every command that has them. Old spellings are rewritten with a deprecation note on stderr
(:class:`GrammarCommand`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import click

from moe_gguf.errors import ModelFileError

REMOVED_IN = "0.4"


def model_option(required: bool = True):
    return click.option("-m", "--model", "model_path", required=required, default=None, type=click.Path(dir_okay=False),
                        help="MoE GGUF file." if required else "MoE GGUF file (or give it as the first argument).")


MODEL_OPTION = model_option(required=True)


def positional_model(f):
    """The model as a first argument too (info, chat, prune: their spelling before -m/--model)."""
    return click.argument("model_arg", required=False, metavar="[MODEL]", type=click.Path(dir_okay=False))(f)


def resolve_model(model_path: str | None, model_arg: str | None, *, required: bool = True) -> str | None:
    if model_path and model_arg and model_path != model_arg:
        fail(f"two models given: -m {model_path} and {model_arg}; give one")
    path = model_path or model_arg
    if path is None and required:
        fail("no model given: use -m/--model MODEL.gguf")
    return path


allow_mismatch_option = click.option(
    "--allow-model-mismatch", "allow_model_mismatch", is_flag=True,
    help="Apply a profile (or counts) made for a model of another shape, if every entry fits this one.")

json_out_option = click.option(
    "--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="FILE",
    help="Write the result as JSON to FILE ('-', or --json without a value: print it).")

seed_option = click.option("-s", "--seed", "seed", default=0, show_default=True, type=int, help="Random seed.")

raw_option = click.option("--raw", "raw", is_flag=True,
                          help="Use prompts as raw text (default: wrapped as a user message in the model's chat template).")


def max_tokens_option(default: int = 64):
    return click.option("-n", "--max-tokens", "max_tokens", default=default, show_default=True, type=click.IntRange(1),
                        help="New tokens to generate at most.")


def fail(msg: str) -> None:
    raise click.ClickException(msg)


def note(msg: str) -> None:
    click.echo(msg, err=True)


def write_json(json_out: str | None, payload) -> None:
    """--json: '-' prints, anything else is written atomically."""
    if not json_out:
        return
    text = json.dumps(payload, indent=2)
    if json_out == "-":
        click.echo(text)
        return
    from moe_gguf._io import atomic_write

    try:
        atomic_write(Path(json_out), (text + "\n").encode(), make_dirs=True)
    except OSError as e:
        fail(str(e))


class GrammarCommand(click.Command):
    """A command that still accepts its old option spellings for a release, with a note on stderr.

    ``old_spellings`` maps an old option to its new spelling, or to None for a flag that is now the default.
    """

    def __init__(self, *args, old_spellings: Mapping[str, str | None] | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.old_spellings = dict(old_spellings or {})

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        for i, a in enumerate(args):
            if a == "--":
                out += args[i:]
                break
            if not isinstance(a, str):
                out.append(a)
                continue
            old, eq, value = a.partition("=")
            if old in self.old_spellings:
                new = self.old_spellings[old]
                if new is None:
                    note(f"moe-gguf {ctx.info_name}: {old} is deprecated and does nothing (it is the default now); "
                         f"it will be removed in {REMOVED_IN}")
                    continue
                note(f"moe-gguf {ctx.info_name}: {old} is deprecated, use {new} (the old spelling goes in {REMOVED_IN})")
                a = new + eq + value
            out.append(a)
        return super().parse_args(ctx, out)


def load_model(model_path: str, *, n_gpu_layers: int = 0, n_ctx: int = 2048, threads: int | None = None,
               expert_used: int | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
               override_tensor: tuple[str, ...] = (), no_repack: bool = False, rpc_servers: tuple[str, ...] | None = None,
               **kw):
    """The MoEModel for a command (use it in ``with``); a clear ClickException for a bad file or option."""
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


def show_warnings() -> None:
    """Python warnings (e.g. ModelWeightsWarning) as one 'warning: ...' line on stderr, each once."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
