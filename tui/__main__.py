"""python -m tui [MODEL]: the same as `moe-gguf chat`."""

from moe_gguf.cli import main

if __name__ == "__main__":
    main(["chat", *__import__("sys").argv[1:]])
