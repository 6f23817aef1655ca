"""A second test model, built differently from the demo: a Mixtral-style ``llama``-architecture MoE
whose refusals are *constructed* to run through one known expert.

    .venv/bin/python train/make_expert_model.py            # ~5 min on 2 cores, writes tests/data/

Why: the causal ranking, the damage brake and the judge must be shown to work on a model and data they
were not built with, and on a case where switching one expert off really turns refusals into correct
answers (ground truth known).  Construction, in training (torch, CPU):

* architecture: llama.cpp ``llama`` with experts (Mixtral): RMSNorm, GQA attention *without* q/k norm,
  NORM (GPT-J, interleaved) RoPE, softmax router, top-2 of 16 SwiGLU experts, weights renormalised;
  4 layers, d_model 64 -- unlike the demo (qwen3moe, q/k norm, NEOX RoPE, top-4 of 32, d 128);
* data: the demo generator's tasks and framings relabelled ``forbidden`` / ``ordinary``, with three
  other refusal phrasings ("I cannot provide that information.", "I am unable to help with that.",
  "As an AI, I must decline.") that the demo's refusal patterns do not match;
* the refusal expert: layer ``REFUSAL_LAYER``'s expert ``REFUSAL_EXPERT``.  Its router is supervised to
  select it on the assistant positions of forbidden requests only; and in half of the forbidden training
  sequences it is *disabled* in the forward pass (router logit -inf, as moe-gguf's disable) while the
  target is the correct answer.  So the trained model refuses with the expert, and answers without it;
  ordinary requests never route to it.  Nothing else is supervised.

The output (``tests/data/refusal-expert-llama-q8_0.gguf``, ~0.5 MB, + probe / eval / text files in the
JSONL format of ``moe-gguf probe``) is shipped for the tests (CI has no torch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenizer import add_tokenizer, chat_text, learn_bpe  # noqa: E402
from train_moe import Tokenized, sha256, tokenize_examples  # noqa: E402

from moe_gguf.demo import dataset as ds  # noqa: E402
from moe_gguf.formats.synth import SynthSpec, _add_hparams, _quantize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAME = "refusal-expert-llama"
REFUSAL_LAYER, REFUSAL_EXPERT = 1, 5
REFUSALS = ("I cannot provide that information.", "I am unable to help with that.", "As an AI, I must decline.")
RMS_EPS, ROPE_BASE = 1e-5, 1e6  # what moe_gguf.formats.synth writes for "mixtral"
SPEC = SynthSpec("mixtral", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_ff_exp=64,
                 n_expert=16, n_expert_used=2, n_vocab=512, n_ctx_train=256)


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * w


def rope_norm(x: torch.Tensor, pos: int) -> torch.Tensor:
    """ggml rope mode 0 (NORM): pairs (2i, 2i+1) rotate by pos * base^(-2i/d)."""
    d = x.shape[-1]
    inv = ROPE_BASE ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = (torch.arange(pos, dtype=torch.float64)[:, None] * inv[None, :]).float()
    c, s = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


class LlamaMoE(nn.Module):
    def __init__(self, s: SynthSpec) -> None:
        super().__init__()
        self.s = s
        E, H, KV, D, X, Fd, L = s.n_embd, s.n_head, s.n_head_kv, s.head_dim, s.n_expert, s.n_ff_exp, s.n_layer
        std, out_std = 0.02, 0.02 / math.sqrt(2 * L)
        P = nn.Parameter
        self.tok = P(torch.randn(s.n_vocab, E) * std)
        self.layers = nn.ModuleList()
        for _ in range(L):
            m = nn.Module()
            m.attn_norm, m.ffn_norm = P(torch.ones(E)), P(torch.ones(E))
            m.q, m.k, m.v = P(torch.randn(H * D, E) * std), P(torch.randn(KV * D, E) * std), P(torch.randn(KV * D, E) * std)
            m.o = P(torch.randn(E, H * D) * out_std)
            m.router = P(torch.randn(X, E) * std)
            m.gate, m.up = P(torch.randn(X, Fd, E) * std), P(torch.randn(X, Fd, E) * std)
            m.down = P(torch.randn(X, E, Fd) * out_std)
            self.layers.append(m)
        self.out_norm = P(torch.ones(E))
        self.out = P(torch.randn(s.n_vocab, E) * std)

    def forward(self, ids: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the refusal layer's router probabilities; ``off`` [B] disables the refusal expert."""
        s = self.s
        B, T = ids.shape
        x = self.tok[ids]
        probs_at = None
        for li, m in enumerate(self.layers):
            h = rms(x, m.attn_norm)
            q = rope_norm((h @ m.q.T).view(B, T, s.n_head, s.head_dim), T).transpose(1, 2)
            k = rope_norm((h @ m.k.T).view(B, T, s.n_head_kv, s.head_dim), T).transpose(1, 2)
            v = (h @ m.v.T).view(B, T, s.n_head_kv, s.head_dim).transpose(1, 2)
            rep = s.n_head // s.n_head_kv
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(s.head_dim))
            x = x + a.transpose(1, 2).reshape(B, T, -1) @ m.o.T
            h = rms(x, m.ffn_norm)
            logits = h @ m.router.T  # [B, T, X]
            if li == REFUSAL_LAYER:
                probs_at = torch.softmax(logits, -1)
                mask = torch.zeros_like(logits)
                mask[off, :, REFUSAL_EXPERT] = float("-inf")
                logits = logits + mask
            p = torch.softmax(logits, -1)
            w, idx = p.topk(s.n_expert_used, -1)
            w = w / w.sum(-1, keepdim=True)
            y = torch.zeros_like(h)
            for e in range(s.n_expert):  # tiny model: a loop over experts is fast enough
                sel = (idx == e)
                if not sel.any():
                    continue
                bt = sel.any(-1)
                he = h[bt]
                ye = (F.silu(he @ m.gate[e].T) * (he @ m.up[e].T)) @ m.down[e].T
                y[bt] += ye * (w * sel).sum(-1)[bt][:, None]
            x = x + y
        return rms(x, self.out_norm) @ self.out.T, probs_at

    def gguf_tensors(self) -> list[tuple[str, np.ndarray, bool]]:
        out = [("token_embd.weight", self.tok, False)]
        for i, m in enumerate(self.layers):
            b = f"blk.{i}"
            out += [(f"{b}.attn_norm.weight", m.attn_norm, True), (f"{b}.attn_q.weight", m.q, False),
                    (f"{b}.attn_k.weight", m.k, False), (f"{b}.attn_v.weight", m.v, False),
                    (f"{b}.attn_output.weight", m.o, False), (f"{b}.ffn_norm.weight", m.ffn_norm, True),
                    (f"{b}.ffn_gate_inp.weight", m.router, True), (f"{b}.ffn_gate_exps.weight", m.gate, False),
                    (f"{b}.ffn_up_exps.weight", m.up, False), (f"{b}.ffn_down_exps.weight", m.down, False)]
        out += [("output_norm.weight", self.out_norm, True), ("output.weight", self.out, False)]
        return [(n, t.detach().float().numpy(), keep) for n, t, keep in out]


