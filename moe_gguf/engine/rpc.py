"""llama.cpp's RPC backend: one model's layers spread over several machines.

Server side, on each machine that lends its memory: ``moe-gguf rpc-server`` runs ggml's RPC server
(``ggml_backend_rpc_start_server``, what llama.cpp's ``rpc-server`` tool calls) from the same patched
library, exposing the machine's GPUs, or its CPU when it has none.

Client side: ``MoEModel(path, rpc_servers=["host:port", ...])``. llama.cpp places layers on the remote
devices as on local GPUs (``n_gpu_layers``, ``tensor_split``). Steering tables and routing ids are graph
inputs and outputs, so steering and capture work unchanged: the client sends the tables with the graph
inputs and reads the ids back once per ubatch.

The RPC protocol has no authentication or encryption: bind servers to loopback or a private network.
"""

from __future__ import annotations

import ctypes
import re
import signal
import socket
import struct
import sys
from dataclasses import dataclass

from moe_gguf.engine import _ggml
from moe_gguf.engine._ggml import DEV_ACCEL, DEV_CPU, DEV_GPU, DEV_IGPU
from moe_gguf.errors import RPCError

# ggml-rpc.cpp: the HELLO exchange (checked here first: ggml aborts the process when a server is unreachable)
RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24
RPC_PROTO_MAJOR = 7
_reached: set[str] = set()  # endpoints this process has talked to (see connect())

_ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")



