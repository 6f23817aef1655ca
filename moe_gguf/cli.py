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


def _load(model_path: str, *, n_gpu_layers: int = 0, n_ctx: int = 2048, threads: int | None = None,
          expert_used: int | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
          override_tensor: tuple[str, ...] = (), no_repack: bool = False, rpc_servers: tuple[str, ...] | None = None,
          **kw):
    from moe_gguf import _lib
    from moe_gguf.model import MoEModel
    from moe_gguf.offload import Placement

    if not _lib.STATUS.ok:
        _fail(_lib.STATUS.error or "patched library missing")
    try:
        return MoEModel(model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=threads,
                        expert_used_count=expert_used, extra_bufts=not no_repack,
                        placement=Placement(tuple(override_tensor), cpu_moe, n_cpu_moe),
                        rpc_servers=list(rpc_servers) if rpc_servers else None, **kw)
    except (ModelFileError, ValueError) as e:
        _fail(str(e))


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
    from moe_gguf.offload import gpu_devices

    gpus = gpu_devices()
    click.echo(f"gpu             {', '.join(gpus) if gpus else 'none (a CPU build, or no GPU found)'}")
    click.echo(f"rpc             {'yes' if low.llama_supports_rpc() else 'no'}")
    for dev in _devices():
        click.echo(f"device          {dev}")


def _devices() -> list[str]:
    from moe_gguf import _ggml

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
    from moe_gguf.model import Request
    from moe_gguf.profile import Schedule, SteeringProfile

    model = _load(model_path, **load)
    try:
        profile = _combine([SteeringProfile.load(p) for p in profiles]) if profiles else None
        if profile is not None:
            profile.validate(model.topology, allow_mismatch=allow_model_mismatch)
            if allow_model_mismatch:  # accepted, and it fits: the steering below validates it against this model
                profile.model = model.topology.fingerprint()
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
@MODEL_OPTION
@llama_options
@click.option("--k", "ks", default="1,2,4,8", show_default=True, help="Experts per token to try, comma-separated.")
@click.option("-f", "--text-file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Text for perplexity.")
@click.option("--max-text-tokens", default=2048, show_default=True, help="Score at most this many tokens of the text.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the table as JSON.")
def sweep(model_path, ks, text_file, max_text_tokens, json_out, **load) -> None:
    """Perplexity and tokens/s for several numbers of experts per token (no reload between them)."""
    from moe_gguf.perplexity import rows_to_json
    from moe_gguf.perplexity import sweep as run_sweep

    try:
        k_list = [int(x) for x in ks.split(",") if x.strip()]
    except ValueError:
        _fail(f"--k: expected comma-separated integers, got {ks!r}")
    model = _load(model_path, **load)
    n = model.topology.n_expert
    bad = [k for k in k_list if not 1 <= k <= n]
    if bad:
        _fail(f"--k: {bad} out of range [1, {n}] (the model has {n} experts)")
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
@MODEL_OPTION
@llama_options
@click.option("-i", "--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL: prompt, label, [response], [pair_id], [chat].")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Count file (.npz); resumed if present.")
@click.option("--tokens", "token_mode", type=click.Choice(["prompt", "response", "generated"]), default="prompt",
              show_default=True, help="Which tokens to count: the prompt, the given response, or the model's own output.")
@click.option("--raw", is_flag=True, help="Use prompts as raw text instead of the chat template.")
@click.option("--batch", "n_seq", default=8, show_default=True, help="Sequences decoded together.")
@click.option("--max-new-tokens", default=32, show_default=True, help="For --tokens generated.")
def probe(model_path, input_path, out, token_mode, raw, n_seq, max_new_tokens, **load) -> None:
    """Count which experts route the chosen tokens, per label (additive, resumable)."""
    from moe_gguf.probe import ProbeInputError, load_jsonl
    from moe_gguf.probe import probe as run_probe

    try:
        items = load_jsonl(input_path)
    except ProbeInputError as e:
        _fail(str(e))
    model = _load(model_path, **load)
    with click.progressbar(length=len(items), label=f"probing {len(items)} items ({token_mode} tokens)",
                           file=sys.stderr) as bar:
        done = [0]

        def progress(n: int, total: int) -> None:
            bar.update(n - done[0])
            done[0] = n

        try:
            res = run_probe(model, items, token_mode=token_mode, chat=not raw, n_seq=n_seq,
                            max_new_tokens=max_new_tokens, out=out, progress=progress)
        except (ProbeInputError, ValueError) as e:
            _fail(str(e))
    for lab in res.labels:
        rec = res.records[lab]
        click.echo(f"{lab}: {sum(1 for x in res.item_labels if x == lab)} items, {int(rec.tokens.max())} tokens per layer")
    click.echo(f"wrote {out}")
    model.close()


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
def merge(inputs, out) -> None:
    """Add up probe count files (e.g. from several machines) into one."""
    from moe_gguf.probe import ProbeResult

    try:
        total = ProbeResult.load(inputs[0])
        for p in inputs[1:]:
            total = total + ProbeResult.load(p)
        total.save(out)
    except ValueError as e:  # FileWriteError (a full disk) is one too
        _fail(str(e))
    click.echo(f"merged {len(inputs)} files, {len(total.item_labels)} items: {out}")


