"""What a result was made with: the command line, the library versions and the machine.

Recorded in every ``summary.json`` / ``results.json`` (``hpredit run``, ``eval``, ``compare``) and
in the benchmark records, because figures computed on a CPU depend on the CPU's kernels, the
thread count and the library versions (the reduction order differs), not only on the seed.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ._version import __version__

__all__ = ["VERSIONED", "command_line", "cpu_name", "machine", "record", "versions"]

#: Libraries whose versions can change a result.
VERSIONED = ("torch", "transformers", "numpy", "safetensors", "tokenizers", "sacrebleu", "rouge-score")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed, for the record: ``hpredit ARGS`` when run as the ``hpredit`` command,
    else ``python SCRIPT ARGS``; each argument shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    program = Path(argv[0]).name
    head = "hpredit" if program in ("hpredit", "__main__.py") or program.startswith("hpredit") else f"python {argv[0]}"
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def versions(names: Sequence[str] = VERSIONED) -> dict[str, str]:
    """hpredit's, Python's and each library's installed version (``"not installed"`` when absent)."""
    out = {"hpredit": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model, cores, torch's thread count, the platform and (if any) the GPU."""
    info: dict = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def record(argv: Sequence[str] | None = None) -> dict:
    """``{"command", "versions", "machine"}``: everything above in one dict."""
    return {"command": command_line(argv), "versions": versions(), "machine": machine()}
