"""Data parallelism with ``torch.distributed``, launched by ``torchrun`` or ``accelerate launch``.

Each rank takes a deterministic share of the work units (batches of texts, groups of questions):
unit ``i`` belongs to rank ``i % world_size``, so the units are the same ones a single process would
run, and every rank receives all the pieces, so rank 0 writes the same files. A failure on any rank
reaches every rank at the next synchronisation point (:func:`step`), so all ranks stop with the same one-line
error; a collective that waits longer than the process group's timeout ends the run instead of
hanging it. Without a launcher (``WORLD_SIZE`` unset or 1) every function is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checks import env_number
from .errors import HpreditError, first_line

__all__ = [
    "active",
    "all_gather",
    "broadcast",
    "configured_timeout_s",
    "init",
    "is_main",
    "launched",
    "on_main",
    "owns",
    "progress",
    "rank",
    "step",
    "world_size",
]

T = TypeVar("T")

#: Seconds a rank waits in a collective (for the others to finish a step, or to join) before the run
#: ends, unless ``$HPREDIT_DIST_TIMEOUT`` says otherwise (read when a process group starts).
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "HPREDIT_DIST_TIMEOUT"


def configured_timeout_s() -> float:
    """``$HPREDIT_DIST_TIMEOUT`` (seconds, a positive number), else :data:`DEFAULT_TIMEOUT_S`."""
    return env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def _launcher_env() -> tuple[int, int]:
    """``(rank, world size)`` from the launcher's variables, each checked: ``WORLD_SIZE`` and ``RANK``
    integers with ``0 ≤ RANK < WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set."""
    size = int(env_number("WORLD_SIZE", 1, low=0, integer=True))
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k, "").strip()]
    if missing:
        raise HpreditError(
            f"environment variable WORLD_SIZE={size} but {', '.join(missing)} not set: start the ranks with "
            "torchrun or accelerate launch (or unset WORLD_SIZE for one process)"
        )
    text = os.environ["RANK"].strip()
    if not text.isdigit() or int(text) >= size:
        raise HpreditError(f"environment variable RANK={text!r} must be an integer from 0 to {size - 1} (WORLD_SIZE)")
    env_number("MASTER_PORT", 0, low=0, integer=True)
    return int(text), size


def launched() -> bool:
    """True when started by a launcher with more than one process (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init(timeout_s: float | None = None) -> bool:
    """Join the launcher's process group once (gloo on CPU, NCCL when each rank has a GPU).

    Returns whether this process now runs as one rank of several. Safe to call repeatedly.
    """
    if os.environ.get("WORLD_SIZE", "").strip():
        env_number("WORLD_SIZE", 1, low=0, integer=True)  # a set WORLD_SIZE must be a count
    if not launched() or not dist.is_available():
        return False
    if not dist.is_initialized():
        rank_, size = _launcher_env()
        seconds = timeout_s if timeout_s is not None else configured_timeout_s()
        local = int(env_number("LOCAL_RANK", 0, low=-1, integer=True))
        use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local
        if use_cuda:
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=seconds)
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
        except Exception as e:  # noqa: BLE001  (a peer that never came, a port in use: one line)
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise HpreditError(
                f"rank {rank_} of {size}: could not join the other ranks at {where} within {seconds:g} s "
                f"(${TIMEOUT_ENV}): {first_line(e)}"
            ) from None
    return active()


@contextlib.contextmanager
def _contact(what: str) -> Iterator[None]:
    """A collective's failure (a rank died, the connection broke, the timeout passed) as one line."""
    try:
        yield
    except HpreditError:
        raise
    except Exception as e:  # noqa: BLE001  (gloo/NCCL errors: RuntimeError, DistBackendError, …)
        raise HpreditError(
            f"rank {rank()} of {world_size()}: lost contact with the other ranks while {what} "
            f"(did one stop?): {first_line(e)}"
        ) from None


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and writes."""
    return rank() == 0


def owns(unit: int) -> bool:
    """Whether work unit ``unit`` (an index in a sequence every rank enumerates alike) is this rank's."""
    return unit % world_size() == rank()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank, in rank order (``[obj]`` in a single process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    with _contact("gathering results"):
        dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (e.g. an editor fitted on rank 0); ``obj`` itself in a single process."""
    if not active():
        return obj
    box: list[Any] = [obj if is_main() else None]
    with _contact("receiving rank 0's result"):
        dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])


class _Progress:
    """A progress bar of the work of all ranks, drawn by rank 0 only.

    Each rank adds what it finished to a counter in the process group's key-value store (one small
    request per update, no collective), and rank 0 shows the sum against the total of all ranks.
    """

    def __init__(self, total: int, desc: str, unit: str, disable: bool):
        global _bars
        _bars += 1
        self.key = f"hpredit/progress/{_bars}"
        self.store = dist.distributed_c10d._get_default_store() if active() else None
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=disable or not is_main())

    def update(self, n: int = 1) -> None:
        if self.store is None:
            self.bar.update(n)
            return
        with _contact("counting progress"):
            done = int(self.store.add(self.key, n))
        if is_main():
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


_bars = 0


def progress(total: int, desc: str, unit: str = "it", disable: bool = False) -> _Progress:
    """A tqdm-like bar (``update(n)``, ``close()``) counting the work of every rank, shown on rank 0."""
    return _Progress(total, desc, unit, disable)


def on_main(fn: Callable[[], T], what: str) -> T:
    """``fn()`` run on rank 0 only (e.g. fitting an editor: small, and one result for all) and its
    result sent to every rank; a failure there stops every rank. In one process: ``fn()``."""
    if not active():
        return fn()
    result: Any = None
    with step(what):
        if is_main():
            result = fn()
    return broadcast(result)


def _exchange(failure: str | None) -> None:
    """Share each rank's failure (or ``None``); if any rank failed, raise the first one everywhere."""
    statuses: list[str | None] = [None] * world_size()
    with _contact(f"sharing each rank's status{'' if failure is None else ' after: ' + failure}"):
        dist.all_gather_object(statuses, failure)
    failed = [(r, msg) for r, msg in enumerate(statuses) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise HpreditError(msg if world_size() == 1 else f"rank {r} of {world_size()}: {msg}")


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """A stretch of work that every rank finishes together: an exception on one rank is raised on
    all of them (as one :class:`HpreditError` naming the rank) when the others reach the end.

    In a single process it adds nothing; ``KeyboardInterrupt`` passes through unsynchronised.
    """
    if not active():
        yield
        return
    try:
        yield
    except Exception as e:
        message = first_line(e)
        if not isinstance(e, HpreditError):
            message = f"{what} failed: {type(e).__name__}: {message}"
        _exchange(message)
        raise  # unreachable: _exchange raised
    _exchange(None)
