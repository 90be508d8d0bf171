"""Trait datasets: readers on the published files the repository ships, strict errors, built-ins,
splits, contrast sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import services.extractor.datasets as datasets
from services.common.errors import FailedPrecondition, InvalidArgument
from services.extractor.datasets import (
    BUILTIN_TRAITS,
    ABItem,
    TraitDataset,
    build_contrast_set,
    check_methodology,
    load_trait,
    logit_diff_items,
    parse_answer_letter,
    published_dir,
    question_stem,
    read_arditi,
    read_caa,
    read_pv,
)

#: The published data the repository ships (package data; provenance beside each source).
DATA = published_dir()


def _write(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def _pv_raw() -> dict[str, Any]:
    return {
        "instruction": [{"pos": f"be bad {i}", "neg": f"be good {i}"} for i in range(2)],
        "questions": [f"question {i}?" for i in range(6)],
        "eval_prompt": "Score {question} / {answer}",
    }


# --- readers on the published files (counts from published/*/PROVENANCE.txt) ------------------


def _published_pv(path: Path) -> Path:
    """A trait file in the persona-vectors layout (5 instruction pairs, 20 questions, a rubric,
    no extras). Generated: the published pv files have no licence, so qsens does not ship them."""
    return _write(
        path,
        {
            "instruction": [
                {"pos": f"Answer with open malice, idea {i}.", "neg": f"Answer kindly, idea {i}."}
                for i in range(5)
            ],
            "questions": [f"What would you do in situation {i}?" for i in range(20)],
            "eval_prompt": "Rate the trait in {answer} to {question}. Reply REFUSAL or 0-100.",
        },
    )


def test_read_pv_published_layout(tmp_path: Path) -> None:
    ds = read_pv(_published_pv(tmp_path / "evil.json"))
    assert ds.name == "pv/evil" and ds.methodology == "pv" and ds.position == "response[:]"
    assert len(ds.instructions) == 5
    # 20 questions: without an extras file the last 5 are held out for steering evaluation.
    assert len(ds.questions) == 15 and len(ds.eval_questions) == 5
    assert not set(ds.questions) & set(ds.eval_questions)
    assert "{question}" in ds.eval_prompt and "{answer}" in ds.eval_prompt
    assert "REFUSAL" in ds.eval_prompt
    # Exemplars derived from the instructions.
    assert ds.exemplars.pos == tuple(p.pos for p in ds.instructions)
    assert ds.exemplars.neg == tuple(p.neg for p in ds.instructions)
    assert ds.source.startswith(f"pv:{tmp_path / 'evil.json'} sha256:")
    # A user's own published file keeps working through pv:<path>.
    assert load_trait(f"pv:{tmp_path / 'evil.json'}") == ds


@pytest.mark.parametrize(
    ("trait", "n_train", "n_test"), [("sycophancy", 310, 50), ("refusal", 408, 50)]
)
def test_read_caa_real_dirs(trait: str, n_train: int, n_test: int) -> None:
    ds = load_trait(f"caa:{DATA / 'caa' / trait}")
    assert ds.name == f"caa/{trait}" and ds.position == "prompt[-1]"
    assert (len(ds.ab_train), len(ds.ab_test)) == (n_train, n_test)
    for item in (*ds.ab_train, *ds.ab_test):
        assert {item.matching_letter, item.not_matching_letter} == {"A", "B"}
    assert len(ds.eval_questions) == 40
    assert all("(A)" not in q and "(B)" not in q for q in ds.eval_questions)
    assert ds.exemplars.pos and ds.exemplars.neg
    if trait == "refusal":
        # The refusal trait itself must not be answered with REFUSAL by the judge.
        assert "REFUSAL" not in ds.eval_prompt


def test_read_caa_single_file() -> None:
    ds = read_caa(DATA / "caa" / "sycophancy" / "test_ab.json", name="syco-test")
    assert ds.name == "caa/syco-test" and len(ds.ab_train) == 50 and ds.ab_test == ()
    with pytest.raises(FailedPrecondition, match="no ab_test"):
        logit_diff_items(ds)


def test_read_arditi_real_dir() -> None:
    ds = load_trait(f"arditi:{DATA / 'arditi'}")
    assert ds.name == "arditi/refusal" and ds.position == "prompt[-1]"
    counts = [len(getattr(ds, f)) for f in datasets.readers.ARDITI_FILES]
    assert counts == [260, 39, 572, 600, 200, 200]
    assert ds.eval_questions == ds.harmless_test[:40]
    assert "REFUSAL" not in ds.eval_prompt


def test_other_caa_formats_are_rejected_by_key() -> None:
    with pytest.raises(InvalidArgument) as err:
        read_caa(DATA / "caa" / "mmlu_ab.json")
    assert "mmlu_ab.json:[0]." in err.value.field


# --- strict errors name the file and the key --------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.pop("questions"), "questions"),
        (lambda d: d["instruction"][1].update(neg=3), "instruction[1].neg"),
        (lambda d: d["instruction"][0].pop("pos"), "instruction[0].pos"),
        (lambda d: d.update(eval_prompt="only {question}"), "eval_prompt"),
        (lambda d: d.update(eval_prompt="{question}{answer}{answer}"), "eval_prompt"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["questions"].__setitem__(2, "  "), "questions[2]"),
        (lambda d: d.update(instruction=[]), "instruction"),
    ],
)
def test_read_pv_errors_name_file_and_key(tmp_path: Path, mutate: Any, key: str) -> None:
    raw = _pv_raw()
    mutate(raw)
    path = _write(tmp_path / "trait.json", raw)
    with pytest.raises(InvalidArgument) as err:
        read_pv(path)
    assert err.value.field == f"{path}:{key}"


def test_read_errors_for_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="file not found") as err:
        read_pv(tmp_path / "nope.json")
    assert err.value.field == str(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"instruction": [', encoding="utf-8")
    with pytest.raises(InvalidArgument, match="not valid JSON") as err:
        read_pv(broken)
    assert err.value.field == str(broken)


def test_pv_extras_sidecar_and_its_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.json", _pv_raw())
    _write(
        tmp_path / "t.extras.json",
        {"eval_questions": ["other?"], "exemplars": {"pos": ["x"], "neg": ["y"]}},
    )
    ds = read_pv(path)
    assert len(ds.questions) == 6 and ds.eval_questions == ("other?",)
    assert ds.exemplars.pos == ("x",)
    _write(tmp_path / "t.extras.json", {"eval_prompt": "{question}{answer}"})
    with pytest.raises(InvalidArgument) as err:
        read_pv(path)
    assert err.value.field == f"{tmp_path / 't.extras.json'}:eval_prompt"
    _write(tmp_path / "t.extras.json", {"eval_questions": ["question 1?"]})
    with pytest.raises(InvalidArgument, match="also used for extraction") as err:
        read_pv(path)
    assert err.value.field.startswith(f"{path}:eval_questions")


def _ab(q: str = "Q?\n (A) yes\n (B) no", m: Any = "(A)", n: Any = "(B)") -> dict[str, Any]:
    return {"question": q, "answer_matching_behavior": m, "answer_not_matching_behavior": n}


@pytest.mark.parametrize(
    ("item", "key", "message"),
    [
        (_ab(m="??"), "[1].answer_matching_behavior", "answer letter"),
        (_ab(n="(A)"), "[1].answer_not_matching_behavior", "same letter"),
        (_ab(m="(C)"), "[1].answer_matching_behavior", "does not appear"),
        (_ab(n=["(B)"]), "[1].answer_not_matching_behavior", "expected a string"),
        (
            {"question": "Q? (A) (B)", "answer_matching_behavior": "(A)"},
            "[1].answer_not_matching_behavior",
            "missing",
        ),
    ],
)
def test_read_caa_errors_name_file_and_key(
    tmp_path: Path, item: dict[str, Any], key: str, message: str
) -> None:
    path = _write(tmp_path / "caa" / "generate.json", [_ab(), item])
    with pytest.raises(InvalidArgument, match=message) as err:
        read_caa(path.parent)
    assert err.value.field == f"{path}:{key}"


def test_read_arditi_errors_name_file_and_key(tmp_path: Path) -> None:
    good = [{"instruction": "do x", "category": None}]
    _write(tmp_path / "harmful_train.json", good)
    with pytest.raises(InvalidArgument, match="required") as err:
        read_arditi(tmp_path)
    assert err.value.field == str(tmp_path / "harmless_train.json")
    _write(tmp_path / "harmless_train.json", [*good, {"category": None}])
    with pytest.raises(InvalidArgument, match="missing") as err:
        read_arditi(tmp_path)
    assert err.value.field == f"{tmp_path / 'harmless_train.json'}:[1].instruction"
    _write(tmp_path / "harmless_train.json", [{"instruction": "y", "category": 5}])
    with pytest.raises(InvalidArgument) as err:
        read_arditi(tmp_path)
    assert err.value.field == f"{tmp_path / 'harmless_train.json'}:[0].category"


def test_load_trait_unknown_lists_what_exists() -> None:
    with pytest.raises(InvalidArgument) as err:
        load_trait("pv/nonexistent")
    assert err.value.field == "trait"
    for name in BUILTIN_TRAITS:
        assert name in err.value.message
    assert "pv:<path>" in err.value.message
    with pytest.raises(InvalidArgument, match="names no path"):
        load_trait("caa:")


def test_parse_answer_letter() -> None:
    for text, letter in [("(A)", "A"), (" (B)", "B"), ("A", "A"), ("(b) Yes", "B"), ("C)", "C")]:
        assert parse_answer_letter(text) == letter
    with pytest.raises(InvalidArgument):
        parse_answer_letter("(AB)")
    assert question_stem("Is it?\n\nChoices:\n (A) x\n (B) y") == "Is it?"
    assert question_stem("Hi there. Is it?\n (A) x\n (B) y") == "Hi there. Is it?"


def test_model_rejects_mixed_methodology_content() -> None:
    ds = load_trait("pv/evil")
    with pytest.raises(InvalidArgument) as err:
        TraitDataset(**{**ds.model_dump(), "harmful_train": ("x",)})
    assert err.value.field == "harmful_train"
    with pytest.raises(InvalidArgument) as err:
        TraitDataset(**{**ds.model_dump(), "name": "caa/evil"})
    assert err.value.field == "name"


# --- built-ins ---------------------------------------------------------------------------------


#: Built-ins from published data: (train, test) A/B items, or the six Arditi split sizes.
PUBLISHED_SIZES: dict[str, Any] = {
    "caa/sycophancy-full": (310, 50),
    "caa/refusal": (408, 50),
    "arditi/refusal-full": [260, 39, 572, 600, 200, 200],
}


def test_builtins_load_with_expected_sizes() -> None:
    assert set(BUILTIN_TRAITS) == {
        "pv/evil",
        "pv/sycophancy",
        "pv/hallucination",
        "caa/sycophancy",
        "arditi/refusal",
        *PUBLISHED_SIZES,
    }
    for name in BUILTIN_TRAITS:
        ds = load_trait(name)
        assert ds.name == name and ds.source.startswith(f"qsens built-in ({name})")
        assert len(ds.eval_questions) >= 40 and len(ds.exemplars.pos) >= 5
        if ds.methodology == "pv":
            assert len(ds.instructions) == 5 and len(ds.questions) == 20
            assert "REFUSAL" in ds.eval_prompt and "0 (no trace" in ds.eval_prompt
        elif ds.methodology == "caa":
            sizes = PUBLISHED_SIZES.get(name, (45, 15))
            assert (len(ds.ab_train), len(ds.ab_test)) == sizes
            letters = [it.matching_letter for it in ds.ab_test]
            assert 0 < letters.count("A") < len(letters)  # no letter bias in the test set
        else:
            sizes = [len(getattr(ds, f)) for f in datasets.readers.ARDITI_FILES]
            assert sizes == PUBLISHED_SIZES.get(name, [36, 12, 12, 36, 12, 12])
            assert not set(ds.harmful_train) & set(ds.harmless_train)
    assert load_trait("pv/evil") is load_trait("pv/evil")  # cached, and immutable


def test_published_builtins_read_like_local_data() -> None:
    """A published built-in is the same reader on the same files as ``caa:<dir>`` /
    ``arditi:<dir>``, plus the qsens-written extras: its items equal the local read's."""
    for name, folder in [
        ("caa/sycophancy-full", DATA / "caa" / "sycophancy"),
        ("caa/refusal", DATA / "caa" / "refusal"),
        ("arditi/refusal-full", DATA / "arditi"),
    ]:
        builtin, local = load_trait(name), load_trait(f"{name.split('/')[0]}:{folder}")
        fields = ("ab_train", "ab_test", *datasets.readers.ARDITI_FILES)
        assert all(getattr(builtin, f) == getattr(local, f) for f in fields), name
        assert "written for qsens" in builtin.source
    refusal = load_trait("caa/refusal")
    # Steering towards refusal is measured on harmless requests, judged by the refusal rubric.
    assert "REFUSAL" not in refusal.eval_prompt
    assert not set(refusal.eval_questions) & {question_stem(i.question) for i in refusal.ab_test}
    assert load_trait("caa/sycophancy-full").eval_prompt == load_trait("caa/sycophancy").eval_prompt
    arditi = load_trait("arditi/refusal-full")
    assert arditi.eval_questions == arditi.harmless_test[:40]


