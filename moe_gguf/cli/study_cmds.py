"""Commands of the behaviour-expert study: probe, merge, rank, eval, demo."""

from __future__ import annotations

import json
import sys

import click

from moe_gguf.cli.common import (
    MODEL_OPTION,
    GrammarCommand,
    fail,
    llama_options,
    load_model,
    max_tokens_option,
    raw_option,
)
from moe_gguf.cli.group import main
from moe_gguf.errors import ProfileError


@main.command(cls=GrammarCommand, old_spellings={"--max-new-tokens": "--max-tokens"})
@MODEL_OPTION
@llama_options
@click.option("-i", "--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL: prompt, label, [response], [pair_id], [chat].")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Count file (.npz), saved after every batch; a file from the same inputs and options is resumed.")
@click.option("--overwrite", is_flag=True, help="Replace an -o file that holds counts from other inputs or options (a file of the same run is "
                   "still resumed).")
@click.option("--tokens", "token_mode", type=click.Choice(["prompt", "response", "generated"]), default="prompt",
              show_default=True, help="Which tokens to count: the prompt, the given response, or the model's own output.")
@raw_option
@click.option("--batch", "n_seq", default=8, show_default=True, help="Sequences decoded together.")
@max_tokens_option()
def probe(model_path, input_path, out, overwrite, token_mode, raw, n_seq, max_tokens, **load) -> None:
    """Count which experts route the chosen tokens, per label (resumable; `merge` adds runs)."""
    from moe_gguf.errors import CountFileError
    from moe_gguf.study.probe import ProbeInputError, load_jsonl
    from moe_gguf.study.probe import probe as run_probe

    try:
        items = load_jsonl(input_path)
    except ProbeInputError as e:
        fail(str(e))
    with load_model(model_path, **load) as model, \
            click.progressbar(length=len(items), label=f"probing {len(items)} items ({token_mode} tokens)",
                              file=sys.stderr) as bar:
        done = [0]

        def progress(n: int, total: int) -> None:
            bar.update(n - done[0])
            done[0] = n

        try:
            res = run_probe(model, items, token_mode=token_mode, chat=not raw, n_seq=n_seq,
                            max_new_tokens=max_tokens, out=out, progress=progress, overwrite=overwrite)
        except (CountFileError, ProbeInputError, ValueError) as e:
            fail(str(e))
    for lab in res.labels:
        rec = res.records[lab]
        click.echo(f"{lab}: {sum(1 for x in res.item_labels if x == lab)} items, {int(rec.tokens.max())} tokens per layer")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
def merge(inputs, out) -> None:
    """Add up count files from several runs or machines: all probe results, or all routing records."""
    from moe_gguf.study.merge import merge_files
    from moe_gguf.study.probe import ProbeResult

    try:
        total = merge_files(inputs, out)
    except ValueError as e:  # CountFileError, FileWriteError (a full disk) are ValueErrors too
        fail(str(e))
    what = f"{len(total.item_labels)} items" if isinstance(total, ProbeResult) else f"{int(total.tokens.max())} tokens per layer"
    click.echo(f"merged {len(inputs)} files, {what}: {out}")


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
    from moe_gguf.study import rank as R
    from moe_gguf.study.plot import heatmap_png
    from moe_gguf.study.probe import ProbeResult

    try:
        res = ProbeResult.load(counts)
        moe_layers = res.meta.get("model", {}).get("moe_layers")
        n_used = res.meta.get("model", {}).get("n_expert_used")
        ranking = R.rank(res, target=target, away=away, method=method, top_n=top_n, n_boot=n_boot,
                         moe_layers=moe_layers, n_expert_used=n_used)
    except ValueError as e:
        fail(str(e))
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
            fail("--causal and --profile-out need -m/--model")
        model = load_model(model_path)
    if causal_path:
        items = [json.loads(line) for line in open(causal_path, encoding="utf-8") if line.strip()]
        try:
            prompts = [R.CausalPrompt(model.tokenize(model.chat_prompt([{"role": "user", "content": d["prompt"]}]),
                                                     add_bos=False),
                                      model.tokenize(d["away"], add_bos=False, special=False),
                                      model.tokenize(d["target"], add_bos=False, special=False)) for d in items]
        except (KeyError, TypeError) as e:
            fail(f"{causal_path}: each line needs prompt, away and target strings ({e})")
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
            from moe_gguf.formats.profile import SteeringProfile

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

    from moe_gguf.formats.profile import SteeringProfile
    from moe_gguf.study.evaluate import EvalItem, JudgeConfig, evaluate
    from moe_gguf.study.plot import bar_chart_png

    model = load_model(model_path, **load)
    try:
        profile = SteeringProfile.load(profile_path)
        profile.validate(model.topology)
        rows = [json.loads(line) for line in open(input_path, encoding="utf-8") if line.strip()]
        items = [EvalItem(d["prompt"], d["label"], d.get("answer")) for d in rows]
        regexes = [_re.compile(p, _re.IGNORECASE) for p in patterns] or None
    except (ProfileError, KeyError, TypeError, json.JSONDecodeError, _re.error) as e:
        fail(f"bad input: {e}")
    if regexes is None:
        from moe_gguf.demo.dataset import refusal_patterns

        regexes = refusal_patterns()
    check = None
    if checker:
        mod, _, fn = checker.partition(":")
        try:
            check = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            fail(f"--checker {checker}: {e}")
    elif any(it.payload for it in items):
        def check(item, reply):
            return item.payload is None or str(item.payload).lower() in reply.lower()
    cfg = JudgeConfig(regexes, check, ppl_factor)
    away_items = [it for it in items if it.label == away]
    benign_items = [it for it in items if benign and it.label == benign]
    if not away_items:
        fail(f"no items with label {away!r} in {input_path}")
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
    from moe_gguf.demo.run import run_demo

    r = run_demo(model_path, out_dir=out_dir, seed=seed, n_threads=threads, log=lambda m: click.echo(m, err=True))
    click.echo(r.report.table())
    click.echo(f"profile: {r.profile.summary()}")
    for name, ok in r.checks.items():
        click.echo(f"  [{'pass' if ok else 'FAIL'}] {name}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(r.summary, f, indent=2)
    click.echo(f"details in {out_dir}/ (demo.json, profile.json, heatmap.png, eval.png)")
