"""A model spread over two RPC servers (llama.cpp's RPC backend, loopback) routes and steers as a local one.

The servers are `moe-gguf rpc-server` processes: ggml's RPC server from the same patched library, built
with -DGGML_RPC=ON like the client. Every layer goes to a server (n_gpu_layers=-1, split by their free
memory), so the MoE graph, the steering tables and the captured ids all travel through the protocol.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from moe_gguf.engine import rpc
from moe_gguf.engine.model import MoEModel
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.records import RoutingRecorder

pytestmark = [pytest.mark.native, pytest.mark.skipif(not rpc.available(), reason="llama-cpp-python built without -DGGML_RPC=ON")]

PROMPT = [1, 17, 42, 99, 7, 3, 250, 11, 64, 5, 300, 2, 8, 19, 77, 123]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rpc-server on port {port} exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"rpc-server on port {port} did not listen within {timeout} s")


@pytest.fixture(scope="module")
def servers():
    procs, endpoints = [], []
    try:
        for _ in range(2):
            port = _free_port()
            p = subprocess.Popen([sys.executable, "-m", "moe_gguf", "rpc-server", "--port", str(port), "-t", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, PYTHONUNBUFFERED="1"))
            procs.append(p)
            _wait_listening(port, p)
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run(model: MoEModel, profile: SteeringProfile | None):
    topo = model.topology
    with model.context(n_seq_max=2, n_batch=64) as ctx:
        ctx.set_profile(profile, seq_id=1)  # sequence 0 unsteered, sequence 1 steered, one batch
        rec = [RoutingRecorder(topo.n_layer, topo.n_expert, traces=True)]
        with ctx.recording(rec[0]):
            logits = ctx.decode([(0, PROMPT, 0), (1, PROMPT, 0)], logits="all")
        gen = ctx.generate(PROMPT[:4], profile=profile, max_tokens=12)
    return logits, rec[0], gen.tokens


@pytest.mark.parametrize("arch,dtype", [("qwen3moe", "f32"), ("gpt-oss", "q8_0")])
def test_rpc_routing_and_steering_equal_local(servers, synth_model, capfd, arch, dtype):
    path = synth_model(arch, dtype)
    with MoEModel(path, n_ctx=256, n_threads=1) as local:
        topo = local.topology
        base = run(local, None)
        layer = topo.moe_layers[0]
        # steer the experts this prompt uses most: disable the busiest, force the least used
        sel = base[1].record.selections[layer]
        prof = SteeringProfile.for_model(topo).disable(layer, int(np.argmax(sel))).force(layer, int(np.argmin(sel)))
        want = run(local, prof)
    capfd.readouterr()
    with MoEModel(path, n_ctx=256, n_threads=1, rpc_servers=servers, verbose=True) as remote:
        log = capfd.readouterr().err
        got = run(remote, prof)
    # the weights really live on both servers (llama.cpp's load log names a buffer per device)
    assert re.search(r"RPC\d+.*model buffer size", log), log[-3000:]
    assert set(re.findall(r"RPC\d+\[([^\]]+)\]\s+model buffer size", log)) == set(servers), log[-3000:]
    assert re.search(r"offloaded \d+/\d+ layers to GPU", log)

    logits_local, rec_local, gen_local = want
    logits_rpc, rec_rpc, gen_rpc = got
    np.testing.assert_array_equal(rec_rpc.record.selections, rec_local.record.selections)
    np.testing.assert_allclose(rec_rpc.record.weight_sum, rec_local.record.weight_sum, rtol=1e-5, atol=1e-6)
    assert [(t.layer, t.seq_id, t.pos, t.experts.tolist()) for t in rec_rpc.traces] == \
        [(t.layer, t.seq_id, t.pos, t.experts.tolist()) for t in rec_local.traces]
    for s in (0, 1):
        np.testing.assert_allclose(logits_rpc[s], logits_local[s], rtol=1e-4, atol=1e-4)
    assert gen_rpc == gen_local
    # and the steering did something through RPC: the steered sequence differs from the unsteered one
    disabled = int(np.argmax(base[1].record.selections[layer]))
    steered = [t for t in rec_rpc.traces if t.seq_id == 1 and t.layer == layer]
    assert steered and all(disabled not in t.experts for t in steered)
    assert not np.allclose(logits_rpc[0], logits_rpc[1])


def test_unreachable_server_is_a_clear_error(synth_model):
    port = _free_port()  # nothing listens there
    from moe_gguf.errors import ModelFileError

    with pytest.raises(ModelFileError, match=f"cannot reach the RPC server at 127.0.0.1:{port}"):
        MoEModel(synth_model("qwen3moe"), rpc_servers=[f"127.0.0.1:{port}"])


@pytest.mark.parametrize("bad", ["localhost", "host:0", "host:70000", ":50052", "a b:1", ""])
def test_bad_endpoints_are_refused(bad):
    with pytest.raises(rpc.RPCError, match="HOST:PORT"):
        rpc.parse_endpoint(bad)


def test_rpc_server_reports_a_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "moe_gguf", "rpc-server", "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "could not start" in r.stderr


def test_not_an_rpc_server_is_a_clear_error():
    """ggml's client would abort the process here; the probe before it names the problem."""
    import threading

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]

        def answer_like_http():
            conn, _ = srv.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=answer_like_http, daemon=True)
        t.start()
        with pytest.raises(rpc.RPCError, match="does not answer like a ggml RPC server"):
            rpc.connect([f"127.0.0.1:{port}"])
        t.join(5)


def test_a_server_that_never_answers_times_out():
    with socket.socket() as srv:  # listening, never accepting: connect succeeds, HELLO gets no answer
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(rpc.RPCError, match="did not answer within"):
            rpc.probe(f"127.0.0.1:{port}", timeout=0.5)
        assert time.monotonic() - t0 < 5