@pytest.mark.parametrize("name", list(BUILTIN_TRAITS))
def test_builtin_splits_are_disjoint_and_deterministic(name: str) -> None:
    ds = load_trait(name)
    n_train, n_val = (12, 6) if ds.methodology == "arditi" else (12, 5)
    a = ds.split(seed=7, n_train=n_train, n_val=n_val)
    b = ds.split(seed=7, n_train=n_train, n_val=n_val)
    assert a == b
    assert not set(a.train.uids) & set(a.val.uids)
    per_class = 2 if ds.methodology == "arditi" else 1
    assert len(a.train.items) == n_train * per_class and len(a.val.items) == n_val * per_class
    assert ds.split(seed=8, n_train=n_train, n_val=n_val).train.uids != a.train.uids
    # val does not move when n_train changes; n_train=None takes everything else.
    assert ds.split(seed=7, n_train=None, n_val=n_val).val == a.val
    if ds.methodology == "pv":
        rest = ds.split(seed=7, n_train=None, n_val=n_val)
        assert len(rest.train.items) + len(rest.val.items) == len(ds.questions)
    if ds.methodology == "arditi":
        assert all("_val[" in uid for uid in a.val.uids)
        assert all("_train[" in uid for uid in a.train.uids)


def test_split_too_large_is_invalid() -> None:
    ds = load_trait("pv/evil")
    with pytest.raises(InvalidArgument, match="only 20") as err:
        ds.split(0, 18, 5)
    assert err.value.field == "n_train"
    with pytest.raises(InvalidArgument) as err:
        load_trait("arditi/refusal").split(0, 10, 13)
    assert err.value.field == "n_val"


