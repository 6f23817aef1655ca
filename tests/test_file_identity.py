"""No silent overwrite, no double count: probe -o onto another run's file, merge of a run twice, routing records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from moe_gguf.cli import main
from moe_gguf.engine.model import MoEModel
from moe_gguf.errors import CountFileError
from moe_gguf.formats.records import RoutingRecorder
from moe_gguf.study.merge import merge_files
from moe_gguf.study.probe import ProbeResult, parse_item, probe

pytestmark = pytest.mark.native

ITEMS = [parse_item({"prompt": f"request {i} on topic {i % 3}", "label": "a" if i % 2 else "b"}, where="t")
         for i in range(6)]


@pytest.fixture(scope="module")
def model(synth_model):
    m = MoEModel(synth_model("qwen3moe", "q8_0"), n_ctx=512, n_threads=2)
    yield m
    m.close()


def test_probe_refuses_a_file_from_other_inputs_unless_overwrite(model, tmp_path):
    out = tmp_path / "c.npz"
    first = probe(model, ITEMS[:4], out=out)
    with pytest.raises(CountFileError, match="other inputs, options or model.*--overwrite"):
        probe(model, ITEMS[2:], out=out)
    with pytest.raises(CountFileError, match="--overwrite"):
        probe(model, ITEMS[:4], out=out, token_mode="generated", max_new_tokens=3)  # same inputs, other options
    assert ProbeResult.load(out).item_labels == first.item_labels  # untouched
    again = probe(model, ITEMS[2:], out=out, overwrite=True)
    assert ProbeResult.load(out).item_labels == again.item_labels
    assert again.meta["run_ids"] != first.meta["run_ids"]  # a new run
    resumed = probe(model, ITEMS[2:], out=out, overwrite=True)  # the same run is still resumed, not restarted
    assert resumed.meta["run_ids"] == again.meta["run_ids"] and resumed.item_labels == again.item_labels


def test_probe_resumes_into_a_file_of_the_same_run(model, tmp_path):
    out = tmp_path / "c.npz"
    full = probe(model, ITEMS, n_seq=2)
    part = probe(model, ITEMS[:2], n_seq=2, out=out)  # as if killed after one batch: keep its file, fake the hash
    res = ProbeResult.load(out)
    res.meta["input_hash"] = probe.__globals__["dataset_hash"](ITEMS, token_mode="prompt", chat=True,
                                                              max_new_tokens=32, model=model.topology.fingerprint_id())
    res.save(out)
    done = probe(model, ITEMS, n_seq=2, out=out)
    np.testing.assert_array_equal(done.item_maps, full.item_maps)
    assert done.meta["run_ids"] == part.meta["run_ids"]  # the same run, continued


def test_probe_cli_refuses_and_overwrites(model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": it.prompt, "label": it.label}) + "\n" for it in ITEMS))
    other = tmp_path / "o.jsonl"
    other.write_text("".join(json.dumps({"prompt": it.prompt + "!", "label": it.label}) + "\n" for it in ITEMS))
    out = tmp_path / "c.npz"
    args = ["probe", "-m", str(model.path), "-o", str(out), "-t", "2"]
    assert CliRunner().invoke(main, args + ["-i", str(data)]).exit_code == 0
    r = CliRunner().invoke(main, args + ["-i", str(other)])
    assert r.exit_code != 0 and "--overwrite" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, args + ["-i", str(other), "--overwrite"])
    assert r.exit_code == 0, r.output


def test_merge_refuses_the_same_run_twice(model, tmp_path):
    a = probe(model, ITEMS[:3], out=tmp_path / "a.npz")
    b = probe(model, ITEMS[3:], out=tmp_path / "b.npz")
    with pytest.raises(CountFileError, match="count it twice"):
        merge_files([tmp_path / "a.npz", tmp_path / "a.npz"], tmp_path / "x.npz")
    ab = merge_files([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "ab.npz")
    assert sorted(ab.meta["run_ids"]) == sorted(a.meta["run_ids"] + b.meta["run_ids"])
    assert "input_hash" not in ab.meta  # a merge is no run that probe -o could resume
    with pytest.raises(CountFileError, match="count it twice"):  # a file already merged into another
        merge_files([tmp_path / "ab.npz", tmp_path / "b.npz"], tmp_path / "x.npz")
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "-o", str(tmp_path / "y.npz")])
    assert r.exit_code != 0 and "twice" in r.output and not (tmp_path / "y.npz").exists()


def test_merge_old_probe_files_of_the_same_inputs_is_refused(model, tmp_path):
    probe(model, ITEMS[:3], out=tmp_path / "a.npz")
    old = ProbeResult.load(tmp_path / "a.npz")
    del old.meta["run_ids"]  # a file written before run ids
    old.save(tmp_path / "old.npz")
    with pytest.raises(CountFileError, match="same probe inputs"):
        merge_files([tmp_path / "old.npz", tmp_path / "old.npz"], tmp_path / "x.npz")


def _record(model, toks, path):
    rec = RoutingRecorder(model.topology.n_layer, model.topology.n_expert)
    with model.context() as ctx, ctx.recording(rec):
        ctx.decode([(0, toks, 0)], logits="route")
    rec.record.save(path)
    return rec.record


def test_merge_routing_records_adds_them_and_refuses_a_mix(model, tmp_path):
    ra = _record(model, list(range(40, 60)), tmp_path / "ra.npz")
    rb = _record(model, list(range(70, 95)), tmp_path / "rb.npz")
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "ra.npz"), str(tmp_path / "rb.npz"), "-o", str(tmp_path / "r.npz")])
    assert r.exit_code == 0, r.output
    from moe_gguf.formats.records import RoutingRecord

    m = RoutingRecord.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(m.selections, ra.selections + rb.selections)
    with pytest.raises(CountFileError, match="count it twice"):
        merge_files([tmp_path / "ra.npz", tmp_path / "ra.npz"], tmp_path / "x.npz")
    probe(model, ITEMS[:2], out=tmp_path / "p.npz")
    with pytest.raises(CountFileError, match="cannot merge probe results .* with routing records"):
        merge_files([tmp_path / "p.npz", tmp_path / "ra.npz"], tmp_path / "x.npz")
