"""Steering profiles: JSON round trip, validation messages, atomic save, strength and the C API arrays."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from moe_gguf.errors import ModelMismatchError, ProfileError
from moe_gguf.formats.profile import Schedule, SteeringEntry, SteeringProfile
from moe_gguf.formats.topology import ModelTopology

EXAMPLE = {
    "format": "moe-gguf-profile", "version": 1,
    "name": "no-refusal", "description": "example",
    "model": {"arch": "qwen3moe", "n_layer": 4, "n_expert": 16, "n_expert_used": 4, "moe_layers": [0, 1, 2, 3]},
    "entries": [
        {"layer": 1, "expert": 3, "action": "disable"},
        {"layer": 2, "expert": 7, "action": "force"},
        {"layer": 2, "expert": 5, "action": "bias", "value": -2.0},
        {"layer": 3, "expert": 1, "action": "scale", "value": 4.0},
    ],
    "schedule": {"apply_to": "all", "after_tokens": 0, "after_text": None},
    "meta": {},
}


def topo(**kw) -> ModelTopology:
    base = dict(arch="qwen3moe", n_layer=4, n_embd=32, n_expert=16, n_expert_used=4, moe_layers=(0, 1, 2, 3),
                n_shared_expert=0, gating="softmax", norm_weights=True, n_expert_groups=0, n_group_used=0, name="tiny")
    return ModelTopology(**(base | kw))


def parse(**changes) -> SteeringProfile:
    return SteeringProfile.from_dict(EXAMPLE | changes)


def with_entries(*entries: dict) -> dict:
    return {"entries": list(entries)}


def raises(match: str, *, entry: int | None = None, exc: type[Exception] = ProfileError):
    """pytest.raises that also checks the message names entries[entry]."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc, match=match)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.cm.__exit__(*a)
            if entry is not None:
                assert f"entries[{entry}]" in str(self.info.value), str(self.info.value)
            return out
    return _Ctx()


# -- round trip ------------------------------------------------------------------------------------------------


def test_example_parses():
    p = SteeringProfile.from_dict(EXAMPLE)
    assert p.name == "no-refusal" and p.schedule == Schedule()
    assert p.entries[2] == SteeringEntry(2, 5, "bias", -2.0)
    p.validate(topo())


def test_round_trip_json_and_file(tmp_path):
    p = (SteeringProfile.for_model(topo(), name="x", description="d", meta={"source": "test"},
                                   schedule=Schedule("generated", 3, "Answer:"))
         .disable(1, 3).force(2, 7).bias(2, 5, -2).scale(3, 1, 4.0).bias(3, 1, 0.5))
    assert SteeringProfile.from_json(p.to_json()) == p
    p.save(tmp_path / "p.json")
    q = SteeringProfile.load(tmp_path / "p.json")
    assert q == p and q.model == topo().fingerprint() and isinstance(q.entries[2].value, float)
    assert json.loads((tmp_path / "p.json").read_text())["entries"][0] == {"layer": 1, "expert": 3, "action": "disable"}
    # one entry per line
    assert '{"layer": 2, "expert": 5, "action": "bias", "value": -2.0}' in p.to_json()


def test_defaults_and_nulls():
    p = SteeringProfile.from_dict({"format": "moe-gguf-profile", "version": 1, "entries": [],
                                   "name": None, "model": None, "schedule": None, "meta": None})
    assert p == SteeringProfile()
    assert SteeringProfile.from_json(SteeringProfile().to_json()) == SteeringProfile()


def test_numpy_ints_are_normalised():
    p = SteeringProfile().disable(np.int64(1), np.int32(3)).bias(1, 4, np.float32(0.5))
    p.validate()
    assert p.entries[0] == SteeringEntry(1, 3, "disable") and type(p.entries[0].layer) is int
    json.loads(p.to_json())


# -- malformed profiles ------------------------------------------------------------------------------------------


def test_malformed_json_has_line_and_column():
    with raises("line 3, column 5"):
        SteeringProfile.from_json('{\n  "format": "moe-gguf-profile",\n    ,\n}')