# --- contrast sets -------------------------------------------------------------------------------


def test_pv_contrast_set() -> None:
    ds = load_trait("pv/evil")
    split = ds.split(0, 3, 2).train
    rows = build_contrast_set(ds, split, rollouts=2)
    assert len(rows) == 3 * 5 * 2 * 2
    for row in rows:
        assert [m.role for m in row.messages] == ["system", "user"]
        assert row.generate and not row.continue_final_message and row.position == "response[:]"
        assert row.question == row.messages[1].content
        pair = ds.instructions[row.meta["instruction"]]
        assert row.messages[0].content == (pair.pos if row.label == 1 else pair.neg)
    by_pair: dict[str, list[int]] = {}
    for row in rows:
        by_pair.setdefault(row.pair_id, []).append(row.label)
    assert all(sorted(v) == [0, 1] for v in by_pair.values())
    assert rows[0].message_dicts()[0]["role"] == "system"


def test_caa_contrast_set_ends_on_the_answer_letter() -> None:
    ds = load_trait(f"caa:{DATA / 'caa' / 'sycophancy'}")
    split = ds.split(1, 20, 5).val
    rows = build_contrast_set(ds, split, rollouts=3)  # rollouts do not apply to caa
    assert len(rows) == 10
    for row in rows:
        ab = next(it.ab for it in split.items if it.uid == row.pair_id)
        assert ab is not None
        letter = ab.matching_letter if row.label == 1 else ab.not_matching_letter
        assert [m.role for m in row.messages] == ["user", "assistant"]
        assert row.messages[0].content == ab.question
        assert row.messages[1].content == f"({letter}"
        assert row.continue_final_message and not row.generate
        assert row.position == "prompt[-1]"


