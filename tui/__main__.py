"""python -m moe_gguf.tui [MODEL]: the same as `moe-gguf chat`."""

import sys

from moe_gguf.cli import main

if __name__ == "__main__":
    main(["chat", *sys.argv[1:]])
