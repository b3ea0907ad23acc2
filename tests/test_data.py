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
    p = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q: 2+2?\nA:", "positive": " 4", "negative": " 5", "group": 3},
            {"prompt": "Q: sky?\nA:", "positive": " blue", "negative": " green", "split": "val"},
        ],
    )
    pairs = ContrastivePairs.from_jsonl(p)
    assert len(pairs) == 2 and pairs[0].group == 3 and pairs[1].group == 2 and pairs[1].split == "val"
    pairs.to_jsonl(tmp_path / "q.jsonl")
    assert ContrastivePairs.from_jsonl(tmp_path / "q.jsonl").pairs == pairs.pairs


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"prompt": "a", "positive": "b"}], r"p.jsonl:1: missing field 'negative'"),
        ([{"prompt": "a", "positive": "b", "negative": "c"}, "{not json"], r"p.jsonl:2: not valid JSON"),
        ([{"prompt": "a", "positive": "", "negative": "c"}], r"p.jsonl:1: field 'positive' must be a non-empty string"),
        ([{"prompt": 1, "positive": "b", "negative": "c"}], r"p.jsonl:1: field 'prompt' must be"),
        (
            [{"prompt": "a", "positive": "b", "negative": "c", "group": "x"}],
            r"p.jsonl:1: field 'group' must be an integer",
        ),
        (
            [{"prompt": "a", "positive": "b", "negative": "c", "split": "dev"}],
            r"p.jsonl:1: field 'split' must be one of",
        ),
        (["[1, 2]"], r"p.jsonl:1: expected a JSON object"),
        ([], r"p.jsonl: no pairs in file"),
    ],
)
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


# --------------------------------------------------------------------------- bad files and missing data (issue 14)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file, not UTF-8 text: give the JSON/JSONL file"),
        ('{"prompt": "caf\u00e9", "positive": " a"}\n'.encode("latin-1"), r"is not UTF-8 text \(byte 15\)"),
        (b"[" * 200_000, r"p.jsonl:1: not valid JSON \(nested too deeply\)"),
        (b'{"prompt": "x", "positive": ' + b"[" * 200_000 + b"\n", r"p.jsonl:1: not valid JSON"),
    ],
)
def test_jsonl_unreadable_files(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_bytes(content)
    with pytest.raises(HpreditError, match=message):
        ContrastivePairs.from_jsonl(tmp_path / "p.jsonl")


def test_jsonl_directory_is_named_as_such(tmp_path):
    with pytest.raises(HpreditError, match="is a directory: give the JSON/JSONL file itself"):
        ContrastivePairs.from_jsonl(tmp_path)


@pytest.mark.parametrize("positive,negative", [(" Blue.", " Blue."), (" Blue.", "  Blue. "), ("Blue\tsky", "Blue sky")])
def test_identical_pairs_are_refused_with_file_line(tmp_path, positive, negative):
    p = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q: sky?\nA:", "positive": " blue", "negative": " green"},
            {"prompt": "Q: sky?\nA:", "positive": positive, "negative": negative},
        ],
    )
    with pytest.raises(HpreditError, match=r"p.jsonl:2: the positive and negative completions are the same"):
        ContrastivePairs.from_jsonl(p)


def test_check_pairs_names_the_index():
    from hpredit.data import ContrastivePair, check_pairs

    check_pairs([ContrastivePair("p", " a", " b")])
    with pytest.raises(HpreditError, match=r"pair 1: the positive and negative completions are the same"):
        check_pairs([ContrastivePair("p", " a", " b"), ContrastivePair("p", " a ", "a")])


def test_truthfulqa_csv_not_utf8_or_a_directory(tmp_path, truthfulqa_csv):
    bad = tmp_path / "tqa.csv"
    text = truthfulqa_csv.read_text(encoding="utf-8")
    bad.write_bytes(text.encode("utf-16"))
    with pytest.raises(HpreditError, match="is UTF-16 text, not UTF-8: save the TruthfulQA CSV as UTF-8"):
        load_truthfulqa(bad)
    bad.write_bytes(text.encode("cp1252", errors="replace"))
    with pytest.raises(HpreditError, match="is not UTF-8 text"):
        load_truthfulqa(bad)
    with pytest.raises(HpreditError, match="is a directory"):
        load_truthfulqa(tmp_path)


