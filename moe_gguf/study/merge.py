"""Adding count files: probe results (`moe-gguf probe`) or routing records (RoutingRecord.save), never a run twice."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moe_gguf.errors import CountFileError
from moe_gguf.formats.records import RoutingRecord
from moe_gguf.study.probe import ProbeResult


def count_file_kind(path: str | os.PathLike) -> str:
    """"probe" or "record"; CountFileError for anything else."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
    except FileNotFoundError as e:
        raise CountFileError(f"{path}: no such count file; check the path") from e
    except Exception as e:  # zipfile, numpy's npy parser, ... fail in many ways on a foreign file
        raise CountFileError(f"{path}: not a count file (.npz) ({type(e).__name__}: {e}); give files written by "
                             "`moe-gguf probe` or RoutingRecord.save") from e
    if "meta.json" in files:
        return "probe"
    if "selections" in files:
        return "record"
    raise CountFileError(f"{path}: an .npz without moe-gguf counts (entries {sorted(files)[:5]}); give files written "
                         "by `moe-gguf probe` or RoutingRecord.save")


def merge_files(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> ProbeResult | RoutingRecord:
    """Add the counts of ``paths`` (all probe results, or all routing records) and save them to ``out``.

    Refused (CountFileError, naming the files): a mix of the two kinds, files of different shapes, models or token
    modes, and a run given twice (the same file twice, or a file already merged into another): each file carries
    the ids of the runs it holds.
    """
    if not paths:
        raise CountFileError("no count files to merge")
    kinds = {str(p): count_file_kind(p) for p in paths}
    if len(set(kinds.values())) > 1:
        probes = [p for p, k in kinds.items() if k == "probe"]
        records = [p for p, k in kinds.items() if k == "record"]
        raise CountFileError(f"cannot merge probe results ({', '.join(probes)}) with routing records "
                             f"({', '.join(records)}): they count different things; merge each kind on its own")
    load = ProbeResult.load if next(iter(kinds.values())) == "probe" else RoutingRecord.load
    total = load(paths[0])
    for p in paths[1:]:
        try:
            total = total + load(p)
        except ValueError as e:
            if isinstance(e, CountFileError):
                raise
            raise CountFileError(f"{p}: {e}") from e
    total.save(out)  # FileWriteError (a full disk, ...) names the file; the old one is left as it was
    return total
