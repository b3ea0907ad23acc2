"""Evaluation: tasks (one registry), TruthfulQA MC/generation, continuation scoring, metrics, judges.

Entry point: :func:`evaluate` (also ``hpredit.evaluate`` and ``hpredit eval``). Rooms: ``job``
(evaluate), ``splits``, ``tasks`` (the registry), ``scoring`` (any
task's continuations on a shared KV cache, generation), ``truthfulqa`` (its protocol),
``metrics``, ``side_effects``, ``judges``, ``lm_eval_backend``.
"""

from ..results import EvalResult
from .job import TASKS, evaluate
from .judges import HFJudge, Judge
from .metrics import BootstrapCI, mc1, mc2, mc3, mc_metrics, paired_bootstrap, reference_acc
from .scoring import generate_texts, score_continuations, score_variants
from .splits import SPLITS, resolve_split
from .tasks import Task, get_task, register_task, task_names, unregister_task
from .truthfulqa import generate_answers, score_truthfulqa_mc, truncate_answer

__all__ = [
    "SPLITS",
    "TASKS",
    "Task",
    "BootstrapCI",
    "EvalResult",
    "HFJudge",
    "Judge",
    "evaluate",
    "generate_answers",
    "generate_texts",
    "get_task",
    "mc1",
    "mc2",
    "mc3",
    "mc_metrics",
    "paired_bootstrap",
    "reference_acc",
    "register_task",
    "resolve_split",
    "score_continuations",
    "score_variants",
    "score_truthfulqa_mc",
    "task_names",
    "unregister_task",
    "truncate_answer",
]
