"""TruthfulQA scoring: cached == uncached (with and without an editor), the tokenisation boundary,
evaluate() outputs, generation, and every bad input as one HpreditError line."""

import json

import pytest
import torch

import hpredit
from hpredit.cli import main
from hpredit.data import load_truthfulqa
from hpredit.errors import HpreditError
from hpredit.evaluation import evaluate, score_continuations, score_truthfulqa_mc

from .conftest import random_hpr, tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small forward passes: one torch thread costs little here and avoids the 5× slowdown of two
    OpenMP threads on a 2-core CPU that another job is using."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def questions(truthfulqa_csv):
    return load_truthfulqa(truthfulqa_csv)[:3]


@pytest.fixture(scope="module")
def two_questions(questions):
    """Two questions of different lengths (so a group has padding between context and answers)."""
    return questions[:2]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_model("llama", vocab=len(tokenizer))


def _max_diff(a, b):
    """Largest score difference, relative to float32 rounding of scores of size |s| (atol 1e-4)."""
    return max(
        abs(x.scores[k] - y.scores[k]) / max(1.0, abs(y.scores[k]) / 100)
        for x, y in zip(a.questions, b.questions)
        for k in x.scores
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])  # rotary, learned positions, sliding window
def test_cached_equals_uncached_with_and_without_editor(arch, tokenizer, two_questions):
    questions = two_questions
    model = tiny_model(arch, vocab=len(tokenizer))
    cached = score_truthfulqa_mc(model, tokenizer, questions)
    plain = score_truthfulqa_mc(model, tokenizer, questions, cached=False)
    assert _max_diff(cached, plain) < 1e-4
    assert cached.merged == 0 and cached.tokens > 0
    assert set(cached.questions[0].scores) == {
        questions[0].best_answer,
        *questions[0].correct_answers,
        *questions[0].incorrect_answers,
    }
    editor = random_hpr(model)
    with editor.attach(model, strength=1.0, scope="all"):
        cached_e = score_truthfulqa_mc(model, tokenizer, questions)
        plain_e = score_truthfulqa_mc(model, tokenizer, questions, cached=False)
    assert _max_diff(cached_e, plain_e) < 1e-4
    assert _max_diff(cached, cached_e) > 1e-2  # the editor did change the scores