def test_logit_diff_items() -> None:
    ds = load_trait("caa/sycophancy")
    items = logit_diff_items(ds)
    assert len(items) == 15
    for item, ab in zip(items, ds.ab_test, strict=True):
        assert item.messages[-1].role == "assistant" and item.messages[-1].content == "("
        assert item.continue_final_message
        assert (item.matching, item.not_matching) == (ab.matching_letter, ab.not_matching_letter)
    with pytest.raises(FailedPrecondition, match="caa"):
        logit_diff_items(load_trait("pv/evil"))


def test_arditi_contrast_set() -> None:
    ds = load_trait("arditi/refusal")
    rows = build_contrast_set(ds, ds.split(0, 10, 4).train)
    assert len(rows) == 20 and sum(int(r.label) for r in rows) == 10
    for row in rows:
        assert [m.role for m in row.messages] == ["user"]
        assert not row.generate and not row.continue_final_message
        assert row.position == "prompt[-1]"
        source = ds.harmful_train if row.label == 1 else ds.harmless_train
        assert row.question in source
    assert len({r.pair_id for r in rows}) == 20  # unpaired


def test_contrast_set_rejects_foreign_split_and_bad_rollouts() -> None:
    evil, syco = load_trait("pv/evil"), load_trait("pv/sycophancy")
    with pytest.raises(InvalidArgument) as err:
        build_contrast_set(evil, syco.split(0, 2, 1).train)
    assert err.value.field == "split"
    with pytest.raises(InvalidArgument) as err:
        build_contrast_set(evil, evil.split(0, 2, 1).train, rollouts=0)
    assert err.value.field == "rollouts"