@pytest.mark.parametrize("changes, match", [
    ({"format": "llama-steer"}, "not a moe-gguf profile"),
    ({"version": 2}, "upgrade moe-gguf"),
    ({"version": 0}, "unsupported profile version 0"),
    ({"version": "1"}, "'version' must be an integer"),
    ({"version": True}, "'version' must be an integer"),
    ({"entries": {}}, "'entries' must be a list"),
    ({"extra": 1}, "unknown field 'extra'.*meta"),
    ({"name": 3}, "'name' and 'description' must be strings"),
    ({"meta": []}, "'meta' must be an object"),
    ({"schedule": {"apply_to": "prompt"}}, "apply_to"),
    ({"schedule": {"after_tokens": -1}}, "after_tokens"),
    ({"schedule": {"after_tokens": True}}, "after_tokens"),
    ({"schedule": {"after_text": 5}}, "after_text"),
    ({"schedule": {"start": 1}}, "unknown field 'start'"),
    ({"schedule": []}, "'schedule' must be an object"),
    ({"model": "qwen3moe"}, "'model' must be an object"),
    ({"model": {"arch": "x", "n_experts": 4}}, "unknown field 'n_experts'"),
    ({"model": {"n_expert": -1}}, "'n_expert' must be an integer >= 0"),
    ({"model": {"moe_layers": [0, "1"]}}, "moe_layers"),
])
def test_bad_top_level(changes, match):
    with raises(match):
        parse(**changes)


def test_not_an_object_and_missing_entries():
    with raises("JSON object"):
        SteeringProfile.from_json("[1, 2]")
    with raises("'entries' is missing"):
        SteeringProfile.from_dict({k: v for k, v in EXAMPLE.items() if k != "entries"})


@pytest.mark.parametrize("entry, match", [
    ({"layer": 1, "expert": 3, "action": "mute"}, "unknown action \"mute\"; use one of disable, force, bias, scale"),
    ({"layer": 1, "expert": 3, "action": "bias"}, "needs a 'value'"),
    ({"layer": 1, "expert": 3, "action": "scale", "value": None}, "needs a 'value'"),
    ({"layer": 1, "expert": 3, "action": "disable", "value": 1.0}, "takes no 'value'"),
    ({"layer": 1, "expert": 3, "action": "force", "value": 0}, "takes no 'value'"),
    ({"layer": 1, "expert": 3, "action": "bias", "value": float("nan")}, "must be finite"),
    ({"layer": 1, "expert": 3, "action": "scale", "value": float("inf")}, "must be finite"),
    ({"layer": 1, "expert": 3, "action": "scale", "value": -1.0}, "scale must be >= 0"),
    ({"layer": 1, "expert": 3, "action": "bias", "value": "2"}, "'value' must be a number"),
    ({"layer": 1, "expert": 3, "action": "bias", "value": True}, "'value' must be a number"),
    ({"layer": -1, "expert": 3, "action": "disable"}, "'layer' must be >= 0"),
    ({"layer": 1, "expert": -2, "action": "disable"}, "'expert' must be >= 0"),
    ({"layer": True, "expert": 3, "action": "disable"}, "'layer' must be an integer, found true"),
    ({"layer": 1, "expert": False, "action": "disable"}, "'expert' must be an integer, found false"),
    ({"layer": 1.0, "expert": 3, "action": "disable"}, "'layer' must be an integer"),
    ({"layer": 1, "expert": 3}, "missing 'action'"),
    ({"layer": 1, "expert": 3, "action": "disable", "weight": 1}, "unknown field 'weight'"),
    ("disable 1 3", "an entry is an object"),
])
def test_bad_entry_is_named(entry, match):
    entries = [{"layer": 0, "expert": 0, "action": "force"}, entry]
    with raises(match, entry=1) as e:
        parse(entries=entries)
    assert json.dumps(entry["action"] if isinstance(entry, dict) and "action" in entry else entry) in str(e.value)


def test_nan_literal_in_json_file():
    text = json.dumps(EXAMPLE).replace("-2.0", "NaN")
    with raises("must be finite", entry=2):
        SteeringProfile.from_json(text)


@pytest.mark.parametrize("a, b", [("disable", "force"), ("disable", "bias"), ("disable", "scale"), ("force", "disable")])
def test_conflicting_actions(a, b):
    e = [{"layer": 1, "expert": 3, "action": x} | ({"value": 1.0} if x in ("bias", "scale") else {}) for x in (a, b)]
    with raises("conflict: a disabled expert", entry=1) as info:
        parse(**with_entries(*e))
    assert "entries[0]" in str(info.value)


def test_duplicate_action():
    with raises("both bias expert 3 of layer 1; keep one", entry=1):
        parse(**with_entries({"layer": 1, "expert": 3, "action": "bias", "value": 1.0},
                             {"layer": 1, "expert": 3, "action": "bias", "value": 2.0}))


