"""The llama.cpp patch series moe-gguf builds on (installed as package data: moe_gguf._native)."""