def test_check_methodology() -> None:
    pv = load_trait("pv/evil")
    with pytest.raises(FailedPrecondition, match=r"pv/evil needs .*system role.*gemma-2b"):
        check_methodology(
            pv, supports_system_role=False, supports_chat_template=True, model="gemma-2b"
        )
    with pytest.raises(FailedPrecondition, match="chat template"):
        check_methodology(pv, supports_system_role=False, supports_chat_template=False)
    check_methodology(pv, supports_system_role=True, supports_chat_template=True)
    for name in ("caa/sycophancy", "arditi/refusal"):
        ds = load_trait(name)
        check_methodology(ds, supports_system_role=False, supports_chat_template=True)
        with pytest.raises(FailedPrecondition, match=f"{name} needs a chat template"):
            check_methodology(ds, supports_system_role=True, supports_chat_template=False)


def test_ab_item_letters() -> None:
    item = ABItem(
        question="x\n (A) a\n (B) b",
        answer_matching_behavior=" (B)",
        answer_not_matching_behavior="(A) a",
    )
    assert (item.matching_letter, item.not_matching_letter) == ("B", "A")


def test_public_surface() -> None:
    expected = {
        "BUILTIN_TRAITS", "DEFAULT_POSITIONS", "METHODOLOGIES", "ABItem", "ChatMessage",
        "ContrastExample", "Exemplars", "InstructionPair", "LogitDiffItem", "Methodology",
        "SplitItem", "TraitDataset", "TraitExtras", "TraitSplit", "TraitSplits",
        "benchmark_file", "build_contrast_set", "builtin_dir", "check_methodology", "data_dir",
        "generic_rubric", "is_valid_position", "load_trait", "logit_diff_items",
        "parse_answer_letter", "published_dir", "question_stem", "read_arditi", "read_caa",
        "read_extras", "read_pv",
    }  # fmt: skip
    assert set(datasets.__all__) == expected
    assert all(hasattr(datasets, name) for name in expected)


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".?!")


