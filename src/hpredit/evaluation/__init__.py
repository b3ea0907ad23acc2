"""TruthfulQA evaluation: exact MC1/MC2/MC3 on cached prefixes, generation metrics, judges.

Entry point: :func:`evaluate` (also ``hpredit.evaluate`` and ``hpredit eval``).
"""

from .api import SPLITS, TASKS, EvalResult, evaluate, resolve_split
from .judges import HFJudge, Judge
from .metrics import BootstrapCI, mc1, mc2, mc3, mc_metrics, paired_bootstrap, reference_acc
from .truthfulqa import generate_answers, score_continuations, score_truthfulqa_mc, truncate_answer

__all__ = [
    "SPLITS",
    "TASKS",
    "BootstrapCI",
    "EvalResult",
    "HFJudge",
    "Judge",
    "evaluate",
    "generate_answers",
    "mc1",
    "mc2",
    "mc3",
    "mc_metrics",
    "paired_bootstrap",
    "reference_acc",
    "resolve_split",
    "score_continuations",
    "score_truthfulqa_mc",
    "truncate_answer",
]
