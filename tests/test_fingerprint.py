"""The model fingerprint identifies the router weights too: a profile on a fine-tune warns, another shape refuses."""

from __future__ import annotations

import json
import warnings

import pytest

from moe_gguf.errors import ModelMismatchError, ModelWeightsWarning
from moe_gguf.formats.profile import SteeringProfile
from moe_gguf.formats.synth import PRESETS, write_gguf
from moe_gguf.formats.topology import ModelTopology


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp")
    spec = PRESETS["tiny-qwen3moe"]
    a = write_gguf(spec, d / "a.gguf", name="base-model")
    b = write_gguf(spec.replace(seed=1), d / "b.gguf", name="fine-tune")  # same shape, other weights
    c = write_gguf(spec.replace(n_layer=spec.n_layer + 1), d / "c.gguf", name="deeper")
    return {k: ModelTopology.from_gguf(p) for k, p in (("a", a), ("b", b), ("c", c))}


def test_same_shape_other_weights_differ_only_in_the_weights_digest(models):
    a, b = models["a"], models["b"]
    assert a.weights and b.weights and a.weights != b.weights
    assert a.fingerprint_id() == b.fingerprint_id()  # the shape id stays comparable across fine-tunes


def test_profile_on_a_fine_tune_warns_naming_both_models(models):
    a, b = models["a"], models["b"]
    p = SteeringProfile.for_model(a, name="p").disable(a.moe_layers[0], 1)
    with pytest.warns(ModelWeightsWarning) as w:
        p.validate(b)
    msg = str(w[0].message)
    assert "base-model" in msg and "fine-tune" in msg and a.weights in msg and b.weights in msg


def test_profile_on_its_own_model_is_silent(models):
    a = models["a"]
    p = SteeringProfile.for_model(a).disable(a.moe_layers[0], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.validate(a)


def test_other_shape_still_refused_unless_allowed(models):
    a, c = models["a"], models["c"]
    p = SteeringProfile.for_model(a).disable(a.moe_layers[0], 1)
    with pytest.raises(ModelMismatchError, match="n_layer"):
        p.validate(c)
    p.validate(c, allow_mismatch=True)


def test_old_profile_without_weights_loads_and_applies_silently(models, tmp_path):
    a, b = models["a"], models["b"]
    old = {"format": "moe-gguf-profile", "version": 1, "name": "old", "model": {k: v for k, v in a.fingerprint().items() if k not in ("weights", "name")},
           "entries": [{"layer": a.moe_layers[0], "expert": 1, "action": "disable"}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    p = SteeringProfile.load(tmp_path / "old.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.validate(b)


def test_profile_file_carries_the_weights_and_a_bad_digest_is_refused(models, tmp_path):
    a = models["a"]
    p = SteeringProfile.for_model(a).disable(a.moe_layers[0], 1)
    p.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["model"]["weights"] == a.weights
    bad = json.loads((tmp_path / "p.json").read_text())
    bad["model"]["weights"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(Exception, match="model 'weights' must be a string"):
        SteeringProfile.load(tmp_path / "bad.json")