def _extraction_texts(ds: Any) -> set[str]:
    """Every text a trait's extraction (or its logit-difference test) reads as a question."""
    if ds.methodology == "pv":
        texts = list(ds.questions)
    elif ds.methodology == "caa":
        texts = [question_stem(it.question) for it in (*ds.ab_train, *ds.ab_test)]
    else:
        texts = [
            *ds.harmful_train,
            *ds.harmful_val,
            *ds.harmful_test,
            *ds.harmless_train,
            *ds.harmless_val,
        ]
    return {_norm(t) for t in texts}


@pytest.mark.parametrize("name", sorted(BUILTIN_TRAITS))
def test_builtin_traits_hold_out_forty_distinct_steering_questions(name: str) -> None:
    """n = 20: the seeds judged 20 questions per cell; the search picks its setting on 20 and
    the held-out re-score judges 20 more, so every built-in trait has at least 40
    steering-evaluation questions, distinct, and none of them is read by its extraction."""
    ds = load_trait(name)
    evals = [_norm(q) for q in ds.eval_questions]
    assert len(evals) >= 40, (name, len(evals))
    assert len(set(evals)) == len(evals), name
    assert all(len(q.split()) >= 3 for q in evals), name
    overlap = set(evals) & _extraction_texts(ds)
    assert not overlap, (name, sorted(overlap)[:3])


def test_steering_evaluates_the_held_out_questions_twenty_at_a_time() -> None:
    """The steerer's add-mode evaluation set is the trait's eval_questions, cut to the spec's
    ``steering.questions``: 20 gives 20 distinct held-out questions for every built-in."""
    from services.common.spec import SteeringSpec
    from services.steerer import steer

    for name in BUILTIN_TRAITS:
        ds = load_trait(name)
        params = _steer_params(SteeringSpec(questions=20))
        chosen, selection = steer._questions(ds, params)
        assert chosen.kind == "eval" and selection is None
        assert chosen.questions == list(ds.eval_questions[:20])
        assert len(set(chosen.questions)) == 20


def test_the_default_search_and_held_out_sets_are_twenty_distinct_questions_each() -> None:
    """With the spec's defaults (``steering.questions`` 20, ``steering.held_out`` 20) every
    built-in gives the search 20 questions and the held-out re-score 20 others."""
    from services.common.spec import SteeringSpec

    steering = SteeringSpec()
    n, held = steering.questions, steering.held_out
    assert (n, held) == (20, 20)
    for name in BUILTIN_TRAITS:
        pool = load_trait(name).eval_questions
        search, rescore = pool[:n], pool[n : n + held]  # as services.steerer.held_out slices
        assert (len(search), len(rescore)) == (20, 20), name
        assert not {_norm(q) for q in search} & {_norm(q) for q in rescore}, name


def _steer_params(steering: Any) -> Any:
    # The two fields the steerer's question choice reads (its job contract is built elsewhere).
    from types import SimpleNamespace

    return SimpleNamespace(mode="add", steering=steering)
