"""`moe-gguf` command line: thin click commands over the Python API."""

from __future__ import annotations

import json
import os
import sys

import click

from moe_gguf.errors import ModelFileError, ProfileError

MODEL_OPTION = click.option("-m", "--model", "model_path", required=True, type=click.Path(dir_okay=False),
                            help="MoE GGUF file.")


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


def _load(model_path: str, n_gpu_layers: int, n_ctx: int, threads: int | None, expert_used: int | None, **kw):
    from moe_gguf import _lib
    from moe_gguf.model import MoEModel

    if not _lib.STATUS.ok:
        _fail(_lib.STATUS.error or "patched library missing")
    try:
        return MoEModel(model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=threads,
                        expert_used_count=expert_used, **kw)
    except (ModelFileError, ValueError) as e:
        _fail(str(e))


def llama_options(f):
    """Loading options named as llama.cpp users know them."""
    for opt in reversed([
        click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", default=0, show_default=True,
                     help="Layers to offload to the GPU (-1: all)."),
        click.option("-c", "--ctx-size", "n_ctx", default=2048, show_default=True, help="Context size."),
        click.option("-t", "--threads", "threads", type=int, default=None, help="CPU threads (default: all cores)."),
        click.option("--expert-used-count", "expert_used", type=int, default=None,
                     help="Experts per token (llama.cpp's <arch>.expert_used_count override, at load time)."),
    ]):
        f = opt(f)
    return f


@click.group()
@click.version_option(package_name="moe-gguf")
def main() -> None:
    """Expert-level behaviour steering for MoE GGUF models on llama.cpp."""


@main.command()
@click.argument("model_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model_path: str, as_json: bool) -> None:
    """Print a GGUF's MoE topology: layers, experts, gating, groups."""
    from moe_gguf.topology import ModelTopology

    try:
        topo = ModelTopology.from_gguf(model_path)
    except ModelFileError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps({**topo.to_dict(), "fingerprint_id": topo.fingerprint_id()}, indent=2))
    else:
        click.echo(topo.describe())


@main.command()
def doctor() -> None:
    """Check the patched llama.cpp: version, patch status, backends and devices."""
    from moe_gguf import _lib
    from moe_gguf.native import build_key, cache_dir

    click.echo(f"moe-gguf        {_version()}")
    click.echo(f"python          {sys.version.split()[0]} ({sys.executable})")
    click.echo(f"patch           {_lib.status_line()}")
    click.echo(f"wheel cache     {cache_dir()} (key {build_key()} for CMAKE_ARGS={os.environ.get('CMAKE_ARGS', '')!r})")
    if not _lib.STATUS.ok:
        sys.exit(1)
    from llama_cpp import llama_cpp as low

    low.llama_backend_init()
    click.echo(f"system          {low.llama_print_system_info().decode().strip()}")
    click.echo(f"gpu offload     {'yes' if low.llama_supports_gpu_offload() else 'no'}")
    click.echo(f"rpc             {'yes' if low.llama_supports_rpc() else 'no'}")
    for dev in _devices():
        click.echo(f"device          {dev}")


def _devices() -> list[str]:
    import ctypes

    from llama_cpp import llama_cpp as low

    lib = low._lib
    try:
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_name.restype = ctypes.c_char_p
        lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_description.restype = ctypes.c_char_p
        out = []
        for i in range(lib.ggml_backend_dev_count()):
            d = lib.ggml_backend_dev_get(i)
            out.append(f"{lib.ggml_backend_dev_name(d).decode()}: {lib.ggml_backend_dev_description(d).decode()}")
        return out
    except AttributeError:
        return ["(device listing not exported by this build)"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-gguf")
    except PackageNotFoundError:
        return "dev"


@main.command()
@MODEL_OPTION
@llama_options
@click.option("-p", "--prompt", required=True, help="Prompt text (raw; use --chat to apply the chat template).")
@click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False),
              help="Steering profile JSON (repeatable: entries are combined).")
