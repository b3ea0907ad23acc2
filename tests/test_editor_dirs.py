"""An editor directory that is empty text or holds no editor: refused up front, or named in the message."""

from __future__ import annotations

import re

import pytest

from hpredit.editors import load_editor
from hpredit.errors import HpreditError
from hpredit.serving import parse_editors


@pytest.mark.parametrize(
    "specs, message",
    [
        (["a="], "--editor a=: no directory given"),
        (["a=  "], "--editor 'a=  ': no directory given"),
        ([""], "--editor '': no directory given"),
        (["x", "b="], "--editor b=: no directory given"),
    ],
)
def test_parse_editors_refuses_an_empty_directory(specs, message):
    with pytest.raises(HpreditError, match=re.escape(message)):
        parse_editors(specs)


def test_load_editor_names_the_directory_it_looked_in(tmp_path, monkeypatch):
    empty = (tmp_path / "empty").resolve()
    empty.mkdir()
    with pytest.raises(HpreditError, match=re.escape(f"{empty}: config.json is missing")):
        load_editor(empty)
    monkeypatch.chdir(empty)  # "." (what a CLI path option makes of "") names the directory, resolved
    with pytest.raises(HpreditError, match=re.escape(f"{empty}: config.json is missing")):
        load_editor(".")
    with pytest.raises(HpreditError, match="editor artifact: no directory given"):
        load_editor("")


def _one_error(capsys, argv: list[str]) -> str:
    from hpredit.cli import main

    capsys.readouterr()  # what the set-up printed (progress bars)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    return " ".join(lines[0].split())


def test_cli_serve_refuses_an_empty_editor_directory(capsys):
    assert "--editor a=: no directory given" in _one_error(capsys, ["serve", "--editor", "a="])


def test_cli_generate_refuses_an_empty_editor_directory(capsys):
    assert "--editor: no directory given" in _one_error(capsys, ["generate", "hi", "--editor", ""])


def test_cli_eval_names_the_directory_it_looked_in(capsys, tmp_path, monkeypatch, tokenizer):
    from .conftest import TRUTHFULQA_CSV, saved_tiny_model

    saved_tiny_model(tmp_path / "model", tokenizer)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    argv = ["eval", "--model", str(tmp_path / "model"), "--data", str(TRUTHFULQA_CSV), "--editor", ""]
    assert "--editor: no directory given" in _one_error(capsys, argv)
    argv[-1] = "."  # a directory that holds no editor: named in full
    assert f"{(tmp_path / 'cwd').resolve()}: config.json is missing" in _one_error(capsys, argv)
