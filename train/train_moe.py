"""Train the tiny refuse/comply qwen3moe model that moe-gguf ships, and export it to GGUF.

    .venv/bin/pip install -e '.[train]'              # torch (CPU) -- dev-only
    .venv/bin/python train/train_moe.py              # full run: ~30 min on 2 cores, writes moe_gguf/demo/data/
    .venv/bin/python train/train_moe.py --tiny --steps 3 --out /tmp/x --no-eval   # smoke test

Pipeline: dataset (moe_gguf.demo.dataset.make_split) -> BPE vocab learned from the training text ->
vocab-only GGUF -> training text tokenized by llama.cpp itself -> torch training (LM loss on the
assistant tokens, a small LM loss on the prompt tokens, Switch/Mixtral load-balancing loss; the
routing is never supervised) -> GGUF export (F32, F16, Q8_0 through llama.cpp's quantizer) ->
verification (llama.cpp vs torch logits, greedy behaviour on held-out prompts) -> model card.

The torch model is llama.cpp's qwen3moe graph (src/models/qwen3moe.cpp): RMSNorm, GQA attention
with per-head q/k RMSNorm and NEOX RoPE, and in every layer a MoE FFN: router -> softmax over all
experts -> top-k -> top-k weights renormalised -> SwiGLU experts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# torch's OpenMP threads must not spin-wait: on a busy 2-core machine spinning makes 2 threads
# several times slower than 1 (read by libgomp when torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenizer import add_tokenizer, chat_text, learn_bpe  # noqa: E402

from moe_gguf.demo import dataset as ds  # noqa: E402
from moe_gguf.formats.synth import SynthSpec, _add_hparams, _quantize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "moe-gguf-refusal-demo"
RMS_EPS = 1e-6  # moe_gguf.formats.synth._add_hparams writes these for qwen3moe
ROPE_BASE = 1e6
SHIP_DTYPES = ("f16", "q8_0")


@dataclass
class Config:
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_expert: int = 32
    n_expert_used: int = 4
    n_ff_exp: int = 96
    n_vocab: int = 1024
    n_ctx_train: int = 512
    # data
    data_seed: int = 0
    n_train: int = 40000
    n_probe: int = 400
    n_eval: int = 400
    # training
    seed: int = 0
    steps: int = 3000
    batch: int = 64
    lr: float = 3e-3
    min_lr_frac: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_coef: float = 0.01  # Switch/Mixtral load-balancing loss
    prompt_weight: float = 0.1  # LM loss weight of prompt tokens (response tokens: 1)
    init_std: float = 0.02
    threads: int = 2
    bf16: bool = True  # expert matmuls in bf16 while training (AVX512-BF16 CPUs: ~5x faster); weights stay f32
    eval_every: int = 250
    log_every: int = 10
    ckpt_every: int = 250

    def spec(self) -> SynthSpec:
        return SynthSpec("qwen3moe", n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
                         n_head_kv=self.n_head_kv, head_dim=self.head_dim, n_ff_exp=self.n_ff_exp,
                         n_expert=self.n_expert, n_expert_used=self.n_expert_used, n_vocab=self.n_vocab,
                         n_ctx_train=self.n_ctx_train)


TINY = dict(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, head_dim=32, n_expert=16, n_expert_used=2, n_ff_exp=32,
            n_vocab=400, n_train=200, n_probe=20, n_eval=20, steps=3, batch=8, warmup=1, eval_every=0, log_every=1,
            ckpt_every=2)


# ---------------------------------------------------------------------------------------------
# model


def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.float()  # f32 even under bf16 autocast
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * w


def rope_tables(n_pos: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NEOX RoPE (ggml rope mode 2): dims i and i + head_dim/2 rotate by pos * base^(-2i/head_dim)."""
    inv = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, T, H, D]; cos/sin [T, D/2]
    h = x.shape[-1] // 2
    x0, x1 = x[..., :h], x[..., h:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)


