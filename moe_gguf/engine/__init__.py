"""The engine: the patched llama.cpp through llama-cpp-python (bindings, models, contexts, offload, RPC).

Everything that loads llama.cpp lives here; the other layers import it only when they run a model.
"""
