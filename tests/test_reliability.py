"""Reliability: model mismatch, faults (SIGKILL, full disk), concurrency, untrusted model files, leaks.

Longer versions run behind environment variables (see docs/RELIABILITY.md):
    MOE_GGUF_KILLS=50        SIGKILLs injected into a running `moe-gguf probe` (CI: 2)
    MOE_GGUF_SAVE_KILLS=1000 SIGKILLs injected into each kind of file save (CI: 20)
    MOE_GGUF_THREAD_ROUNDS=20 rounds of the two-thread comparison (CI: 2)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import moe_gguf.formats.synth as synth
from moe_gguf.engine.model import MoEModel
from moe_gguf.errors import FileWriteError, ModelFileError, ModelMismatchError, ProfileError
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.records import RoutingRecord, RoutingRecorder
from moe_gguf.study.probe import ProbeResult, load_jsonl, probe

pytestmark = pytest.mark.native  # every test here runs the patched llama.cpp

KILLS = int(os.environ.get("MOE_GGUF_KILLS", "2"))
SAVE_KILLS = int(os.environ.get("MOE_GGUF_SAVE_KILLS", "20"))
THREAD_ROUNDS = int(os.environ.get("MOE_GGUF_THREAD_ROUNDS", "2"))
ROOT = Path(__file__).resolve().parents[1]
PROMPT = list(range(40, 88))


@pytest.fixture(scope="module")
def model(synth_model):
    m = MoEModel(synth_model("qwen3moe", "f32"), n_ctx=256, n_threads=2)
    yield m
    m.close()


def _selections(model: MoEModel, profile: SteeringProfile | None, **kw) -> np.ndarray:
    topo = model.topology
    with model.context() as ctx:
        ctx.set_profile(profile, seq_id=0, **kw)
        rec = RoutingRecorder(topo.n_layer, topo.n_expert)
        with ctx.recording(rec):
            ctx.decode([(0, PROMPT, 0)], logits="all")
    return rec.record.selections


# -- model mismatch --------------------------------------------------------------------------------------------


def test_profile_file_carries_the_fingerprint(model, tmp_path):
    p = SteeringProfile.for_model(model.topology, name="x").disable(0, 1)
    p.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["model"] == model.topology.fingerprint()
    assert SteeringProfile.load(tmp_path / "p.json").model == model.topology.fingerprint()


def test_mismatch_is_refused_unless_overridden_and_then_only_if_it_fits(model):
    topo = model.topology
    layer = topo.moe_layers[0]
    base = _selections(model, None)
    busiest = int(np.argmax(base[layer]))
    other = {**topo.fingerprint(), "arch": "llama", "n_layer": topo.n_layer + 2}  # another model, same expert table
    p = SteeringProfile(model=other, name="other").disable(layer, busiest)
    with pytest.raises(ModelMismatchError, match="arch: profile 'llama', model 'qwen3moe'.*allow-model-mismatch"):
        _selections(model, p)
    with pytest.raises(ModelMismatchError):
        model.steer(p)
    # explicit override, shapes fit: applied
    sel = _selections(model, p, allow_mismatch=True)
    assert sel[layer, busiest] == 0 and base[layer, busiest] > 0
    # explicit override, shapes do not fit: still refused, as a plain ProfileError naming the entry
    bad = SteeringProfile(model={**other, "n_expert": 64}, name="big").disable(layer, topo.n_expert + 3)
    with pytest.raises(ProfileError, match=f"expert {topo.n_expert + 3} does not exist.*different model") as e:
        _selections(model, bad, allow_mismatch=True)
    assert not isinstance(e.value, ModelMismatchError)
    bad_layer = SteeringProfile(model=other).force(topo.n_layer + 1, 0)
    with pytest.raises(ProfileError, match="does not exist"):
        model.steer(bad_layer, allow_mismatch=True)


def test_override_applies_to_one_call_only(model):
    """Bug found: the upload cache skipped validation, so an earlier override let later calls through."""
    topo = model.topology
    p = SteeringProfile(model={**topo.fingerprint(), "arch": "llama"}).disable(topo.moe_layers[0], 0)
    with model.context(n_seq_max=2) as ctx:
        ctx.set_profile(p, seq_id=0, allow_mismatch=True)
        with pytest.raises(ModelMismatchError):
            ctx.set_profile(p, seq_id=1)


def test_a_profile_edited_after_use_is_uploaded_again(model):
    """Bug found: the upload cache was keyed by the profile object only, so edits were silently ignored."""
    topo = model.topology
    layer = topo.moe_layers[0]
    base = _selections(model, None)
    first, second = (int(x) for x in np.argsort(-base[layer])[:2])
    p = SteeringProfile.for_model(topo).disable(layer, first)
    with model.context() as ctx:
        for disabled, kept in ((first, second), (second, first)):
            p.entries[:] = []
            p.disable(layer, disabled)
            ctx.set_profile(p, seq_id=0)
            rec = RoutingRecorder(topo.n_layer, topo.n_expert)
            ctx.clear_memory()
            with ctx.recording(rec):
                ctx.decode([(0, PROMPT, 0)], logits="all")
            assert rec.record.selections[layer, disabled] == 0 and rec.record.selections[layer, kept] > 0


def test_cli_refuses_a_mismatched_profile_unless_allowed(model, tmp_path):
    from moe_gguf.cli import main

    topo = model.topology
    p = SteeringProfile(model={**topo.fingerprint(), "arch": "llama"}, name="o").disable(topo.moe_layers[0], 0)
    p.save(tmp_path / "o.json")
    args = ["generate", "-m", str(model.path), "-p", "hello", "-n", "2", "--profile", str(tmp_path / "o.json"), "-t", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "different model" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [*args, "--allow-model-mismatch"])
    assert r.exit_code == 0, r.output


# -- faults: SIGKILL during a probe ----------------------------------------------------------------------------


def _dataset(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"item {i}: " + "tell me about topic " * (1 + i % 4), "label": "ab"[i % 2],
                                "pair_id": i // 2}) + "\n")
    return path


def _probe_cmd(model_path: Path, data: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).with_name("moe-gguf")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-c", "from moe_gguf.cli import main; main()"]
    return [*cli, "probe", "-m", str(model_path), "-i", str(data), "-o", str(out), "--batch", "2", "-t", "1", "-c", "512"]


def assert_same_probe(a: ProbeResult, b: ProbeResult) -> None:
    assert a.item_labels == b.item_labels and a.item_pairs == b.item_pairs and a.labels == b.labels
    np.testing.assert_array_equal(a.item_maps, b.item_maps)
    np.testing.assert_array_equal(a.item_tokens, b.item_tokens)
    np.testing.assert_array_equal(a.item_wsum, b.item_wsum)
    for lab in a.labels:
        for k in ("selections", "weight_sum", "tokens"):
            np.testing.assert_array_equal(getattr(a.records[lab], k), getattr(b.records[lab], k))


def test_probe_killed_at_random_moments_resumes_to_the_exact_counts(synth_model, tmp_path):
    """`moe-gguf probe` is SIGKILLed at random moments (up to 5 times per run through the dataset), resumed each
    time, and must end with exactly the counts of an uninterrupted run."""
    model_path = synth_model("qwen3moe", "f32")
    data = _dataset(tmp_path / "d.jsonl", 24 if KILLS <= 5 else 40)
    # the uninterrupted run, in a process of its own like the interrupted ones
    ref_out = tmp_path / "ref.npz"
    t0 = time.monotonic()
    subprocess.run(_probe_cmd(model_path, data, ref_out), check=True, capture_output=True, env=_env())
    full = time.monotonic() - t0
    ref = ProbeResult.load(ref_out)
    n = len(ref.item_labels)
    t0 = time.monotonic()  # start-up: a run that finds the work done (imports, model load, context)
    subprocess.run(_probe_cmd(model_path, data, ref_out), check=True, capture_output=True, env=_env())
    startup = min(time.monotonic() - t0, full)
    per_batch = (full - startup) / (n / 2)

    rng = random.Random(os.environ.get("MOE_GGUF_FUZZ_SEED", "0"))
    progress: list[int] = []
    kills = runs = 0
    while kills < KILLS:
        out = tmp_path / f"out{runs}.npz"
        runs += 1
        for _ in range(min(5, KILLS - kills)):
            done = len(ProbeResult.load(out).item_labels) if out.exists() else 0
            if done == n:
                break
            proc = subprocess.Popen(_probe_cmd(model_path, data, out), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=_env())
            # a random moment: once a random number of items is saved, plus up to two batches' time (so in the
            # middle of decoding a batch, or of writing the file)
            target = rng.randrange(done, n)
            while proc.poll() is None and _saved(out) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 2 * per_batch))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            # whatever the moment, the file is a whole result, never a partial one
            progress.append(len(ProbeResult.load(out).item_labels) if out.exists() else 0)
        subprocess.run(_probe_cmd(model_path, data, out), check=True, capture_output=True, env=_env())
        assert_same_probe(ProbeResult.load(out), ref)
    stale = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    _report("probe_sigkill", kills=kills, runs_through_the_dataset=runs, items=n,
            items_done_at_each_kill=progress, kills_mid_probe=sum(0 < x < n for x in progress),
            stale_temp_files=len(stale), exact_match=True)


def _saved(out: Path) -> int:
    try:
        return len(ProbeResult.load(out).item_labels)
    except ValueError:  # not written yet
        return 0


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _report(name: str, **figures) -> None:
    out = os.environ.get("MOE_GGUF_RELIABILITY_REPORT")
    if out:
        prev = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        prev[name] = figures
        Path(out).write_text(json.dumps(prev, indent=2, sort_keys=True))


# -- faults: SIGKILL during a save -----------------------------------------------------------------------------


def _savers(tmp: Path):
    """(name, path, save(version), check(path) -> version) for each kind of file moe-gguf writes."""
    def prof(v: int) -> SteeringProfile:
        return SteeringProfile(name=f"v{v}", meta={"pad": "x" * 20000 * (1 + v % 3)}).disable(v % 4, 1)

    def rec(v: int) -> RoutingRecord:
        r = RoutingRecord(48, 128, meta={"version_of_test": v})
        r.selections += v
        return r

    def res(v: int) -> ProbeResult:
        r = ProbeResult(8, 16, "prompt", meta={"v": v})
        r.record("a").selections += v
        r.item_labels, r.item_pairs = ["a"] * v, [None] * v
        r.item_maps = np.full((v, 8, 16), v, np.int32)
        r.item_tokens = np.full((v, 8), v, np.int32)
        r.item_wsum = np.zeros((v, 8, 16), np.float32)
        return r

    return [
        ("profile", tmp / "p.json", lambda v: prof(v).save(tmp / "p.json"),
         lambda p: int(SteeringProfile.load(p).name[1:])),
        ("routing_record", tmp / "r.npz", lambda v: rec(v).save(tmp / "r.npz"),
         lambda p: (lambda r: int(r.selections[0, 0]) if r.meta["version_of_test"] == r.selections[0, 0] else -1)(
             RoutingRecord.load(p))),
        ("probe_result", tmp / "pr.npz", lambda v: res(v).save(tmp / "pr.npz"),
         lambda p: len(ProbeResult.load(p).item_labels)),
    ]


@pytest.mark.parametrize("kind", ["profile", "routing_record", "probe_result"])
def test_save_killed_at_random_moments_leaves_a_whole_file(tmp_path, kind):
    name, path, save, check = next(s for s in _savers(tmp_path) if s[0] == kind)
    save(1)
    rng = random.Random(f"{kind}-{os.environ.get('MOE_GGUF_FUZZ_SEED', '0')}")
    seen = set()
    for _ in range(SAVE_KILLS):
        pid = os.fork()
        if pid == 0:  # the child saves new versions until it is killed
            try:
                v = 2
                while True:
                    save(v)
                    v += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        v = check(path)  # loads, and is one whole version: never a mix, never a partial file
        assert v >= 1
        seen.add(v)
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    _report(f"save_sigkill_{kind}", kills=SAVE_KILLS, distinct_versions_seen=len(seen), stale_temp_files=len(stale))
    # a killed writer leaves its own temp files (never a damaged target); the next save removes them
    assert len(stale) <= (2 if kind == "routing_record" else 1)  # (a record writes an .npz and a .json)
    save(99)
    assert check(path) == 99
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_stale_temp_files_of_live_writers_and_other_targets_are_kept(tmp_path):
    from moe_gguf._io import _host, sweep_stale

    target = tmp_path / "p.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    files = {
        "dead": tmp_path / f".p.json.{_host()}-{dead_pid}.x1.tmp",
        "live": tmp_path / f".p.json.{_host()}-{os.getppid()}.x2.tmp",  # the test runner's parent is alive
        "other_host": tmp_path / f".p.json.elsewhere-{dead_pid}.x3.tmp",
        "other_target": tmp_path / f".q.json.{_host()}-{dead_pid}.x4.tmp",
    }
    for f in files.values():
        f.write_text("x")
    assert sweep_stale(target) == 1
    assert {k for k, f in files.items() if f.exists()} == {"live", "other_host", "other_target"}


# -- faults: full disk -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def disk_full_at(call: int):
    """The `call`-th temp file moe-gguf opens (0-based) is backed by /dev/full: its writes fail with ENOSPC."""
    real = tempfile.mkstemp
    n = [0]

    def mkstemp(*a, **kw):
        fd, name = real(*a, **kw)
        if n[0] == call:
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        n[0] += 1
        return fd, name

    tempfile.mkstemp = mkstemp
    try:
        yield
    finally:
        tempfile.mkstemp = real


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("kind,n_files", [("profile", 1), ("routing_record", 2), ("probe_result", 1)])
def test_full_disk_is_a_clear_error_and_keeps_the_old_file(tmp_path, kind, n_files):
    name, path, save, check = next(s for s in _savers(tmp_path) if s[0] == kind)
    save(1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for call in range(n_files):  # the disk fills up while writing the first file, or the second one
        with disk_full_at(call), pytest.raises((ProfileError, FileWriteError)) as e:
            save(2)
        assert "No space left on device" in str(e.value) and path.stem in str(e.value)
        if isinstance(e.value, FileWriteError):
            assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError) and isinstance(e.value, ValueError)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # byte-identical, no temp file
    assert check(path) == 1
    _report(f"enospc_{kind}", faults=n_files, data_lost=0)


def test_full_disk_in_the_probe_cli_keeps_the_counts(model, tmp_path):
    data = _dataset(tmp_path / "d.jsonl", 4)
    out = tmp_path / "out.npz"
    res = probe(model, load_jsonl(data), n_seq=2, out=out)
    before = out.read_bytes()
    with disk_full_at(0), pytest.raises(FileWriteError, match="out.npz: cannot save .No space left on device"):
        probe(model, load_jsonl(_dataset(tmp_path / "d2.jsonl", 6)), n_seq=2, out=out, overwrite=True)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d2.jsonl", "out.npz"]
    assert ProbeResult.load(out).item_labels == res.item_labels


def test_full_disk_in_the_merge_cli_is_a_clear_error(tmp_path):
    from moe_gguf.cli import main

    name, path, save, check = next(s for s in _savers(tmp_path) if s[0] == "probe_result")
    save(2)
    out = tmp_path / "merged.npz"
    assert CliRunner().invoke(main, ["merge", str(path), str(path), "-o", str(out)]).exit_code == 0
    before = out.read_bytes()
    with disk_full_at(0):
        r = CliRunner().invoke(main, ["merge", str(path), "-o", str(out)])
    assert r.exit_code != 0 and "No space left on device" in r.output and "Traceback" not in r.output
    assert out.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KiB filesystem (needs root and mount); skipped where it cannot be mounted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_tmpfs(tiny_tmpfs):
    path = tiny_tmpfs / "p.json"
    SteeringProfile(name="small").save(path)
    before = path.read_bytes()
    with pytest.raises(ProfileError, match="No space left on device.*not changed"):
        SteeringProfile(name="big", meta={"pad": "x" * 200_000}).save(path)
    assert path.read_bytes() == before and os.listdir(tiny_tmpfs) == ["p.json"]
    rec = tiny_tmpfs / "r.npz"
    RoutingRecord(2, 4).save(rec)
    before = {p: p.read_bytes() for p in tiny_tmpfs.iterdir()}
    with pytest.raises(FileWriteError, match="No space left on device"):
        RoutingRecord(200, 128).save(rec)
    assert {p: p.read_bytes() for p in tiny_tmpfs.iterdir()} == before
    _report("enospc_tmpfs", faults=2, data_lost=0)


# -- concurrency -----------------------------------------------------------------------------------------------


def _job(model: MoEModel, ctx, profile: SteeringProfile, out: dict) -> None:
    topo = model.topology
    rec = RoutingRecorder(topo.n_layer, topo.n_expert, traces=True)
    threads = set()

    class Tap:
        def on_route(self, route):
            threads.add(threading.get_ident())
            rec.on_route(route)

    ctx.set_recorder(Tap())
    ctx.clear_memory()
    ctx.set_profile(profile, seq_id=0)
    logits = ctx.decode([(0, PROMPT, 0)], logits="all")[0]
    ctx.set_recorder(None)
    gen = ctx.generate(PROMPT[:16], profile=profile, max_tokens=12)
    out.update(logits=logits, selections=rec.record.selections.copy(), tokens=gen.tokens,
               threads=threads, me=threading.get_ident())


def test_two_contexts_two_threads_match_sequential_runs(model):
    topo = model.topology
    base = _selections(model, None)
    p1 = SteeringProfile.for_model(topo, name="a")
    p2 = SteeringProfile.for_model(topo, name="b")
    for layer in topo.moe_layers:
        order = np.argsort(-base[layer])
        p1.disable(layer, int(order[0]))
        p2.force(layer, int(order[-1])).bias(layer, int(order[1]), 3.0)
    with model.context() as c1, model.context() as c2:
        seq = [{}, {}]
        _job(model, c1, p1, seq[0])
        _job(model, c2, p2, seq[1])
        assert not np.array_equal(seq[0]["logits"], seq[1]["logits"])  # the profiles differ in effect
        for _ in range(THREAD_ROUNDS):
            par = [{}, {}]
            ts = [threading.Thread(target=_job, args=(model, c, p, o)) for c, p, o in zip((c1, c2), (p1, p2), par, strict=True)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            for s, p in zip(seq, par, strict=True):
                np.testing.assert_array_equal(p["logits"], s["logits"])
                np.testing.assert_array_equal(p["selections"], s["selections"])
                assert p["tokens"] == s["tokens"]
                # the routing callback runs on the thread that called llama_decode, never on a llama.cpp worker
                assert p["threads"] == {p["me"]}
    _report("threads", rounds=THREAD_ROUNDS, contexts=2, identical=True)


# -- untrusted model files -------------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARK') }}",
    "{{ joiner.__init__.__globals__.os.system('touch MARK') }}",
    "{{ namespace.__init__.__globals__['os'].system('touch MARK') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARK').read() }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch MARK') }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch MARK') }}",
    "{{ strftime_now.__globals__['os'].system('touch MARK') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ messages }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ ''.__class__.__base__.__subclasses__()[0].__init__.__globals__['sys'].modules['os'].system('touch MARK') }}",
    "{% for i in range(1000000000) %}x{% endfor %}",
    "{{ raise_exception('refused by the template') }}",
    "{{ 1 + 'a' }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_chat_template_cannot_execute_code(tmp_path, monkeypatch, template):
    mark = tmp_path / "pwned"
    monkeypatch.setattr(synth, "CHAT_TEMPLATE", template.replace("MARK", str(mark)))
    path = synth.write_gguf(synth.PRESETS["tiny-qwen3moe"], tmp_path / "evil.gguf")
    m = MoEModel(path, n_ctx=64, n_threads=1)
    try:
        with pytest.raises(ModelFileError, match="evil.gguf: the model's chat template failed") as e:
            m.chat_prompt([{"role": "user", "content": "hi"}])
        if "__" in template or ".format(" in template:
            assert "SecurityError" in str(e.value)
        # llama-cpp-python's own chat handler renders the same template in the same sandbox
        with pytest.raises(Exception) as e2:
            m.llama.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1)
        assert not isinstance(e2.value, (SystemExit, KeyboardInterrupt))
    finally:
        m.close()
    assert not mark.exists()


def test_the_sandbox_is_jinja2s_immutable_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template="{{ messages[0]['content'] }}", eos_token="", bos_token="")
    assert isinstance(fmt._environment.environment, ImmutableSandboxedEnvironment)


@pytest.mark.parametrize("template", ["{% for %}", "{{ x", "{% if %}{% endfor %}"])
def test_broken_chat_template_is_a_clear_error_on_load(tmp_path, monkeypatch, template):
    """Bug found: llama-cpp-python compiles the template while loading, and its TemplateSyntaxError escaped."""
    monkeypatch.setattr(synth, "CHAT_TEMPLATE", template)
    path = synth.write_gguf(synth.PRESETS["tiny-qwen3moe"], tmp_path / "broken.gguf")
    with pytest.raises(ModelFileError, match="broken.gguf: the model's chat template is broken"):
        MoEModel(path, n_ctx=64, n_threads=1)


# -- leaks -----------------------------------------------------------------------------------------------------


def test_context_cycles_do_not_grow_memory(synth_model):
    """A short version of scripts/leak_cycles.py (1,000 cycles, under LeakSanitizer in scripts/sanitize.sh)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import leak_cycles
    finally:
        sys.path.pop(0)
    cycles = int(os.environ.get("MOE_GGUF_LEAK_CYCLES", "12"))
    res = leak_cycles.run(synth_model("qwen3moe", "f32"), cycles=cycles, warmup=max(4, cycles // 5))
    assert res["cycles"] == cycles and res["decode_failures"] == 0 and res["tokens_routed"] > 0
    # generous for a short run: a leaked context (KV cache, compute buffers) is over a MiB per cycle here
    assert res["rss_growth_per_cycle_kib"] < (512 if cycles < 100 else 4), res
    _report("leak_cycles_ci", **res)