@pytest.mark.parametrize("a, b", [("bias", "scale"), ("force", "scale"), ("force", "bias")])
def test_combinable_actions(a, b):
    p = SteeringProfile()
    for x in (a, b):
        getattr(p, x)(1, 3, 2.0) if x in ("bias", "scale") else getattr(p, x)(1, 3)
    p.validate(topo())


def test_builder_mistakes_are_caught_by_validate():
    with raises("conflict", entry=1):
        SteeringProfile().disable(1, 3).force(1, 3).validate()
    with raises("must be finite", entry=1):
        SteeringProfile().disable(1, 3).bias(1, 4, float("inf")).validate()


def test_validate_catches_edits_after_construction():
    p = SteeringProfile(entries=[SteeringEntry(1, 3, "disable"), SteeringEntry(1, 3, "zap")])
    with raises("unknown action", entry=1):
        p.validate()


# -- against a model -------------------------------------------------------------------------------------------


def test_layer_out_of_range():
    with raises("layer 9 does not exist.*0-3", entry=0):
        parse(model=None, **with_entries({"layer": 9, "expert": 3, "action": "disable"})).validate(topo())


def test_dense_layer_lists_moe_layers():
    t = topo(moe_layers=(1, 2, 3))
    with raises("layer 0 is a dense layer.*MoE layers are 1-3", entry=0):
        parse(model=None, **with_entries({"layer": 0, "expert": 3, "action": "disable"})).validate(t)


def test_expert_out_of_range():
    with raises("expert 16 does not exist.*0-15", entry=1):
        parse(model=None, **with_entries({"layer": 1, "expert": 3, "action": "disable"},
                                         {"layer": 1, "expert": 16, "action": "force"})).validate(topo())


def test_too_many_forced():
    p = SteeringProfile()
    for x in range(5):
        p.force(2, x)
    with raises("layer 2: 5 experts forced .*entries\\[4\\] expert 4.*force at most 4"):
        p.validate(topo())
    p.entries.pop()
    p.validate(topo())


def test_too_many_disabled():
    p = SteeringProfile()
    for x in range(13):
        p.disable(0, x)
    with raises("layer 0: 13 of 16 experts disabled .*entries\\[12\\] expert 12.*disable at most 12"):
        p.validate(topo())
    p.entries.pop()
    p.validate(topo())


def test_forced_experts_must_fit_the_expert_groups():
    t = topo(n_expert_groups=4, n_group_used=2)  # groups of 4 experts
    SteeringProfile().force(1, 0).force(1, 5).validate(t)
    with raises("3 expert groups \\[0, 1, 3\\]"):
        SteeringProfile().force(1, 0).force(1, 5).force(1, 12).validate(t)


def test_not_a_moe_model():
    with raises("no routed experts"):
        parse(model=None).validate(topo(n_expert=0, n_expert_used=0, moe_layers=()))


def test_model_mismatch_names_fields():
    p = parse()
    t = topo(n_expert=32, n_layer=6, moe_layers=(0, 1, 2, 3, 4, 5))
    with raises("n_layer: profile 4, model 6; n_expert: profile 16, model 32; moe_layers: profile \\[0-3\\], model "
                "\\[0-5\\].*--allow-model-mismatch", exc=ModelMismatchError):
        p.validate(t)
    p.validate(t, allow_mismatch=True)  # every entry fits the bigger model
    assert 1 in p.layer_arrays(t)


def test_model_mismatch_that_does_not_fit():
    small = topo(n_expert=4, n_expert_used=2)
    with raises("expert 7 does not exist.*made for a different model: n_expert: profile 16, model 4", entry=1) as e:
        parse().validate(small, allow_mismatch=True)
    assert not isinstance(e.value, ModelMismatchError)


def test_partial_model_fingerprint_compares_what_it_has():
    parse(model={"arch": "qwen3moe"}).validate(topo(n_expert=32))
    with raises("arch: profile 'qwen3moe', model 'mixtral'", exc=ModelMismatchError):
        parse(model={"arch": "qwen3moe"}).validate(topo(arch="mixtral"))


# -- files -----------------------------------------------------------------------------------------------------


