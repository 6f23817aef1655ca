"""`moe-gguf` command line: thin click commands over the Python API.

Each command parses its options, calls one library function and prints. The commands live by subject in
model_cmds (info, doctor, generate, chat, sweep, rpc-server), study_cmds (probe, merge, rank, eval, demo) and
file_cmds (synth, prune); common holds the options they share.
"""

from __future__ import annotations

from moe_gguf.cli import file_cmds, model_cmds, study_cmds  # noqa: F401  (each registers its commands)
from moe_gguf.cli.group import main

__all__ = ["main"]
