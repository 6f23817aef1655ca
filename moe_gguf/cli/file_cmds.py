"""Commands that write model files: synth, prune."""

from __future__ import annotations

import click

from moe_gguf.cli.common import (
    GrammarCommand,
    allow_mismatch_option,
    fail,
    json_out_option,
    model_option,
    positional_model,
    resolve_model,
    seed_option,
    write_json,
)
from moe_gguf.cli.group import main


@main.command()
@click.argument("preset_or_arch")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output GGUF path.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0", "q4_0", "q4_k"]), default="f32", show_default=True)
@click.option("--n-layer", type=int, default=None, help="Override the preset's layer count.")
@seed_option
def synth(preset_or_arch: str, out: str, dtype: str, n_layer: int | None, seed: int) -> None:
    """Write a random-weight MoE GGUF (presets: tiny-<arch>, qwen3-30b-a3b, gpt-oss-20b)."""
    from moe_gguf.formats.synth import PRESETS, resolve_spec, synth_summary, write_gguf

    try:
        spec = resolve_spec(preset_or_arch, n_layer=n_layer, seed=seed)
        name = f"synth-{preset_or_arch}"
        path = write_gguf(spec, out, dtype=dtype, name=name)
    except (KeyError, ValueError) as e:
        fail(f"{e}; presets: {', '.join(PRESETS)}")
    click.echo(synth_summary(path, spec, dtype, name))


@main.command(cls=GrammarCommand, old_spellings={"--pad-with": "--counts"})
@positional_model
@model_option(required=False)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Pruned GGUF to write (atomically: an existing file is replaced only on success).")
@click.option("--profile", "profile_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Remove the experts this profile disables (force/bias/scale entries are refused). Layers that would "
                   "lose fewer are padded: with --counts by least use, else by weakest router rows.")
@click.option("--counts", "counts_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Routing counts (.npz from `moe-gguf probe` or a RoutingRecord): rank experts for --keep-fraction; "
                   "with --profile, even out the layers by also removing their least-used experts.")
@click.option("--keep-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Keep this fraction of each layer's experts, the best by selections x routing weight (needs --counts).")
@allow_mismatch_option
@json_out_option
def prune(model_arg, model_path, out, profile_path, counts_path, keep_fraction, allow_model_mismatch, json_out) -> None:
    """Write a smaller GGUF without the chosen experts (bytes copied, no requantization)."""
    from moe_gguf.formats.prune import prune_gguf

    src = resolve_model(model_path, model_arg)
    try:
        report = prune_gguf(src, out, profile=profile_path, counts=counts_path, keep_fraction=keep_fraction,
                            allow_mismatch=allow_model_mismatch)
    except ValueError as e:
        fail(str(e))
    if json_out != "-":
        click.echo(report.summary())
    write_json(json_out, report.to_dict())
