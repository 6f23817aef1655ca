"""The one JSONL format of the study commands (``probe``, ``rank --causal``, ``eval``).

One JSON object per line::

    {"prompt": "...", "label": "forbidden", "response": "I cannot help with that.", "category": "weapons"}

=========== ======== ==========================================================================================
field       required meaning
=========== ======== ==========================================================================================
prompt      yes      the user's request (non-empty string)
label       yes      the behaviour class, e.g. ``refuse`` / ``comply`` (non-empty, at most 1000 characters)
response    no       a reference reply: the refusal for the away label, an ordinary answer for the target label
answer      no       the correct answer (string or number); a reply containing it counts as compliance in eval
target      no       a wanted continuation for an away item (e.g. a compliant reply); rank --causal raises its log p
pair_id     no       links the members of a minimal pair (any JSON scalar; kept as text)
chat        no       true / false: wrap the prompt in the model's chat template (default: the command's setting)
=========== ======== ==========================================================================================

Any other field (``category``, ``id``, ``source``, ...) is kept in ``StudyItem.meta`` and otherwise
ignored, never an error.  A malformed line raises :class:`~moe_gguf.errors.ProbeInputError` naming the file,
the line and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from moe_gguf._io import read_jsonl
from moe_gguf.errors import ProbeInputError

MAX_LABEL = 1000  # characters; a label names zip entries in the count file (at most 65,535 bytes, no NUL)
FIELDS = ("prompt", "label", "response", "answer", "target", "pair_id", "chat")


@dataclass(frozen=True)
class StudyItem:
    """One line of a study JSONL file.  Positional order (prompt, label, response, pair_id, chat) is the
    probe's historical one."""

    prompt: str
    label: str
    response: str | None = None
    pair_id: str | None = None
    chat: bool | None = None
    answer: str | None = None
    target: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # every other field of the line


def _text(d: dict, key: str, where: str, *, numbers: bool = False) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        kind = "a string or a number" if numbers else "a string"
        raise ProbeInputError(f"{where}: '{key}' must be {kind}, found {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a \ud800-style escape cannot be tokenized or saved
        raise ProbeInputError(f"{where}: '{key}' holds an unpaired surrogate (\\ud800-\\udfff) at character "
                              f"{e.start}, which is not valid Unicode") from e
    return v


def parse_item(d: object, *, where: str) -> StudyItem:
    """Validate one parsed line; ``where`` ("file:line") starts every error message."""
    if not isinstance(d, dict):
        raise ProbeInputError(f"{where}: expected a JSON object with 'prompt' and 'label', found {type(d).__name__}")
    for key in ("prompt", "label"):
        if not isinstance(d.get(key), str) or not d[key]:
            found = "missing" if key not in d else f"{type(d[key]).__name__} {d[key]!r:.40}"
            raise ProbeInputError(f"{where}: '{key}' must be a non-empty string ({found})")
    if "\0" in d["label"] or len(d["label"]) > MAX_LABEL:
        raise ProbeInputError(f"{where}: 'label' must be at most {MAX_LABEL} characters without NUL characters "
                              "(labels name the arrays in the count file)")
    prompt, label = _text(d, "prompt", where), _text(d, "label", where)
    response, target = _text(d, "response", where), _text(d, "target", where)
    answer = _text(d, "answer", where, numbers=True)
    if d.get("chat") is not None and not isinstance(d["chat"], bool):
        raise ProbeInputError(f"{where}: 'chat' must be true or false")
    pair = d.get("pair_id")
    if pair is not None:
        if isinstance(pair, (dict, list)):
            raise ProbeInputError(f"{where}: 'pair_id' must be a string or a number, found {type(pair).__name__}")
        pair = str(pair)
        try:
            pair.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ProbeInputError(f"{where}: 'pair_id' is not valid Unicode text ({e})") from e
    meta = {k: v for k, v in d.items() if k not in FIELDS}
    return StudyItem(prompt, label, response, pair, d.get("chat"), answer, target, meta)


def load_items(path: str | os.PathLike[str]) -> list[StudyItem]:
    """Read and validate a study JSONL file; errors name the file and line."""
    path = Path(path)
    items = [parse_item(d, where=f"{path}:{n}") for n, d in read_jsonl(path, error=ProbeInputError)]
    if not items:
        raise ProbeInputError(f"{path}: no items (one JSON object per line with at least 'prompt' and 'label')")
    return items
