"""Versioned JSON steering profiles: which experts of which MoE layers to disable, force, bias or scale.

    p = SteeringProfile.for_model(topo, name="no-refusal").disable(1, 3).bias(2, 5, -2.0)
    p.save("no-refusal.json")
    p = SteeringProfile.load("no-refusal.json"); p.validate(topo)
    for layer, (action, bias, scale) in p.layer_arrays(topo, strength=0.5).items(): ...
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moe_gguf._io import atomic_write
from moe_gguf.errors import FileWriteError, ModelMismatchError, ModelWeightsWarning, ProfileError
from moe_gguf.formats.topology import ModelTopology, format_layers

FORMAT = "moe-gguf-profile"
VERSION = 1

Action = Literal["disable", "force", "bias", "scale"]
ACTIONS: tuple[str, ...] = ("disable", "force", "bias", "scale")
# llama_moe_steer_action in the patched llama.h
ACTION_KEEP, ACTION_DISABLE, ACTION_FORCE = 0, 1, 2  # enum llama_moe_steer_action in the patched llama.h

_VALUED = ("bias", "scale")
# actions that may target the same expert together; a disabled expert is never selected, so it combines with nothing
_COMBINABLE = {frozenset(("bias", "scale")), frozenset(("force", "scale")), frozenset(("force", "bias"))}
_TOP_KEYS = ("format", "version", "name", "description", "model", "entries", "schedule", "meta")
_ENTRY_KEYS = ("layer", "expert", "action", "value")
_SHAPE_KEYS = ("arch", "n_layer", "n_expert", "n_expert_used", "moe_layers")  # must match
_MODEL_KEYS = (*_SHAPE_KEYS, "weights", "name")  # weights: router digest (a warning if it differs); name: shown
_SCHEDULE_KEYS = ("apply_to", "after_tokens", "after_text")


@dataclass(frozen=True)
class SteeringEntry:
    layer: int
    expert: int
    action: Action
    value: float | None = None  # bias: added to the router logit; scale: multiplies the routing weight

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.layer, "expert": self.expert, "action": self.action}
        if self.value is not None:
            d["value"] = self.value
        return d


@dataclass(frozen=True)
class Schedule:
    """When steering starts: on every token ("all") or generated tokens only, after a count or a text."""

    apply_to: Literal["all", "generated"] = "all"
    after_tokens: int = 0
    after_text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"apply_to": self.apply_to, "after_tokens": self.after_tokens, "after_text": self.after_text}


@dataclass
class SteeringProfile:
    entries: list[SteeringEntry] = field(default_factory=list)
    model: dict[str, Any] | None = None  # ModelTopology.fingerprint() of the model it was made for
    name: str = ""
    description: str = ""
    schedule: Schedule = field(default_factory=Schedule)
    meta: dict[str, Any] = field(default_factory=dict)  # free-form: provenance, notes, tool data

    # -- builders (chainable) --------------------------------------------------------------------------

    def disable(self, layer: int, expert: int) -> SteeringProfile:
        return self._add(layer, expert, "disable", None)

    def force(self, layer: int, expert: int) -> SteeringProfile:
        return self._add(layer, expert, "force", None)

    def bias(self, layer: int, expert: int, value: float) -> SteeringProfile:
        return self._add(layer, expert, "bias", value)

    def scale(self, layer: int, expert: int, value: float) -> SteeringProfile:
        return self._add(layer, expert, "scale", value)

    def _add(self, layer: int, expert: int, action: Action, value: float | None) -> SteeringProfile:
        # not checked here: validate() (run by save, to_json and before steering) names the bad entry
        self.entries.append(SteeringEntry(layer, expert, action, value))
        return self

    @classmethod
    def for_model(cls, topology: ModelTopology, **kw: Any) -> SteeringProfile:
        return cls(model=topology.fingerprint(), **kw)

    @classmethod
    def combine(cls, profiles: Sequence[SteeringProfile]) -> SteeringProfile:
        """One profile holding the entries of several, in order (``--profile A --profile B``).

        The name joins theirs with "+", the model fingerprint is the first one given, the schedule is the
        first profile's; descriptions and meta are kept (joined / merged, earlier profiles win). One profile
        is returned as it is. Raises ProfileError if the result is invalid (e.g. two entries for one expert).
        """
        if not profiles:
            raise ProfileError("no profiles to combine")
        if len(profiles) == 1:
            return profiles[0]
        first = profiles[0]
        meta: dict[str, Any] = {}
        for p in reversed(profiles):
            meta.update(copy.deepcopy(p.meta))
        combined = cls(entries=[e for p in profiles for e in p.entries],
                       model=copy.deepcopy(next((p.model for p in profiles if p.model), None)),
                       name="+".join(p.name for p in profiles if p.name),
                       description="\n".join(p.description for p in profiles if p.description),
                       schedule=first.schedule, meta=meta)
        combined.validate()
        return combined

    # -- JSON ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "description": self.description,
            "model": copy.deepcopy(self.model),
            "entries": [e.to_dict() for e in self.entries],
            "schedule": self.schedule.to_dict(),
            "meta": copy.deepcopy(self.meta),
        }

    def to_json(self) -> str:
        self.validate()
        d = self.to_dict()
        # one line per entry and for the model fingerprint, so long profiles stay readable and diff well
        tag = uuid.uuid4().hex
        inline = {f"{tag}{i}": json.dumps(e, allow_nan=False) for i, e in enumerate(d["entries"])}
        d["entries"] = list(inline)
        if d["model"] is not None:
            inline[f"{tag}m"] = json.dumps(d["model"], ensure_ascii=False, allow_nan=False)
            d["model"] = f"{tag}m"
        try:
            text = json.dumps(d, indent=2, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:  # meta is free-form, so it can hold what JSON cannot
            raise ProfileError(f"{self._label()}: 'meta' cannot be written as JSON ({e}); keep it to JSON types") from e
        for key, value in inline.items():
            text = text.replace(json.dumps(key), value, 1)
        _check_text(text, self._label())
        return text + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> SteeringProfile:
        """Build a profile from parsed JSON; `source` (a path) prefixes error messages."""
        prefix = source or "profile"
        if not isinstance(data, dict):
            raise ProfileError(f"{prefix}: a profile is a JSON object, found {_json_type(data)}")
        if data.get("format") != FORMAT:
            raise ProfileError(f"{prefix}: not a moe-gguf profile: 'format' is {data.get('format')!r}, "
                               f"expected {FORMAT!r}. Is this the right file?")
        version = data.get("version")
        if not _is_int(version):
            raise ProfileError(f"{prefix}: 'version' must be an integer (this moe-gguf writes {VERSION}), found {version!r}")
        if version > VERSION:
            raise ProfileError(f"{prefix}: profile version {version} is newer than this moe-gguf supports "
                               f"(version {VERSION}); upgrade moe-gguf to use it")
        if version < 1:
            raise ProfileError(f"{prefix}: unsupported profile version {version}; the first version is 1")
        _no_unknown(data, _TOP_KEYS, prefix, "the profile", hint="; put custom data under 'meta'")
        if "entries" not in data:
            raise ProfileError(f"{prefix}: 'entries' is missing; add \"entries\": [] for a profile that steers nothing")
        entries_raw = data["entries"]
        if not isinstance(entries_raw, list):
            raise ProfileError(f"{prefix}: 'entries' must be a list, found {_json_type(entries_raw)}")

        entries = []
        for i, raw in enumerate(entries_raw):
            where = f"{prefix}: entries[{i}] {_show(raw)}"
            if not isinstance(raw, dict):
                raise ProfileError(f"{where}: an entry is an object like "
                                   '{"layer": 1, "expert": 3, "action": "disable"}')
            _no_unknown(raw, _ENTRY_KEYS, where, "an entry")
            missing = [k for k in ("layer", "expert", "action") if k not in raw]
            if missing:
                raise ProfileError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
            entries.append(SteeringEntry(raw["layer"], raw["expert"], raw["action"], raw.get("value")))

        schedule_raw = data.get("schedule")
        if schedule_raw is None:
            schedule = Schedule()
        elif isinstance(schedule_raw, dict):
            _no_unknown(schedule_raw, _SCHEDULE_KEYS, prefix, "'schedule'")
            schedule = Schedule(**schedule_raw)
        else:
            raise ProfileError(f"{prefix}: 'schedule' must be an object, found {_json_type(schedule_raw)}")

        def opt(key: str, empty: Any) -> Any:  # null is the same as leaving the field out
            return empty if data.get(key) is None else data[key]

        profile = cls(entries=entries, model=data.get("model"), name=opt("name", ""),
                      description=opt("description", ""), schedule=schedule, meta=opt("meta", {}))
        profile.validate(source=source)
        return profile

    @classmethod
    def from_json(cls, text: str, *, source: str | None = None) -> SteeringProfile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{source or 'profile'}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        except (ValueError, RecursionError) as e:  # an integer of > 4300 digits; nesting deeper than Python's stack
            raise ProfileError(f"{source or 'profile'}: invalid JSON ({e})") from e
        _check_text(data, source or "profile")
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringProfile:
        path = Path(path).expanduser()
        try:
            raw = path.read_bytes()
        except FileNotFoundError as e:
            raise ProfileError(f"{path}: no such profile file; check the path") from e
        except IsADirectoryError as e:
            raise ProfileError(f"{path}: is a directory; give the path of a profile .json file") from e
        except OSError as e:
            raise ProfileError(f"{path}: cannot read the profile ({e.strerror or e})") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProfileError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); a profile is a UTF-8 JSON "
                               "file. Was a binary (e.g. a .gguf) given instead?") from e
        return cls.from_json(text.removeprefix("\ufeff"), source=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: readers see the old file or the new one, never a partial one."""
        path = Path(path).expanduser()
        try:
            atomic_write(path, self.to_json().encode("utf-8"))
        except FileWriteError as e:
            raise ProfileError(str(e)) from e

    # -- validation ------------------------------------------------------------------------------------

    def validate(self, topology: ModelTopology | None = None, *, allow_mismatch: bool = False,
                 source: str | None = None) -> None:
        """Raise ProfileError if the profile is malformed or, given a topology, does not fit that model.

        A profile made for another model (its `model` differs from topology.fingerprint()) raises
        ModelMismatchError, unless allow_mismatch: then it is used if every entry fits the model.
        `source` (a path) prefixes error messages; by default the profile's name.
        """
        source = source or self._label()
        if not isinstance(self.name, str) or not isinstance(self.description, str):
            raise ProfileError(f"{source}: 'name' and 'description' must be strings")
        if not isinstance(self.meta, dict):
            raise ProfileError(f"{source}: 'meta' must be an object, found {_json_type(self.meta)}")
        if _depth(self.meta) > _MAX_META_DEPTH:
            raise ProfileError(f"{source}: 'meta' is nested more than {_MAX_META_DEPTH} levels deep")
        _check_schedule(self.schedule, source)
        _check_model(self.model, source)
        if not isinstance(self.entries, list):
            raise ProfileError(f"{source}: 'entries' must be a list, found {_json_type(self.entries)}")
        self.entries[:] = [_checked_entry(i, e, source) for i, e in enumerate(self.entries)]
        _check_conflicts(self.entries, source)
        if topology is None:
            return

        if not topology.is_moe:
            raise ProfileError(f"{source}: {topology.name} ({topology.arch}) has no routed experts, so there is "
                               "nothing to steer; use a Mixture-of-Experts model")
        diffs = self._mismatches(topology)
        if diffs and not allow_mismatch:
            raise ModelMismatchError(
                f"{source}: made for a different model ({'; '.join(diffs)}). Use a profile made "
                f"for {topology.name}, or allow the mismatch (--allow-model-mismatch) to apply it if every entry fits.")
        note = f" (the profile was made for a different model: {'; '.join(diffs)})" if diffs else ""
        self._check_fits(topology, source, note)
        theirs = self.model or {}
        if not diffs and theirs.get("weights") and topology.weights and theirs["weights"] != topology.weights:
            warnings.warn(ModelWeightsWarning(
                f"{source}: made for {theirs.get('name') or 'another model'} (router weights {theirs['weights']}), "
                f"applied to {topology.name} (router weights {topology.weights}): the same shape with other weights "
                "(a fine-tune, or another model); its experts may play other roles there"), stacklevel=2)

    def _mismatches(self, topology: ModelTopology) -> list[str]:
        fp = topology.fingerprint()
        theirs = self.model or {}
        out = []
        for key in _SHAPE_KEYS:
            if key in theirs and theirs[key] != fp[key]:
                a, b = theirs[key], fp[key]
                if key == "moe_layers":
                    a, b = f"[{format_layers(a)}]", f"[{format_layers(b)}]"
                out.append(f"{key}: profile {a!r}, model {b!r}" if key == "arch" else f"{key}: profile {a}, model {b}")
        return out

    def _check_fits(self, topo: ModelTopology, source: str, note: str) -> None:
        moe = set(topo.moe_layers)
        by_layer: dict[int, list[tuple[int, SteeringEntry]]] = defaultdict(list)
        for i, e in enumerate(self.entries):
            where = f"{source}: {_name(i, e)}"
            if e.layer >= topo.n_layer:
                raise ProfileError(f"{where}: layer {e.layer} does not exist, the model has layers 0-{topo.n_layer - 1} "
                                   f"(MoE layers: {format_layers(topo.moe_layers)}){note}")
            if e.layer not in moe:
                raise ProfileError(f"{where}: layer {e.layer} is a dense layer without routed experts; the MoE layers "
                                   f"are {format_layers(topo.moe_layers)}{note}")
            if e.expert >= topo.n_expert:
                raise ProfileError(f"{where}: expert {e.expert} does not exist, the model has experts "
                                   f"0-{topo.n_expert - 1} per MoE layer{note}")
            by_layer[e.layer].append((i, e))

        n_used = topo.n_expert_used
        for layer, items in sorted(by_layer.items()):
            forced = [(i, e) for i, e in items if e.action == "force"]
            disabled = [(i, e) for i, e in items if e.action == "disable"]
            if len(forced) > n_used:
                raise ProfileError(f"{source}: layer {layer}: {len(forced)} experts forced ({_names(forced)}) but the model "
                                   f"selects {n_used} per token; force at most {n_used} experts per layer{note}")
            if topo.n_expert_groups > 1 and forced:
                # forced experts are always selected, so their groups must all fit in the groups selected per token
                per_group = topo.n_expert // topo.n_expert_groups
                groups = sorted({e.expert // per_group for _, e in forced})
                if len(groups) > topo.n_group_used:
                    raise ProfileError(f"{source}: layer {layer}: forced experts ({_names(forced)}) lie in {len(groups)} "
                                       f"expert groups {groups}, but the model routes within {topo.n_group_used} groups "
                                       f"per token ({per_group} experts each); force experts from fewer groups{note}")
            if topo.n_expert - len(disabled) < n_used:
                raise ProfileError(f"{source}: layer {layer}: {len(disabled)} of {topo.n_expert} experts disabled "
                                   f"({_names(disabled)}), leaving fewer than the {n_used} the model selects per token; "
                                   f"disable at most {topo.n_expert - n_used}{note}")

    # -- use -------------------------------------------------------------------------------------------

    def layer_arrays(self, topology: ModelTopology, strength: float = 1.0
                     ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per steered layer, the (action int32, bias float32, scale float32) vectors of the C API.

        strength multiplies biases and raises scales to its power (interpolation in log space);
        disable and force are on/off and do not change with it.
        """
        self.validate(topology, allow_mismatch=True)
        n = topology.n_expert
        out: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for i, e in enumerate(self.with_strength(strength).entries):
            if e.layer not in out:
                out[e.layer] = (np.full(n, ACTION_KEEP, np.int32), np.zeros(n, np.float32), np.ones(n, np.float32))
            action, bias, scale = out[e.layer]
            with np.errstate(over="ignore", under="ignore"):  # checked below
                if e.action == "disable":
                    action[e.expert] = ACTION_DISABLE
                elif e.action == "force":
                    action[e.expert] = ACTION_FORCE
                elif e.action == "bias":
                    bias[e.expert] = e.value
                else:
                    scale[e.expert] = e.value
            if not (math.isfinite(bias[e.expert]) and math.isfinite(scale[e.expert]) and scale[e.expert] >= 0):
                raise ProfileError(f"{self._label()}: {_name(i, self.entries[i])}: with strength {strength} its value leaves the "
                                   "float32 range; use a smaller strength")
        return dict(sorted(out.items()))

    def with_strength(self, s: float) -> SteeringProfile:
        """A copy with biases multiplied by s and scales raised to the power s (a scale of 0 stays 0 for s > 0)."""
        if not _is_number(s) or not math.isfinite(s):
            raise ProfileError(f"strength must be a finite number, got {s!r}")
        self.validate()
        entries = []
        for i, e in enumerate(self.entries):
            if e.action in _VALUED:
                try:
                    if e.action == "bias":
                        v = e.value * s
                    elif e.value == 0:  # zero-ablation: on at any positive strength, neutral at 0
                        v = 0.0 if s > 0 else 1.0 if s == 0 else math.inf
                    else:
                        v = e.value ** s
                except OverflowError:
                    v = math.inf
                if not math.isfinite(v) or (e.action == "scale" and v < 0):
                    raise ProfileError(f"{self._label()}: {_name(i, e)}: strength {s} makes its value {v}; use a smaller strength")
                e = replace(e, value=float(v))
            entries.append(e)
        return replace(self, entries=entries, model=copy.deepcopy(self.model), meta=copy.deepcopy(self.meta))

    def experts(self) -> list[tuple[int, int, str, float | None]]:
        """(layer, expert, action, value) for every entry, by layer and expert."""
        order = {a: k for k, a in enumerate(ACTIONS)}
        return sorted(((e.layer, e.expert, e.action, e.value) for e in self.entries),
                      key=lambda t: (t[0], t[1], order[t[2]]))

    def summary(self) -> str:
        counts = Counter(e.action for e in self.entries)
        layers = sorted({e.layer for e in self.entries})
        lines = [f"{self._label()}: {len(self.entries)} entries in {len(layers)} layers"
                 + (f" ({', '.join(f'{counts[a]} {a}' for a in ACTIONS if counts[a])})" if counts else "")]
        if self.description:
            lines.append(f"  {self.description}")
        if self.model:
            m = self.model
            shape = ", ".join(f"{k} {m[k]}" for k in ("n_layer", "n_expert", "n_expert_used") if k in m)
            lines.append(f"  for model: {m.get('arch', '?')}" + (f" ({shape})" if shape else ""))
        sc = self.schedule
        when = "prompt and generated tokens" if sc.apply_to == "all" else "generated tokens"
        if sc.after_tokens:
            when += f", after {sc.after_tokens} generated tokens"
        if sc.after_text:
            when += f", after the text {sc.after_text!r}"
        lines.append(f"  steers: {when}")
        for layer in layers:
            parts = [f"{a} {x}" if v is None else f"{a} {x} ({v:g})" for il, x, a, v in self.experts() if il == layer]
            lines.append(f"  layer {layer}: " + ", ".join(parts))
        return "\n".join(lines)

    def _label(self) -> str:
        return f"profile {self.name!r}" if self.name else "profile"


# -- checks ------------------------------------------------------------------------------------------------


def _checked_entry(i: int, e: Any, source: str) -> SteeringEntry:
    """`e` with ints and floats normalised; ProfileError naming entries[i] if it is malformed."""
    if not isinstance(e, SteeringEntry):
        raise ProfileError(f"{source}: entries[{i}] is a {type(e).__name__}, not a SteeringEntry")
    where = f"{source}: {_name(i, e)}"
    for key in ("layer", "expert"):
        v = getattr(e, key)
        if not _is_int(v):
            raise ProfileError(f"{where}: '{key}' must be an integer, found {_show(v)}")
        if v < 0:
            raise ProfileError(f"{where}: '{key}' must be >= 0 (indices count from 0), found {v}")
    if e.action not in ACTIONS:
        raise ProfileError(f"{where}: unknown action {_show(e.action)}; use one of {', '.join(ACTIONS)}")
    value = e.value
    if e.action in _VALUED:
        if value is None:
            example = "-2.0 to discourage, 2.0 to encourage" if e.action == "bias" else "0.5 to halve, 2.0 to double"
            raise ProfileError(f"{where}: action {e.action!r} needs a 'value' ({example})")
        if not _is_number(value):
            raise ProfileError(f"{where}: 'value' must be a number, found {_show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            value = math.inf
        if not math.isfinite(value):
            raise ProfileError(f"{where}: 'value' must be finite, found {value}")
        if e.action == "scale" and value < 0:
            raise ProfileError(f"{where}: a scale must be >= 0 (0 zero-ablates the expert in its slot; "
                               "to let the next expert take its slot, use action 'disable')")
    elif value is not None:
        raise ProfileError(f"{where}: action {e.action!r} takes no 'value'; remove it, or use 'bias' or 'scale'")
    return SteeringEntry(int(e.layer), int(e.expert), e.action, value)


def _check_conflicts(entries: list[SteeringEntry], source: str) -> None:
    seen: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, e in enumerate(entries):
        for j in seen[(e.layer, e.expert)]:
            other = entries[j]
            here = f"{source}: {_name(i, e)} and {_name(j, other)}"
            if other.action == e.action:
                raise ProfileError(f"{here} both {e.action} expert {e.expert} of layer {e.layer}; keep one of them")
            if frozenset((e.action, other.action)) not in _COMBINABLE:
                raise ProfileError(f"{here} conflict: a disabled expert is never selected, so it cannot also be "
                                   f"{'forced' if 'force' in (e.action, other.action) else 'biased or scaled'}; "
                                   "remove one of them")
        seen[(e.layer, e.expert)].append(i)


def _check_schedule(sc: Any, source: str) -> None:
    if not isinstance(sc, Schedule):
        raise ProfileError(f"{source}: 'schedule' must be a Schedule, found {type(sc).__name__}")
    if sc.apply_to not in ("all", "generated"):
        raise ProfileError(f"{source}: schedule 'apply_to' must be \"all\" or \"generated\", found {_show(sc.apply_to)}")
    if not _is_int(sc.after_tokens) or sc.after_tokens < 0:
        raise ProfileError(f"{source}: schedule 'after_tokens' must be an integer >= 0, found {_show(sc.after_tokens)}")
    if sc.after_text is not None and not isinstance(sc.after_text, str):
        raise ProfileError(f"{source}: schedule 'after_text' must be a string or null, found {_show(sc.after_text)}")


def _check_model(model: Any, source: str) -> None:
    if model is None:
        return
    if not isinstance(model, dict):
        raise ProfileError(f"{source}: 'model' must be an object or null, found {_json_type(model)}")
    _no_unknown(model, _MODEL_KEYS, source, "'model'")
    if "arch" in model and not isinstance(model["arch"], str):
        raise ProfileError(f"{source}: model 'arch' must be a string, found {_show(model['arch'])}")
    for key in ("n_layer", "n_expert", "n_expert_used"):
        if key in model and (not _is_int(model[key]) or model[key] < 0):
            raise ProfileError(f"{source}: model '{key}' must be an integer >= 0, found {_show(model[key])}")
    for key in ("weights", "name"):
        if key in model and not isinstance(model[key], str):
            raise ProfileError(f"{source}: model '{key}' must be a string, found {_show(model[key])}")
    layers = model.get("moe_layers", [])
    if not isinstance(layers, list) or not all(_is_int(x) and x >= 0 for x in layers):
        raise ProfileError(f"{source}: model 'moe_layers' must be a list of layer indices, found {_show(layers)}")


_MAX_META_DEPTH = 64


def _depth(v: Any) -> int:
    """How deeply lists and dicts nest in v (iterative: the value may come from an untrusted file)."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if d <= _MAX_META_DEPTH:
                stack.extend((y, d + 1) for y in (x.values() if isinstance(x, dict) else x))
    return deepest


def _check_text(v: Any, source: str) -> None:
    """ProfileError if v holds a string that is not valid Unicode (a lone surrogate from a \\ud800-style escape)."""
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ProfileError(f"{source}: text {json.dumps(x[max(0, e.start - 20):e.end + 20])} holds an unpaired "
                                   "surrogate (\\ud800-\\udfff), which is not valid Unicode; fix or remove it") from e
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def _no_unknown(d: dict, known: tuple[str, ...], where: str, what: str, hint: str = "") -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ProfileError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(repr(k) for k in unknown)} in {what}; known: {', '.join(known)}{hint}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # JSON true would pass as 1 otherwise


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _name(i: int, e: SteeringEntry) -> str:
    return f"entries[{i}] {_show(e.to_dict())}"


def _names(items: list[tuple[int, SteeringEntry]]) -> str:
    return ", ".join(f"entries[{i}] expert {e.expert}" for i, e in items)


def _show(v: Any) -> str:
    try:
        return json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(v)
    except RecursionError:  # nested deeper than the stack allows
        return f"(a deeply nested {_json_type(v)})"


def _json_type(v: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(v), "a number" if _is_number(v) else type(v).__name__)