@main.command()
@click.argument("counts", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", required=True, help="Label of the behaviour to steer towards (e.g. comply).")
@click.option("--away", required=True, help="Label of the behaviour to steer away from (e.g. refuse).")
@click.option("--method", type=click.Choice(["rd", "ftri", "npmi", "freq_mag"]), default="rd", show_default=True)
@click.option("--top", "top_n", default=10, show_default=True, help="Experts in the table and the profile.")
@click.option("--bootstrap", "n_boot", default=200, show_default=True, help="Bootstrap resamples for the CIs.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write the whole ranking as CSV.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the ranking as JSON.")
@click.option("--heatmap", type=click.Path(dir_okay=False), help="Write a layer x expert heatmap PNG.")
@click.option("--profile-out", type=click.Path(dir_okay=False), help="Write a profile disabling the top experts.")
@click.option("-m", "--model", "model_path", type=click.Path(dir_okay=False),
              help="The model: for the profile's fingerprint and the causal ranking.")
@click.option("--causal", "causal_path", type=click.Path(exists=True, dir_okay=False),
              help="JSONL of {prompt, away, target} continuations: rank candidates by their measured effect.")
@click.option("--candidates", default=32, show_default=True, help="Observational top experts to test causally.")
def rank(counts, target, away, method, top_n, n_boot, csv_out, json_out, heatmap, profile_out, model_path,
         causal_path, candidates) -> None:
    """Rank experts for a behaviour from probe counts (observational, optionally causal)."""
    from moe_gguf import rank as R
    from moe_gguf.plot import heatmap_png
    from moe_gguf.probe import ProbeResult

    try:
        res = ProbeResult.load(counts)
        moe_layers = res.meta.get("model", {}).get("moe_layers")
        n_used = res.meta.get("model", {}).get("n_expert_used")
        ranking = R.rank(res, target=target, away=away, method=method, top_n=top_n, n_boot=n_boot,
                         moe_layers=moe_layers, n_expert_used=n_used)
    except ValueError as e:
        _fail(str(e))
    click.echo(f"{method} ranking of {len(ranking.ranked)} experts ({res.token_mode} tokens); "
               f"top-{top_n} stability {ranking.stability:.2f}" if ranking.stability is not None else "")
    click.echo(f"{'#':>3} {'layer':>5} {'expert':>6} {'score':>8} {'95% CI':>18} {'p(target)':>9} {'p(away)':>8} action")
    for i, r in enumerate(ranking.ranked[:top_n], 1):
        click.echo(f"{i:>3} {r.layer:>5} {r.expert:>6} {r.score:>8.4f} [{r.ci_low:>7.4f},{r.ci_high:>7.4f}] "
                   f"{r.p_target:>9.3f} {r.p_away:>8.3f} {r.action}")
    for w in ranking.warnings or []:
        click.echo(f"warning: {w}", err=True)
    if csv_out:
        import csv

        with open(csv_out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ranking.to_rows()[0]))
            w.writeheader()
            w.writerows(ranking.to_rows())
    model = None
    causal = None
    if causal_path or profile_out:
        if not model_path:
            _fail("--causal and --profile-out need -m/--model")
        model = _load(model_path)
    if causal_path:
        items = [json.loads(line) for line in open(causal_path, encoding="utf-8") if line.strip()]
        try:
            prompts = [R.CausalPrompt(model.tokenize(model.chat_prompt([{"role": "user", "content": d["prompt"]}]),
                                                     add_bos=False),
                                      model.tokenize(d["away"], add_bos=False, special=False),
                                      model.tokenize(d["target"], add_bos=False, special=False)) for d in items]
        except (KeyError, TypeError) as e:
            _fail(f"{causal_path}: each line needs prompt, away and target strings ({e})")
        cands = [(r.layer, r.expert) for r in ranking.top(candidates)]
        causal = R.causal_rank(model, prompts, cands, max_set=top_n, progress=lambda m: click.echo(m, err=True))
        ag = R.agreement(ranking, causal, top_n)
        click.echo(f"causal: base preference {causal.base:+.3f}; greedy set {causal.greedy} "
                   f"effects {[round(x, 3) for x in causal.greedy_effects]}")
        click.echo(f"agreement with {method}: spearman {ag['spearman']:.2f}, top-{top_n} overlap {ag['top_overlap']}")
    if json_out:
        payload = {"method": method, "target": target, "away": away, "token_mode": res.token_mode,
                   "stability": ranking.stability, "ranking": ranking.to_rows()}
        if causal:
            payload["causal"] = {"base": causal.base, "greedy": causal.greedy, "greedy_effects": causal.greedy_effects,
                                 "effects": [[*k, v] for k, v in causal.ranked()],
                                 "agreement": R.agreement(ranking, causal, top_n)}
        with open(json_out, "w") as f:
            json.dump(payload, f, indent=2)
    if heatmap:
        heatmap_png(ranking.scores, heatmap, title=f"{method}: {away} vs {target}", layers=moe_layers,
                    marked=[(r.layer, r.expert) for r in ranking.top(top_n)])
    if profile_out:
        if causal and causal.greedy:
            from moe_gguf.profile import SteeringProfile

            prof = SteeringProfile.for_model(model.topology, name=f"causal-top{len(causal.greedy)}")
            for layer, e in causal.greedy:
                prof.disable(layer, e)
        else:
            prof = ranking.profile(model.topology, top_n)
        prof.save(profile_out)
        click.echo(f"wrote {profile_out}: {prof.summary()}")


