"""The second bad-input sweep (issue 21): device maps, output targets, full disks, seeds, CSV shape,
lm-eval tasks, environment variables, Python API inputs, duplicates, hangs and leftovers.

The table runs each command line through the real entry point with model loading blocked (the
``world`` and ``no_model_loads`` fixtures of tests/test_bad_inputs.py): exit status 2, one ``error:``
line with the expected fragment, nothing written, inputs untouched. Below the table: the cases that
need a model, a process or a filesystem of their own.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import hpredit
from hpredit.checks import check_seed, check_unique, env_number
from hpredit.cli import main
from hpredit.data import ContrastivePair, load_truthfulqa, truthfulqa_pairs
from hpredit.errors import HpreditError
from hpredit.files import atomic_directory, check_output_dir, remove_stale_temporaries

from .conftest import tiny_model
from .test_bad_inputs import (  # noqa: F401  (fixtures)
    Case,
    _fill,
    _snapshot,
    no_model_loads,
    one_error_line,
    world,
)

CUDA = torch.cuda.is_available()
HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
ROW = "Adversarial,Misc,Q{i}?,Yes.,Yes; Sure,No; Nope,src\n"


@pytest.fixture(scope="module")
def world2(world, tmp_path_factory) -> dict[str, str]:  # noqa: F811
    """``world`` plus the bad files of this sweep (never modified)."""
    root = tmp_path_factory.mktemp("world2")
    (root / "short-row.csv").write_text(HEADER + ROW.format(i=0) + "Adversarial,Misc,Q1?,Yes.\n")
    (root / "two-questions.csv").write_text(HEADER.replace("Source", "Question") + ROW.format(i=0))
    (root / "three-rows.csv").write_text(HEADER + "".join(ROW.format(i=i) for i in range(3)))
    editor = root / "editor-no-sha"
    shutil.copytree(world["editor"], editor)
    config = json.loads((editor / "config.json").read_text())
    del config["weights_sha256"]
    (editor / "config.json").write_text(json.dumps(config))
    inputs = root / "inputs"
    inputs.mkdir()
    shutil.copy(world["pairs.jsonl"], inputs / "pairs.jsonl")
    return {
        **world,
        "root2": str(root),
        "inputs": str(inputs),
        "inputs_pairs": str(inputs / "pairs.jsonl"),
        **{k.replace("-", "_").replace(".", "_"): str(root / k) for k in ("short-row.csv", "two-questions.csv")},
        "three_rows": str(root / "three-rows.csv"),
        "editor_no_sha": str(editor),
    }


FIT = "fit --model {model} --pairs {pairs.jsonl} --top-k 2 --out {out}"
RUN = "run --model {model} --data {csv} --top-k 2 --out {out}"
EVAL = "eval --model {model} --data {csv} --out {out}"
GEN = "generate hello --model {model} --editor {editor}"
CMP = "compare --model {model} --data {csv} --methods none,hpr --out {out}"
DIST = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}

CASES = [
    # -- tracebacks before: device maps get the checks of --device; an all-"disk" map is refused
    Case("devmap-all-disk-fit", FIT + ' --device-map {"":"disk"}', 'every module on "disk"'),
    Case("devmap-all-disk-eval", EVAL + ' --device-map {"":"disk"}', 'every module on "disk"'),
    Case("devmap-all-disk-generate", GEN + ' --device-map {"":"disk"}', 'every module on "disk"'),
    Case("devmap-gpu7", RUN + ' --device-map {"":"gpu7"}', "unknown device 'gpu7'"),
    *([] if CUDA else [Case("devmap-cuda-no-cuda", RUN + ' --device-map {"":"cuda:0"}', "CUDA is not available")]),
    *([] if CUDA else [Case("devmap-int-no-cuda", FIT + ' --device-map {"":0}', "CUDA is not available")]),
    # -- output targets that would replace the current directory, a parent of it or the inputs
    Case("out-empty-force", "fit --model {model} --pairs {pairs.jsonl} --out ∅ --force", "current directory"),
    Case("out-dot-force", "fit --model {model} --pairs {pairs.jsonl} --out . --force", "current directory"),
    Case("out-parent-of-cwd", "fit --model {model} --pairs {pairs.jsonl} --out .. --force", "a parent of the current"),
    Case(
        "out-holds-its-pairs",
        "fit --model {model} --pairs {inputs_pairs} --top-k 2 --out {inputs} --force",
        "holds the input",
    ),
    Case("out-holds-the-editor", "eval --model {model} --data {csv} --editor {editor} --out {root} --force", "holds"),
    Case("run-out-holds-the-data", "run --model {model} --data {three_rows} --out {root2} --force", "holds the input"),
    # -- seeds: checked first
    Case("run-seed-negative", RUN + " --seed -7", "--seed must be a whole number ≥ 0, got -7"),
    Case(
        "eval-seed-negative",
        EVAL + " --editor {editor} --no-strict --seed -1",
        "--seed must be a whole number ≥ 0, got -1",
    ),
    Case(
        "fit-seed-negative",
        "fit --model {model} --data {csv} --top-k 2 --out {out} --seed -3",
        "must be a whole number ≥ 0",
    ),
    Case("compare-seeds-negative", CMP + " --seeds 0,-1", "each of --seeds must be a whole number ≥ 0"),
    # -- CSV shape
    Case(
        "csv-short-row",
        "run --model {model} --data {short_row_csv} --top-k 2 --out {out}",
        "4 field(s) where the header has 7",
    ),
    Case(
        "csv-two-question-columns",
        "run --model {model} --data {two_questions_csv} --top-k 2 --out {out}",
        "more than once",
    ),
    Case(
        "csv-too-few-rows",
        "run --model {model} --data {three_rows} --top-k 2 --out {out}",
        "val split has no questions",
    ),
    Case("eval-csv-short-row", "eval --model {model} --data {short_row_csv}", "where the header has 7"),
    # -- lm-eval: an unknown task is one line
    Case(
        "lm-eval-unknown-task",
        "lm-eval run --model hpredit --model_args pretrained={model} --tasks no_such_task_xyz",
        "Tasks not found: no_such_task_xyz",
    ),
    # -- environment variables: each checked where it is read, one line naming it
    Case("env-dist-timeout-abc", FIT, "HPREDIT_DIST_TIMEOUT='abc'", env={**DIST, "HPREDIT_DIST_TIMEOUT": "abc"}),
    Case("env-world-size-without-rank", FIT, "RANK", env={**DIST, "RANK": None}),
    Case("env-world-size-abc", FIT, "WORLD_SIZE='abc'", env={"WORLD_SIZE": "abc"}),
    Case("env-rank-out-of-range", FIT, "RANK='5' must be an integer from 0 to 1", env={**DIST, "RANK": "5"}),
    Case(
        "env-cache-is-a-file",
        "fit --pairs {pairs.jsonl} --top-k 2 --out {out}",
        "HPREDIT_CACHE",
        env={"HPREDIT_CACHE": "{a_file}"},
    ),
    Case(
        "env-cache-unwritable",
        "fit --pairs {pairs.jsonl} --top-k 2 --out {out}",
        "cannot write the model cache",
        env={"HPREDIT_CACHE": "/proc/hpredit-cache"},
    ),
    Case(
        "env-truthfulqa-dev-null",
        "run --model {model} --top-k 2 --out {out}",
        "environment variable HPREDIT_TRUTHFULQA: /dev/null is not a regular file",
        env={"HPREDIT_TRUTHFULQA": "/dev/null"},
    ),
    Case(
        "env-truthfulqa-directory",
        "eval --model {model}",
        "environment variable HPREDIT_TRUTHFULQA:",
        env={"HPREDIT_TRUTHFULQA": "{root}"},
    ),
    # -- nonsense accepted before
    Case(
        "split-test-test",
        "fit --model {model} --data {csv} --split test+test --top-k 2 --out {out}",
        "test more than once",
    ),
    Case("devmap-unknown-module", FIT + ' --device-map {"model.layerz.0":"cpu","":"cpu"}', "'model.layerz.0'"),
    Case("devmap-incomplete", FIT + ' --device-map {"model.layers.0":"cpu"}', "places no device for"),
    Case("compare-methods-twice", CMP.replace("none,hpr", "hpr,hpr"), "--methods lists 'hpr' more than once"),
    Case("compare-seeds-twice", CMP + " --seeds 0,0", "--seeds lists 0 more than once"),
    # -- unclear messages before
    Case("pairs-dev-null", "fit --model {model} --pairs /dev/null --top-k 2 --out {out}", "not a regular file"),
    Case("data-dev-null", "run --model {model} --data /dev/null --top-k 2 --out {out}", "not a regular file"),
    Case("layers-only-commas", FIT + " --layers ,", "--layers needs at least one value"),
    Case("editor-without-checksum", "generate hi --model {model} --editor {editor_no_sha}", "no 'weights_sha256'"),
    # -- hangs before: generation bounded by the model's context (the tiny model has 256 positions)
    Case("generate-max-new-tokens-huge", GEN + " --max-new-tokens 100000", "context of 256 positions"),
    Case(
        "eval-gen-max-new-tokens-huge",
        "eval --model {model} --data {csv} --task truthfulqa-gen --max-new-tokens 100000",
        "context of 256 positions",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_writes_nothing(
    case,
    world2,
    tmp_path,
    capsys,
    monkeypatch,
    no_model_loads,  # noqa: F811
):
    out = tmp_path / "out"
    for key, value in case.env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, _fill(value, world2, out)[0])
    before = {k: _snapshot(Path(world2[k])) for k in ("root", "root2")}
    monkeypatch.chdir(tmp_path)  # "." and ".." name the test's own directories
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cwd_before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(_fill(case.argv, world2, out))
    _, err = capsys.readouterr()
    one_error_line(exc.value.code, err, case.fragment)
    assert _snapshot(tmp_path) == cwd_before, "something was written"
    assert {k: _snapshot(Path(world2[k])) for k in ("root", "root2")} == before, "an input was modified"


def test_every_new_case_has_a_distinct_name():
    assert len({c.id for c in CASES}) == len(CASES)


def test_the_dist_timeout_variable_does_not_break_a_single_process(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    """``HPREDIT_DIST_TIMEOUT`` is read only when a process group starts: without a launcher a bad
    value is not the command's business (it used to break every command at import)."""
    monkeypatch.setenv("HPREDIT_DIST_TIMEOUT", "abc")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model", world["model"], "--pairs", world["pairs.jsonl"], "--layers", "99", "--out", "x"])
    one_error_line(exc.value.code, capsys.readouterr()[1], "--layers [99] out of range")


