"""The command line: help everywhere, and user mistakes as one line with exit status 2."""

import json

import pytest

from hpredit.cli import main


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["generate", "--help"], ["run", "--help"]])
def test_help(argv, capsys):
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "Usage" in out


def _one_line_error(code, err, pattern):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and pattern in lines[0], lines[0]
    assert "Traceback" not in err


def test_fit_bad_pairs_file(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "positive": "b"}) + "\n")
    code, _, err = run_cli(["fit", "--pairs", str(bad), "--out", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, "p.jsonl:1: missing field 'negative'")
    assert not (tmp_path / "o").exists()


def test_run_missing_csv(tmp_path, capsys):
    code, _, err = run_cli(["run", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_run_csv_missing_column(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("Question,Best Answer,Incorrect Answers\nQ?,A,B\n")
    code, _, err = run_cli(["run", "--data", str(bad), "--out", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, "missing column(s) 'Correct Answers'")


def test_out_not_empty_needs_force(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("precious")
    code, _, err = run_cli(["run", "--out", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, "--force")
    assert (tmp_path / "o" / "keep.txt").read_text() == "precious"


def test_generate_missing_editor(tmp_path, capsys):
    code, _, err = run_cli(["generate", "Hello", "--editor", str(tmp_path / "none")], capsys)
    _one_line_error(code, err, "does not exist")


def test_fit_bad_layers_and_limit(tmp_path, capsys, truthfulqa_csv):
    code, _, err = run_cli(["fit", "--out", str(tmp_path / "o"), "--data", str(truthfulqa_csv), "--limit", "0"], capsys)
    _one_line_error(code, err, "must be positive")
    code, _, err = run_cli(
        ["fit", "--out", str(tmp_path / "o"), "--data", str(truthfulqa_csv), "--split", "dev"], capsys
    )
    _one_line_error(code, err, "unknown split 'dev'")


def test_generate_on_a_tiny_model(tmp_path, capsys, tokenizer):
    from .conftest import random_hpr, saved_tiny_model

    model = saved_tiny_model(tmp_path / "tiny-llama", tokenizer)  # the name the editor's fingerprint carries
    random_hpr(model).save_pretrained(tmp_path / "editor")
    code, out, err = run_cli(
        [
            "generate",
            "Hello there",
            "--model",
            str(tmp_path / "tiny-llama"),
            "--editor",
            str(tmp_path / "editor"),
            "--max-new-tokens",
            "3",
            "--strength",
            "1.5",
        ],
        capsys,
    )
    assert code in (0, None), err
    assert "unedited" in out and "strength 1.5" in out