@dataclass(frozen=True)
class Device:
    name: str
    description: str
    type: int
    free: int
    total: int


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with a clear error for anything else."""
    m = _ENDPOINT.match(endpoint.strip()) if isinstance(endpoint, str) else None
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise RPCError(f"RPC server {endpoint!r}: expected HOST:PORT with a port in 1..65535, e.g. 192.168.1.20:50052")
    return m["host"], int(m["port"])


def probe(endpoint: str, timeout: float = 10.0) -> tuple[int, int, int]:
    """Connect and say HELLO as ggml's client does; returns the server's protocol version.

    Raises RPCError naming the cause (refused, timed out, not a ggml RPC server, other protocol version)
    where ggml's own client would abort the process.
    """
    host, port = parse_endpoint(endpoint)
    host = host.strip("[]")
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
            want = 8 + 4 + RPC_CONN_CAPS_SIZE
            data = b""
            while len(data) < want:
                chunk = s.recv(want - len(data))
                if not chunk:
                    break
                data += chunk
    except TimeoutError as e:
        raise RPCError(f"the RPC server at {endpoint} did not answer within {timeout:.0f} s (a server serves one "
                       "client at a time: is another process using it? is a firewall dropping the packets?)") from e
    except OSError as e:
        raise RPCError(f"cannot reach the RPC server at {endpoint} ({e.strerror or e}): start "
                       "`moe-gguf rpc-server --host HOST --port PORT` there, and check that the port is open") from e
    if len(data) < want or struct.unpack("<Q", data[:8])[0] != want - 8:
        raise RPCError(f"{endpoint} does not answer like a ggml RPC server (protocol {RPC_PROTO_MAJOR}.x): "
                       "wrong port, or a server from an incompatible llama.cpp version")
    version = (data[8], data[9], data[10])
    if version[0] != RPC_PROTO_MAJOR:
        raise RPCError(f"the RPC server at {endpoint} speaks protocol {'.'.join(map(str, version))}, this library "
                       f"{RPC_PROTO_MAJOR}.x: run the same moe-gguf / llama.cpp version on both machines")
    return version


def _rpc_fn(name: str, restype, argtypes):
    lib = _ggml.lib()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RPCError("this llama-cpp-python build has no RPC backend; rebuild it with "
                       "`python -m moe_gguf.native build` (moe-gguf builds with -DGGML_RPC=ON unless CMAKE_ARGS "
                       "says -DGGML_RPC=OFF)")
    addr = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not addr:
        raise RPCError(f"the RPC backend of this build does not export {name}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(addr)


def available() -> bool:
    """True if the installed library was built with the RPC backend."""
    try:
        return bool(_ggml.lib().ggml_backend_reg_by_name(b"RPC"))
    except (ImportError, OSError, AttributeError):
        return False


def _describe(lib, dev: int) -> Device:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device(lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                  lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                  int(lib.ggml_backend_dev_type(dev)), free.value, total.value)


def connect(endpoints: list[str]) -> list[int]:
    """Connect to RPC servers; returns their devices (ggml_backend_dev_t), in order.

    A server is contacted once per process: later calls with the same endpoint reuse the connection.
    """
    if not endpoints:
        raise RPCError("no RPC servers given")
    seen: set[str] = set()
    for ep in endpoints:
        parse_endpoint(ep)
        if ep.strip() in seen:
            raise RPCError(f"RPC server {ep!r} is given twice")
        seen.add(ep.strip())
    add_server = _rpc_fn("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    lib = _ggml.lib()
    for ep in endpoints:
        # only before the first connection: ggml then keeps one per endpoint, and a server serves one
        # client at a time, so probing again while this process holds a model there would wait for it
        if ep.strip() not in _reached:
            probe(ep.strip())
    devices: list[int] = []
    for ep in endpoints:
        reg = add_server(ep.strip().encode())
        _reached.add(ep.strip())
        if not reg:
            raise RPCError(f"cannot reach the RPC server at {ep} (connection refused, or it exposes no device): start "
                           f"`moe-gguf rpc-server --host HOST --port PORT` there, and check that the port is open")
        devices += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
    return devices


def device_list(endpoints: list[str]) -> ctypes.Array:
    """The NULL-terminated ``llama_model_params.devices`` array: the RPC devices, then this machine's GPUs.

    Passing the devices explicitly (instead of registering the servers globally, as llama.cpp's tools do)
    keeps other models in the same process on local devices only. The array must outlive the model.
    """
    devs = connect(endpoints)
    lib = _ggml.lib()
    devs += [d for d in _ggml.devices() if lib.ggml_backend_dev_type(d) in (DEV_GPU, DEV_IGPU)]
    arr = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
    return arr


def describe(endpoints: list[str]) -> list[Device]:
    """Name, description and memory of each server's devices."""
    lib = _ggml.lib()
    return [_describe(lib, d) for d in connect(endpoints)]


def local_devices(names: list[str] | None = None) -> list[int]:
    """The devices a server on this machine exposes: the named ones, else every GPU, else the CPU."""
    lib = _ggml.lib()
    all_devs = _ggml.devices()
    if names:
        by_name = {lib.ggml_backend_dev_name(d).decode(): d for d in all_devs}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise RPCError(f"unknown device(s) {', '.join(missing)}; this machine has: {', '.join(by_name)}")
        return [by_name[n] for n in names]
    gpus = [d for d in all_devs if lib.ggml_backend_dev_type(d) not in (DEV_CPU, DEV_ACCEL)]
    return gpus or [d for d in all_devs if lib.ggml_backend_dev_type(d) == DEV_CPU][:1]


def serve(host: str = "127.0.0.1", port: int = 50052, *, n_threads: int | None = None,
          devices: list[str] | None = None, cache_dir: str | None = None, log=print) -> None:
    """Run an RPC server in this process until it is killed (it does not return on success)."""
    import os

    parse_endpoint(f"{host}:{port}")
    start = _rpc_fn("ggml_backend_rpc_start_server", None,
                    [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p])
    devs = local_devices(devices)
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        log(f"WARNING: serving on {host}: the RPC protocol has no authentication or encryption; anyone who can "
            "reach this port can use this machine's memory. Use it on a private network only.")
    arr = (ctypes.c_void_p * len(devs))(*devs)
    # the C loop blocks the main thread, where Python would run its SIGINT handler: let Ctrl-C end the process
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.stdout.flush()
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None,
          n_threads or os.cpu_count() or 1, len(devs), ctypes.cast(arr, ctypes.c_void_p))
    # ggml returns only when it could not start (it printed why: port in use, bad address, ...)
    raise RPCError(f"the RPC server on {host}:{port} could not start or stopped (see the message above: port "
                   "in use? address not on this machine?)")