# --------------------------------------------------------------------------- checks.py contracts


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, "3", True, None])
def test_check_seed_refuses_what_numpy_and_python_do_not_both_take(bad):
    with pytest.raises(HpreditError, match="must be a whole number ≥ 0"):
        check_seed(bad, "--seed")


def test_check_seed_and_check_unique_accept_good_values():
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1
    assert check_unique([0, 1, 2], "--seeds") == [0, 1, 2]
    with pytest.raises(HpreditError, match="--methods lists 'hpr', 'caa' more than once"):
        check_unique(["hpr", "caa", "hpr", "caa", "hpr"], "--methods")


@pytest.mark.parametrize("text", ["abc", "0", "-5", "nan", "inf"])
def test_env_number_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("HPREDIT_X", text)
    with pytest.raises(HpreditError, match=f"environment variable HPREDIT_X='{text}' must be a number greater than 0"):
        env_number("HPREDIT_X", 5.0)


def test_env_number_default_and_value(monkeypatch):
    monkeypatch.delenv("HPREDIT_X", raising=False)
    assert env_number("HPREDIT_X", 5.0) == 5.0
    monkeypatch.setenv("HPREDIT_X", " 12.5 ")
    assert env_number("HPREDIT_X", 5.0) == 12.5


# --------------------------------------------------------------------------- data


