"""Commands of the behaviour-expert study: probe, merge, rank, eval, demo."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

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
    raw_option,
    seed_option,
    write_json,
)
from moe_gguf.cli.group import main
from moe_gguf.errors import ProbeInputError, ProfileError


@main.command(cls=GrammarCommand, old_spellings={"--max-new-tokens": "--max-tokens"})
@MODEL_OPTION
@llama_options
@click.option("-i", "--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="Study JSONL: prompt, label, [response], [answer], [target], [pair_id], [chat]; other fields are kept.")
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
@click.option("--top", "top_n", default=10, show_default=True, help="Experts in the table (and in an observational profile).")
@click.option("--bootstrap", "n_boot", default=200, show_default=True, help="Bootstrap resamples for the CIs.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write the whole ranking as CSV.")
@json_out_option
@click.option("--heatmap", type=click.Path(dir_okay=False), help="Write a layer x expert heatmap PNG.")
@click.option("--profile-out", type=click.Path(dir_okay=False),
              help="Write a profile disabling the chosen experts (the causal set with --causal, else the top experts).")
@click.option("-m", "--model", "model_path", type=click.Path(dir_okay=False),
              help="The model: for the profile's fingerprint and the causal ranking.")
@llama_options
@click.option("--causal", "causal_path", type=click.Path(exists=True, dir_okay=False),
              help="Study JSONL (the probe file will do): test candidates causally on its --away items' responses "
                   "(and target/answer) and its --target items.")
@click.option("--candidates", default=24, show_default=True, help="Observational top experts to test causally.")
@click.option("--causal-items", default=32, show_default=True, help="Items per label used by --causal (a seeded sample).")
@click.option("--max-set", default=10, show_default=True, help="Largest causal set.")
@click.option("--max-damage", default=0.1, show_default=True, type=float,
              help="Damage budget: mean KL(unsteered || steered) of next-token distributions on the --target items, "
                   "nats/token; a set over it does not grow. 'inf' switches the brake off.")
@click.option("--effect-fraction", default=0.9, show_default=True, type=float,
              help="The chosen set is the smallest greedy prefix reaching this share of the best effect.")
@click.option("--min-gain", default=0.005, show_default=True, type=float,
              help="An expert joins the set only if the set's effect rises by more than this.")
@click.option("--patience", default=3, show_default=True, help="Stop growing after this many refused candidates in a row.")
@seed_option
@raw_option
def rank(counts, target, away, method, top_n, n_boot, csv_out, json_out, heatmap, profile_out, model_path,
         causal_path, candidates, causal_items, max_set, max_damage, effect_fraction, min_gain, patience, seed, raw,
         **load) -> None:
    """Rank experts for a behaviour from probe counts (observational, optionally causal with a damage brake)."""
    from moe_gguf.study import rank as R
    from moe_gguf.study.items import load_items
    from moe_gguf.study.plot import heatmap_png
    from moe_gguf.study.probe import ProbeResult

    try:
        res = ProbeResult.load(counts)
        moe_layers = res.meta.get("model", {}).get("moe_layers")
        n_used = res.meta.get("model", {}).get("n_expert_used")
        ranking = R.rank(res, target=target, away=away, method=method, top_n=top_n, n_boot=n_boot,
                         moe_layers=moe_layers, n_expert_used=n_used, seed=seed)
    except ValueError as e:
        fail(str(e))
    click.echo(f"{method} ranking of {len(ranking.ranked)} experts ({res.token_mode} tokens)"
               + (f"; top-{top_n} stability {ranking.stability:.2f}" if ranking.stability is not None else ""))
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
    if (causal_path or profile_out) and not model_path:
        fail("--causal and --profile-out need -m/--model")
    sel = None
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(load_model(model_path, **load)) if (causal_path or profile_out) else None
        if causal_path:
            try:
                items = load_items(causal_path)
            except ProbeInputError as e:  # names the file and line
                fail(str(e))
            try:
                away_items, keep_items = R.causal_items(model, items, target=target, away=away,
                                                        n_items=causal_items, seed=seed, chat=not raw)
                sel = R.causal_select(model, away_items, keep_items, [(r.layer, r.expert) for r in ranking.top(candidates)],
                                      max_set=max_set, max_damage=max_damage, effect_fraction=effect_fraction,
                                      min_gain=min_gain, patience=patience, progress=lambda m: click.echo(m, err=True))
            except ValueError as e:
                fail(f"{causal_path}: {e}")
            _print_selection(sel, ranking, method=method, away=away, target=target, top_n=top_n,
                             n_away=len(away_items), n_keep=len(keep_items), max_damage=max_damage,
                             effect_fraction=effect_fraction)
        payload = {"method": method, "target": target, "away": away, "token_mode": res.token_mode,
                   "stability": ranking.stability, "ranking": ranking.to_rows()}
        if sel:
            payload["causal"] = {**sel.to_json(), "agreement": R.agreement(ranking, sel, top_n)}
        write_json(json_out, payload)
        if heatmap:
            heatmap_png(ranking.scores, heatmap, title=f"{method}: {away} vs {target}", layers=moe_layers,
                        marked=[(r.layer, r.expert) for r in ranking.top(top_n)])
        if profile_out:
            if sel is not None:
                prof = R.selection_profile(model.topology, sel, away=away)
                if not sel.chosen:
                    click.echo("warning: no expert passed the causal test within the damage budget; the profile is empty",
                               err=True)
            else:
                prof = ranking.profile(model.topology, top_n)
            prof.save(profile_out)
            click.echo(f"wrote {profile_out}: {prof.summary()}")


def _print_selection(sel, ranking, *, method: str, away: str, target: str, top_n: int, n_away: int, n_keep: int,
                     max_damage: float, effect_fraction: float) -> None:
    from moe_gguf.study.rank import agreement

    ag = agreement(ranking, sel, top_n)
    click.echo(f"causal ({n_away} '{away}' / {n_keep} '{target}' items): effect = fall of "
               f"p(away continuation) per token; damage = KL on '{target}' items (budget {max_damage})")
    click.echo(f"{'size':>4} {'effect':>8} {'damage':>8}  experts")
    for row in sel.curve:
        click.echo(f"{row['size']:>4} {row['effect']:>8.3f} {row['damage']:>8.4f}  {row['experts']}")
    for rj in sel.rejected:
        click.echo(f"     refused {rj['expert']}: {rj['reason']} (effect {rj['effect']:.3f}, damage {rj['damage']:.4f})")
    click.echo(f"chosen: {sel.chosen} (smallest set reaching {effect_fraction:.0%} of the best effect)")
    click.echo(f"agreement with {method}: spearman {ag['spearman']:.2f}, top-{top_n} overlap {ag['top_overlap']}")


def _load_checker(spec: str):
    """``module:function`` (the module found in the current directory too) or ``path/to/file.py:function``."""
    import importlib
    import importlib.util
    import os

    mod, _, fn = spec.rpartition(":")
    if not mod or not fn:
        fail(f"--checker {spec!r}: expected module:function or file.py:function")
    try:
        if mod.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location(Path(mod).stem, mod)
            if loader_spec is None or loader_spec.loader is None:
                fail(f"--checker {spec}: cannot load {mod}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)  # a checker module beside the data, without PYTHONPATH
            try:
                module = importlib.import_module(mod)
            finally:
                if added:
                    sys.path.remove(cwd)
        check = getattr(module, fn)
    except (ImportError, AttributeError, OSError, SyntaxError) as e:
        fail(f"--checker {spec}: {type(e).__name__}: {e}")
    if not callable(check):
        fail(f"--checker {spec}: {fn} is not a function")
    return check


@main.command(name="eval")
@MODEL_OPTION
@llama_options
@click.option("--profile", "profile_path", required=True, type=click.Path(exists=True, dir_okay=False))
@allow_mismatch_option
@click.option("-i", "--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Study JSONL of held-out items: prompt, label, [answer], [response], ...")
@click.option("--away", required=True, help="Label of prompts that show the behaviour (e.g. refuse).")
@click.option("--benign", default=None, help="Label of ordinary prompts: the profile must not damage them.")
@click.option("--refusal-pattern", "patterns", multiple=True,
              help="Regex of a refusal (repeatable; replaces the default English refusal markers).")
@click.option("--refusal-exact", "exact", multiple=True,
              help="A refusal must be exactly this text (repeatable); other refusal-like replies are broken refusals.")
@click.option("--checker", default=None,
              help="module:function or file.py:function(item, reply) -> True / False / None judging compliance.")
@click.option("--ppl-file", type=click.Path(exists=True, dir_okay=False),
              help="Held-out text, one document per line, for the perplexity guard.")
@click.option("--ppl-factor", default=3.0, show_default=True,
              help="Degenerate above this x the 95th percentile fluency of the unsteered benign replies.")
@click.option("--random", "n_random", default=5, show_default=True, help="Random-expert control profiles.")
@max_tokens_option(32)
@seed_option
@raw_option
@click.option("--batch", "n_seq", default=16, show_default=True, help="Sequences decoded together.")
@json_out_option
@click.option("--replies-out", type=click.Path(dir_okay=False),
              help="JSONL: condition, prompt, reply, class, reason, perplexity of every reply.")
@click.option("--chart", type=click.Path(dir_okay=False), help="Bar chart PNG.")
def eval_cmd(model_path, profile_path, allow_model_mismatch, input_path, away, benign, patterns, exact, checker,
             ppl_file, ppl_factor, n_random, max_tokens, seed, raw, n_seq, json_out, replies_out, chart, **load) -> None:
    """Judge replies as refusal / compliance / unverified / degenerate: baseline, profile, random controls,
    and the profile on ordinary prompts."""
    import re as _re

    from moe_gguf._io import atomic_write
    from moe_gguf.errors import DecodeError
    from moe_gguf.formats.profile import SteeringProfile
    from moe_gguf.study.evaluate import (
        EvalItem,
        JudgeConfig,
        answer_checker,
        default_refusal_patterns,
        evaluate,
        perplexity_inputs,
    )
    from moe_gguf.study.items import load_items
    from moe_gguf.study.plot import bar_chart_png

    try:
        rows = load_items(input_path)
        regexes = [_re.compile(p, _re.IGNORECASE) for p in patterns] or default_refusal_patterns()
    except ProbeInputError as e:
        fail(str(e))
    except _re.error as e:
        fail(f"--refusal-pattern: not a valid regular expression ({e})")
    items = [EvalItem(it.prompt, it.label, it) for it in rows]
    away_items = [it for it in items if it.label == away]
    benign_items = [it for it in items if benign and it.label == benign]
    labels = sorted({it.label for it in items})
    if not away_items:
        fail(f"no items with label {away!r} in {input_path} (labels: {', '.join(labels)})")
    if benign and not benign_items:
        fail(f"no items with label {benign!r} in {input_path} (labels: {', '.join(labels)})")
    check = _load_checker(checker) if checker else answer_checker
    docs_text = None
    if ppl_file:
        try:
            docs_text = [line.strip() for line in open(ppl_file, encoding="utf-8") if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--ppl-file {ppl_file}: cannot read ({e})")
        if not docs_text:
            fail(f"--ppl-file {ppl_file}: no text (one document per line)")
    cfg = JudgeConfig(regexes, check, ppl_factor, refusal_exact=exact)
    total = [0]

    def progress(stage: str, done: int, n: int) -> None:
        if stage == "generate" and (done == n or done - total[0] >= max(n // 10, 1)):
            total[0] = done
            click.echo(f"  generated {done}/{n} replies", err=True)
        elif stage == "fluency":
            click.echo("  scoring fluency and perplexity", err=True)

    with load_model(model_path, **load) as model:
        try:
            profile = SteeringProfile.load(profile_path)
            profile.validate(model.topology, allow_mismatch=allow_model_mismatch, source=profile_path)
        except ProfileError as e:
            fail(str(e))
        docs, pairs = perplexity_inputs(model, benign_items, texts=docs_text or (), chat=not raw)
        try:
            rep = evaluate(model, profile, away_items, cfg, benign_items=benign_items, ppl_docs=docs, ppl_pairs=pairs,
                           n_random=n_random, max_tokens=max_tokens, n_seq=n_seq, seed=seed, chat=not raw,
                           progress=progress)
        except DecodeError as e:
            fail(f"{e}; try a smaller --batch or a larger -c")
    click.echo(rep.table())
    write_json(json_out, rep.to_json())
    if replies_out:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rep.replies).encode()
        try:
            atomic_write(Path(replies_out), data)
        except ValueError as e:
            fail(str(e))
    if chart:
        groups = list(rep.conditions)
        bar_chart_png(groups, {k: [rep.conditions[g].rates[k] for g in groups] for k in ("refusal", "compliance",
                                                                                     "unverified", "degenerate")},
                      chart, title=f"{profile.name}: judged replies")


@main.command()
@click.option("-m", "--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help="Default: the shipped demo model.")
@llama_options
@click.option("-o", "--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the profile, counts, JSON and PNGs.")
@json_out_option
@seed_option
def demo(model_path, out_dir, json_out, seed, **load) -> None:
    """Find the refusal experts of the shipped model, switch them off, and judge what really changed.

    Exits non-zero when one of the checks fails; the findings are reported either way."""
    from moe_gguf.demo.run import DemoSetupError, run_demo
    from moe_gguf.errors import DecodeError

    try:
        r = run_demo(model_path, out_dir=out_dir, seed=seed, load=load, log=lambda m: click.echo(m, err=True))
    except (DemoSetupError, DecodeError, ValueError) as e:
        fail(str(e))
    click.echo(r.report.table())
    click.echo(f"profile: {r.profile.summary()}")
    click.echo("findings:")
    for line in r.findings:
        click.echo(f"  - {line}")
    click.echo("checks:")
    for name, ok in r.checks.items():
        click.echo(f"  [{'pass' if ok else 'FAIL'}] {name}")
    write_json(json_out, r.summary)
    click.echo(f"details in {out_dir}/ (demo.json, profile.json, heatmap.png, eval.png, replies.jsonl)")
    if not all(r.checks.values()):
        raise SystemExit(1)
