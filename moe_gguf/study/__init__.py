"""Finding behaviour experts: probe routing on labelled prompts, rank experts (observational scores and causal
ablation), evaluate a profile on held-out prompts. Scoring maths is pure; probing and evaluation run a model."""