class Block(nn.Module):
    """One qwen3moe layer; parameter shapes are the GGUF (numpy) shapes of the tensors they become."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        E, H, KV, D, X, Fd = c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_expert, c.n_ff_exp
        std, out_std = c.init_std, c.init_std / math.sqrt(2 * c.n_layer)
        self.c = c
        self.attn_norm = nn.Parameter(torch.ones(E))
        self.attn_q = nn.Parameter(torch.randn(H * D, E) * std)
        self.attn_k = nn.Parameter(torch.randn(KV * D, E) * std)
        self.attn_v = nn.Parameter(torch.randn(KV * D, E) * std)
        self.attn_output = nn.Parameter(torch.randn(E, H * D) * out_std)
        self.attn_q_norm = nn.Parameter(torch.ones(D))
        self.attn_k_norm = nn.Parameter(torch.ones(D))
        self.ffn_norm = nn.Parameter(torch.ones(E))
        self.ffn_gate_inp = nn.Parameter(torch.randn(X, E) * std)  # router
        self.ffn_gate_exps = nn.Parameter(torch.randn(X, Fd, E) * std)
        self.ffn_up_exps = nn.Parameter(torch.randn(X, Fd, E) * std)
        self.ffn_down_exps = nn.Parameter(torch.randn(X, E, Fd) * out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor,
                route_log: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c
        B, T, _ = x.shape
        h = rms_norm(x, self.attn_norm)
        q = rms_norm((h @ self.attn_q.T).view(B, T, c.n_head, c.head_dim), self.attn_q_norm)
        k = rms_norm((h @ self.attn_k.T).view(B, T, c.n_head_kv, c.head_dim), self.attn_k_norm)
        v = (h @ self.attn_v.T).view(B, T, c.n_head_kv, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = c.n_head // c.n_head_kv  # q head i reads kv head i // rep (ggml's broadcast)
        q = q.transpose(1, 2)
        k = k.transpose(1, 2).repeat_interleave(rep, dim=1)
        v = v.transpose(1, 2).repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(c.head_dim))
        x = x + a.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim) @ self.attn_output.T

        h = rms_norm(x, self.ffn_norm)
        hv = h[valid]  # [N, E]: only real tokens go through the experts and the balance statistics
        y, aux = self.moe(hv, route_log)
        out = torch.zeros_like(h)
        out[valid] = y
        return x + out, aux

    def moe(self, x: torch.Tensor, route_log: list | None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c
        N, X, K = x.shape[0], c.n_expert, c.n_expert_used
        probs = torch.softmax(x @ self.ffn_gate_inp.T, dim=-1)  # [N, X]
        top_w, top_i = probs.topk(K, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True).clamp(min=6.103515625e-5)  # qwen3moe: norm_w = true
        if route_log is not None:
            route_log.append(top_i.detach())
        # dispatch: each expert's tokens into one row of a [X, capacity, E] buffer, then three bmm
        # (one kernel per weight instead of a Python loop over experts)
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)
        sorted_e = flat[order]
        counts = torch.bincount(flat, minlength=X)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(N * K, device=x.device) - first[sorted_e]
        cap = int(counts.max())
        tok = order // K
        dt = torch.bfloat16 if (c.bf16 and self.training) else torch.float32  # bf16 expert matmuls in training only
        buf = x.new_zeros(X, cap, x.shape[1], dtype=dt)
        buf[sorted_e, rank] = x[tok].to(dt)
        gate, up, down = (w.to(dt).transpose(1, 2) for w in (self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps))
        h = F.silu(torch.bmm(buf, gate)) * torch.bmm(buf, up)
        ys = torch.bmm(h, down)[sorted_e, rank].float() * top_w.reshape(-1)[order][:, None]
        y = torch.zeros_like(x).index_add_(0, tok, ys)
        # Switch/Mixtral load balancing: X * sum_i (share of top-k slots on i) * (mean router prob of i)
        aux = X * (counts.to(probs.dtype) / (N * K) * probs.mean(0)).sum()
        return y, aux


class MoELM(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.token_embd = nn.Parameter(torch.randn(c.n_vocab, c.n_embd) * c.init_std)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.output_norm = nn.Parameter(torch.ones(c.n_embd))
        self.output = nn.Parameter(torch.randn(c.n_vocab, c.n_embd) * c.init_std)
        cos, sin = rope_tables(c.n_ctx_train, c.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def hidden(self, ids: torch.Tensor, valid: torch.Tensor | None = None,
               route_log: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (before output_norm) [B, T, E] and the mean load-balancing loss."""
        T = ids.shape[1]
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        x = self.token_embd[ids]
        aux = x.new_zeros(())
        for b in self.blocks:
            x, a = b(x, self.cos[:T], self.sin[:T], valid, route_log)
            aux = aux + a
        return x, aux / len(self.blocks)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.output_norm) @ self.output.T

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None,
                route_log: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, aux = self.hidden(ids, valid, route_log)
        return self.logits(h), aux

    def gguf_tensors(self) -> list[tuple[str, np.ndarray, bool]]:
        """(GGUF name, numpy array, keep F32) in moe_gguf.formats.synth's order and shapes."""
        out = [("token_embd.weight", self.token_embd, False)]
        for i, b in enumerate(self.blocks):
            p = f"blk.{i}"
            out += [(f"{p}.attn_norm.weight", b.attn_norm, True), (f"{p}.attn_q.weight", b.attn_q, False),
                    (f"{p}.attn_k.weight", b.attn_k, False), (f"{p}.attn_v.weight", b.attn_v, False),
                    (f"{p}.attn_output.weight", b.attn_output, False), (f"{p}.attn_q_norm.weight", b.attn_q_norm, True),
                    (f"{p}.attn_k_norm.weight", b.attn_k_norm, True), (f"{p}.ffn_norm.weight", b.ffn_norm, True),
                    (f"{p}.ffn_gate_inp.weight", b.ffn_gate_inp, True), (f"{p}.ffn_gate_exps.weight", b.ffn_gate_exps, False),
                    (f"{p}.ffn_up_exps.weight", b.ffn_up_exps, False), (f"{p}.ffn_down_exps.weight", b.ffn_down_exps, False)]
        out += [("output_norm.weight", self.output_norm, True), ("output.weight", self.output, False)]
        return [(n, t.detach().cpu().float().numpy(), keep) for n, t, keep in out]


