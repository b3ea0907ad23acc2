"""Data parallelism with a real torchrun (gloo, 2 CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpredit import distributed as dist

WORKER = Path(__file__).parent / "distributed" / "worker.py"


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ...`` on 127.0.0.1, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HPREDIT_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_single_process_is_a_no_op():
    assert not dist.launched() and not dist.active()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert all(dist.owns(u) for u in range(5))
    assert dist.all_gather("x") == ["x"] and dist.broadcast("y") == "y"
    with dist.step("nothing"):
        pass


def test_units_are_shared_round_robin_and_gathered_in_rank_order(tmp_path):
    out = tmp_path / "gather.json"
    r = torchrun(str(WORKER), "gather", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [x["rank"] for x in result] == [0, 1]
    assert result[0]["owns"] == [0, 2, 4, 6] and result[1]["owns"] == [1, 3, 5]


def test_a_failing_rank_stops_every_rank_with_one_error(tmp_path):
    out = tmp_path / "fail"
    start = time.monotonic()
    r = torchrun(str(WORKER), "fail", str(out))
    assert r.returncode != 0
    assert time.monotonic() - start < 300  # the bound: launch plus the process group's timeout, on a busy machine
    messages = {p.name: p.read_text() for p in tmp_path.glob("fail.*")}
    assert sorted(messages) == ["fail.0", "fail.1"]  # both ranks stopped with the same error
    assert set(messages.values()) == {"rank 1 of 2: data.jsonl:3: field 'positive' must be a non-empty string"}


@pytest.mark.parametrize("value", ["", "1", "x"])
def test_launched_needs_more_than_one_process(monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    assert not dist.launched()


# --------------------------------------------------------------------------- the pipeline on 2 ranks

ROOT = Path(__file__).resolve().parents[1]


def hpredit(*args: str, ranks: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m hpredit ...`` in one process, or under ``torchrun`` on ``ranks`` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HPREDIT_DIST_TIMEOUT": "120", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    cmd = [*(launcher if ranks > 1 else [sys.executable]), "-m", "hpredit", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def on_one_and_two_ranks(args: list[str], out: Path) -> None:
    """Run ``hpredit *args`` in one process (``--out`` ``{out}1``) and on 2 ranks (``{out}2``)."""
    for ranks in (1, 2):
        r = hpredit(*args, "--out", f"{out}{ranks}", ranks=ranks)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    from .conftest import saved_tiny_model

    directory = tmp_path_factory.mktemp("tiny")
    saved_tiny_model(directory, tokenizer)
    return directory


def _same_store(a: Path, b: Path) -> None:
    import torch

    from hpredit import ActivationStore

    one, two = ActivationStore.load(a), ActivationStore.load(b)
    assert torch.equal(one.acts, two.acts) and one.acts.dtype == two.acts.dtype
    assert one.texts == two.texts and torch.equal(one.offsets, two.offsets) and torch.equal(one.pairs, two.pairs)
    assert one.splits == two.splits and one.dtype_choice == two.dtype_choice


def _same_editor(a: Path, b: Path) -> None:
    import torch

    from hpredit import load_editor

    one, two = load_editor(a), load_editor(b)
    assert one.layers == two.layers and one.metrics == two.metrics
    for name, t in one.tensors().items():
        assert torch.equal(t, two.tensors()[name]), name


def test_two_ranks_collect_fit_and_evaluate_as_one_process(tiny_dir, truthfulqa_csv, tmp_path):
    fit = [
        "fit",
        "--model",
        str(tiny_dir),
        "--data",
        str(truthfulqa_csv),
        "--limit",
        "12",
        "--epochs",
        "2",
        "--top-k",
        "2",
        "--batch-size",
        "4",
        "--save-activations",
    ]
    on_one_and_two_ranks(fit, tmp_path / "fit")
    _same_store(tmp_path / "fit1" / "activations", tmp_path / "fit2" / "activations")
    _same_editor(tmp_path / "fit1" / "editor", tmp_path / "fit2" / "editor")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left by either rank

    ev = [
        "eval",
        "--model",
        str(tiny_dir),
        "--data",
        str(truthfulqa_csv),
        "--limit",
        "20",
        "--batch-size",
        "4",
        "--editor",
        str(tmp_path / "fit1" / "editor"),
        "--strength",
        "0.5",
    ]
    on_one_and_two_ranks(ev, tmp_path / "eval")
    rows = [[json.loads(line) for line in (tmp_path / f"eval{n}" / "per_question.jsonl").open()] for n in (1, 2)]
    assert [q["index"] for q in rows[0]] == [q["index"] for q in rows[1]] and len(rows[0]) == 20
    for q1, q2 in zip(*rows):
        for a1, a2 in zip(q1["answers"], q2["answers"]):
            for variant in ("unedited", "edited"):
                assert a1["score"][variant] == pytest.approx(a2["score"][variant], abs=1e-6)
    metrics = [json.loads((tmp_path / f"eval{n}" / "summary.json").read_text())["metrics"] for n in (1, 2)]
    assert metrics[0]["edited"] == pytest.approx(metrics[1]["edited"], abs=1e-9)


def test_two_ranks_compare_as_one_process(tiny_dir, truthfulqa_csv, tmp_path):
    args = [
        "compare",
        "--model",
        str(tiny_dir),
        "--data",
        str(truthfulqa_csv),
        "--methods",
        "none,hpr,caa",
        "--seeds",
        "0",
        "--limit",
        "6",
    ]
    on_one_and_two_ranks(args, tmp_path / "cmp")
    one, two = (json.loads((tmp_path / f"cmp{n}" / "results.json").read_text()) for n in (1, 2))
    for r1, r2 in zip(one["runs"], two["runs"]):
        if "method" in r1:
            assert (r1["method"], r1["strength"], r1["layers"]) == (r2["method"], r2["strength"], r2["layers"])
            assert r1["test"] == pytest.approx(r2["test"], abs=1e-6) and r1["kl"] == pytest.approx(r2["kl"], abs=1e-6)


def test_a_rank_failing_on_its_share_stops_the_run_with_one_error(tmp_path, tokenizer):
    from .conftest import tiny_model

    # A vocabulary cut below the id of " zebra": only the pair that has it fails, inside the forward
    # pass of the rank that owns it (a text longer than the positions is refused before any rank runs).
    model_dir = tmp_path / "gpt2"
    (zebra,) = tokenizer(" zebra").input_ids
    others = tokenizer("Q0: yes?\nA: yes no").input_ids
    assert max(others) < 20_000 <= zebra
    tiny_model("gpt2", vocab=20_000).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(7):
            negative = " zebra" if i == 3 else " no"
            f.write(json.dumps({"prompt": f"Q{i}: yes?\nA:", "positive": " yes", "negative": negative}) + "\n")
    start = time.monotonic()
    r = hpredit(
        "fit",
        "--model",
        str(model_dir),
        "--pairs",
        str(pairs),
        "--top-k",
        "1",
        "--out",
        str(tmp_path / "o"),
        ranks=2,
        timeout=300,
    )
    assert r.returncode != 0 and time.monotonic() - start < 240
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "rank 1 of 2: collecting activations failed: IndexError" in errors[0], r.stderr
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


@pytest.mark.slow
def test_two_ranks_on_smollm2_collect_and_fit_as_one_process(smol_dir, truthfulqa_csv, tmp_path):
    args = ["fit", "--data", str(truthfulqa_csv), "--limit", "4", "--epochs", "1", "--save-activations"]
    on_one_and_two_ranks(args, tmp_path / "fit")
    _same_store(tmp_path / "fit1" / "activations", tmp_path / "fit2" / "activations")
    _same_editor(tmp_path / "fit1" / "editor", tmp_path / "fit2" / "editor")
