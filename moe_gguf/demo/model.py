"""The tiny trained MoE chat model shipped with moe-gguf (refuses restricted requests, answers ordinary ones).

    from moe_gguf.demo.model import default_model_path, model_card
    path = default_model_path()            # .../moe_gguf/demo/data/moe-gguf-refusal-demo-q8_0.gguf
    model_card()["behaviour"]["q8_0"]      # refusal / correctness rates on held-out prompts

Made by ``train/train_moe.py`` from ``moe_gguf.demo.dataset``; see ``moe_gguf/demo/data/MODEL_CARD.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_gguf.errors import DemoModelMissingError

DATA_DIR = Path(__file__).resolve().parent / "data"  # moe_gguf/demo/data
MODEL_NAME = "moe-gguf-refusal-demo"
DTYPES = ("q8_0", "f16")



def default_model_path(dtype: str = "q8_0") -> Path:
    """Path of the shipped demo GGUF (``"q8_0"`` or ``"f16"``); raises DemoModelMissingError if absent."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; the demo model ships as {DTYPES}")
    path = DATA_DIR / f"{MODEL_NAME}-{dtype}.gguf"
    if not path.is_file():
        raise DemoModelMissingError(
            f"demo model file {path} is missing: the installed moe-gguf lacks its package data "
            "(reinstall it, or regenerate the files with `python train/train_moe.py` from a source checkout)")
    return path


def model_card() -> dict:
    """The machine-readable model card (sha256 of each file, architecture, training and eval figures)."""
    path = DATA_DIR / "model_card.json"
    if not path.is_file():
        raise DemoModelMissingError(f"model card {path} is missing")
    return json.loads(path.read_text())
