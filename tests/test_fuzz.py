"""Fuzzing: profile files, probe datasets (JSONL), count files, the C API and GGUF model files.

Every bad input must end in the documented, clear error (ProfileError, ProbeInputError, CountFileError,
ModelFileError: ValueErrors naming the file), never another exception, a crash, a hang or a partial write;
every good input must round-trip.

CI runs a few hundred inputs per target. The full run (>= 100,000 inputs per target) is

    MOE_GGUF_FUZZ_EXAMPLES=100000 bash scripts/fuzz.sh

which also writes the number of inputs tried per target to $MOE_GGUF_FUZZ_REPORT (JSON).
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_gguf.engine import _lib
from moe_gguf.engine.model import MoEModel
from moe_gguf.errors import CountFileError, ModelFileError, ProfileError
from moe_gguf.formats.profile import FORMAT as PROFILE_FORMAT
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.records import RoutingRecord
from moe_gguf.formats.topology import ModelTopology
from moe_gguf.study.probe import ProbeInputError, ProbeItem, ProbeResult, dataset_hash, load_jsonl

N = int(os.environ.get("MOE_GGUF_FUZZ_EXAMPLES", "200"))  # inputs per target
FULL = "MOE_GGUF_FUZZ_EXAMPLES" in os.environ
# CI: Hypothesis (derandomized, shrinks a failure); the full run: the same generators driven by a seeded PRNG,
# ~50x faster per input (MOE_GGUF_FUZZ_ENGINE=hypothesis forces Hypothesis there too)
ENGINE = os.environ.get("MOE_GGUF_FUZZ_ENGINE", "random" if FULL else "hypothesis")
SEED = int(os.environ.get("MOE_GGUF_FUZZ_SEED", "0"))
N_GGUF = int(os.environ.get("MOE_GGUF_FUZZ_GGUF", "24"))  # corrupted model files per architecture
COUNTS: Counter = Counter()  # inputs tried per target (and outcomes), for the report

FUZZ = settings(
    max_examples=N,
    deadline=None,
    database=None,
    derandomize=not FULL,  # CI: the same inputs every run
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@pytest.fixture(scope="module", autouse=True)
def report():
    t0 = time.time()
    yield
    out = os.environ.get("MOE_GGUF_FUZZ_REPORT")
    if out:
        prev = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        prev.update({k: v for k, v in COUNTS.items()})
        prev["seconds"] = round(prev.get("seconds", 0) + time.time() - t0, 1)
        prev["engine"] = ENGINE
        Path(out).write_text(json.dumps(prev, indent=2, sort_keys=True))


# -- where generators draw from --------------------------------------------------------------------------------

NASTY_INTS = [0, 1, -1, 2, 7, 2**31 - 1, -(2**31), 2**31, 2**32, 2**53 + 1, 2**63, -(2**63) - 1, 10**400]
NASTY_FLOATS = [0.0, -0.0, 0.5, 1e-45, 1e-320, 3.4e38, 3.5e38, 1e308, -1e308, math.inf, -math.inf, math.nan]
NASTY_STRINGS = ["", " ", "\ud800", "a\udfffb", "\x00", "a\x00", "é", "\u202e", "𝔘", "\ufeff", "disable", "force",
                 "bias", "scale", "all", "generated", "prompt", "../../x", "a/b", "selections/a", "meta.json",
                 "{{7*7}}", "%s%n", "x" * 1000, "x" * 1001, "é" * 20000, "x" * 70000]
_ALPHABET = "abcdefgh \n\t\"\\{}[],:0-.eé\x00\x7f\u2028\U0001d518"  # lone surrogates: in NASTY_STRINGS


class Src:
    """The choices a generator makes: from Hypothesis (`draw`) or from a seeded random.Random (`rng`)."""

    def __init__(self, draw=None, rng: random.Random | None = None) -> None:
        self.draw, self.rng = draw, rng

    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi)) if self.draw else self.rng.randint(lo, hi)

    def pick(self, seq):
        seq = list(seq)
        return self.draw(st.sampled_from(seq)) if self.draw else self.rng.choice(seq)

    def p(self, prob: float) -> bool:
        """True with probability `prob`."""
        return self.int(0, 999) < prob * 1000

    def float(self) -> float:
        if self.draw:
            return self.draw(st.sampled_from(NASTY_FLOATS) | st.floats())
        r = self.rng.random()
        return self.rng.choice(NASTY_FLOATS) if r < 0.4 else self.rng.uniform(-1e6, 1e6) if r < 0.8 else \
            struct.unpack("<d", self.rng.randbytes(8))[0]

    def float32(self) -> float:
        if self.draw:
            return self.draw(st.sampled_from(NASTY_FLOATS) | st.floats(width=32))
        r = self.rng.random()
        return self.rng.choice(NASTY_FLOATS) if r < 0.4 else self.rng.uniform(-100, 100) if r < 0.8 else \
            struct.unpack("<f", self.rng.randbytes(4))[0]

    def bigint(self) -> int:
        if self.draw:
            return self.draw(st.sampled_from(NASTY_INTS) | st.integers())
        return self.rng.choice(NASTY_INTS) if self.rng.random() < 0.5 else self.rng.randint(-(2**70), 2**70)

    def text(self, max_size: int = 12) -> str:
        if self.draw:
            return self.draw(st.sampled_from(NASTY_STRINGS) | st.text(max_size=max_size))
        if self.rng.random() < 0.3:
            return self.rng.choice(NASTY_STRINGS)
        return "".join(self.rng.choice(_ALPHABET) for _ in range(self.rng.randint(0, max_size)))

    def binary(self, max_size: int) -> bytes:
        return self.draw(st.binary(max_size=max_size)) if self.draw else self.rng.randbytes(self.rng.randint(0, max_size))

    def value(self, depth: int = 0):
        """Anything JSON (and Python's json module) can hold, nasty values favoured."""
        k = self.int(0, 9) if depth < 3 else self.int(0, 6)
        if k == 0:
            return None
        if k == 1:
            return self.pick([True, False])
        if k == 2:
            return self.bigint()
        if k == 3:
            return self.float()
        if k in (4, 5, 6):
            return self.text()
        if k in (7, 8):
            return [self.value(depth + 1) for _ in range(self.int(0, 3))]
        return {self.text(): self.value(depth + 1) for _ in range(self.int(0, 3))}

    def maybe(self, plausible, p_weird: float = 0.15):
        """Mostly plausible() (a callable), sometimes anything."""
        return self.value() if self.p(p_weird) else plausible()


def fuzz(target, n: int | None = None):
    """Run target(src) on n inputs: with Hypothesis in CI, with a seeded PRNG in the full run."""
    n = N if n is None else n
    name = target.__name__.lstrip("_")
    if ENGINE == "hypothesis":
        @settings(FUZZ, max_examples=n)
        @given(st.data())
        def run(data):
            COUNTS[name] += 1
            target(Src(draw=data.draw))

        run()
        return
    only = os.environ.get("MOE_GGUF_FUZZ_ONLY")  # rerun the one input a failure names
    for i in [int(only)] if only else range(n):
        rng = random.Random(f"{name}-{SEED}-{i}")
        COUNTS[name] += 1
        try:
            target(Src(rng=rng))
        except Exception as e:
            raise AssertionError(f"{name}: input {i} (seed {SEED}) failed; rerun it alone with "
                                 f"MOE_GGUF_FUZZ_SEED={SEED} MOE_GGUF_FUZZ_ONLY={i}") from e


def dump(src: Src, doc) -> bytes:
    """JSON text of `doc`, sometimes damaged at the text or byte level."""
    try:
        text = json.dumps(doc, allow_nan=True, ensure_ascii=src.p(0.5), indent=src.pick([None, 2]))
    except ValueError:  # an int too long for str()
        text = "{}"
    return mutate(src, text.encode("utf-8", "surrogatepass"))


def mutate(src: Src, data: bytes, intact: float = 0.55) -> bytes:
    """Byte-level damage: flips, insertions, deletions, truncation, nesting bombs, long numbers."""
    if src.p(intact):  # most inputs reach the checks behind the parser intact
        return data
    kind = src.pick(["flip", "insert", "delete", "truncate", "bomb", "bigint", "raw"])
    b = bytearray(data)
    if kind == "flip" and b:
        for _ in range(src.int(1, 4)):
            b[src.int(0, len(b) - 1)] = src.int(0, 255)
    elif kind == "insert":
        i = src.int(0, len(b))
        b[i:i] = src.pick([b"\x00", b"\xff", b"\xef\xbb\xbf", b"NaN", b"-Infinity", b"\\ud800", b"{", b"]", b",",
                           b'"', b"\n"]) if src.p(0.7) else src.binary(8)
    elif kind == "delete" and b:
        i = src.int(0, len(b) - 1)
        del b[i:i + src.int(1, 8)]
    elif kind == "truncate":
        b = b[:src.int(0, len(b))]
    elif kind == "bomb":
        d = src.pick([100, 990, 1000, 5000, 100000])
        i = src.int(0, len(b))
        b[i:i] = b"[" * d + b"]" * d
    elif kind == "bigint":
        i = src.int(0, len(b))
        b[i:i] = b"1" * src.pick([400, 4300, 4301, 20000])
    elif kind == "raw":
        b = bytearray(src.binary(64))
    return bytes(b)


def no_temp_files(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert not left, f"temp files left behind: {left}"


# -- profiles --------------------------------------------------------------------------------------------------

ACTIONS = ["disable", "force", "bias", "scale"]
TOPOS = [
    ModelTopology("qwen3moe", 4, 64, 16, 4, (0, 1, 2, 3), 0, "softmax", True, 0, 0, "q"),
    ModelTopology("deepseek2", 4, 64, 16, 4, (1, 2, 3), 1, "sigmoid", True, 4, 2, "d"),
    ModelTopology("llama", 2, 64, 8, 2, (0, 1), 0, "softmax", True, 0, 0, "m"),
]


def profile_file(src: Src) -> bytes:
    def index() -> int:
        return src.int(0, 20) if src.p(0.9) else src.pick([-2, -1, 2**31, 2**63])

    entries = []
    for _ in range(src.int(0, 6)):
        action = src.pick(ACTIONS)
        entry = {"layer": src.maybe(index, 0.05), "expert": src.maybe(index, 0.05),
                 "action": src.value() if src.p(0.05) else action}
        if (action in ("bias", "scale")) == src.p(0.92):
            entry["value"] = src.maybe(lambda: src.pick([0.0, 0.5, 2.0, -2.0, 1]) if src.p(0.7) else src.float(), 0.05)
        for key in list(entry):
            if src.p(0.03):
                del entry[key]
        entries.append(entry)
    fields = {
        "format": lambda: PROFILE_FORMAT,
        "version": lambda: 1 if src.p(0.9) else src.pick([0, 2, 1.0, "1", True]),
        "name": src.text, "description": src.text,
        "model": lambda: src.pick([None, *[t.fingerprint() for t in TOPOS], {"arch": "qwen3moe"}]) if src.p(0.9)
        else src.pick([{"n_layer": -1}, {"moe_layers": [0, "1"]}, {"x": 1}]),
        "entries": lambda: entries,
        "schedule": lambda: {k: v() for k, v in (
            ("apply_to", lambda: src.pick(["all", "generated"]) if src.p(0.9) else "x"),
            ("after_tokens", lambda: src.pick([0, 3, 2**70]) if src.p(0.9) else -1),
            ("after_text", lambda: src.text() if src.p(0.5) else None)) if src.p(0.5)},
        "meta": lambda: {src.text(): src.value() for _ in range(src.int(0, 3))},
    }
    doc: dict | object = {key: src.maybe(plausible, 0.04) for key, plausible in fields.items()
                          if src.p(0.99 if key in ("format", "entries", "version") else 0.8)}
    if src.p(0.03):
        doc[src.text()] = src.value()
    if src.p(0.02):
        doc = src.value()
    return dump(src, doc)


def _profile_files(src: Src) -> None:
    data, strength, allow = profile_file(src), src.pick([1.0, 0.5, 0.0, -1.0, 2.0, 1e10]), src.p(0.5)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        path = d / "in.json"
        path.write_bytes(data)
        try:
            p = SteeringProfile.load(path)
        except ProfileError as e:
            assert str(path) in str(e), e
            COUNTS["profile_files.rejected"] += 1
            return
        COUNTS["profile_files.loaded"] += 1
        p.summary()
        for topo in TOPOS:
            try:
                p.validate(topo, allow_mismatch=allow)
                arrays = p.layer_arrays(topo, strength=strength)
            except ProfileError:
                continue
            for action, bias, scale in arrays.values():
                assert action.shape == bias.shape == scale.shape == (topo.n_expert,)
                assert np.isfinite(bias).all() and np.isfinite(scale).all() and (scale >= 0).all()
        out = d / "out.json"
        try:
            p.save(out)
        except ProfileError:  # e.g. NaN in the free-form 'meta': refused before anything is written
            assert not out.exists()
        else:
            assert SteeringProfile.load(out).to_dict() == p.to_dict()
        no_temp_files(d)


def test_fuzz_profile_files():
    fuzz(_profile_files)


# -- probe datasets --------------------------------------------------------------------------------------------


def jsonl_file(src: Src) -> bytes:
    lines = []
    for _ in range(src.int(0, 5)):
        item: dict | object = {}
        for key, plausible in (("prompt", src.text), ("label", lambda: src.pick(["a", "b"]) if src.p(0.5) else src.text()),
                               ("response", lambda: src.text() if src.p(0.7) else None), ("pair_id", src.value),
                               ("chat", lambda: src.p(0.5))):
            if src.p(0.95 if key in ("prompt", "label") else 0.4):
                item[key] = src.maybe(plausible)
        if src.p(0.05):
            item[src.text()] = src.value()
        if src.p(0.05):
            item = src.value()
        try:
            line = json.dumps(item, allow_nan=True, ensure_ascii=src.p(0.5))
        except ValueError:
            line = "{}"
        lines.append(line.encode("utf-8", "surrogatepass"))
    sep = src.pick([b"\n", b"\r\n", b"\n\n", b"\r"])
    return mutate(src, sep.join(lines) + src.pick([b"", b"\n"]))


def _probe_datasets(src: Src) -> None:
    data = jsonl_file(src)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_bytes(data)
        try:
            items = load_jsonl(path)
        except ProbeInputError as e:
            assert str(path) in str(e), e
            COUNTS["probe_datasets.rejected"] += 1
            return
    COUNTS["probe_datasets.loaded"] += 1
    assert items
    for it in items:
        assert isinstance(it, ProbeItem)
        assert isinstance(it.prompt, str) and it.prompt and isinstance(it.label, str) and it.label
        assert it.response is None or isinstance(it.response, str)
        assert it.pair_id is None or isinstance(it.pair_id, str)
        assert it.chat in (None, True, False)
        for s in (it.prompt, it.label, it.response or "", it.pair_id or ""):
            s.encode("utf-8")  # can be tokenized and saved
    dataset_hash(items, token_mode="prompt")
    # every label the loader accepts can be saved in a count file and read back
    res = ProbeResult(1, 2, "prompt")
    for it in items:
        res.record(it.label)
    res.item_labels, res.item_pairs = [it.label for it in items], [it.pair_id for it in items]
    buf = Path(tempfile.mkdtemp())
    try:
        res.save(buf / "r.npz")
        back = ProbeResult.load(buf / "r.npz")
        assert back.labels == res.labels and back.item_pairs == res.item_pairs
    finally:
        shutil.rmtree(buf)


def test_fuzz_probe_datasets():
    fuzz(_probe_datasets)


# -- count files -----------------------------------------------------------------------------------------------

DTYPES = [np.int64, np.int32, np.uint8, np.uint64, np.float64, np.float32, np.float16, np.bool_, np.complex64, "U3",
          "S2", object]


def array(src: Src, shape: tuple | None = None, dtype=np.int64) -> np.ndarray:
    if shape is None or src.p(0.1):
        shape = tuple(src.int(0, 4) for _ in range(src.int(0, 3)))
    dtype = dtype if src.p(0.9) else src.pick(DTYPES)
    n = int(np.prod(shape)) if shape else 1
    pool = [0, 1, 3, 2**40, -1, 0.5, math.nan, math.inf, -2.0]
    vals = [src.pick(pool[:3]) if src.p(0.97) else src.pick(pool) for _ in range(n)]
    with np.errstate(all="ignore"):
        try:
            return np.array(vals, dtype=np.float64).astype(dtype).reshape(shape)
        except (ValueError, OverflowError, TypeError):
            return np.zeros(shape, dtype=dtype)


def _npz(arrs: dict, compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrs)
    return buf.getvalue()


def record_files(src: Src) -> tuple[bytes, bytes | None]:
    n_layer, n_expert = src.int(0, 3), src.int(0, 4)
    shapes = {"selections": (n_layer, n_expert), "weight_sum": (n_layer, n_expert), "tokens": (n_layer,)}
    arrs = {k: array(src, s, np.float64 if k == "weight_sum" else np.int64) for k, s in shapes.items() if src.p(0.98)}
    if src.p(0.1):
        arrs[src.pick(["x", "selections.npy", "tokens/a"])] = array(src)
    meta = src.maybe(lambda: {"format": "moe-gguf-routing", "version": 1, "n_layer": n_layer, "n_expert": n_expert,
                              "model": "abc"}, 0.1)
    if src.p(0.5):  # files since the metadata is kept inside the .npz too
        arrs["record_meta"] = np.frombuffer(dump(src, meta), dtype=np.uint8) if src.p(0.9) else array(src)
    data = mutate(src, _npz(arrs, src.p(0.5)), intact=0.85)  # (zip checksums catch most damage)
    side = dump(src, meta) if src.p(0.5) else None
    return data, side


def _count_files_routing_record(src: Src) -> None:
    data, side = record_files(src)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        path = d / "counts.npz"
        path.write_bytes(data)
        if side is not None:
            path.with_suffix(".json").write_bytes(side)
        try:
            rec = RoutingRecord.load(path)
        except CountFileError as e:
            assert "counts." in str(e), e
            COUNTS["count_files_routing_record.rejected"] += 1
            return
        COUNTS["count_files_routing_record.loaded"] += 1
        assert rec.selections.shape == rec.weight_sum.shape == (rec.n_layer, rec.n_expert)
        assert rec.tokens.shape == (rec.n_layer,)
        assert rec.selections.dtype == np.int64 and (rec.selections >= 0).all()
        assert np.isfinite(rec.weight_sum).all() and (rec.weight_sum >= 0).all()
        rec.frequency()
        both = rec + rec
        out = d / "out.npz"
        both.save(out)
        back = RoutingRecord.load(out)
        np.testing.assert_array_equal(back.selections, 2 * rec.selections)
        no_temp_files(d)


def test_fuzz_count_files_routing_record():
    fuzz(_count_files_routing_record)


def probe_file(src: Src) -> bytes:
    n_layer, n_expert = src.int(0, 3), src.int(0, 3)
    labels = list(dict.fromkeys(src.pick(["a", "b", "x/y", "é", "meta.json", "selections"]) if src.p(0.7)
                                else src.text(4) or "z" for _ in range(src.int(0, 3))))
    item_labels = [src.pick(labels) for _ in range(src.int(0, 3))] if labels else []
    meta: dict | object = {
        "format": "moe-gguf-probe", "version": 1, "n_layer": n_layer, "n_expert": n_expert, "token_mode": "prompt",
        "labels": labels, "item_labels": item_labels, "item_pairs": [src.pick([None, "p"]) for _ in item_labels],
        "meta": {"n_items": len(item_labels)}}
    for key in list(meta):
        if src.p(0.02):
            del meta[key]
        elif src.p(0.03):
            meta[key] = src.value()
    if src.p(0.03):
        meta = src.value()
    arrs: dict = {}
    for lab in labels:
        for k, s in (("selections", (n_layer, n_expert)), ("weight_sum", (n_layer, n_expert)), ("tokens", (n_layer,))):
            if src.p(0.97):
                arrs[f"{k}/{lab}"] = array(src, s, np.float64 if k == "weight_sum" else np.int64)
    if src.p(0.8):
        n = len(item_labels)
        for k, s in (("item_maps", (n, n_layer, n_expert)), ("item_tokens", (n, n_layer)),
                     ("item_wsum", (n, n_layer, n_expert))):
            if src.p(0.97):
                arrs[k] = array(src, s, np.float32 if k == "item_wsum" else np.int32)
    arrs["meta.json"] = np.frombuffer(mutate(src, json.dumps(meta).encode(), intact=0.8) if src.p(0.9) else dump(src, meta),
                                      dtype=np.uint8) if src.p(0.97) else array(src)
    try:
        return mutate(src, _npz(arrs, src.p(0.5)), intact=0.85)
    except (ValueError, UnicodeEncodeError, struct.error):  # a label numpy/zipfile cannot name an entry after
        return b""


def _count_files_probe_result(src: Src) -> None:
    data = probe_file(src)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        path = d / "probe.npz"
        path.write_bytes(data)
        try:
            res = ProbeResult.load(path)
        except CountFileError as e:
            assert str(path) in str(e), e
            COUNTS["count_files_probe_result.rejected"] += 1
            return
        COUNTS["count_files_probe_result.loaded"] += 1
        for rec in res.records.values():
            assert rec.selections.shape == (res.n_layer, res.n_expert) and (rec.selections >= 0).all()
        merged = res + res
        out = d / "out.npz"
        merged.save(out)
        back = ProbeResult.load(out)
        assert back.item_labels == res.item_labels * 2 and back.labels == res.labels
        no_temp_files(d)


def test_fuzz_count_files_probe_result():
    fuzz(_count_files_probe_result)


def test_count_files_known_bad_inputs(tmp_path):
    """The inputs that crashed the loaders before they were hardened, named one by one."""
    cases = {
        "empty.npz": b"",
        "zip.npz": b"PK\x03\x04garbage",
        "text.npz": b"hello",
        "pickle.npz": _npz({"selections": np.array([{}], dtype=object)}, False),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CountFileError, match=name):
            RoutingRecord.load(tmp_path / name)
        with pytest.raises(CountFileError, match=name):
            ProbeResult.load(tmp_path / name)
    ok = tmp_path / "ok.npz"  # as written before the metadata was kept inside the .npz: read from the sidecar
    ok.write_bytes(_npz({"selections": np.zeros((2, 3), np.int64), "weight_sum": np.zeros((2, 3)),
                         "tokens": np.zeros(2, np.int64)}, False))
    for side in (b"[1]", b"\xff", b"[" * 100000):
        ok.with_suffix(".json").write_bytes(side)
        with pytest.raises(CountFileError, match="ok.json"):
            RoutingRecord.load(ok)
    (tmp_path / "neg.npz").write_bytes(_npz({"selections": -np.ones((2, 3), np.int64), "weight_sum": np.zeros((2, 3)),
                                             "tokens": np.zeros(2, np.int64)}, False))
    with pytest.raises(CountFileError, match="negative"):
        RoutingRecord.load(tmp_path / "neg.npz")


# -- the C API, straight through ctypes on a real context ------------------------------------------------------

I32 = [-(2**31), -2, -1, 0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 64, 511, 512, 2**31 - 1]
F32_NASTY = [0.0, -0.0, 1.0, -1.0, 1e-45, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan, 65504.0, 1e-38]


def c_calls(src: Src, E: int, n_layer: int, n_seq: int) -> list[tuple]:
    specials = I32 + [n_layer - 1, n_layer, E - 1, E, E + 1, n_seq - 1, n_seq]

    def i32() -> int:
        r = src.int(0, 9)
        return src.int(-1, max(n_layer, n_seq, 4)) if r < 5 else src.pick(specials) if r < 8 else src.int(-(2**31), 2**31 - 1)

    def action() -> int:
        r = src.int(0, 19)
        return 0 if r < 15 else src.pick([1, 2]) if r < 19 else src.pick([3, -1, 2**31 - 1, -(2**31)])

    def bias() -> float:
        return src.pick([0.0, 0.5, 2.0, -3.0]) if src.p(0.7) else src.float32()

    def vec(el):
        return None if src.p(0.25) else [el() for _ in range(E)]

    calls = []
    for _ in range(src.int(1, 10)):
        op = src.pick(["set_layer"] * 4 + ["clear", "seq", "seq", "n_used", "get_n_used", "callback", "null_ctx"])
        if op == "set_layer":
            calls.append((op, i32(), i32(), vec(action), vec(bias), vec(bias), E if src.p(0.7) else i32()))
        elif op in ("clear", "get_n_used", "null_ctx"):
            calls.append((op, i32()))
        elif op == "seq":
            calls.append((op, i32(), i32()))
        elif op == "n_used":
            calls.append((op, i32(), src.int(-1, E + 1) if src.p(0.7) else i32()))
        else:
            calls.append((op, src.p(0.5), src.p(0.5)))
    return calls


DECODE_EVERY = 25 if FULL else 10
N_C_API = N if FULL else min(N, 120)


class _CApi:
    """A real context of a tiny model, and the checks run after the calls of each example."""

    def __init__(self, model: MoEModel) -> None:
        self.model, self.lib = model, _lib.lib()
        self.topo = model.topology
        self.ctx = model.context(n_seq_max=2, n_ctx=64, n_batch=64)
        self.toks = model.tokenize("the quick brown fox")[:6]
        self.baseline = self.decode()
        self.routes = 0
        self.bad_routes: list[str] = []
        self.cb = _lib.ROUTE_CALLBACK(self._on_route)
        self.examples = 0

    def _on_route(self, route_p, _ud) -> None:
        r = route_p.contents
        self.routes += 1
        E = self.topo.n_expert
        if r.n_expert != E or not 0 <= r.il < self.topo.n_layer or r.n_tokens <= 0:
            self.bad_routes.append(f"il {r.il} n_expert {r.n_expert} n_tokens {r.n_tokens}")
            return
        ids = np.ctypeslib.as_array(r.ids, shape=(r.n_tokens, r.n_expert_used))
        if ((ids < 0) | (ids >= E)).any():
            self.bad_routes.append(f"expert ids out of range in layer {r.il}: {ids.tolist()}")

    def decode(self) -> np.ndarray:
        self.ctx.clear_memory()
        out = self.ctx.decode([(0, self.toks, 0), (1, self.toks, 0)])
        return np.stack([out[0], out[1]])

    def reset(self) -> None:
        c, lib = self.ctx.ctx, self.lib
        assert lib.llama_moe_set_route_callback(c, _lib.ROUTE_CALLBACK(), None, False) == 0
        assert lib.llama_moe_steer_seq(c, -1, 0) == 0
        assert lib.llama_moe_steer_clear(c, -1) == 0
        assert lib.llama_moe_set_n_expert_used(c, -1, 0) == 0

    def run(self, calls) -> None:
        c, lib, E = self.ctx.ctx, self.lib, self.topo.n_expert
        f32p, i32p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)
        self.reset()
        for call in calls:
            op = call[0]
            COUNTS[f"c_api.{self.topo.arch}.calls"] += 1
            if op == "set_layer":
                _, pid, il, a, b, s, n = call
                with np.errstate(over="ignore"):  # doubles beyond the float32 range become inf, as intended
                    arrs = [None if v is None else np.ascontiguousarray(v, dtype=dt) for v, dt in
                            ((a, np.int32), (b, np.float32), (s, np.float32))]
                ptrs = [None if x is None else x.ctypes.data_as(p) for x, p in zip(arrs, (i32p, f32p, f32p), strict=True)]
                # the vectors always hold the model's n_expert values: a wrong count must be refused before reading
                rc = lib.llama_moe_steer_set_layer(c, pid, il, *ptrs, n)
            elif op == "clear":
                rc = lib.llama_moe_steer_clear(c, call[1])
            elif op == "seq":
                rc = lib.llama_moe_steer_seq(c, call[1], call[2])
            elif op == "n_used":
                rc = lib.llama_moe_set_n_expert_used(c, call[1], call[2])
            elif op == "get_n_used":
                rc = lib.llama_moe_get_n_expert_used(c, call[1])
                assert rc < 0 or 0 < rc <= E, rc
                rc = min(rc, 0)
            elif op == "callback":
                rc = lib.llama_moe_set_route_callback(c, self.cb if call[1] else _lib.ROUTE_CALLBACK(), None, call[2])
            else:
                rc = [lib.llama_moe_steer_set_layer(None, 1, 0, None, None, None, E),
                      lib.llama_moe_steer_clear(None, call[1]), lib.llama_moe_steer_seq(None, 0, call[1]),
                      lib.llama_moe_set_n_expert_used(None, 0, call[1]), lib.llama_moe_get_n_expert_used(None, 0),
                      lib.llama_moe_set_route_callback(None, _lib.ROUTE_CALLBACK(), None, False)]
                assert rc == [-1] * 6, rc
                rc = 0
            assert rc == 0 or -8 <= rc <= -1, (call, rc)
            COUNTS[f"c_api.{self.topo.arch}.calls.{'ok' if rc == 0 else 'refused'}"] += 1
        self.examples += 1
        # decode with whatever the calls left in place (every DECODE_EVERY-th example: decoding, with the graph
        # rebuilt, is the slow part), then with everything cleared: the logits must be the unsteered ones, bit for bit
        if self.examples % DECODE_EVERY == 0:
            logits = self.decode()
            assert logits.shape == self.baseline.shape
            COUNTS[f"c_api.{self.topo.arch}.decodes"] += 1
            self.reset()
            np.testing.assert_array_equal(self.decode(), self.baseline)
        assert not self.bad_routes, self.bad_routes[:3]


@pytest.fixture(scope="module", params=["qwen3moe", "deepseek2"])
def c_api(request, synth_model):
    model = MoEModel(synth_model(request.param, "f32"), n_ctx=128, n_threads=2)
    api = _CApi(model)
    yield api
    api.reset()
    # the context still decodes, unsteered, after all of it
    np.testing.assert_array_equal(api.decode(), api.baseline)
    api.ctx.close()
    model.close()


@pytest.mark.native
def test_fuzz_c_api(c_api):
    topo = c_api.topo

    def c_api_calls(src: Src) -> None:
        COUNTS[f"c_api.{topo.arch}"] += 1
        c_api.run(c_calls(src, topo.n_expert, topo.n_layer, 2))

    fuzz(c_api_calls, N_C_API)
    assert c_api.examples >= min(N_C_API, 100)


# -- GGUF model files: truncated and corrupted -----------------------------------------------------------------


def _run_workers(paths: list[Path], timeout: float = 120) -> dict[Path, str]:
    """Outcome per file from tests/gguf_worker.py; a worker that dies marks its current file CRASH, one that
    reports nothing for `timeout` seconds is killed and its current file marked HANG."""
    import queue
    import threading

    worker = Path(__file__).with_name("gguf_worker.py")
    results: dict[Path, str] = {}
    pending = list(paths)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    while pending:
        p = subprocess.Popen([sys.executable, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("".join(f"{x}\n" for x in pending))
        p.stdin.close()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(p.stdout, lines), daemon=True).start()
        done, hung = 0, False
        while done < len(pending):
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                p.kill()
                hung = True
                break
            if line is None:
                break
            if line.startswith("@@"):
                results[pending[done]] = line[2:].strip()
                done += 1
        rc = p.wait()
        if done < len(pending):
            results[pending[done]] = f"HANG no answer in {timeout} s" if hung else f"CRASH exit status {rc}"
            done += 1
        pending = pending[done:]
    return results


def _pump(stream, q) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def _header_end(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).data_offset)


@pytest.mark.native
@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral", "deepseek2", "gpt-oss"])
def test_fuzz_corrupted_gguf(synth_model, tmp_path, arch):
    """Truncated files and byte flips in the header and metadata: ModelFileError or a model that works."""
    src = synth_model(arch, "q8_0")
    data = src.read_bytes()
    end = _header_end(src)
    rng = random.Random(f"{arch}-{N_GGUF}-{os.environ.get('MOE_GGUF_FUZZ_SEED', '0')}")
    files: list[Path] = []
    # truncation: every boundary of interest plus random cuts, in the header and in the tensor data
    cuts = {0, 3, 4, 8, 23, 24, end - 1, end, end + 1, len(data) - 1}
    cuts |= {rng.randrange(end) for _ in range(N_GGUF // 2)} | {rng.randrange(end, len(data)) for _ in range(N_GGUF // 4)}
    for cut in sorted(cuts):
        f = tmp_path / f"cut-{cut}.gguf"
        f.write_bytes(data[:cut])
        files.append(f)
    for i in range(N_GGUF):
        b = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 4, 8])):
            off = rng.randrange(end)
            r = rng.random()
            b[off] = b[off] ^ (1 << rng.randrange(8)) if r < 0.4 else rng.choice([0, 0xFF, 0x7F, 0x80]) if r < 0.7 \
                else rng.randrange(256)
        f = tmp_path / f"flip-{i}.gguf"
        f.write_bytes(bytes(b))
        files.append(f)
    # files that the metadata checks already refuse never reach llama.cpp: check those in-process (fast)
    outcome: dict[Path, str] = {}
    to_load = []
    for f in files:
        try:
            ModelTopology.from_gguf(f)
        except ModelFileError as e:
            assert f.name in str(e)
            outcome[f] = "clear"
        except Exception as e:  # pragma: no cover - a bug
            outcome[f] = f"BAD {type(e).__name__}: {e}"
        else:
            to_load.append(f)
    outcome.update(_run_workers(to_load))
    kinds = Counter(v.split()[0] for v in outcome.values())
    COUNTS[f"gguf.{arch}.files"] += len(files)
    for k, v in kinds.items():
        COUNTS[f"gguf.{arch}.{k}"] += v
    bad = {f.name: v for f, v in outcome.items() if not v.startswith(("clear", "loaded"))}
    assert not bad, bad
    for f in files:
        f.unlink()


def test_labels_that_cannot_be_saved_are_refused_up_front(tmp_path):
    """Bug found: a label with a NUL (or over 65,535 bytes) was saved, then the count file could not be read."""
    from moe_gguf.study.probe import parse_item

    for label in ("a\x00b", "x" * 1001, "x" * 70000):
        with pytest.raises(ProbeInputError, match="'label' must be at most 1000 characters"):
            parse_item({"prompt": "p", "label": label}, where="d.jsonl:1")
    for label in ("a\x00b", "x" * 70000):
        res = ProbeResult(1, 2, "prompt")
        res.record(label)
        with pytest.raises(ProbeInputError, match="cannot be saved"):
            res.save(tmp_path / "r.npz")
        assert not list(tmp_path.iterdir())
