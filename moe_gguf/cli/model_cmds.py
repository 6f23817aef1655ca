"""Commands that inspect, run or serve a model: info, doctor, generate, chat, sweep, rpc-server."""

from __future__ import annotations

import os
import sys

import click

from moe_gguf.cli.common import (
    MODEL_OPTION,
    GrammarCommand,
    allow_mismatch_option,
    fail,
    json_out_option,
    llama_options,
    load_model,
    max_tokens_option,
    model_option,
    positional_model,
    raw_option,
    resolve_model,
    seed_option,
    write_json,
)
from moe_gguf.cli.group import main
from moe_gguf.errors import ModelFileError, ProfileError


def load_profiles(paths, topology, allow_model_mismatch: bool):
    """The --profile files combined and checked against the model; None without any."""
    from moe_gguf.formats.profile import SteeringProfile

    if not paths:
        return None
    try:
        profile = SteeringProfile.combine([SteeringProfile.load(p) for p in paths])
        profile.validate(topology, allow_mismatch=allow_model_mismatch)
    except ProfileError as e:
        fail(str(e))
    if allow_model_mismatch:  # accepted, and it fits: steering re-validates it against this model
        profile.model = topology.fingerprint()
    return profile


@main.command()
@positional_model
@model_option(required=False)
@json_out_option
def info(model_arg, model_path, json_out) -> None:
    """Print a GGUF's MoE topology: layers, experts, gating, groups."""
    from moe_gguf.formats.topology import ModelTopology

    try:
        topo = ModelTopology.from_gguf(resolve_model(model_path, model_arg))
    except ModelFileError as e:
        fail(str(e))
    if json_out:
        write_json(json_out, topo.to_dict())
        if json_out != "-":
            click.echo(topo.describe())
    else:
        click.echo(topo.describe())


@main.command()
def doctor() -> None:
    """Check the patched llama.cpp: version, patch status, backends and devices."""
    from moe_gguf.engine import _lib
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
    from moe_gguf.engine.offload import gpu_devices

    gpus = gpu_devices()
    click.echo(f"gpu             {', '.join(gpus) if gpus else 'none (a CPU build, or no GPU found)'}")
    click.echo(f"rpc             {'yes' if low.llama_supports_rpc() else 'no'}")
    for dev in _devices():
        click.echo(f"device          {dev}")


def _devices() -> list[str]:
    from moe_gguf.engine import _ggml

    try:
        lib = _ggml.lib()
        return [f"{_ggml.name(d)}: {lib.ggml_backend_dev_description(d).decode(errors='replace')}"
                for d in _ggml.devices()]
    except AttributeError:
        return ["(device listing not exported by this build)"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-gguf")
    except PackageNotFoundError:
        return "dev"


@main.command(cls=GrammarCommand, old_spellings={"--chat": None})
@MODEL_OPTION
@llama_options
@click.option("-p", "--prompt", required=True, help="Prompt text (a user message in the chat template unless --raw).")
@click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False),
              help="Steering profile JSON (repeatable: entries are combined).")
@click.option("--strength", default=1.0, show_default=True, help="Multiplies bias values, scales scale values in log space.")
@raw_option
@max_tokens_option()
@click.option("--temp", default=0.0, show_default=True, help="Temperature (0: greedy).")
@click.option("--top-p", default=1.0, show_default=True)
@seed_option
@click.option("--steer-from", type=click.Choice(["all", "generated"]), default=None,
              help="Steer prompt and output (all) or the output only (default: the profile's schedule).")
@click.option("--steer-after-tokens", type=int, default=None, help="Start steering after N generated tokens.")
@click.option("--steer-after-text", default=None, help="Start steering once this text has been generated.")
@click.option("--compare", is_flag=True, help="Also generate unsteered, in the same batch, and print both.")
@allow_mismatch_option
@json_out_option
def generate(model_path, prompt, profiles, strength, raw, max_tokens, temp, top_p, seed, steer_from,
             steer_after_tokens, steer_after_text, compare, allow_model_mismatch, json_out, **load) -> None:
    """Generate text with (or without) a steering profile."""
    from moe_gguf.engine.textgen import generate_text
    from moe_gguf.formats.profile import Schedule

    with load_model(model_path, **load) as model:
        profile = load_profiles(profiles, model.topology, allow_model_mismatch)
        sched = None
        if profile is not None and (steer_from or steer_after_tokens is not None or steer_after_text):
            base = profile.schedule
            sched = Schedule(apply_to=steer_from or base.apply_to,
                             after_tokens=base.after_tokens if steer_after_tokens is None else steer_after_tokens,
                             after_text=steer_after_text or base.after_text)
        outs = generate_text(model, prompt, profile=profile, raw=raw, max_tokens=max_tokens, temperature=temp,
                             top_p=top_p, seed=seed, strength=strength, schedule=sched, compare=compare)
    if not any(o.tokens for o in outs):
        hint = ("chat models need their template: drop --raw" if raw else
                "a base model without a chat template may need --raw")
        click.echo(f"(empty reply: the model ended at once; {hint})", err=True)
    if json_out:
        names = ["steered", "unsteered"] if compare else ["text"]
        write_json(json_out, {n: {"text": o.text, "tokens": len(o.tokens), "finish_reason": o.finish_reason}
                              for n, o in zip(names, outs, strict=True)})
        if json_out == "-":
            return
    if compare:
        click.echo(click.style("steered:", bold=True))
        click.echo(outs[0].text)
        click.echo(click.style("unsteered:", bold=True))
        click.echo(outs[1].text)
    else:
        click.echo(outs[0].text)


