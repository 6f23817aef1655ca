"""The shipped demo: a tiny trained MoE chat model, the seeded dataset it was trained on, and the pipeline run."""
