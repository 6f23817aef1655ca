"""Bad input gets a clear error from C and Python, never a crash."""

from __future__ import annotations

import ctypes
import json
import math

import pytest

from moe_gguf.engine import _lib
from moe_gguf.engine.model import MoEModel
from moe_gguf.errors import ModelFileError, ModelMismatchError, NotMoEError, ProfileError
from moe_gguf.formats.profile import SteeringProfile

from .conftest import write_dense_gguf


@pytest.fixture(scope="module")
def model(synth_model):
    m = MoEModel(synth_model("qwen3moe", "f32"), n_ctx=256, n_threads=2)
    yield m
    m.close()


def _arr(ctype, values):
    return (ctype * len(values))(*values)


@pytest.mark.native
def test_c_api_rejects_every_bad_argument(model):
    lib = _lib.lib()
    topo = model.topology
    E, k = topo.n_expert, topo.n_expert_used
    layer = topo.moe_layers[0]
    with model.context(n_seq_max=2) as ctx:
        c = ctx.ctx
        keep = _arr(ctypes.c_int32, [0] * E)
        set_layer = lib.llama_moe_steer_set_layer
        assert set_layer(None, 1, layer, keep, None, None, E) == -1              # null context
        assert set_layer(c, 0, layer, keep, None, None, E) == -1                 # profile ids start at 1
        assert set_layer(c, 1, -1, keep, None, None, E) == -3                    # layer out of range
        assert set_layer(c, 1, topo.n_layer, keep, None, None, E) == -3
        assert set_layer(c, 1, layer, keep, None, None, E - 1) == -4             # wrong vector length
        assert set_layer(c, 1, layer, _arr(ctypes.c_int32, [7] + [0] * (E - 1)), None, None, E) == -5
        nan_bias = _arr(ctypes.c_float, [math.nan] + [0.0] * (E - 1))
        assert set_layer(c, 1, layer, None, nan_bias, None, E) == -6             # non-finite bias
        inf_scale = _arr(ctypes.c_float, [math.inf] + [1.0] * (E - 1))
        assert set_layer(c, 1, layer, None, None, inf_scale, E) == -6
        forced = _arr(ctypes.c_int32, [2] * (k + 1) + [0] * (E - k - 1))
        assert set_layer(c, 1, layer, forced, None, None, E) == -7               # more forced than used
        disabled = _arr(ctypes.c_int32, [1] * (E - k + 1) + [0] * (k - 1))
        assert set_layer(c, 1, layer, disabled, None, None, E) == -8             # fewer enabled than used
        assert lib.llama_moe_steer_seq(c, 2, 1) == -1                            # seq >= n_seq_max
        assert lib.llama_moe_steer_seq(c, -2, 1) == -1
        assert lib.llama_moe_steer_seq(c, 0, -1) == -1
        assert lib.llama_moe_steer_clear(c, 0) == -1
        # after all that, the context still works and is unsteered
        ctx.decode([(0, [1, 2, 3], 0)])


def test_dense_model_is_refused(tmp_path):
    path = write_dense_gguf(tmp_path / "dense.gguf")
    with pytest.raises(NotMoEError, match="dense.gguf"):
        MoEModel(path)


def test_missing_and_corrupt_model_files(tmp_path, synth_model):
    with pytest.raises(ModelFileError, match="nope.gguf"):
        MoEModel(tmp_path / "nope.gguf")
    cut = tmp_path / "cut.gguf"
    data = synth_model("qwen3moe", "f32").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.gguf"):
        MoEModel(cut)


@pytest.mark.native
def test_out_of_range_profiles_are_refused_before_the_library(model):
    topo = model.topology
    for bad in (SteeringProfile.for_model(topo).disable(topo.n_layer, 0),
                SteeringProfile.for_model(topo).disable(topo.moe_layers[0], topo.n_expert),
                SteeringProfile.for_model(topo).scale(topo.moe_layers[0], 0, math.nan)):
        with pytest.raises(ProfileError):
            model.steer(bad)
    too_many = SteeringProfile.for_model(topo)
    for e in range(topo.n_expert_used + 1):
        too_many.force(topo.moe_layers[0], e)
    with pytest.raises(ProfileError, match="force"):
        model.steer(too_many)


@pytest.mark.native
def test_profile_for_another_model_is_refused(model, synth_model):
    other = MoEModel(synth_model("mixtral", "f32"), n_ctx=128, n_threads=2)
    try:
        prof = SteeringProfile.for_model(other.topology).disable(other.topology.moe_layers[0], 0)
    finally:
        other.close()
    with pytest.raises(ModelMismatchError):
        model.steer(prof)


def test_malformed_profile_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"format": "moe-gguf-profile", "version": 1, "entries": [')
    with pytest.raises(ProfileError, match="bad.json"):
        SteeringProfile.load(p)
    p.write_text(json.dumps({"format": "moe-gguf-profile", "version": 1,
                             "entries": [{"layer": 0, "expert": 1, "action": "explode"}]}))
    with pytest.raises(ProfileError, match="explode"):
        SteeringProfile.load(p)