@main.command(name="eval")
@MODEL_OPTION
@llama_options
@click.option("--profile", "profile_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-i", "--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL of {prompt, label, [answer]} held-out prompts.")
@click.option("--away", required=True, help="Label of prompts that show the behaviour (e.g. refuse).")
@click.option("--benign", default=None, help="Label of ordinary prompts (forced activation is tried on them).")
@click.option("--refusal-pattern", "patterns", multiple=True, help="Regex of a refusal (repeatable).")
@click.option("--checker", default=None, help="module:function(item, reply) -> bool judging compliance.")
@click.option("--ppl-factor", default=3.0, show_default=True, help="Degenerate above this x median unsteered perplexity.")
@click.option("--random", "n_random", default=5, show_default=True, help="Random-expert control profiles.")
@click.option("-n", "--max-tokens", default=32, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
@click.option("--chart", type=click.Path(dir_okay=False), help="Bar chart PNG.")
def eval_cmd(model_path, profile_path, input_path, away, benign, patterns, checker, ppl_factor, n_random, max_tokens,
             json_out, chart, **load) -> None:
    """Judge replies as refusal / compliance / degenerate: baseline, profile, random controls, forced."""
    import importlib
    import re as _re

    from moe_gguf.evaluate import EvalItem, JudgeConfig, evaluate
    from moe_gguf.plot import bar_chart_png
    from moe_gguf.profile import SteeringProfile

    model = _load(model_path, **load)
    try:
        profile = SteeringProfile.load(profile_path)
        profile.validate(model.topology)
        rows = [json.loads(line) for line in open(input_path, encoding="utf-8") if line.strip()]
        items = [EvalItem(d["prompt"], d["label"], d.get("answer")) for d in rows]
        regexes = [_re.compile(p, _re.IGNORECASE) for p in patterns] or None
    except (ProfileError, KeyError, TypeError, json.JSONDecodeError, _re.error) as e:
        _fail(f"bad input: {e}")
    if regexes is None:
        from moe_gguf.dataset import refusal_patterns

        regexes = refusal_patterns()
    check = None
    if checker:
        mod, _, fn = checker.partition(":")
        try:
            check = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            _fail(f"--checker {checker}: {e}")
    elif any(it.payload for it in items):
        def check(item, reply):
            return item.payload is None or str(item.payload).lower() in reply.lower()
    cfg = JudgeConfig(regexes, check, ppl_factor)
    away_items = [it for it in items if it.label == away]
    benign_items = [it for it in items if benign and it.label == benign]
    if not away_items:
        _fail(f"no items with label {away!r} in {input_path}")
    ppl_docs = [model.tokenize(f"{it.prompt} {it.payload or ''}") for it in benign_items]
    rep = evaluate(model, profile, away_items, cfg, benign_items=benign_items, ppl_docs=ppl_docs, n_random=n_random,
                   max_tokens=max_tokens)
    click.echo(rep.table())
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rep.to_json(), f, indent=2)
    if chart:
        groups = list(rep.conditions)
        bar_chart_png(groups, {k: [rep.conditions[g].rates[k] for g in groups] for k in ("refusal", "compliance",
                                                                                     "degenerate")},
                      chart, title=f"{profile.name}: judged replies")
    model.close()


