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


def torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ...`` on 127.0.0.1, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HPREDIT_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_single_process_is_a_no_op():
    assert not dist.launched() and not dist.active()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.mine([1, 2, 3]) == [1, 2, 3] and dist.owns(5)
    assert dist.gather("x") == ["x"]
    with dist.step("nothing"):
        pass


def test_units_are_shared_round_robin_and_gathered_in_rank_order(tmp_path):
    out = tmp_path / "gather.json"
    r = torchrun(str(WORKER), "gather", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [x["rank"] for x in result] == [0, 1]
    assert result[0]["mine"] == [0, 2, 4, 6] and result[1]["mine"] == [1, 3, 5]
    assert [x["owns"] for x in result] == [x["mine"] for x in result]


def test_a_failing_rank_stops_every_rank_with_one_error(tmp_path):
    out = tmp_path / "fail"
    start = time.monotonic()
    r = torchrun(str(WORKER), "fail", str(out))
    assert r.returncode != 0
    assert time.monotonic() - start < 120
    messages = {p.name: p.read_text() for p in tmp_path.glob("fail.*")}
    assert sorted(messages) == ["fail.0", "fail.1"]  # both ranks stopped with the same error
    assert set(messages.values()) == {"rank 1 of 2: data.jsonl:3: field 'positive' must be a non-empty string"}


@pytest.mark.parametrize("value", ["", "1", "x"])
def test_launched_needs_more_than_one_process(monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    assert not dist.launched()