def _count_calls(model, fn):
    """Input shapes of every backbone call and every causal-LM call made by ``fn()``."""
    body, lm = [], []
    h1 = model.model.register_forward_pre_hook(
        lambda m, a, k: body.append(tuple(k["input_ids"].shape)), with_kwargs=True
    )
    h2 = model.register_forward_pre_hook(lambda m, a, k: lm.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    try:
        fn()
    finally:
        h1.remove()
        h2.remove()
    return body, lm


def test_primer_once_each_question_once(tiny, tokenizer, questions):
    n = len(questions)
    answers = [len(q.scores) for q in score_truthfulqa_mc(tiny, tokenizer, questions).questions]
    # one question at a time: the primer once, each question once, each question's answers in one batch
    body, lm = _count_calls(
        tiny, lambda: score_truthfulqa_mc(tiny, tokenizer, questions, group_size=1, batch_tokens=10**6)
    )
    assert len(body) == 1 + 2 * n and len(lm) == n
    assert body[0][1] > 150  # the primer (and the shared "\n\nQ:") is the first call
    assert sorted(s[0] for s in lm) == sorted(answers)
    # grouped (the default): the questions of a group in one call, their answers sorted into batches
    body, lm = _count_calls(tiny, lambda: score_truthfulqa_mc(tiny, tokenizer, questions, batch_tokens=200))
    assert body[1][0] == n and len(body) == 2 + len(lm) and len(lm) > 1
    assert sum(s[0] for s in lm) == sum(answers) and all(s[0] * s[1] <= 200 for s in lm if s[0] > 1)


class MergingCharTokenizer:
    """Characters as ids, except that ``": "`` is one token: ``"A:"`` + ``" yes"`` merges."""

    pad_token_id, eos_token_id = 0, 1

    def encode(self, s):
        ids, i = [], 0
        while i < len(s):
            if s.startswith(": ", i):
                ids.append(250)
                i += 2
            else:
                ids.append(2 + ord(s[i]) % 240)
                i += 1
        return ids

    def __call__(self, texts, **_):
        return {"input_ids": [self.encode(t) for t in texts]}


def test_boundary_merge_is_scored_exactly_and_counted():
    model = tiny_model("llama")
    tok = MergingCharTokenizer()
    items = [("Q: is it?\nA:", [" yes.", " no.", "x"]), ("Q: and this one?\nA:", [" maybe.", "y"])]
    cached = score_continuations(model, tok, items)
    plain = score_continuations(model, tok, items, cached=False)
    assert cached.merged == plain.merged == 3  # the three continuations starting with " "
    for a, b in zip(cached.scores, plain.scores):
        assert a == pytest.approx(b, abs=1e-4)
    # the merged ": " token is part of the continuation: scored given "Q: is it?\nA"
    ids = tok.encode("Q: is it?\nA: yes.")
    logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(tok.encode("Q: is it?\nA"))
    manual = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
    assert cached.scores[0][0] == pytest.approx(manual, abs=1e-4)


def test_evaluate_with_editor_writes_everything(tiny, tokenizer, truthfulqa_csv, tmp_path):
    editor = random_hpr(tiny)
    out = tmp_path / "eval"
    result = evaluate(
        model=tiny,
        tokenizer=tokenizer,
        editor=editor,
        task="truthfulqa-mc",
        split="fold0",
        seed=1,
        limit=2,
        strength=0.5,
        data=truthfulqa_csv,
        out=out,
        show=False,
        bootstrap_resamples=200,
    )
    m = result.metrics
    assert set(m) == {"unedited", "edited", "difference"}
    for name in ("mc1", "mc2", "mc3"):
        assert 0 <= m["unedited"][name] <= 1 and 0 <= m["edited"][name] <= 1
        d = m["difference"][name]
        assert d["mean"] == pytest.approx(m["edited"][name] - m["unedited"][name])
        assert d["ci"][0] <= d["mean"] + 1e-12 and d["mean"] - 1e-12 <= d["ci"][1]
    assert sorted(p.name for p in out.iterdir()) == ["per_question.jsonl", "split.json", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["editor"]["strength"] == 0.5 and summary["editor"]["method"] == "hpr"
    assert summary["split"]["name"] == "fold0" and summary["split"]["seed"] == 1
    assert summary["split"]["indices"] == hpredit.data.two_fold_split(817, 1)[0].test[:2]
    assert {"torch", "transformers", "hpredit"} <= set(summary["versions"])
    assert summary["model"]["architecture"] == "LlamaForCausalLM" and summary["command"].startswith("hpredit.evaluate(")
    rows = [json.loads(line) for line in (out / "per_question.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    q = load_truthfulqa(truthfulqa_csv)[rows[0]["index"]]
    assert len(rows[0]["answers"]) == len(q.correct_answers) + len(q.incorrect_answers)
    assert all(set(a["score"]) == {"unedited", "edited"} for a in rows[0]["answers"])
    assert len(json.loads((out / "split.json").read_text())["folds"]) == 2
    # the same questions scored again: identical numbers
    again = evaluate(
        model=tiny,
        tokenizer=tokenizer,
        task="truthfulqa-mc",
        split="fold0",
        seed=1,
        limit=2,
        data=truthfulqa_csv,
        show=False,
    )
    # unedited alone vs beside the edited rows in one widened pass: the same within float32 rounding
    assert again.metrics["unedited"] == pytest.approx(m["unedited"], abs=1e-6)


def test_generation_with_judges(tiny, tokenizer, truthfulqa_csv):
    seen = []

    def truth(question, answer):
        seen.append((question, answer))
        return True

    result = evaluate(
        model=tiny,
        tokenizer=tokenizer,
        editor=random_hpr(tiny),
        task="truthfulqa-gen",
        split="all",
        limit=2,
        data=truthfulqa_csv,
        max_new_tokens=4,
        show=False,
        scope="last-prompt-and-generated",
        judges={"truth": truth, "info": lambda q, a: 0.25},
        bootstrap_resamples=100,
    )
    m = result.metrics
    assert {"bleu_acc", "rougeL_acc", "judge_truth", "judge_info_acc", "truth_x_info"} <= set(m["unedited"])
    assert m["unedited"]["truth_x_info"] == 0.0 and m["edited"]["judge_truth"] == 1.0
    assert len(seen) == 4  # 2 questions × (unedited, edited)
    assert set(result.per_question[0]["generation"]) == {"unedited", "edited"}


def test_hf_judge(tiny, tokenizer):
    from hpredit.evaluation.judges import INFO_TEMPLATE, HFJudge

    judge = HFJudge(tiny, tokenizer)
    p = judge("Is the sky blue?", "Yes.")
    assert isinstance(p, float) and 0 < p < 1
    raw = HFJudge(tiny, tokenizer, normalize=False)("Is the sky blue?", "Yes.")
    assert 0 < raw <= p  # p(yes) over the whole vocabulary ≤ p(yes) / (p(yes) + p(no))
    assert HFJudge(tiny, tokenizer, INFO_TEMPLATE)("Is the sky blue?", "Yes.") != p
    with pytest.raises(HpreditError, match="needs the fields"):
        HFJudge(tiny, tokenizer, template="Q: {question}\nTrue:")


def test_a_failing_run_leaves_no_output(tiny, tokenizer, truthfulqa_csv, tmp_path):
    with pytest.raises(HpreditError, match="judge must return"):
        evaluate(
            model=tiny,
            tokenizer=tokenizer,
            task="truthfulqa-gen",
            split="all",
            limit=1,
            data=truthfulqa_csv,
            max_new_tokens=2,
            judges=lambda q, a: 2.0,
            out=tmp_path / "o",
            show=False,
        )
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad input


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    _, err = capsys.readouterr()
    return exc.value.code, err


def one_line_error(code, err, pattern):
    """Exit status 2 and the error as one line, the last on stderr (after any loading progress bar)."""
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and pattern in errors[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def saved(tiny, tokenizer, tmp_path_factory):
    """A tiny Llama and its tokenizer on disk, and an editor fitted on a tiny Qwen2."""
    root = tmp_path_factory.mktemp("saved")
    tiny.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    random_hpr(tiny_model("qwen2")).save_pretrained(root / "other-editor")
    return root


def _bad_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Question,Best Answer,Incorrect Answers\nQ?,A,B\n")
    return bad


def _three_questions(truthfulqa_csv, tmp_path):
    lines = truthfulqa_csv.read_text(encoding="utf-8").splitlines(keepends=True)
    small = tmp_path / "small.csv"
    small.write_text("".join(lines[:4]), encoding="utf-8")
    return small


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing-column", "missing column(s) 'Correct Answers'"),
        ("unknown-split", "unknown split 'dev'"),
        ("empty-split-name", "unknown split ''"),
        ("empty-split", "split 'val' has no questions"),
        ("limit-0", "limit must be positive, got 0"),
        ("other-model-editor", "editor does not match this model: architecture LlamaForCausalLM"),
        ("mc-scope", "only --scope all applies"),
        ("unknown-task", "unknown task 'truthfulqa'"),
    ],
)
def test_bad_input_cli_and_api(case, pattern, saved, truthfulqa_csv, tmp_path, capsys):
    out = tmp_path / "out"
    data = truthfulqa_csv
    cli = ["eval", "--model", str(saved / "model"), "--out", str(out)]
    api = dict(model=str(saved / "model"), out=out, show=False)
    if case == "missing-column":
        data = _bad_csv(tmp_path)
    elif case == "unknown-split":
        cli += ["--split", "dev"]
        api["split"] = "dev"
    elif case == "empty-split-name":
        cli += ["--split", ""]
        api["split"] = ""
    elif case == "empty-split":
        data = _three_questions(truthfulqa_csv, tmp_path)
        cli += ["--split", "val"]
        api["split"] = "val"
    elif case == "limit-0":
        cli += ["--limit", "0"]
        api["limit"] = 0
    elif case == "other-model-editor":
        cli += ["--editor", str(saved / "other-editor"), "--limit", "1"]
        api.update(editor=saved / "other-editor", limit=1)
    elif case == "mc-scope":
        cli += ["--editor", str(saved / "other-editor"), "--scope", "generated"]
        api.update(editor=saved / "other-editor", scope="generated")
    elif case == "unknown-task":
        cli += ["--task", "truthfulqa"]
        api["task"] = "truthfulqa"
    code, err = run_cli(cli + ["--data", str(data)], capsys)
    one_line_error(code, err, pattern)
    assert not out.exists()
    with pytest.raises(HpreditError) as exc:
        evaluate(data=data, **api)
    assert pattern in str(exc.value) and "\n" not in str(exc.value)
    assert not out.exists()


def test_eval_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0 and "--task" in capsys.readouterr().out


def test_out_not_empty_needs_force(saved, truthfulqa_csv, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(
        ["eval", "--model", str(saved / "model"), "--data", str(truthfulqa_csv), "--limit", "1", "--out", str(out)],
        capsys,
    )
    one_line_error(code, err, "--force")
    assert (out / "keep.txt").read_text() == "precious"


def test_cli_eval_runs(saved, truthfulqa_csv, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "eval",
                "--model",
                str(saved / "model"),
                "--data",
                str(truthfulqa_csv),
                "--split",
                "fold1",
                "--limit",
                "1",
                "--out",
                str(out),
            ]
        )
    assert exc.value.code == 0
    captured = capsys.readouterr().out
    assert "mc2" in captured and "unedited" in captured
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"].startswith("hpredit ") and summary["questions"] == 1


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_model_three_questions(smol, questions, truthfulqa_csv):
    model, tok = smol
    result = evaluate(model=model, tokenizer=tok, split="all", limit=3, data=truthfulqa_csv, show=False)
    assert result["questions"] == 3 and result["boundary_merges"] == 0
    assert 0 < result.metrics["unedited"]["mc2"] < 1
    # two answers of the first question against the plain forward pass of the full text
    q = questions[0]
    context = hpredit.data.qa_prompt(q.question)
    texts = [q.best_answer, q.incorrect_answers[0]]
    reference = score_continuations(model, tok, [(context, [" " + a for a in texts])], cached=False).scores[0]
    scored = {a["text"]: a["score"]["unedited"] for a in result.per_question[0]["answers"]}
    assert [scored[a] for a in texts] == pytest.approx(reference, abs=1e-4)
    for row in result.per_question:
        assert row["unedited"]["mc1"] in (0.0, 1.0) and 0 <= row["unedited"]["mc3"] <= 1
