"""Loads GGUF files named on stdin, one per line, and reports each outcome on stdout as one `@@` line.

Run by tests/test_fuzz.py (and scripts/fuzz.sh) in a child process, so that a file which crashed llama.cpp
(an abort, a segfault) kills only this worker: the parent sees which file it was and starts a new worker.

    @@clear <message>   MoEModel raised ModelFileError (the documented error for a bad model file)
    @@loaded            the file loaded, tokenized, rendered its chat template and decoded a few tokens
    @@BAD <type> <msg>  any other exception: a bug
"""

from __future__ import annotations

import sys

from moe_gguf.engine.model import MoEModel
from moe_gguf.errors import ModelFileError


def check(path: str) -> str:
    try:
        m = MoEModel(path, n_ctx=64, n_threads=1)
    except ModelFileError as e:
        return "clear " + str(e).replace("\n", " ")[:300]
    try:
        with m.context() as ctx:
            toks = m.tokenize("hello world")[:8] or [0]
            ctx.decode([(0, toks, 0)])
        try:
            m.chat_prompt([{"role": "user", "content": "hi"}])
        except ModelFileError:
            pass  # a damaged chat template is a clear error too
        return "loaded"
    finally:
        m.close()


def main() -> None:
    for line in sys.stdin:
        path = line.rstrip("\n")
        if not path:
            continue
        try:
            res = check(path)
        except Exception as e:
            res = f"BAD {type(e).__name__} " + str(e).replace("\n", " ")[:300]
        sys.stdout.write("@@" + res + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
