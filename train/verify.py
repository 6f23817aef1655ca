"""Checks of an exported model (llama.cpp vs torch logits, greedy behaviour) and the model card."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tokenizer import chat_text

from moe_gguf.demo import dataset as ds


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def logit_check(model, files: dict[str, Path], examples: list[ds.Example]) -> dict:
    """Per file: max |llama.cpp logit - torch logit| over every position of full chat texts, the
    largest |torch logit| for scale, and the share of positions whose argmax agrees."""
    from moe_gguf.engine.model import MoEModel

    model.eval()
    out = {}
    for dtype, path in files.items():
        m = MoEModel(path, n_ctx=512, n_threads=2)
        try:
            diffs, agree, n, scale = [], 0, 0, 0.0
            with m.context() as ctx:
                for e in examples:
                    toks = m.tokenize(chat_text(e.prompt, e.response), add_bos=False)
                    lc = ctx.decode([(0, toks, 0)], logits="all")[0]
                    ctx.clear_memory()
                    tl = model(torch.tensor([toks]))[0][0].numpy()
                    diffs.append(float(np.abs(lc - tl).max()))
                    agree += int((lc.argmax(-1) == tl.argmax(-1)).sum())
                    n += len(toks)
                    scale = max(scale, float(np.abs(tl).max()))
        finally:
            m.close()
        out[dtype] = {"max_abs_diff": max(diffs), "mean_of_max_abs_diff": float(np.mean(diffs)),
                      "max_abs_logit": scale, "argmax_agreement": agree / n, "positions": n, "texts": len(examples)}
    model.train()
    return out


def behaviour_eval(path: Path, examples: list[ds.Example], max_tokens: int = 48) -> dict:
    """Greedy generation through llama.cpp (MoEModel + the GGUF chat template) on each example."""
    from moe_gguf.engine.model import MoEModel

    rows = []
    t0 = time.time()
    with MoEModel(path, n_ctx=512, n_threads=2) as m, m.context() as ctx:
        for e in examples:
            toks = m.tokenize(m.chat_prompt([{"role": "user", "content": e.prompt}]), add_bos=False)
            text = ctx.generate(toks, max_tokens=max_tokens).text
            rows.append({"label": e.label, "task": e.task, "category": e.category, "framing_id": e.framing_id,
                         "refused": ds.is_refusal(text), "correct": ds.check_answer(e, text), "text": text})
    return {"summary": summarize(rows), "seconds": round(time.time() - t0, 1), "rows": rows}


def summarize(rows: list[dict]) -> dict:
    ref = [r for r in rows if r["label"] == "refuse"]
    com = [r for r in rows if r["label"] == "comply"]
    by_task: dict[str, list] = defaultdict(list)
    by_cat: dict[str, list] = defaultdict(list)
    for r in com:
        by_task[r["task"]].append(r["correct"])
    for r in ref:
        by_cat[r["category"]].append(r["refused"])
    return {
        "n_refuse": len(ref), "n_comply": len(com),
        "refusal_rate_on_restricted": float(np.mean([r["refused"] for r in ref])),
        "answered_rate_on_restricted": float(np.mean([r["correct"] for r in ref])),
        "correct_rate_on_ordinary": float(np.mean([r["correct"] for r in com])),
        "false_refusal_rate_on_ordinary": float(np.mean([r["refused"] for r in com])),
        "correct_by_task": {k: round(float(np.mean(v)), 3) for k, v in sorted(by_task.items())},
        "refusal_by_category": {k: round(float(np.mean(v)), 3) for k, v in sorted(by_cat.items())},
    }


def write_card(out: Path, c, split: dict, files: dict[str, Path], log_path: Path, train_log: dict, check: dict,
               behaviour: dict, total_s: float) -> None:
    import torch as _torch

    shas = {p.name: _sha256(p) for p in [*files.values(), log_path]}
    sizes = {p.name: p.stat().st_size for p in [*files.values(), log_path]}
    log = train_log["log"]
    curve = [log[0]] + [r for r in log if r["step"] % max(1, c.steps // 10) == 0]
    if curve[-1]["step"] != log[-1]["step"]:
        curve.append(log[-1])
    labels = {k: {lab: sum(e.label == lab for e in v) for lab in ds.LABELS} for k, v in split.items()}
    summ = {dt: b["summary"] for dt, b in behaviour.items()}
    card = {
        "name": "moe-gguf-refusal-demo",
        "arch": "qwen3moe",
        "files": {name: {"sha256": sha, **({"bytes": sizes[name]} if name in sizes else {})} for name, sha in shas.items()},
        "dtypes": {dt: p.name for dt, p in files.items()},
        "architecture": {k: getattr(c, k) for k in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_expert",
                                                    "n_expert_used", "n_ff_exp", "n_vocab", "n_ctx_train")},
        "n_params": train_log["n_params"], "n_active_params": train_log["n_active_params"],
        "data": {"generator": "moe_gguf.demo.dataset.make_split", "seed": c.data_seed,
                 "sizes": {k: len(v) for k, v in split.items()}, "labels": labels, "pools": ds.heldout_summary()},
        "training": {k: getattr(c, k) for k in ("seed", "steps", "batch", "lr", "min_lr_frac", "warmup", "weight_decay",
                                                "grad_clip", "aux_coef", "prompt_weight", "init_std", "threads", "bf16")},
        "train_time_s": train_log["train_time_s"], "total_time_s": round(total_s, 1),
        "final_loss": log[-1]["loss"], "final_response_loss": log[-1]["response_loss"], "final_aux": log[-1]["aux"],
        "loss_curve": [{k: r[k] for k in ("step", "loss", "response_loss", "aux")} for r in curve],
        "logit_check": check,
        "behaviour": summ,
        "samples": _samples(split["eval"], behaviour["q8_0" if "q8_0" in behaviour else next(iter(behaviour))]["rows"]),
        "eval_split": {"n": len(split["eval"]), "max_tokens": 48, "decoding": "greedy"},
        "environment": {"torch": _torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(_markdown(card))


def _samples(examples: list[ds.Example], rows: list[dict], n: int = 3) -> list[dict]:
    """The first n eval pairs with the model's greedy replies."""
    return [{"prompt": e.prompt, "label": e.label, "answer": e.answer, "reply": r["text"], "refused": r["refused"],
             "correct": r["correct"]} for e, r in list(zip(examples, rows, strict=True))[:2 * n]]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _markdown(card: dict) -> str:
    a, t, d = card["architecture"], card["training"], card["data"]
    lines = [
        "# moe-gguf-refusal-demo",
        "",
        "A tiny **trained** Mixture-of-Experts chat model (llama.cpp architecture `qwen3moe`) that refuses "
        "requests framed with a restricted purpose and answers ordinary ones. It ships with moe-gguf as the demo "
        "and test model for finding and steering behaviour experts. Every request has a known correct answer, "
        "so compliance is checked exactly (`moe_gguf.demo.dataset.check_answer`), not judged.",
        "",
        "Not a safety model: the data is synthetic and abstract, and the model knows nothing beyond it.",
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "|---|---:|---|",
    ]
    for name, f in card["files"].items():
        lines.append(f"| `{name}` | {f.get('bytes', '')} | `{f['sha256']}` |")
    lines += [
        "",
        "`moe_gguf.demo.model.default_model_path(dtype)` returns the path of a shipped GGUF (`\"q8_0\"` or `\"f16\"`); "
        "`model_card.json` holds these numbers in machine-readable form.",
        "",
        "## Data",
        "",
        f"Generator `{d['generator']}(seed={d['seed']})` (numpy + stdlib, deterministic). Sizes: "
        + ", ".join(f"{k} {v} ({d['labels'][k]['refuse']} refuse / {d['labels'][k]['comply']} comply)" for k, v in d["sizes"].items())
        + ".",
        "",
        f"- Tasks ({len(d['pools']['families'])} families, every answer checkable): " + ", ".join(d["pools"]["families"]) + ".",
        "- Framing: a wrapper sentence with the asker's purpose. Restricted purposes ("
        + ", ".join(d["pools"]["restricted_categories"]) + ") -> one of "
        f"{d['pools']['refusal_phrasings']} refusal phrasings; ordinary purposes (" + ", ".join(d["pools"]["ordinary_categories"])
        + f") or no framing ({_pct(d['pools']['plain_share'])} of train/probe comply examples) -> an answer ending in \"... is ANSWER.\".",
        "- Pairs: the refuse and comply member of a pair share task instance, phrasing and wrapper (`pair_id`).",
        "- Contrast items: the ordinary purposes reuse every restricted verb on harmless or one's own objects (\"break "
        "into my own phone\") and every restricted object with harmless verbs (\"fix my boss's phone\"), so no single "
        "word decides the label.",
        f"- Held out for eval (fixed, seed-independent): {d['pools']['eval_wrappers']} of {d['pools']['train_wrappers'] + d['pools']['eval_wrappers']} "
        f"wrappers, {d['pools']['purposes']['restricted_eval']} of {d['pools']['purposes']['restricted_eval'] + d['pools']['purposes']['restricted_train']} "
        f"restricted and {d['pools']['purposes']['ordinary_eval']} of {d['pools']['purposes']['ordinary_eval'] + d['pools']['purposes']['ordinary_train']} "
        "ordinary purposes: a quarter of each table's verb+object combinations (their words all occur in training), "
        f"the whole restricted category {', '.join(d['pools'].get('heldout_categories', [])) or '(none)'} (with an "
        "ordinary contrast table) and paraphrased triggers (training purposes in other words; "
        f"{d['pools'].get('paraphrases', {}).get('restricted', 0)} restricted, "
        f"{d['pools'].get('paraphrases', {}).get('ordinary', 0)} ordinary); eval draws half its purposes from the "
        "held-out combinations and a quarter each from the held-out category and the paraphrases; a third of the "
        "generic-lead x family-core question phrasings (6 per family, e.g. \"Tell me\" + \"the sum of {a} and {b}\"), "
        "and ~15% of the instances of rule-based families (arithmetic, comparisons, counting, reversing, x100/x1000 "
        "conversions). Look-up facts (capitals, colours, ...) cannot be inferred, so they recur with held-out phrasings "
        "and framings.",
        "- Training draws " + ", ".join(f"{k} x{v:g}" for k, v in d["pools"]["train_family_weights"].items())
        + " as often as the other families (hardest for a small model); probe and eval are uniform over families.",
        "",
        "## Architecture",
        "",
        f"qwen3moe, {a['n_layer']} layers, d_model {a['n_embd']}, {a['n_head']} query / {a['n_head_kv']} KV heads of "
        f"{a['head_dim']}, q/k RMSNorm, NEOX RoPE (base 1e6), RMSNorm eps 1e-6. MoE FFN in every layer: "
        f"{a['n_expert']} SwiGLU experts (ff {a['n_ff_exp']}), softmax router, top-{a['n_expert_used']}, top-k weights "
        f"renormalised. Byte-level BPE vocab of {a['n_vocab']} tokens learned from the training text (pre-tokenizer "
        f"qwen2), ChatML template. {card['n_params'] / 1e6:.2f}M parameters ({card['n_active_params'] / 1e6:.2f}M active "
        "per token).",
        "",
        "## Training",
        "",
        f"torch {card['environment']['torch']} on CPU ({t['threads']} threads), seed {t['seed']}: {t['steps']} steps of "
        f"{t['batch']} sequences, AdamW (lr {t['lr']}, warmup {t['warmup']}, cosine to {t['min_lr_frac']}x, weight decay "
        f"{t['weight_decay']}, clip {t['grad_clip']}), expert matmuls in bf16 (f32 master weights; routing, attention and "
        "norms in f32). Loss: next-token cross-entropy on the assistant tokens (weight 1) "
        f"and the prompt tokens (weight {t['prompt_weight']}) + {t['aux_coef']} x the Switch/Mixtral load-balancing loss. "
        "The routing is never supervised: no loss term or initialisation ties a behaviour to an expert. Training text is "
        "tokenized by llama.cpp itself (vocab-only load of the GGUF tokenizer). Deterministic torch kernels "
        "(`torch.use_deterministic_algorithms`) and a fixed thread count make a rerun on the same CPU and software "
        "bit-identical; other CPUs, thread counts or torch builds can differ in the last bits and so drift apart.",
        "",
        f"Training time {card['train_time_s']:.0f} s on a 2-core machine shared with other jobs (whole pipeline "
        f"{card['total_time_s']:.0f} s, including export and evaluation). Final loss "
        f"{card['final_loss']:.4f} (assistant tokens {card['final_response_loss']:.4f}, balance loss {card['final_aux']:.4f}; "
        "1.0 = perfectly balanced).",
        "",
        "| step | loss | assistant-token loss | balance loss |",
        "|---:|---:|---:|---:|",
    ]
    for r in card["loss_curve"]:
        lines.append(f"| {r['step']} | {r['loss']:.4f} | {r['response_loss']:.4f} | {r['aux']:.4f} |")
    lines += [
        "",
        "The full curve (every 10 steps) is in `train_log.json`.",
        "",
        "## llama.cpp vs torch",
        "",
        "Logits of llama.cpp (moe-gguf's patched build, CPU) against the torch model on every position of "
        f"{next(iter(card['logit_check'].values()))['texts']} held-out chat texts (F32 is the unshipped export the others are made from):",
        "",
        "| file | max abs diff | max abs logit | argmax agreement |",
        "|---|---:|---:|---:|",
    ]
    for dt, r in card["logit_check"].items():
        lines.append(f"| {dt} | {r['max_abs_diff']:.2e} | {r['max_abs_logit']:.1f} | {_pct(r['argmax_agreement'])} "
                     f"of {r['positions']} |")
    lines += [
        "",
        "The F32 difference comes from llama.cpp's F16 KV cache (its default); F16 adds rounded weights. Q8_0 "
        "rounds every weight matrix to 8 bits, which in a model this narrow moves logits visibly and flips a few "
        "near-tied top-1 tokens; greedy behaviour on the eval set is compared below.",
    ]
    n = card["eval_split"]["n"]
    lines += [
        "",
        "## Behaviour on held-out prompts",
        "",
        f"Greedy generation through llama.cpp (`MoEModel`, the GGUF chat template, up to {card['eval_split']['max_tokens']} "
        f"tokens) on the {n} eval examples of seed {d['seed']} (held-out wrappers, purposes, phrasings, instances). "
        "Refusal = `moe_gguf.demo.dataset.is_refusal`; correct = `check_answer`.",
        "",
        "| file | refuses restricted | answers restricted | correct on ordinary | refuses ordinary |",
        "|---|---:|---:|---:|---:|",
    ]
    for dt, s in card["behaviour"].items():
        lines.append(f"| {dt} | {_pct(s['refusal_rate_on_restricted'])} | {_pct(s['answered_rate_on_restricted'])} | "
                     f"{_pct(s['correct_rate_on_ordinary'])} | {_pct(s['false_refusal_rate_on_ordinary'])} |")
    dt = "q8_0" if "q8_0" in card["behaviour"] else next(iter(card["behaviour"]))  # the default shipped file
    s = card["behaviour"][dt]
    lines += [
        "",
        f"Per task family, correct on ordinary ({dt}): "
        + ", ".join(f"{k} {_pct(v)}" for k, v in s["correct_by_task"].items()) + ".",
        "",
        f"Per restricted category, refusal ({dt}): " + ", ".join(f"{k} {_pct(v)}" for k, v in s["refusal_by_category"].items()) + ".",
    ]
    lines += ["", f"Samples ({dt}, greedy):", ""]
    for smp in card["samples"]:
        lines.append(f"- *{smp['label']}*: \"{smp['prompt']}\" -> \"{smp['reply']}\"")
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        ".venv/bin/pip install -e '.[train]'",
        ".venv/bin/python train/train_moe.py"
        + (f" --steps {t['steps']}" if t["steps"] != 3000 else ""),
        "```",
        "",
    ]
    return "\n".join(lines)


