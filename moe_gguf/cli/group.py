"""The `moe-gguf` click group every command module adds its commands to."""

from __future__ import annotations

import click

from moe_gguf.cli.common import show_warnings


@click.group()
@click.version_option(package_name="moe-gguf")
def main() -> None:
    """Expert-level behaviour steering for MoE GGUF models on llama.cpp."""
    show_warnings()