def test_check_truthfulqa_source(tmp_path, truthfulqa_csv, monkeypatch):
    from hpredit import data

    data.check_truthfulqa_source(truthfulqa_csv)
    monkeypatch.setenv("HPREDIT_TRUTHFULQA", str(truthfulqa_csv))
    data.check_truthfulqa_source()
    with pytest.raises(HpreditError, match="does not exist"):
        data.check_truthfulqa_source(tmp_path / "none.csv")
    (tmp_path / "cols.csv").write_text("Question,Answer\nq,a\n")
    with pytest.raises(HpreditError, match="missing column"):
        data.check_truthfulqa_source(tmp_path / "cols.csv")
    monkeypatch.delenv("HPREDIT_TRUTHFULQA")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HpreditError, match=r"no TruthfulQA data: pass the CSV with --data \(or set \$HPREDIT_TRUTH"):
        data.check_truthfulqa_source()
    with pytest.raises(HpreditError, match="no TruthfulQA data"):
        load_truthfulqa()  # the loader says the same, never a datasets traceback
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(HpreditError, match="hub' extra"):
        data.check_truthfulqa_source()


def test_truthfulqa_hub_failure_is_one_line(monkeypatch):
    import datasets

    def down(*a, **k):
        raise ConnectionError("Couldn't reach 'truthfulqa/truthful_qa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HPREDIT_TRUTHFULQA", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", down)
    with pytest.raises(HpreditError, match=r"could not load TruthfulQA from the hub \(Couldn't reach.*--data"):
        load_truthfulqa()


def test_hub_reachable_uses_the_endpoint(monkeypatch):
    import socket

    from hpredit import data

    seen = []

    def connect(address, timeout):
        seen.append(address)
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080")
    assert data.hub_reachable() is False and seen == [("mirror.local", 8080)]


def test_behaviour_check_source(tmp_path, monkeypatch):
    from hpredit import behaviour_data as bd
    from hpredit.evaluation.tasks import get_task

    bd.BBQ_SOURCE.check()  # offline (conftest): the installed package copies
    bd.ab_source("sycophancy").check()
    (tmp_path / "t.json").write_text("[]")
    bd.TOXIGEN_SOURCE.check(tmp_path / "t.json")
    with pytest.raises(HpreditError, match="no such file"):
        bd.TOXIGEN_SOURCE.check(tmp_path / "none.json")
    with pytest.raises(HpreditError, match="is a directory"):
        bd.REFUSAL_SOURCE.check(tmp_path)
    with pytest.raises(HpreditError, match="unknown task 'bbq2'"):
        get_task("bbq2")
    with pytest.raises(HpreditError, match="unknown A/B behaviour set 'greed'"):
        bd.ab_source("greed")
    monkeypatch.setattr(bd, "_package_file", lambda package, rel: None)
    with pytest.raises(HpreditError, match=r"no BBQ data offline: pass a local file with --data \(or \$HPREDIT_BBQ\)"):
        bd.BBQ_SOURCE.check()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(bd, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(HpreditError, match=r"no ToxiGen data: the hub is unreachable; pass a local file with --data"):
        bd.TOXIGEN_SOURCE.check()
    with pytest.raises(HpreditError, match="'hallucination' is not on the hub"):
        bd.ab_source("hallucination").check()
    monkeypatch.setattr(bd, "hub_reachable", lambda timeout=3.0: True)
    bd.REFUSAL_SOURCE.check()


def test_split_file_errors(tmp_path):
    (tmp_path / "split.json").write_text('{"seed": 0, "fractions": [0.5, 0.5], "train": [], "val": [], "test": []}')
    with pytest.raises(HpreditError, match="question split .*expected seed, fractions"):
        QuestionSplit.load(tmp_path / "split.json")
    (tmp_path / "split.json").write_text("{")
    with pytest.raises(HpreditError, match="not valid JSON"):
        QuestionSplit.load(tmp_path / "split.json")