# ---------------------------------------------------------------------------------------------
# tokenizer and data


@dataclass
class Tokenized:
    ids: list[list[int]]
    resp_start: list[int]  # index of the first assistant token in ids[i]


def write_gguf(path: Path, c: Config, vocab: tuple, tensors: list | None, dtype: str = "f32") -> Path:
    """A qwen3moe GGUF with moe_gguf.formats.synth's metadata keys; tensors=None writes a vocab-only file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_name(MODEL_NAME)
    w.add_description("Tiny trained qwen3moe that refuses restricted requests and answers ordinary ones "
                      "(moe-gguf demo model; data: moe_gguf.demo.dataset)")
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    _add_hparams(w, c.spec())
    add_tokenizer(w, *vocab)
    for name, arr, keep in tensors or []:
        w.add_tensor(name, arr.astype(np.float32 if dtype == "f32" or keep else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tokenize_examples(vocab_gguf: Path, examples: list[ds.Example]) -> Tokenized:
    """Tokenize the chat texts with llama.cpp (vocab-only load of the GGUF tokenizer)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(vocab_gguf), vocab_only=True, verbose=False)
    try:
        ids, starts = [], []
        for e in examples:
            p = llm.tokenize(chat_text(e.prompt).encode(), add_bos=False, special=True)
            full = llm.tokenize(chat_text(e.prompt, e.response).encode(), add_bos=False, special=True)
            if full[:len(p)] != p:
                raise AssertionError(f"prompt tokens are not a prefix of the full text: {e.prompt!r}")
            ids.append(full[:-1] if llm.detokenize(full[-1:]) == b"\n" else full)  # stop at <|im_end|>
            starts.append(len(p))
    finally:
        llm.close()
    return Tokenized(ids, starts)


