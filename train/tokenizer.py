"""A small byte-level BPE vocab learned from the dataset, written as a llama.cpp GGUF tokenizer.

The vocab is GPT-2 style (tokenizer.ggml.model "gpt2", pre-tokenizer "qwen2"): ids 0..255 are the
byte tokens (GPT-2's byte -> unicode map, as moe_gguf.formats.synth), then one token per learned merge, then
the ChatML special tokens.  Training text is tokenized by llama.cpp itself from a vocab-only GGUF,
so torch and llama.cpp see the same ids; this module only has to *learn* the merges.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import gguf

from moe_gguf.formats.synth import SPECIAL_TOKENS, _byte_chars, add_tokenizer  # noqa: F401  (re-exported for train_moe)

# ASCII form of llama.cpp's qwen2 pre-tokenizer regex (the dataset is ASCII):
# (?:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
_PRE = re.compile(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]"
    r"| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def pretokenize(text: str) -> list[str]:
    out: list[str] = []
    for part in _SPECIAL_SPLIT.split(text):
        out += _PRE.findall(part)
    return out


def learn_bpe(texts: Iterable[str], n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of exactly ``n_vocab`` tokens, merges learned from ``texts``.

    Deterministic: the most frequent pair wins, ties broken by the pair's strings.
    """
    bc = _byte_chars()
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for w in pretokenize(text):
            words[tuple(bc[b] for b in w.encode())] += 1
    n_merge = n_vocab - 256 - len(SPECIAL_TOKENS)
    if n_merge < 1:
        raise ValueError("n_vocab too small")
    merges: list[str] = []
    tokens = list(bc)
    vocab = dict(words)
    while len(merges) < n_merge:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, c in vocab.items():
            for a, b in zip(w, w[1:], strict=False):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(merged)
        new: dict[tuple[str, ...], int] = {}
        for w, c in vocab.items():
            if len(w) < 2:
                new[w] = new.get(w, 0) + c
                continue
            out: list[str] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == best[0] and w[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            t = tuple(out)
            new[t] = new.get(t, 0) + c
        vocab = new
    # every pre-token may already be one token: pad with unused byte-pair merges so n_vocab is exact
    filler = 0
    while len(merges) < n_merge:
        a, b = bc[filler // 256], bc[filler % 256]
        filler += 1
        if a + b in tokens:
            continue
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    tokens += list(SPECIAL_TOKENS)
    types = [int(gguf.TokenType.NORMAL)] * (n_vocab - len(SPECIAL_TOKENS)) + [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    assert len(tokens) == n_vocab == len(set(tokens)), (len(tokens), n_vocab)
    return tokens, types, merges




def chat_text(prompt: str, response: str | None = None) -> str:
    """The ChatML text of CHAT_TEMPLATE: the prompt turn, then the assistant turn (open if no response)."""
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    if response is not None:
        text += f"{response}<|im_end|>\n"
    return text
