"""Commands that write model files: synth, prune."""

from __future__ import annotations

import click

from moe_gguf.cli.common import fail
from moe_gguf.cli.group import main


@main.command()
@click.argument("preset_or_arch")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output GGUF path.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0", "q4_0", "q4_k"]), default="f32", show_default=True)
@click.option("--n-layer", type=int, default=None, help="Override the preset's layer count.")
@click.option("--seed", default=0, show_default=True)
def synth(preset_or_arch: str, out: str, dtype: str, n_layer: int | None, seed: int) -> None:
    """Write a random-weight MoE GGUF (presets: tiny-<arch>, qwen3-30b-a3b, gpt-oss-20b)."""
    from moe_gguf.formats.synth import PRESETS, main_synth

    try:
        main_synth(preset_or_arch, out, dtype=dtype, n_layer=n_layer, seed=seed)  # prints a summary line
    except (KeyError, ValueError) as e:
        fail(f"{e}; presets: {', '.join(PRESETS)}")


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
    from moe_gguf.formats.prune import main_prune

    try:
        main_prune(model_path, out, profile_path=profile_path, counts_path=counts_path, keep_fraction=keep_fraction)
    except ValueError as e:
        fail(str(e))