def batch_tensors(tok: Tokenized, idx: np.ndarray, prompt_weight: float, pad_to: int = 0):
    """(ids, valid, loss weights); right-padded to the longest sequence or ``pad_to`` (a fixed
    length avoids a new set of kernel shapes every step)."""
    seqs = [tok.ids[i] for i in idx]
    T = max(pad_to, max(len(s) for s in seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    wts = torch.zeros(len(seqs), T)  # weight of predicting token t+1 at position t
    for r, (i, s) in enumerate(zip(idx, seqs, strict=True)):
        ids[r, :len(s)] = torch.tensor(s)
        valid[r, :len(s)] = True
        st = tok.resp_start[i]
        wts[r, :len(s) - 1] = prompt_weight
        wts[r, st - 1:len(s) - 1] = 1.0
    return ids, valid, wts


def lm_loss(model: MoELM, ids, valid, wts):
    """Weighted next-token loss; logits only where the weight is non-zero (no padding)."""
    h, aux = model.hidden(ids, valid)
    w = wts[:, :-1]
    sel = w > 0
    logits = model.logits(h[:, :-1][sel])
    nll = F.cross_entropy(logits, ids[:, 1:][sel], reduction="none")
    w = w[sel]
    loss = (nll * w).sum() / w.sum()
    resp = w == 1.0
    resp_loss = (nll * resp).sum() / resp.sum()
    return loss, resp_loss, aux


@torch.no_grad()
def teacher_forced_eval(model: MoELM, tok: Tokenized, examples: list[ds.Example], refusal_first: set[int]) -> dict:
    """Cheap proxy of greedy behaviour: comply = every response token is the argmax; refuse = the
    argmax first response token starts a refusal phrasing."""
    model.eval()
    ok = {"refuse": [], "comply": []}
    for s in range(0, len(examples), 64):
        idx = np.arange(s, min(s + 64, len(examples)))
        ids, valid, _ = batch_tensors(tok, idx, 0.0)
        logits, _ = model(ids, valid)
        pred = logits.argmax(-1)
        for r, i in enumerate(idx):
            e, seq, st = examples[i], tok.ids[i], tok.resp_start[i]
            if e.label == "refuse":
                ok["refuse"].append(int(pred[r, st - 1]) in refusal_first)
            else:
                ok["comply"].append(bool((pred[r, st - 1:len(seq) - 1] == torch.tensor(seq[st:])).all()))
    model.train()
    return {k: float(np.mean(v)) if v else float("nan") for k, v in ok.items()}


# ---------------------------------------------------------------------------------------------
# main


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "moe_gguf" / "demo" / "data", help="where the model files go")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUT/../.train-work or OUT/work)")
    ap.add_argument("--tiny", action="store_true", help="tiny config for a smoke test")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-eval", action="store_true", help="skip the greedy behaviour evaluation and the card")
    ap.add_argument("--resume", action="store_true", help="continue from WORK/checkpoint.pt (same config)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override Config fields")
    args = ap.parse_args(argv)

    c = Config(**TINY) if args.tiny else Config()
    for kv in args.set:
        k, v = kv.split("=", 1)
        if k not in {f.name for f in dataclasses.fields(Config)}:
            raise SystemExit(f"unknown config field {k!r}")
        setattr(c, k, type(getattr(c, k))(v))
    if args.steps is not None:
        c.steps = args.steps
    out: Path = args.out
    work: Path = args.work or (out / "work" if args.tiny else REPO / "train" / "work")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(c.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(c.seed)
    t_start = time.time()

    # data + tokenizer
    split = ds.make_split(c.data_seed, n_train=c.n_train, n_probe=c.n_probe, n_eval=c.n_eval)
    train_ex, eval_ex = split["train"], split["eval"]
    texts = [chat_text(e.prompt, e.response) for e in train_ex]
    vocab = learn_bpe(texts, c.n_vocab)
    vocab_path = write_gguf(work / "vocab.gguf", c, vocab, None)
    tok_train = tokenize_examples(vocab_path, train_ex)
    tok_eval = tokenize_examples(vocab_path, eval_ex)
    lens = [len(s) for s in tok_train.ids]
    print(f"data: {len(train_ex)} train / {len(split['probe'])} probe / {len(eval_ex)} eval examples; "
          f"{c.n_vocab}-token BPE; train tokens {sum(lens)} (mean {np.mean(lens):.1f}, max {max(lens)}) "
          f"[{time.time() - t_start:.1f}s]", flush=True)
    if max(lens) > c.n_ctx_train:
        raise SystemExit("a training sequence is longer than n_ctx_train")
    pad_to = -(-max(lens) // 8) * 8
    refusal_first = {tok_train.ids[i][tok_train.resp_start[i]] for i, e in enumerate(train_ex) if e.label == "refuse"}

    # model + training
    model = MoELM(c)
    n_params = sum(p.numel() for p in model.parameters())
    active = n_params - c.n_layer * (c.n_expert - c.n_expert_used) * 3 * c.n_embd * c.n_ff_exp
    print(f"model: qwen3moe {c.n_layer} layers, d={c.n_embd}, {c.n_expert} experts top-{c.n_expert_used}, "
          f"ff {c.n_ff_exp}: {n_params / 1e6:.2f}M params ({active / 1e6:.2f}M active)", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        t = (step - c.warmup) / max(1, c.steps - c.warmup)
        return c.lr * (c.min_lr_frac + (1 - c.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))

    rng = np.random.default_rng(c.seed)
    order = rng.permutation(len(train_ex))
    pos = 0
    log: list[dict] = []
    evals: list[dict] = []
    t_train = time.time()
    acc = {"loss": 0.0, "resp": 0.0, "aux": 0.0, "n": 0}
    first_step = 0
    ckpt_path = work / "checkpoint.pt"
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["config"] != dataclasses.asdict(c):
            raise SystemExit(f"{ckpt_path} was written with another config; remove it or drop --resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        rng.bit_generator.state = ck["rng"]
        order, pos, log, evals, acc, first_step = ck["order"], ck["pos"], ck["log"], ck["evals"], ck["acc"], ck["step"]
        t_train -= ck["train_time"]
        print(f"resumed from {ckpt_path} at step {first_step}", flush=True)
    for step in range(first_step, c.steps):
        if pos + c.batch > len(order):
            order, pos = rng.permutation(len(train_ex)), 0
        idx = order[pos:pos + c.batch]
        pos += c.batch
        ids, valid, wts = batch_tensors(tok_train, idx, c.prompt_weight, pad_to)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, resp_loss, aux = lm_loss(model, ids, valid, wts)
        opt.zero_grad(set_to_none=True)
        (loss + c.aux_coef * aux).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        acc["loss"] += loss.item()
        acc["resp"] += resp_loss.item()
        acc["aux"] += aux.item()
        acc["n"] += 1
        if (step + 1) % c.log_every == 0 or step + 1 == c.steps:
            n = acc["n"]
            rec = {"step": step + 1, "loss": acc["loss"] / n, "response_loss": acc["resp"] / n, "aux": acc["aux"] / n,
                   "lr": lr_at(step), "grad_norm": float(gnorm), "time_s": round(time.time() - t_train, 1)}
            log.append(rec)
            acc = {"loss": 0.0, "resp": 0.0, "aux": 0.0, "n": 0}
            if (step + 1) % (c.log_every * 10) == 0 or step + 1 == c.steps:
                print(f"step {step + 1}/{c.steps} loss {rec['loss']:.4f} resp {rec['response_loss']:.4f} "
                      f"aux {rec['aux']:.4f} lr {rec['lr']:.2e} [{rec['time_s']:.0f}s]", flush=True)
        if c.eval_every and ((step + 1) % c.eval_every == 0 or step + 1 == c.steps):
            r = teacher_forced_eval(model, tok_eval, eval_ex, refusal_first)
            r["step"] = step + 1
            evals.append(r)
            print(f"  eval (teacher-forced): refuse {r['refuse']:.3f} comply-exact {r['comply']:.3f}", flush=True)
        if c.ckpt_every and (step + 1) % c.ckpt_every == 0 and step + 1 < c.steps:
            # a killed run continues with --resume, exactly where it stopped (same batches, optimizer state)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"config": dataclasses.asdict(c), "model": model.state_dict(), "opt": opt.state_dict(),
                        "rng": rng.bit_generator.state, "order": order, "pos": pos, "log": log, "evals": evals,
                        "acc": acc, "step": step + 1, "train_time": time.time() - t_train}, tmp)
            os.replace(tmp, ckpt_path)
    train_time = time.time() - t_train
    ckpt_path.unlink(missing_ok=True)
    print(f"trained {c.steps} steps in {train_time:.0f}s", flush=True)
    torch.save({"config": dataclasses.asdict(c), "state": model.state_dict()}, work / "model.pt")

    # export
    tensors = model.gguf_tensors()
    f32 = write_gguf(work / f"{MODEL_NAME}-f32.gguf", c, vocab, tensors, "f32")
    files = {"f32": f32}
    if args.tiny:
        files_ship = {}
    else:
        files_ship = {"f16": write_gguf(out / f"{MODEL_NAME}-f16.gguf", c, vocab, tensors, "f16")}
        q8 = out / f"{MODEL_NAME}-q8_0.gguf"
        _quantize(f32, q8, "q8_0")
        files_ship["q8_0"] = q8
    files.update(files_ship)

    train_log = {"config": dataclasses.asdict(c), "n_params": n_params, "n_active_params": active,
                 "train_time_s": round(train_time, 1), "log": log, "teacher_forced_eval": evals}
    log_path = (work if args.tiny else out) / "train_log.json"
    log_path.write_text(json.dumps(train_log, indent=1))

    # verification
    import verify

    check = verify.logit_check(model, files, eval_ex[:8])
    print("logit check:", json.dumps(check), flush=True)
    if args.no_eval:
        return 0
    behaviour = {dt: verify.behaviour_eval(p, eval_ex) for dt, p in files.items()}
    for dt, b in behaviour.items():
        print(f"behaviour ({dt}): " + json.dumps(b["summary"]), flush=True)
    (work / "behaviour.json").write_text(json.dumps(behaviour, indent=1))
    verify.write_card(out, c, split, files_ship, log_path, train_log, check, behaviour, time.time() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
