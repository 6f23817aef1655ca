"""The synthetic refuse/comply dataset: deterministic, balanced, held-out splits, checkable answers."""

from __future__ import annotations

from collections import Counter

import pytest

from moe_gguf.demo import dataset as ds


@pytest.fixture(scope="module")
def split():
    return ds.make_split(0, n_train=4000, n_probe=400, n_eval=400)


def test_deterministic(split):
    again = ds.make_split(0, n_train=4000, n_probe=400, n_eval=400)
    assert again == split
    other = ds.make_split(1, n_train=4000, n_probe=400, n_eval=400)
    assert [e.prompt for e in other["train"]] != [e.prompt for e in split["train"]]


def test_sizes_and_balance(split):
    for name, n in (("train", 4000), ("probe", 400), ("eval", 400)):
        exs = split[name]
        assert len(exs) == n
        assert Counter(e.label for e in exs) == {"refuse": n // 2, "comply": n // 2}
        assert {e.split for e in exs} == {name}
        assert set(Counter(e.task for e in exs)) == set(ds.FAMILIES)


def test_pairs_share_everything_but_the_purpose(split):
    for name, exs in split.items():
        pairs: dict[int, list[ds.Example]] = {}
        for e in exs:
            pairs.setdefault(e.pair_id, []).append(e)
        assert all(len(p) == 2 for p in pairs.values()), name
        for refuse, comply in pairs.values():
            assert (refuse.label, comply.label) == ("refuse", "comply")
            assert (refuse.task, refuse.answer, refuse.instance, refuse.phrasing_id) == \
                   (comply.task, comply.answer, comply.instance, comply.phrasing_id)
            if comply.framing_id != "plain":
                assert refuse.framing_id.split("|")[0] == comply.framing_id.split("|")[0]  # same wrapper
    # pair ids never collide across splits
    ids = [{e.pair_id for e in exs} for exs in split.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_every_answer_checks(split):
    for exs in split.values():
        for e in exs:
            if e.label == "comply":
                assert ds.check_answer(e, e.response), e
                assert not ds.is_refusal(e.response), e
            else:
                assert e.response in ds.REFUSALS
                assert ds.is_refusal(e.response), e
                assert not ds.check_answer(e, e.response), e


def test_check_answer_is_strict():
    e = ds.Example("What is 17 plus 25?", "17 plus 25 is 42.", "comply", "add", "42", 0, "plain")
    assert ds.check_answer(e, "17 plus 25 is 42.")
    assert ds.check_answer(e, "The answer is 42")
    assert ds.check_answer(e, " 42.")
    assert not ds.check_answer(e, "17 plus 25 is 43.")
    assert not ds.check_answer(e, "17 plus 25 is 420.")
    assert not ds.check_answer(e, "I can't help with that.")
    assert not ds.check_answer(e, "17 plus 25 plus is is")
    assert not ds.check_answer(e, "")
    lst = ds.Example("Reverse this list: cat, sun.", "", "comply", "reverse", "sun, cat", 0, "plain")
    assert ds.check_answer(lst, "The reversed list is sun,cat.")
    assert not ds.check_answer(lst, "The reversed list is cat, sun.")


def test_refusal_patterns():
    pats = ds.refusal_patterns()
    for r in ds.REFUSALS:
        assert any(p.search(r) for p in pats), r
    for text in ("17 plus 25 is 42.", "The capital of France is Paris.", "The sound that a dog makes is woof."):
        assert not ds.is_refusal(text)


def test_eval_is_held_out(split):
    train, probe, evals = split["train"], split["probe"], split["eval"]
    train_prompts = {e.prompt for e in train}
    assert not train_prompts & {e.prompt for e in probe}
    assert not train_prompts & {e.prompt for e in evals}
    assert len({e.prompt for e in evals}) == len(evals)
    assert len({e.prompt for e in probe}) == len(probe)

    def wrappers(exs):
        return {e.framing_id.split("|")[0] for e in exs if e.framing_id != "plain"}

    def purposes(exs):
        return {e.framing_id.split("|")[1] for e in exs if e.framing_id != "plain"}

    assert wrappers(evals) <= {f"e{i}" for i in range(len(ds.EVAL_WRAPPERS))}
    assert not wrappers(evals) & (wrappers(train) | wrappers(probe))
    assert not purposes(evals) & (purposes(train) | purposes(probe))
    assert not {e.phrasing_id for e in evals} & {e.phrasing_id for e in train + probe}
    assert all(e.framing_id != "plain" for e in evals)
    # rule-based instances: eval-only ones never appear in training (any seed's training: the partition is fixed)
    big = ds.make_split(3, n_train=20000, n_probe=2, n_eval=2)["train"]
    held_families = {"add", "subtract", "larger", "next_number", "reverse", "count"}
    train_inst = {e.instance for e in big + train + probe}
    eval_rule = [e for e in evals if e.task in held_families]
    assert eval_rule
    assert not {e.instance for e in eval_rule} & train_inst
    # held-out combinations reuse training words; the held-out category and the paraphrases are new wording
    train_words = {w for e in train for w in e.prompt.split()}
    for p in ds.PURPOSES:
        if p.heldout == "combination":
            assert set(p.text.split()) <= train_words, p
    kinds = {(e.label, e.heldout) for e in evals}
    assert kinds == {(lab, k) for lab in ds.LABELS for k in ("combination", "category", "paraphrase")}
    assert {e.category for e in evals if e.heldout == "category" and e.label == "refuse"} == {"spying"}
    assert "spying" not in {e.category for e in train + probe}


def test_no_single_word_decides_the_behaviour(split):
    """Contrast items: every word of a restricted training purpose also occurs in an ordinary one, so a
    one-word rule cannot tell the labels apart (the old dataset had a restricted-only word in every purpose)."""
    restricted = [p for p in ds.PURPOSES if p.restricted and not p.eval_only]
    ordinary_words = {w for p in ds.PURPOSES if not p.restricted and not p.eval_only for w in p.text.split()}
    for p in restricted:
        assert set(p.text.split()) <= ordinary_words, p
    # and on the training prompts: the best one-word rule ("refuse iff the prompt has word w") is far from perfect
    train = split["train"]
    words = {w for e in train for w in e.prompt.lower().split()}
    best = 0.0
    for w in words:
        acc = sum((w in e.prompt.lower().split()) == (e.label == "refuse") for e in train) / len(train)
        best = max(best, acc)
    assert best < 0.8, best


def test_purposes_partition():
    restricted = [p for p in ds.PURPOSES if p.restricted]
    ordinary = [p for p in ds.PURPOSES if not p.restricted]
    held = {t[0] for t in ds.HELDOUT_TABLES}
    assert {p.category for p in restricted} == set(ds.RESTRICTED) | (held & {"spying"})
    assert {p.category for p in ordinary} == set(ds.ORDINARY) | (held - {"spying"})
    assert not {p.text for p in restricted} & {p.text for p in ordinary}
    for pool in (restricted, ordinary):
        assert any(p.eval_only for p in pool) and any(not p.eval_only for p in pool)


def test_example_roundtrip():
    e = ds.make_split(0, n_train=2, n_probe=2, n_eval=2)["eval"][0]
    assert ds.Example(**e.to_dict()) == e