@click.option("--strength", default=1.0, show_default=True, help="Multiplies bias values, scales scale values in log space.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message in the model's chat template.")
@click.option("-n", "--max-tokens", default=64, show_default=True)
@click.option("--temp", default=0.0, show_default=True, help="Temperature (0: greedy).")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("-s", "--seed", default=0, show_default=True)
@click.option("--steer-from", type=click.Choice(["all", "generated"]), default=None,
              help="Steer prompt and output (all) or the output only (default: the profile's schedule).")
@click.option("--steer-after-tokens", type=int, default=None, help="Start steering after N generated tokens.")
@click.option("--steer-after-text", default=None, help="Start steering once this text has been generated.")
@click.option("--compare", is_flag=True, help="Also generate unsteered, in the same batch, and print both.")
@click.option("--allow-model-mismatch", is_flag=True, help="Apply a profile made for another model if its shapes fit.")
def generate(model_path, n_gpu_layers, n_ctx, threads, expert_used, prompt, profiles, strength, chat, max_tokens,
             temp, top_p, seed, steer_from, steer_after_tokens, steer_after_text, compare, allow_model_mismatch) -> None:
    """Generate text with (or without) a steering profile."""
    from moe_gguf.model import Request
    from moe_gguf.profile import Schedule, SteeringProfile

    model = _load(model_path, n_gpu_layers, n_ctx, threads, expert_used)
    try:
        profile = _combine([SteeringProfile.load(p) for p in profiles]) if profiles else None
        if profile is not None:
            profile.validate(model.topology, allow_mismatch=allow_model_mismatch)
    except ProfileError as e:
        _fail(str(e))
    sched = None
    if profile is not None and (steer_from or steer_after_tokens is not None or steer_after_text):
        base = profile.schedule
        sched = Schedule(apply_to=steer_from or base.apply_to,
                         after_tokens=base.after_tokens if steer_after_tokens is None else steer_after_tokens,
                         after_text=steer_after_text or base.after_text)
    text = model.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    tokens = model.tokenize(text, add_bos=not chat)
    reqs = [Request(tokens, profile, max_tokens, strength, sched)]
    if compare:
        reqs.append(Request(tokens, None, max_tokens))
    with model.context(n_seq_max=len(reqs)) as ctx:
        outs = ctx.generate_many(reqs, temperature=temp, top_p=top_p, seed=seed)
    if compare:
        click.echo(click.style("steered:", bold=True))
        click.echo(outs[0].text)
        click.echo(click.style("unsteered:", bold=True))
        click.echo(outs[1].text)
    else:
        click.echo(outs[0].text)
    model.close()


def _combine(profiles):
    first = profiles[0]
    for p in profiles[1:]:
        first = first.merged(p) if hasattr(first, "merged") else _merge(first, p)
    return first


def _merge(a, b):
    from moe_gguf.profile import SteeringProfile

    return SteeringProfile(entries=list(a.entries) + list(b.entries), model=a.model or b.model,
                           name="+".join(x for x in (a.name, b.name) if x), schedule=a.schedule)


@main.command()
@click.argument("preset_or_arch")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output GGUF path.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0", "q4_0", "q4_k"]), default="f32", show_default=True)
@click.option("--n-layer", type=int, default=None, help="Override the preset's layer count.")
@click.option("--seed", default=0, show_default=True)
def synth(preset_or_arch: str, out: str, dtype: str, n_layer: int | None, seed: int) -> None:
    """Write a random-weight MoE GGUF (presets: tiny-<arch>, qwen3-30b-a3b, gpt-oss-20b)."""
    from moe_gguf.synth import PRESETS, main_synth

    try:
        path = main_synth(preset_or_arch, out, dtype=dtype, n_layer=n_layer, seed=seed)
    except (KeyError, ValueError) as e:
        _fail(f"{e}; presets: {', '.join(PRESETS)}")
    click.echo(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
