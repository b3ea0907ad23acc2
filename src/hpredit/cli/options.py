"""Every option of the ``hpredit`` commands, declared once; and the parsing of comma-separated values.

The values' rules live in :mod:`hpredit.checks` and are applied by the library; the CLI only
turns text into values (``--layers 10,12`` → ``[10, 12]``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..checks import MAX_STRENGTH
from ..errors import HpreditError
from ..evaluation.tasks import task_names

# --------------------------------------------------------------------------- what every job shares

Model = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Hub id or local directory; default: the embedded SmolLM2-135M-Instruct."),
]
TruthfulQAData = Annotated[
    Path | None,
    typer.Option("--data", help="TruthfulQA CSV (default: $HPREDIT_TRUTHFULQA, else the Hugging Face hub)."),
]
TaskData = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="The task's data file (TruthfulQA: default $HPREDIT_TRUTHFULQA, else the hub; see docs/tasks.md).",
    ),
]
Dtype = Annotated[str, typer.Option("--dtype", help="The model's dtype: float32, float16, bfloat16 or auto.")]
StoreDtype = Annotated[
    str,
    typer.Option(
        "--store-dtype",
        help="Activation store type: auto (float16, or bfloat16 where float16 would "
        "overflow), float16, bfloat16 or float32.",
    ),
]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1, mps (default: cpu).")]
DeviceMap = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Spread the model over devices with accelerate: auto, balanced, sequential, or a JSON "
        '{module: device} map (text or file; "disk" offloads). Excludes --device.',
    ),
]
Force = Annotated[bool, typer.Option(help="Replace a non-empty --out (as a whole).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
Seed = Annotated[int, typer.Option(help="Seed of the 40/10/50 question split.")]
Limit = Annotated[int | None, typer.Option(help="Use only the first N questions (items) of each split (quick runs).")]

# --------------------------------------------------------------------------- fitting

TopK = Annotated[int, typer.Option(help="Edit the k layers with the best validation probe accuracy.")]
Layers = Annotated[str | None, typer.Option(help="Edit these layers (e.g. 10,12,14) instead of top-k.")]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
TrainSeed = Annotated[int, typer.Option(help="Seed of training.")]
BatchSize = Annotated[int, typer.Option(help="Texts per forward pass when collecting.")]
SaveActivations = Annotated[bool, typer.Option(help="Also save the activation store.")]

# --------------------------------------------------------------------------- editing and strength


def editor_dir(text: str) -> Path:
    """``--editor DIR``: refused when empty (``Path("")`` would be the current directory)."""
    if not text.strip():
        raise HpreditError("--editor: no directory given")
    return Path(text)


Editor = Annotated[
    Path,
    typer.Option(
        "--editor",
        "-e",
        parser=editor_dir,
        metavar="<path>",
        help="Editor directory (from fit / run), or a Hugging Face Hub repo id (org/name; offline: from the cache).",
    ),
]
Strength = Annotated[float, typer.Option(help=f"Edit strength α (|α| ≤ {MAX_STRENGTH:g}).")]
OptionalStrength = Annotated[
    float | None, typer.Option(help=f"Edit strength α (|α| ≤ {MAX_STRENGTH:g}); default 1 unless --kl is given.")
]
KL = Annotated[
    float | None,
    typer.Option(
        "--kl",
        help="Instead of --strength: the fluency cost wanted (KL nats/token on neutral text), converted to a "
        "strength through the editor's measured strength → KL curve.",
    ),
]
Protocol = Annotated[
    str,
    typer.Option(
        help="How the strength is chosen: matched (the strength whose KL hits each target cost) or grid "
        "(the best validation score among a grid under --kl-cap: the published numbers). An option of the "
        "other protocol is refused, never ignored."
    ),
]
KLTol = Annotated[
    float | None,
    typer.Option(
        help="Matched cost only: relative tolerance on each target KL (default 0.05: within 5%); "
        "refused with --protocol grid."
    ),
]
Strict = Annotated[bool, typer.Option(help="Refuse a model whose name differs from the editor's.")]
KLCap = Annotated[
    float,
    typer.Option(
        help="The fluency cost (KL nats/token on neutral text): --protocol matched, the cost aimed at; "
        "grid, the largest a chosen strength may have."
    ),
]
CompareKLCap = Annotated[
    float | None,
    typer.Option(
        "--kl-cap",
        help="Grid only: the largest fluency cost (KL nats/token on neutral text) a chosen strength may have "
        "(default 0.5). Refused with --protocol matched, which reaches given costs: give them as --targets.",
    ),
]
Strengths = Annotated[str, typer.Option(help="Strengths tried on the validation questions.")]
MaxHalvings = Annotated[
    int | None,
    typer.Option(
        help="Grid only: while every strength is over the KL cap, halve the smallest, at most this often "
        "(default 3); refused with --protocol matched."
    ),
]
Targets = Annotated[
    str | None,
    typer.Option(
        help="Matched cost only: comma-separated target KLs (nats/token on neutral text; default 0.1,0.25,0.5); "
        "refused with --protocol grid."
    ),
]
Steps = Annotated[
    int | None,
    typer.Option(
        help="Matched cost only: KL measurements per target at most, after the grid (default 4); "
        "refused with --protocol grid."
    ),
]
Refine = Annotated[
    int | None,
    typer.Option(
        help="Grid only: bisection steps between the strongest strength under the KL cap and the weakest over "
        "it (default 0); refused with --protocol matched."
    ),
]
Task = Annotated[
    str,
    typer.Option(
        "--task",
        help=f"The task (see docs/tasks.md): {', '.join(task_names())}.",
    ),
]


# --------------------------------------------------------------------------- parsing text into values


def parse_list(text: str, option: str, kind: Callable[[str], Any], what: str) -> list:
    """A comma-separated option value as a non-empty list of ``kind``."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HpreditError(f"{option} must be comma-separated {what}, got {text!r}") from None
    if not values:
        raise HpreditError(f"{option} needs at least one value")
    return values


def parse_layers(text: str | None) -> list[int] | None:
    """``--layers 10,12`` → ``[10, 12]`` (empty: None, the top-k choice)."""
    if text is None or not text.strip():
        return None
    return parse_list(text, "--layers", int, "integers")