def test_utf8_bom_csv_reads_like_the_plain_one(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text(HEADER.replace("Type,Category,", "") + "Q?,Yes.,Yes,No,s\n" * 2)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    hpredit.data.check_truthfulqa_source(bom)
    assert load_truthfulqa(bom) == load_truthfulqa(plain)


def test_all_split_of_a_small_csv_is_still_allowed(tmp_path):
    """``all`` takes whatever there is; only a named empty split is refused."""
    path = tmp_path / "q.csv"
    path.write_text(HEADER + "".join(ROW.format(i=i) for i in range(3)))
    assert len({p.group for p in truthfulqa_pairs("all", path=path)}) == 3
    with pytest.raises(HpreditError, match="val split has no questions"):
        truthfulqa_pairs("val", path=path)


# --------------------------------------------------------------------------- Python API inputs


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    return model, tokenizer


@pytest.mark.parametrize("pairs", [["a", "b"], "ab", [("a",)], [(1, 2)], [{"positive": "a"}], 5])
def test_collect_activations_refuses_what_is_not_pairs(tiny, pairs):
    model, tok = tiny
    with pytest.raises(HpreditError, match=r"pairs must be ContrastivePair objects or \(prompt, positive, negative\)"):
        hpredit.collect_activations(model, tok, pairs, progress=False)


def test_collect_activations_accepts_tuples(tiny):
    model, tok = tiny
    objects = [ContrastivePair("Q: sky?\nA:", " Blue.", " Green.", group=0), ContrastivePair("", " Yes.", " No.", 1)]
    tuples = [("Q: sky?\nA:", " Blue.", " Green."), (" Yes.", " No.")]
    a = hpredit.collect_activations(model, tok, objects, progress=False, dtype="float32")
    b = hpredit.collect_activations(model, tok, tuples, progress=False, dtype="float32")
    assert a.texts == b.texts and torch.equal(a.acts, b.acts) and torch.equal(a.groups, b.groups)


def test_texts_longer_than_the_models_positions_are_refused_before_running(tiny, monkeypatch):
    model, tok = tiny  # 256 positions
    ran = []
    monkeypatch.setattr(hpredit.activations, "_run_on_prompt_caches", lambda *a: ran.append(1))
    pairs = [ContrastivePair("Q: sky?\nA:", " Blue." * 400, " Green.")]
    with pytest.raises(HpreditError, match="longer than the model's 256 positions"):
        hpredit.collect_activations(model, tok, pairs, progress=False)
    assert not ran


def _store(model, tok, pairs):
    return hpredit.collect_activations(model, tok, pairs, progress=False, dtype="float32")


def test_fit_refuses_pairs_that_all_contrast_nothing(tiny):
    model, tok = tiny
    store = _store(model, tok, [ContrastivePair(f"Q{i}:", " Same.", " Same. ", group=i) for i in range(4)])
    from hpredit.editors import CAAEditor

    for method in (hpredit.HPREditor, CAAEditor):
        with pytest.raises(HpreditError, match="every pair has the same positive and negative"):
            method.fit(store, progress=False)


def test_fit_warns_about_some_pairs_that_contrast_nothing_and_keeps_them(tiny):
    """Kept, not refused: TruthfulQA itself has two such pairs (questions 347 and 354), and the
    published figures include them; the JSONL reader refuses them in a user's own file."""
    model, tok = tiny
    pairs = [ContrastivePair(f"Q{i}:", " Yes.", " No." if i else " Yes.", group=i) for i in range(6)]
    store = _store(model, tok, pairs)
    with pytest.warns(UserWarning, match="1 of 6 pairs have the same positive and negative"):
        editor = hpredit.HPREditor.fit(store, epochs=1, top_k=1, progress=False)
    assert editor.metrics["train_token_pairs"] + editor.metrics["val_token_pairs"] > 0


def test_truthfulqa_keeps_its_two_pairs_alike(truthfulqa_csv):
    """The reason fit only warns: the dataset's own pairs, which the published numbers include."""
    pairs = truthfulqa_pairs("all", path=truthfulqa_csv)
    alike = sorted({p.group for p in pairs if p.positive.split() == p.negative.split()})
    assert alike == [347, 354]


def test_one_group_validates_on_training_pairs_and_says_so(tiny):
    model, tok = tiny
    store = _store(model, tok, [ContrastivePair("Q:", " Yes.", " No.", group=0)])
    with pytest.warns(UserWarning, match="fewer than 2 groups"):
        editor = hpredit.HPREditor.fit(store, epochs=1, top_k=1, progress=False)
    assert editor.metrics["validation"].startswith("the training pairs")
    assert "held-out" not in json.dumps(editor.metrics)


def test_generation_is_bounded_by_the_context_and_says_so_once(tokenizer):
    from hpredit.evaluation.scoring import generate_texts

    model = tiny_model("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        texts = generate_texts(model, tokenizer, ["Hello there", "Hi"], max_new_tokens=1000, batch_size=1)
    said = [w for w in caught if "positions" in str(w.message)]
    assert len(said) == 1 and "generating at most" in str(said[0].message)
    assert len(texts) == 2


def test_load_model_checks_the_device_map(world):  # noqa: F811
    for spec, fragment in (
        ({"": "gpu7"}, "unknown device 'gpu7'"),
        ({"": "disk"}, 'every module on "disk"'),
        ({"model.layerz.0": "cpu", "": "cpu"}, "model.layerz.0"),
    ):
        with pytest.raises(HpreditError, match=fragment):
            hpredit.load_model(world["model"], device_map=spec)


# --------------------------------------------------------------------------- outputs: full disk, leftovers, races


def test_a_full_disk_is_one_line_naming_the_path_and_nothing_is_left(tmp_path):
    target = tmp_path / "out"

    def fill(tmp: Path, error: Exception) -> None:
        (tmp / "part.bin").write_bytes(b"x" * 5000)
        raise error

    from safetensors import SafetensorError

    for error in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError("No space left on device (os)")):
        with pytest.raises(HpreditError) as exc, atomic_directory(target) as tmp:
            fill(tmp, error)
        message = str(exc.value)
        assert "\n" not in message and str(target) in message and "needs more than 5.0 KB" in message
        assert list(tmp_path.iterdir()) == []
    # a nested write (an editor or a store inside the output) names the output, with all written so far
    with pytest.raises(HpreditError) as exc, atomic_directory(target) as tmp:
        (tmp / "editor.bin").write_bytes(b"x" * 3000)
        with atomic_directory(tmp / "activations") as inner:
            fill(inner, OSError(errno.ENOSPC, "No space left on device"))
    message = str(exc.value)
    assert message.startswith(f"no space left on the device to write {target}: it needs more than 8.0 KB"), message
    assert ".tmp-" not in message and list(tmp_path.iterdir()) == []


def test_a_full_disk_during_fit_is_one_error_line(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    def full(self, directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "editor.safetensors").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hpredit.HPREditor, "save_pretrained", full)
    out = tmp_path / "out"
    argv = ["fit", "--model", world["model"], "--pairs", world["pairs.jsonl"], "--top-k", "1", "--epochs", "1"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)])
    one_error_line(exc.value.code, capsys.readouterr()[1], f"no space left on the device to write {out}")
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_write_go_on_the_next_write_but_a_live_writers_stay(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / ".out.tmp-dead"
    dead.mkdir()
    (dead / "partial").write_text("x")
    with atomic_directory(target) as tmp:  # holds its lock: a live writer
        assert not dead.exists()  # the killed write's leftovers went first
        (tmp / "a").write_text("1")
        assert remove_stale_temporaries(target) == [] and tmp.exists()
        with pytest.raises(HpreditError, match="another process is writing"):
            check_output_dir(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_sigkilled_fit_leaves_a_temporary_that_the_next_fit_removes(world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        from hpredit.files import atomic_directory
        with atomic_directory(Path({str(out)!r})) as tmp:
            (tmp / "half").write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(Path(hpredit.__file__).parents[1])}
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")], "the kill left nothing to clean"
    argv = ["fit", "--model", world["model"], "--pairs", world["pairs.jsonl"], "--top-k", "1", "--epochs", "1"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)])  # no --force
    assert exc.value.code in (0, None), capsys.readouterr()[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    """Two runs to the same new --out: the one finishing second refuses instead of replacing."""
    target = tmp_path / "out"
    with pytest.raises(HpreditError, match="was written by another process while this one worked"):
        with atomic_directory(target) as tmp:
            (tmp / "mine").write_text("second")
            target.mkdir()  # the other run finished first
            (target / "theirs").write_text("first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["theirs"]
    with atomic_directory(target) as tmp:  # what was there at the start is replaced, as before
        (tmp / "mine").write_text("third")
    assert [p.name for p in target.iterdir()] == ["mine"]


def test_a_disk_device_map_leaves_no_offload_directory_and_keeps_the_weight_signature(world, tmp_path):  # noqa: F811
    script = textwrap.dedent(
        f"""
        import hpredit
        from hpredit.architecture import weight_signature
        spread = {{"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                   "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}}
        whole, _ = hpredit.load_model({world["model"]!r})
        model, _ = hpredit.load_model({world["model"]!r}, device_map=spread)
        assert hpredit.fingerprint(model).weights is not None
        assert hpredit.fingerprint(model).weights == hpredit.fingerprint(whole).weights
        """
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(hpredit.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("hpredit-offload-")]


# --------------------------------------------------------------------------- distributed: bounded waits, one line

_WORKER = textwrap.dedent(
    """
    import os, sys
    from hpredit import distributed as dist
    from hpredit.cli import _fail
    from hpredit.errors import HpreditError
    try:
        dist.init()
        if dist.rank() == 1:
            os._exit(0)  # the peer dies
        dist.all_gather("x")
        dist.all_gather("y")
    except HpreditError as e:
        _fail(str(e))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, timeout: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "HPREDIT_DIST_TIMEOUT": timeout,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(hpredit.__file__).parents[1]),
    }
    return subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stderr=subprocess.PIPE, text=True)


def _one_line(proc: subprocess.Popen, timeout: float) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    one_error_line(proc.returncode, err, "")
    return err.strip().splitlines()[-1]


def test_rank_zero_alone_waits_a_bounded_time_and_says_so_in_one_line():
    line = _one_line(_rank(0, _free_port(), "3"), timeout=120)
    assert "rank 0 of 2: could not join the other ranks" in line and "HPREDIT_DIST_TIMEOUT" in line


def test_ranks_started_by_hand_stop_with_one_line_when_a_peer_dies():
    port = _free_port()
    zero, one = _rank(0, port, "30"), _rank(1, port, "30")
    try:
        line = _one_line(zero, timeout=180)
    finally:
        one.kill()
        one.communicate()
    assert "rank 0 of 2: lost contact with the other ranks" in line
