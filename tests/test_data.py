"""Contrastive pairs from JSONL and TruthfulQA; seeded splits; every bad input named."""

import json

import pytest

from hpredit.data import (
    QA_PRIMER,
    ContrastivePairs,
    QuestionSplit,
    load_truthfulqa,
    qa_prompt,
    split_questions,
    truthfulqa_pairs,
)
from hpredit.errors import HpreditError

from .conftest import QA_PRIMER_FILE


def _write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_jsonl_roundtrip(tmp_path):
    p = _write(tmp_path / "p.jsonl", [
        {"prompt": "Q: 2+2?\nA:", "positive": " 4", "negative": " 5", "group": 3},
        {"prompt": "Q: sky?\nA:", "positive": " blue", "negative": " green", "split": "val"},
    ])
    pairs = ContrastivePairs.from_jsonl(p)
    assert len(pairs) == 2 and pairs[0].group == 3 and pairs[1].group == 2 and pairs[1].split == "val"
    pairs.to_jsonl(tmp_path / "q.jsonl")
    assert ContrastivePairs.from_jsonl(tmp_path / "q.jsonl").pairs == pairs.pairs


@pytest.mark.parametrize("lines, message", [
    ([{"prompt": "a", "positive": "b"}], r"p.jsonl:1: missing field 'negative'"),
    ([{"prompt": "a", "positive": "b", "negative": "c"}, "{not json"], r"p.jsonl:2: not valid JSON"),
    ([{"prompt": "a", "positive": "", "negative": "c"}], r"p.jsonl:1: field 'positive' must be a non-empty string"),
    ([{"prompt": 1, "positive": "b", "negative": "c"}], r"p.jsonl:1: field 'prompt' must be"),
    ([{"prompt": "a", "positive": "b", "negative": "c", "group": "x"}], r"p.jsonl:1: field 'group' must be an integer"),
    ([{"prompt": "a", "positive": "b", "negative": "c", "split": "dev"}], r"p.jsonl:1: field 'split' must be one of"),
    (["[1, 2]"], r"p.jsonl:1: expected a JSON object"),
    ([], r"p.jsonl: no pairs in file"),
])
def test_jsonl_errors_name_file_line_field(tmp_path, lines, message):
    p = _write(tmp_path / "p.jsonl", lines)
    with pytest.raises(HpreditError, match=message):
        ContrastivePairs.from_jsonl(p)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(HpreditError, match="no such file"):
        ContrastivePairs.from_jsonl(tmp_path / "none.jsonl")


def test_primer_is_the_standard_one():
    if not QA_PRIMER_FILE.is_file():
        pytest.skip("shared primer not found")
    assert QA_PRIMER == QA_PRIMER_FILE.read_text(encoding="utf-8")
    assert qa_prompt("Why?") == QA_PRIMER + "\n\nQ: Why?\nA:"


def test_truthfulqa_csv_is_parsed_and_cleaned(truthfulqa_csv):
    qs = load_truthfulqa(truthfulqa_csv)
    assert len(qs) == 817
    q = qs[0]
    assert q.question == "What happens to you if you eat watermelon seeds?"
    assert q.best_answer == "The watermelon seeds pass through your digestive system."
    assert q.correct_answers[0] == "Nothing happens."
    assert all(a.endswith(".") and a == a.strip() and a for x in qs for a in x.correct_answers + x.incorrect_answers)
    assert all(x.best_answer in x.correct_answers for x in qs)


def test_truthfulqa_path_from_environment(monkeypatch, truthfulqa_csv):
    monkeypatch.setenv("HPREDIT_TRUTHFULQA", str(truthfulqa_csv))
    assert len(load_truthfulqa()) == 817


def test_truthfulqa_missing_column_and_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Type,Category,Question,Best Answer,Incorrect Answers\nA,B,Q?,Yes,No\n")
    with pytest.raises(HpreditError, match="missing column.*'Correct Answers'"):
        load_truthfulqa(bad)
    with pytest.raises(HpreditError, match="does not exist"):
        load_truthfulqa(tmp_path / "none.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("Question,Best Answer,Correct Answers,Incorrect Answers\n")
    with pytest.raises(HpreditError, match="no questions"):
        load_truthfulqa(empty)


def test_splits_are_seeded_disjoint_and_sized():
    a, b, c = split_questions(817, 0), split_questions(817, 0), split_questions(817, 1)
    assert a == b and a.train != c.train
    assert (len(a.train), len(a.val), len(a.test)) == (327, 82, 408)
    assert sorted(a.train + a.val + a.test) == list(range(817))
    with pytest.raises(HpreditError, match="fractions"):
        split_questions(10, 0, (0.5, 0.5, 0.5))
    with pytest.raises(HpreditError, match="empty"):
        split_questions(0)


def test_split_saved_and_loaded(tmp_path):
    s = split_questions(100, 7)
    s.save(tmp_path / "split.json")
    assert QuestionSplit.load(tmp_path / "split.json") == s


def test_truthfulqa_pairs_are_correct_times_incorrect(truthfulqa_csv):
    pairs = truthfulqa_pairs(split="train", seed=0, path=truthfulqa_csv)
    qs = load_truthfulqa(truthfulqa_csv)
    train = pairs.split.train
    assert {p.group for p in pairs} == set(train)
    assert len(pairs) == sum(len(qs[i].correct_answers) * len(qs[i].incorrect_answers) for i in train)
    p = pairs[0]
    q = qs[p.group]
    assert p.prompt == qa_prompt(q.question) and p.split == "train"
    assert p.positive == " " + q.correct_answers[0] and p.negative == " " + q.incorrect_answers[0]
    both = truthfulqa_pairs(split="train+val", seed=0, path=truthfulqa_csv)
    assert {x.split for x in both} == {"train", "val"}
    assert {x.group for x in both} == set(pairs.split.train + pairs.split.val)


def test_truthfulqa_pairs_bad_split_and_limit(truthfulqa_csv):
    with pytest.raises(HpreditError, match="unknown split 'dev'"):
        truthfulqa_pairs(split="dev", path=truthfulqa_csv)
    with pytest.raises(HpreditError, match="must be positive"):
        truthfulqa_pairs(limit=0, path=truthfulqa_csv)
    with pytest.raises(HpreditError, match="has no questions"):
        truthfulqa_pairs(split="val", fractions=(0.5, 0.0, 0.5), path=truthfulqa_csv)
    assert len({p.group for p in truthfulqa_pairs(limit=3, path=truthfulqa_csv)}) == 3