def test_load_missing(tmp_path):
    with raises("no such profile file") as e:
        SteeringProfile.load(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(e.value)


def test_load_directory(tmp_path):
    with raises("is a directory"):
        SteeringProfile.load(tmp_path)


def test_load_not_utf8(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00\xff\xfe")
    with raises("not UTF-8") as e:
        SteeringProfile.load(path)
    assert str(path) in str(e.value)


def test_load_error_names_path_and_entry(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(EXAMPLE | with_entries({"layer": 1, "expert": 3, "action": "nuke"})))
    with raises("unknown action", entry=0) as e:
        SteeringProfile.load(path)
    assert str(e.value).startswith(str(path))


def test_load_bom(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(EXAMPLE).encode())
    assert SteeringProfile.load(path).name == "no-refusal"


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    SteeringProfile(name="old").save(path)
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with raises("No space left on device.*not changed"):
        SteeringProfile(name="new").disable(1, 2).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.json"]  # no temp file left


def test_save_interrupted_by_other_error(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    SteeringProfile(name="old").save(path)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        SteeringProfile(name="new").save(path)
    assert SteeringProfile.load(path).name == "old" and os.listdir(tmp_path) == ["p.json"]


def test_save_mode_and_missing_directory(tmp_path):
    path = tmp_path / "p.json"
    SteeringProfile().save(path)
    assert path.stat().st_mode & 0o777 == 0o644
    with raises("cannot save"):
        SteeringProfile().save(tmp_path / "no" / "p.json")


def test_meta_must_be_json(tmp_path):
    with raises("'meta' cannot be written as JSON"):
        SteeringProfile(meta={"x": float("nan")}).save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_save_refuses_invalid_profile(tmp_path):
    p = SteeringProfile(entries=[SteeringEntry(1, 3, "bias")])
    with raises("needs a 'value'", entry=0):
        p.save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


# -- strength and arrays ---------------------------------------------------------------------------------------


def test_layer_arrays():
    arrays = parse().layer_arrays(topo())
    assert list(arrays) == [1, 2, 3]  # only steered layers
    for action, bias, scale in arrays.values():
        assert action.dtype == np.int32 and bias.dtype == np.float32 and scale.dtype == np.float32
        assert action.shape == bias.shape == scale.shape == (16,)
    action, bias, scale = arrays[2]
    assert action[7] == 2 and bias[5] == -2.0 and action.sum() == 2 and bias.sum() == -2.0 and (scale == 1).all()
    assert arrays[1][0][3] == 1 and arrays[3][2][1] == 4.0


def test_strength():
    p = parse()
    half = p.layer_arrays(topo(), strength=0.5)
    assert half[2][1][5] == -1.0 and half[3][2][1] == 2.0  # bias * s, scale ** s
    assert half[1][0][3] == 1 and half[2][0][7] == 2  # disable / force unchanged
    zero = p.layer_arrays(topo(), strength=0.0)
    assert (zero[2][1] == 0).all() and (zero[3][2] == 1).all() and zero[1][0][3] == 1
    neg = p.layer_arrays(topo(), strength=-1.0)
    assert neg[2][1][5] == 2.0 and neg[3][2][1] == 0.25


def test_with_strength_returns_a_copy():
    p = parse()
    q = p.with_strength(2.0)
    assert q.entries[2].value == -4.0 and q.entries[3].value == 16.0 and q.entries[:2] == p.entries[:2]
    assert p.entries[2].value == -2.0 and q.model == p.model and q.model is not p.model


@pytest.mark.parametrize("s", [float("nan"), float("inf"), "1", True])
def test_bad_strength(s):
    with raises("strength must be a finite number"):
        parse().with_strength(s)


def test_strength_overflow():
    with raises("smaller strength", entry=3):
        parse().with_strength(1000.0)
    p = SteeringProfile().bias(1, 1, 1e30)
    with raises("smaller strength", entry=0):
        p.layer_arrays(topo(), strength=1e10)


# -- helpers ---------------------------------------------------------------------------------------------------


def test_for_model_experts_summary():
    p = SteeringProfile.for_model(topo(), name="s").scale(2, 1, 0.5).disable(1, 3).force(2, 1)
    assert p.model == topo().fingerprint()
    assert p.experts() == [(1, 3, "disable", None), (2, 1, "force", None), (2, 1, "scale", 0.5)]
    text = p.summary()
    assert "'s': 3 entries in 2 layers (1 disable, 1 force, 1 scale)" in text
    assert "layer 2: force 1, scale 1 (0.5)" in text and "for model: qwen3moe" in text
    sched = replace(p, schedule=Schedule("generated", 4, "Answer:")).summary()
    assert "generated tokens, after 4 generated tokens, after the text 'Answer:'" in sched


def test_scale_zero_is_zero_ablation_at_any_positive_strength():
    p = SteeringProfile.for_model(topo()).scale(2, 1, 0.0)
    assert p.with_strength(0.5).entries[0].value == 0.0
    assert p.with_strength(0.0).entries[0].value == 1.0  # strength 0: neutral
    with pytest.raises(ProfileError, match="strength"):
        p.with_strength(-1.0)
