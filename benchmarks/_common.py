"""What every benchmark script records: when, how it was called, on which machine, and the versions.

The command line, the machine and the versions come from :mod:`hpredit.provenance`, the same
record as ``hpredit run``/``eval``/``compare`` write.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from hpredit.provenance import command_line, cpu_name, machine, versions

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "truthfulqa" / "TruthfulQA.csv"

#: The Llama-3-8B shape (config fields) of the GPU benchmarks, built with random or dummy weights.
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

__all__ = ["DEFAULT_CSV", "LLAMA3_8B", "ROOT", "command_line", "cpu_name", "emit", "run_record"]


def run_record(load_before: tuple[float, float, float] | None = None) -> dict:
    """Date (UTC), command, machine (CPU, cores, torch threads, platform, load averages) and versions."""
    return {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "command": command_line(),
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": versions(),
    }


def emit(record: dict, out: Path | None) -> None:
    """Print ``record`` as JSON and, with ``out``, write it there."""
    text = json.dumps(record, indent=1)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