@main.command()
@MODEL_OPTION
@llama_options
@click.option("--k", "ks", default="1,2,4,8", show_default=True, help="Experts per token to try, comma-separated.")
@click.option("-f", "--text-file", type=click.Path(exists=True, dir_okay=False), required=True, metavar="FILE",
              help="A UTF-8 text FILE to score (its perplexity; the first tokens also time generation).")
@click.option("--max-text-tokens", default=2048, show_default=True, help="Score at most this many tokens of the text.")
@json_out_option
def sweep(model_path, ks, text_file, max_text_tokens, json_out, **load) -> None:
    """Perplexity and tokens/s for several numbers of experts per token (no reload between them)."""
    from moe_gguf.study.perplexity import rows_to_json
    from moe_gguf.study.perplexity import sweep as run_sweep

    try:
        k_list = [int(x) for x in ks.split(",") if x.strip()]
    except ValueError:
        fail(f"--k: expected comma-separated integers, got {ks!r}")
    with load_model(model_path, **load) as model:
        n = model.topology.n_expert
        bad = [k for k in k_list if not 1 <= k <= n]
        if bad:
            fail(f"--k: {bad} out of range [1, {n}] (the model has {n} experts)")
        with open(text_file, encoding="utf-8", errors="replace") as f:
            tokens = model.tokenize(f.read())[:max_text_tokens]
        with model.context(n_ctx=min(model.llama.n_ctx(), 512)) as ctx:
            rows = run_sweep(ctx, k_list, tokens)
        default_k = model.topology.n_expert_used
    if json_out != "-":
        click.echo(f"{'k':>4} {'perplexity':>12} {'pp tok/s':>10} {'tg tok/s':>10}")
        for r in rows:
            click.echo(f"{r.n_expert_used:>4} {r.perplexity:>12.3f} {r.pp_tokens_per_s:>10.1f} {r.tg_tokens_per_s:>10.1f}")
    write_json(json_out, {"model": str(model_path), "default_k": default_k, "rows": rows_to_json(rows)})


@main.command()
@positional_model
@model_option(required=False)
@llama_options
@click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False), help="Steering profile(s) to load.")
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@allow_mismatch_option
def chat(model_arg, model_path, profiles, system_prompt, allow_model_mismatch, n_gpu_layers, n_ctx, threads,
         expert_used, **placement) -> None:
    """Chat in the terminal with live expert steering (default model: the shipped demo model)."""
    import inspect

    from moe_gguf.tui.app import run_chat

    extra = {}
    if allow_model_mismatch:
        if "allow_model_mismatch" not in inspect.signature(run_chat).parameters:
            fail("--allow-model-mismatch: this chat UI cannot apply a mismatched profile yet")
        extra["allow_model_mismatch"] = True
    run_chat(model_path=resolve_model(model_path, model_arg, required=False), n_gpu_layers=n_gpu_layers, n_ctx=n_ctx,
             threads=threads, expert_used_count=expert_used, profiles=list(profiles), system_prompt=system_prompt,
             **placement, **extra)


@main.command("rpc-server", cls=GrammarCommand, old_spellings={"-p": "--port"})
@click.option("-H", "--host", default="127.0.0.1", show_default=True,
              help="Address to bind (the protocol has no authentication: loopback or a private network only).")
@click.option("--port", default=50052, show_default=True, type=int, help="TCP port.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("-d", "--device", "devices", multiple=True, help="Device(s) to expose (default: all GPUs, else the CPU).")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="Cache received tensors in this directory (faster reloads of the same model).")
def rpc_server(host: str, port: int, threads: int | None, devices: tuple[str, ...], cache_dir: str | None) -> None:
    """Lend this machine's memory to a model loaded elsewhere with --rpc (llama.cpp's rpc-server)."""
    from moe_gguf.engine import _lib, rpc

    if not _lib.STATUS.ok:
        fail(_lib.STATUS.error or "patched library missing")
    try:
        rpc.serve(host, port, n_threads=threads, devices=list(devices) or None, cache_dir=cache_dir,
                  log=lambda m: click.echo(m, err=True))
    except rpc.RPCError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