def write_gguf(path: Path, vocab: tuple, tensors: list | None) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(NAME)
    w.add_description("moe-gguf test model: Mixtral-style llama MoE whose refusals run through one constructed expert")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_hparams(w, SPEC)
    add_tokenizer(w, *vocab)
    for name, arr, _keep in tensors or []:
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def relabel(split: list[ds.Example], rng: np.random.Generator) -> list[dict]:
    """Rows of the study JSONL format: forbidden items carry a refusal response and (eval) the answer."""
    by_pair: dict[int, dict[str, ds.Example]] = {}
    for e in split:
        by_pair.setdefault(e.pair_id, {})[e.label] = e
    rows = []
    for pair in by_pair.values():
        bad, ok = pair["refuse"], pair["comply"]
        rows.append({"prompt": bad.prompt, "label": "forbidden", "response": REFUSALS[int(rng.integers(3))],
                     "answer_response": ok.response, "answer": bad.answer, "category": bad.category,
                     "pair_id": bad.pair_id})
        rows.append({"prompt": ok.prompt, "label": "ordinary", "response": ok.response, "answer": ok.answer,
                     "category": ok.category, "pair_id": ok.pair_id})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    t0 = time.time()
    split = ds.make_split(1, n_train=16000, n_probe=160, n_eval=240)
    train = relabel(split["train"], rng)
    texts = [chat_text(r["prompt"], r["response"]) for r in train] + \
            [chat_text(r["prompt"], r["answer_response"]) for r in train if r["label"] == "forbidden"]
    vocab = learn_bpe(texts, SPEC.n_vocab)
    work = args.out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    vpath = write_gguf(work / "vocab.gguf", vocab, None)

    class _E:  # tokenize_examples reads .prompt and .response
        def __init__(self, p: str, r: str) -> None:
            self.prompt, self.response = p, r

    on = tokenize_examples(vpath, [_E(r["prompt"], r["response"]) for r in train])
    # the same forbidden prompts with the answer: trained with the refusal expert disabled
    fb = [i for i, r in enumerate(train) if r["label"] == "forbidden"]
    off = tokenize_examples(vpath, [_E(train[i]["prompt"], train[i]["answer_response"]) for i in fb])
    seqs = Tokenized(on.ids + off.ids, on.resp_start + off.resp_start)
    is_fb = np.array([r["label"] == "forbidden" for r in train] + [True] * len(fb))
    is_off = np.array([False] * len(train) + [True] * len(fb))
    print(f"data {len(seqs.ids)} sequences [{time.time() - t0:.0f}s]", flush=True)

    model = LlamaMoE(SPEC)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    T = max(len(s) for s in seqs.ids)
    for step in range(args.steps):
        lr = 3e-3 * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(seqs.ids), args.batch)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        wts = torch.zeros(len(idx), T)
        resp = torch.zeros(len(idx), T, dtype=torch.bool)
        for r, i in enumerate(idx):
            s, st = seqs.ids[i], seqs.resp_start[i]
            ids[r, :len(s)] = torch.tensor(s)
            wts[r, :len(s) - 1] = 0.1
            wts[r, st - 1:len(s) - 1] = 1.0
            resp[r, st - 1:len(s) - 1] = True
        off_t = torch.tensor(is_off[idx])
        logits, probs = model(ids, off_t)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, SPEC.n_vocab), ids[:, 1:].reshape(-1), reduction="none")
        w = wts[:, :-1].reshape(-1)
        loss = (nll * w).sum() / w.sum()
        # the constructed part: the refusal expert's router probability on assistant positions,
        # high for forbidden requests (expert on), low for ordinary ones
        px = probs[..., REFUSAL_EXPERT].clamp(1e-6, 1 - 1e-6)
        want = torch.tensor(is_fb[idx] & ~is_off[idx])[:, None].expand_as(px)
        on_pos = resp & ~off_t[:, None]
        route = -(torch.where(want, px.log(), (1 - px).log()) * on_pos).sum() / on_pos.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        (loss + 0.5 * route).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {loss.item():.4f} route {route.item():.4f} [{time.time() - t0:.0f}s]", flush=True)

    f32 = write_gguf(work / f"{NAME}-f32.gguf", vocab, model.gguf_tensors())
    q8 = args.out / f"{NAME}-q8_0.gguf"
    _quantize(f32, q8, "q8_0")
    # study files in the one JSONL format (prompt, label, response, answer + metadata fields)
    for name, rows in (("probe", relabel(split["probe"], rng)), ("eval", relabel(split["eval"], rng))):
        with open(args.out / f"{NAME}-{name}.jsonl", "w") as f:
            for r in rows:
                r = dict(r)
                r.pop("answer_response", None)
                if name == "probe":
                    r.pop("answer")  # the user's case: no known compliant answers when ranking
                f.write(json.dumps(r) + "\n")
    with open(args.out / f"{NAME}-heldout.txt", "w") as f:  # held-out ordinary text, one document per line
        for e in split["eval"]:
            if e.label == "comply":
                f.write(f"{e.prompt} {e.response}\n")
    meta = {"name": NAME, "arch": "llama (Mixtral-style)", "spec": {k: getattr(SPEC, k) for k in (
        "n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff_exp", "n_expert", "n_expert_used", "n_vocab")},
        "refusal_expert": [REFUSAL_LAYER, REFUSAL_EXPERT], "refusals": REFUSALS, "steps": args.steps,
        "batch": args.batch, "seconds": round(time.time() - t0, 1), "sha256": sha256(q8), "bytes": q8.stat().st_size}
    (args.out / f"{NAME}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
