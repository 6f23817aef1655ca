"""Commands that inspect, run or serve a model: info, doctor, generate, chat, sweep, rpc-server."""

from __future__ import annotations

import json
import os
import sys

import click

from moe_gguf.cli.common import MODEL_OPTION, fail, llama_options, load_model
from moe_gguf.cli.group import main
from moe_gguf.errors import ModelFileError, ProfileError


@main.command()
@click.argument("model_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model_path: str, as_json: bool) -> None:
    """Print a GGUF's MoE topology: layers, experts, gating, groups."""
    from moe_gguf.formats.topology import ModelTopology

    try:
        topo = ModelTopology.from_gguf(model_path)
    except ModelFileError as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps({**topo.to_dict(), "fingerprint_id": topo.fingerprint_id()}, indent=2))
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
def generate(model_path, prompt, profiles, strength, chat, max_tokens, temp, top_p, seed, steer_from,
             steer_after_tokens, steer_after_text, compare, allow_model_mismatch, **load) -> None:
    """Generate text with (or without) a steering profile."""
    from moe_gguf.engine.context import Request
    from moe_gguf.formats.profile import Schedule, SteeringProfile

    model = load_model(model_path, **load)
    try:
        profile = SteeringProfile.combine([SteeringProfile.load(p) for p in profiles]) if profiles else None
        if profile is not None:
            profile.validate(model.topology, allow_mismatch=allow_model_mismatch)
            if allow_model_mismatch:  # accepted, and it fits: the steering below validates it against this model
                profile.model = model.topology.fingerprint()
    except ProfileError as e:
        fail(str(e))
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


@main.command()
@MODEL_OPTION
@llama_options
@click.option("--k", "ks", default="1,2,4,8", show_default=True, help="Experts per token to try, comma-separated.")
@click.option("-f", "--text-file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Text for perplexity.")
@click.option("--max-text-tokens", default=2048, show_default=True, help="Score at most this many tokens of the text.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the table as JSON.")
def sweep(model_path, ks, text_file, max_text_tokens, json_out, **load) -> None:
    """Perplexity and tokens/s for several numbers of experts per token (no reload between them)."""
    from moe_gguf.study.perplexity import rows_to_json
    from moe_gguf.study.perplexity import sweep as run_sweep

    try:
        k_list = [int(x) for x in ks.split(",") if x.strip()]
    except ValueError:
        fail(f"--k: expected comma-separated integers, got {ks!r}")
    model = load_model(model_path, **load)
    n = model.topology.n_expert
    bad = [k for k in k_list if not 1 <= k <= n]
    if bad:
        fail(f"--k: {bad} out of range [1, {n}] (the model has {n} experts)")
    tokens = model.tokenize(open(text_file, encoding="utf-8", errors="replace").read())[:max_text_tokens]
    with model.context(n_ctx=min(model.llama.n_ctx(), 512)) as ctx:
        rows = run_sweep(ctx, k_list, tokens)
    click.echo(f"{'k':>4} {'perplexity':>12} {'pp tok/s':>10} {'tg tok/s':>10}")
    for r in rows:
        click.echo(f"{r.n_expert_used:>4} {r.perplexity:>12.3f} {r.pp_tokens_per_s:>10.1f} {r.tg_tokens_per_s:>10.1f}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"model": str(model_path), "default_k": model.topology.n_expert_used, "rows": rows_to_json(rows)}, f,
                      indent=2)
    model.close()


@main.command()
@click.argument("model_path", required=False, type=click.Path(dir_okay=False))
@llama_options
@click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False), help="Steering profile(s) to load.")
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--allow-model-mismatch", is_flag=True,
              help="Apply a profile made for another model if its entries fit (a switch in the Steer tab too).")
def chat(model_path, profiles, system_prompt, allow_model_mismatch, n_gpu_layers, n_ctx, threads, expert_used,
         **placement) -> None:
    """Chat in the terminal with live expert steering (default model: the shipped demo model)."""
    from moe_gguf.tui.app import run_chat

    run_chat(model_path=model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, threads=threads,
             expert_used_count=expert_used, profiles=list(profiles), system_prompt=system_prompt,
             allow_model_mismatch=allow_model_mismatch, **placement)


@main.command("rpc-server")
@click.option("-H", "--host", default="127.0.0.1", show_default=True,
              help="Address to bind (the protocol has no authentication: loopback or a private network only).")
@click.option("-p", "--port", default=50052, show_default=True, type=int, help="TCP port.")
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
