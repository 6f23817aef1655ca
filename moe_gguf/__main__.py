"""python -m moe_gguf: the moe-gguf command line."""

from moe_gguf.cli import main

if __name__ == "__main__":
    main()
