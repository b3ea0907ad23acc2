"""One registry type for tasks and editors: names, collisions, base classes and abstract hooks are
checked when something registers (before any model loads), and every user-facing list of tasks or
editor methods is built from the registries."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from hpredit.editors import CAAEditor, Editor, load_editor, register_editor
from hpredit.editors import base as editor_base
from hpredit.errors import HpreditError
from hpredit.evaluation import tasks as T
from hpredit.registry import Registry

from .conftest import random_editor, tiny_model

# --------------------------------------------------------------------------- the registry type


class _Base:
    pass


class _Widget(_Base):
    pass


def test_a_registry_checks_names_collisions_and_types():
    reg: Registry[_Base] = Registry("widget", _Base)
    a = reg.register("a", _Widget())
    assert reg.get("a") is a and reg.names() == ["a"] and "a" in reg and list(reg) == ["a"] and len(reg) == 1
    with pytest.raises(HpreditError, match="widget 'a' is already registered.*replace=True"):
        reg.register("a", _Widget())
    assert reg.get("a") is a  # the first one is kept
    b = reg.register("a", _Widget(), replace=True)
    assert reg.get("a") is b
    for bad in ("", "  ", None, 3):
        with pytest.raises(HpreditError, match=re.escape(f"widget name must be a non-empty string, got {bad!r}")):
            reg.register(bad, _Widget())  # type: ignore[arg-type]
    with pytest.raises(HpreditError, match="a widget must be a _Base instance, got str 'x'"):
        reg.register("x", "x")  # type: ignore[arg-type]
    with pytest.raises(HpreditError, match=re.escape("unknown widget 'zz' (known: a)")):
        reg.get("zz")
    reg.unregister("a")
    assert reg.names() == [] and "a" not in reg
    with pytest.raises(HpreditError, match="unknown widget 'a'"):
        reg.unregister("a")


def test_a_class_registry_refuses_other_classes_and_abstract_ones():
    from abc import ABC, abstractmethod

    class Hook(ABC):
        @abstractmethod
        def run(self): ...

    class Done(Hook):
        def run(self):
            return 1

    class NotDone(Hook):
        pass

    reg: Registry[type[Hook]] = Registry("hook", Hook, classes=True)
    assert reg.register("done", Done) is Done
    with pytest.raises(HpreditError, match="a hook must be a Hook subclass, got int"):
        reg.register("int", int)  # type: ignore[arg-type]
    with pytest.raises(HpreditError, match="a hook must be a Hook subclass, got Done instance"):
        reg.register("inst", Done())  # type: ignore[arg-type]
    with pytest.raises(HpreditError, match="hook 'nd': NotDone does not implement run"):
        reg.register("nd", NotDone)


def test_a_live_view_follows_the_registry():
    reg: Registry[_Base] = Registry("widget", _Base)
    view = reg.view()
    assert list(view) == [] and len(view) == 0
    reg.register("a", _Widget())
    assert list(view) == ["a"] and "a" in view and view[0] == "a" and view == ["a"]


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class _Complete(T.Task):
    def load(self, data=None):
        return []

    def check_source(self, data=None):
        return None

    def pairs(self, items, split_of, tok):
        raise AssertionError

    def score(self, model, tok, items):
        return {"acc": 0.0}


@pytest.fixture
def restore_tasks():
    before = T.task_names()
    yield
    for name in T.task_names():
        if name not in before:
            T.unregister_task(name)
    assert T.task_names() == before


def test_register_task_refuses_a_duplicate_name(restore_tasks):
    builtin = T.get_task("truthfulqa-mc")
    with pytest.raises(HpreditError, match="task 'truthfulqa-mc' is already registered.*replace=True"):
        T.register_task(_Complete("truthfulqa-mc", "acc", ("acc",)))
    assert T.get_task("truthfulqa-mc") is builtin  # not silently replaced
    with pytest.raises(HpreditError, match="task 'ab:sycophancy' is already registered"):
        T.register_task(_Complete("ab:sycophancy", "acc", ("acc",)))
    mine = T.register_task(_Complete("mine", "acc", ("acc",)))
    again = T.register_task(_Complete("mine", "acc", ("acc",), note="v2"), replace=True)
    assert T.get_task("mine") is again is not mine


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _Complete("", "acc", ("acc",)), "task name must be a non-empty string, got ''"),
        (lambda: _Complete("   ", "acc", ("acc",)), "task name must be a non-empty string, got '   '"),
        (lambda: _Complete("x", "mc2", ("acc",)), "task 'x': primary metric 'mc2' is not among its metrics (acc)"),
        (lambda: _Complete("x", "acc", ()), "task 'x': metrics must be a non-empty tuple of metric names, got ()"),
        (
            lambda: _Complete("x", "acc", "acc"),
            "task 'x': metrics must be a non-empty tuple of metric names, got 'acc'",
        ),
        (lambda: "str", "a task must be a Task instance, got str 'str'"),
        (lambda: _Complete, "a task must be a Task instance, got the class _Complete"),
    ],
    ids=["empty", "blank", "primary", "no-metrics", "metrics-str", "str", "class"],
)
def test_register_task_refuses_bad_tasks(make, message, restore_tasks):
    with pytest.raises(HpreditError, match=re.escape(message)):
        T.register_task(make())
    assert "x" not in T.task_names()


def test_a_task_missing_a_hook_fails_when_it_is_made():
    """Not at run time, after the model loaded, with an empty NotImplementedError."""

    @dataclass(frozen=True)
    class NoScore(T.Task):
        def load(self, data=None):
            return []

        def check_source(self, data=None):
            return None

        def pairs(self, items, split_of, tok):
            return None

    with pytest.raises(TypeError, match="abstract.*score"):
        NoScore("noscore", "acc", ("acc",))
    assert set(T.Task.__abstractmethods__) == {"load", "check_source", "pairs", "score"}


def test_a_task_registered_later_is_everywhere(restore_tasks):
    from hpredit.compare import CompareConfig
    from hpredit.evaluation import TASKS
    from hpredit.evaluation.job import EvalConfig

    assert "late" not in TASKS
    T.register_task(_Complete("late", "acc", ("acc",)))
    assert "late" in TASKS and list(TASKS) == T.task_names()  # TASKS is a live view, not a frozen tuple
    assert EvalConfig(task="late").task == CompareConfig(methods=["none"], seeds=[0], task="late").task == "late"
    with pytest.raises(HpreditError, match=r"unknown task 'magic' \(known: truthfulqa-mc, .*late"):
        T.get_task("magic")
    T.unregister_task("late")
    assert "late" not in TASKS


def test_cli_task_help_lists_every_registered_task(capsys):
    from hpredit.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    for name in T.task_names():
        assert name in out, name


# --------------------------------------------------------------------------- editors


def test_register_editor_refuses_a_duplicate_method():
    class Impostor(CAAEditor):
        method = "caa"

    with pytest.raises(HpreditError, match="editor method 'caa' is already registered.*replace=True"):
        register_editor(Impostor)
    assert editor_base.EDITORS.get("caa") is CAAEditor
    try:
        assert register_editor(Impostor, replace=True) is Impostor
        assert editor_base.EDITORS.get("caa") is Impostor
    finally:
        register_editor(CAAEditor, replace=True)
    assert editor_base.EDITORS.get("caa") is CAAEditor


def test_register_editor_refuses_what_is_not_an_editor():
    class Empty(CAAEditor):
        method = ""

    class Partial(Editor):
        method = "partial"
        config_class = CAAEditor.config_class

    with pytest.raises(HpreditError, match="an editor method must be an Editor subclass, got str 'x'"):
        register_editor("x")  # type: ignore[arg-type]
    with pytest.raises(HpreditError, match="an editor method must be an Editor subclass, got int"):
        register_editor(int)  # type: ignore[arg-type]
    with pytest.raises(HpreditError, match="editor method name must be a non-empty string, got ''"):
        register_editor(Empty)
    with pytest.raises(HpreditError, match="editor method 'partial': Partial does not implement"):
        register_editor(Partial)
    assert "partial" not in editor_base.EDITORS and "" not in editor_base.EDITORS

    @register_editor(replace=False)  # the decorator with options
    class Mine(CAAEditor):
        method = "mine-caa"

    try:
        assert editor_base.EDITORS.get("mine-caa") is Mine
    finally:
        editor_base.EDITORS.unregister("mine-caa")


def test_unknown_editor_method_lists_the_registry(tmp_path):
    import json

    ed = random_editor("caa", tiny_model())
    ed.save_pretrained(tmp_path / "ed")
    cfg = json.loads((tmp_path / "ed" / "config.json").read_text())
    cfg["method"] = "magic"
    (tmp_path / "ed" / "config.json").write_text(json.dumps(cfg))
    known = ", ".join(editor_base.EDITORS.names())
    with pytest.raises(HpreditError, match=re.escape(f"unknown editor method 'magic' (known: {known})")):
        load_editor(tmp_path / "ed")
    assert {"hpr", "caa", "caa-norm", "iti"} <= set(editor_base.EDITORS.names())


def test_serving_names_the_residual_editors_from_the_registry(tmp_path):
    """A heads editor is refused by serve with the list of editors it can serve (not "mean-diff")."""
    from hpredit.serving import check_editor

    random_editor("iti", tiny_model()).save_pretrained(tmp_path / "iti")
    residual = [n for n in editor_base.EDITORS.names() if editor_base.EDITORS.get(n).site == "residual"]
    with pytest.raises(HpreditError) as e:
        check_editor(tmp_path / "iti")
    assert f"({', '.join(residual)})" in str(e.value) and "mean-diff" not in str(e.value)
