"""What every benchmark script records: when, how it was called, on which machine, and the versions."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "truthfulqa" / "TruthfulQA.csv"


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())


def run_record(load_before: tuple[float, float, float] | None = None) -> dict:
    """Date (UTC), command, machine (CPU, cores, torch threads, load averages) and versions."""
    import torch

    import hpredit

    return {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": {"hpredit": hpredit.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def emit(record: dict, out: Path | None) -> None:
    """Print ``record`` as JSON and, with ``out``, write it there."""
    text = json.dumps(record, indent=1)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
