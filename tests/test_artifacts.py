"""Atomic writes, output-directory checks and the cleaning of temporary siblings."""

import json
import os
import stat

import pytest

from hpredit.errors import HpreditError
from hpredit.files import (
    atomic_directory,
    check_output_dir,
    read_json,
    remove_stale_temporaries,
    write_json_atomic,
    write_text_atomic,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_text_and_json_atomic(tmp_path):
    umask = os.umask(0o022)
    try:
        p = write_text_atomic(tmp_path / "sub" / "a.txt", "héllo\n")
        assert p.read_text(encoding="utf-8") == "héllo\n" and _mode(p) == 0o644
        write_json_atomic(tmp_path / "b.json", {"x": [1, 2]})
        assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
        write_json_atomic(tmp_path / "b.json", {"x": 3})  # replaces the old version whole
        assert json.loads((tmp_path / "b.json").read_text()) == {"x": 3}
    finally:
        os.umask(umask)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.json", "sub"]  # no temporary left


def test_write_text_atomic_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old")

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(HpreditError, match=f"no space left on the device to write {target}: it needs 3 bytes"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_check_output_dir(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is left behind
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(HpreditError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(HpreditError, match="not a directory"):
        check_output_dir(tmp_path / "file" / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(HpreditError, match="not empty: pass --force"):
        check_output_dir(tmp_path / "full")
    check_output_dir(tmp_path / "full", force=True)
    with pytest.raises(HpreditError, match="cannot write to output directory /proc/hpredit-out"):
        check_output_dir("/proc/hpredit-out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_check_output_dir_unwritable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(HpreditError, match="cannot write"):
            check_output_dir(ro / "out")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_atomic_directory_cleans_on_any_exit(tmp_path, exc):
    target = tmp_path / "editor"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("v1")
    with pytest.raises(exc), atomic_directory(target) as tmp:
        (tmp / "a").write_text("v2")
        raise exc()
    assert (target / "a").read_text() == "v1"
    assert [f.name for f in tmp_path.iterdir()] == ["editor"]


def test_atomic_directory_has_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "d") == 0o755 and _mode(tmp_path / "d" / "f") == 0o644


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".editor.tmp-abc").mkdir()
    (tmp_path / ".editor.tmp-abc" / "x").write_text("x")
    (tmp_path / ".editor.old-def").mkdir()
    (tmp_path / ".summary.json.tmp-1").write_text("x")
    (tmp_path / "editor").mkdir()
    (tmp_path / ".other.tmp-1").mkdir()
    removed = remove_stale_temporaries(tmp_path / "editor")
    assert sorted(p.name for p in removed) == [".editor.old-def", ".editor.tmp-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", ".summary.json.tmp-1", "editor"]
    assert [p.name for p in remove_stale_temporaries(tmp_path / "summary.json")] == [".summary.json.tmp-1"]
    assert remove_stale_temporaries(tmp_path / "nowhere" / "x") == []


def test_read_json_errors(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 200_000)
    with pytest.raises(HpreditError, match="not valid JSON"):
        read_json(tmp_path / "deep.json", "thing")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(HpreditError, match="not valid JSON"):
        read_json(tmp_path / "bin.json", "thing")


def test_atomic_directory_with_subdirectories(tmp_path):
    """A whole run directory: nested artifacts (themselves written atomically) and plain files."""
    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "run") as tmp:
            with atomic_directory(tmp / "editor") as inner:
                (inner / "config.json").write_text("{}")
            (tmp / "eval" / "deep").mkdir(parents=True)
            (tmp / "eval" / "deep" / "x.json").write_text("[]")
            write_json_atomic(tmp / "summary.json", {"ok": True})
    finally:
        os.umask(umask)
    run = tmp_path / "run"
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        "editor",
        "editor/config.json",
        "eval",
        "eval/deep",
        "eval/deep/x.json",
        "summary.json",
    ]
    assert {_mode(p) for p in run.rglob("*") if p.is_dir()} | {_mode(run)} == {0o755}
    assert {_mode(p) for p in run.rglob("*") if p.is_file()} == {0o644}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