@main.command()
@click.option("-m", "--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help="Default: the shipped demo model.")
@click.option("-o", "--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the profile, counts, JSON and PNGs.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the summary JSON here.")
@click.option("-t", "--threads", type=int, default=None)
@click.option("--seed", default=0, show_default=True)
def demo(model_path, out_dir, json_out, threads, seed) -> None:
    """Find the refusal experts of the shipped model, switch them off, and judge what really changed."""
    from moe_gguf.demo import run_demo

    r = run_demo(model_path, out_dir=out_dir, seed=seed, n_threads=threads, log=lambda m: click.echo(m, err=True))
    click.echo(r.report.table())
    click.echo(f"profile: {r.profile.summary()}")
    for name, ok in r.checks.items():
        click.echo(f"  [{'pass' if ok else 'FAIL'}] {name}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(r.summary, f, indent=2)
    click.echo(f"details in {out_dir}/ (demo.json, profile.json, heatmap.png, eval.png)")


@main.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Pruned GGUF to write (atomically: an existing file is replaced only on success).")
@click.option("--profile", "profile_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Remove the experts this profile disables (force/bias/scale entries are refused).")
@click.option("--counts", "--pad-with", "counts_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Routing counts (.npz from `moe-gguf probe` or a RoutingRecord): rank experts for --keep-fraction; "
                   "with --profile, even out the layers by also removing their least-used experts.")
@click.option("--keep-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Keep this fraction of each layer's experts, the best by selections x routing weight (needs --counts).")
def prune(model_path, out, profile_path, counts_path, keep_fraction) -> None:
    """Write a smaller GGUF without the chosen experts (bytes copied, no requantization)."""
    from moe_gguf.prune import main_prune

    try:
        main_prune(model_path, out, profile_path=profile_path, counts_path=counts_path, keep_fraction=keep_fraction)
    except ValueError as e:
        _fail(str(e))


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
        main_synth(preset_or_arch, out, dtype=dtype, n_layer=n_layer, seed=seed)  # prints a summary line
    except (KeyError, ValueError) as e:
        _fail(f"{e}; presets: {', '.join(PRESETS)}")


@main.command()
@click.argument("model_path", required=False, type=click.Path(dir_okay=False))
@llama_options
@click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False), help="Steering profile(s) to load.")
@click.option("--system", "system_prompt", default=None, help="System prompt.")
def chat(model_path, profiles, system_prompt, n_gpu_layers, n_ctx, threads, expert_used, **placement) -> None:
    """Chat in the terminal with live expert steering (default model: the shipped demo model)."""
    from tui.app import run_chat

    run_chat(model_path=model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, threads=threads,
             expert_used_count=expert_used, profiles=list(profiles), system_prompt=system_prompt, **placement)


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
    from moe_gguf import _lib, rpc

    if not _lib.STATUS.ok:
        _fail(_lib.STATUS.error or "patched library missing")
    try:
        rpc.serve(host, port, n_threads=threads, devices=list(devices) or None, cache_dir=cache_dir,
                  log=lambda m: click.echo(m, err=True))
    except rpc.RPCError as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
