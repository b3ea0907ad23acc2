"""TruthfulQA's protocol: multiple choice (MC1/MC2/MC3) and answers for the generation metrics.

Multiple choice: every candidate's score is the sum of the log-probabilities of its tokens after
the context (``primer + "\\n\\nQ: " + question + "\\nA:"``), the answer appended as ``" " + answer``,
computed by :func:`hpredit.evaluation.scoring.score_continuations` (the primer runs once per call,
each question once on top of its KV cache, the answers in batches on the question's cache rows).
Generation: greedy answers after the same primer, cut at the first blank line or ``"Q:"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data import QA_PRIMER, Question, qa_prompt
from ..hooks import EditObserver
from ..variants import MAX_VARIANTS, Variant
from .metrics import mc_metrics
from .scoring import ContinuationScores, encode_continuations, generate_texts, score_continuations, score_variants

__all__ = [
    "ContinuationScores",
    "MCScores",
    "QuestionScores",
    "encode_continuations",
    "generate_answers",
    "generate_texts",
    "score_continuations",
    "score_truthfulqa_mc",
    "score_truthfulqa_variants",
    "score_variants",
    "truncate_answer",
]


# --------------------------------------------------------------------------- TruthfulQA MC


@dataclass
class QuestionScores:
    """The summed log-probability of every candidate answer of one question."""

    question: Question
    scores: dict[str, float] = field(default_factory=dict)  #: answer text → score

    @property
    def true(self) -> list[float]:
        return [self.scores[a] for a in self.question.correct_answers]

    @property
    def false(self) -> list[float]:
        return [self.scores[a] for a in self.question.incorrect_answers]

    @property
    def best(self) -> float:
        return self.scores[self.question.best_answer]

    def metrics(self) -> dict[str, float]:
        """MC1, MC2 and MC3 of this question."""
        return mc_metrics(self.true, self.false, self.best)

    def mc1_tie(self) -> bool:
        """Whether the best answer ties the highest false answer exactly (MC1 counts it as 0)."""
        return self.best == max(self.false)


def _candidates(q: Question) -> list[str]:
    """Unique answer texts of ``q`` in order: best, true, false (duplicates are scored once)."""
    return list(dict.fromkeys((q.best_answer, *q.correct_answers, *q.incorrect_answers)))


@dataclass
class MCScores:
    """Per-question answer scores of one pass, with tokenisation counts."""

    questions: list[QuestionScores]
    merged: int
    tokens: int


def score_truthfulqa_mc(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    primer: str = QA_PRIMER,
    cached: bool = True,
    group_size: int = 16,
    batch_tokens: int = 512,
    progress: bool = False,
) -> MCScores:
    """Score every answer of each question (TruthfulQA MC protocol; see the module docstring)."""
    return score_truthfulqa_variants(
        model, tok, questions, [Variant()], primer, cached, group_size, batch_tokens, progress
    )[0]


def score_truthfulqa_variants(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    variants: Sequence[Variant],
    primer: str = QA_PRIMER,
    cached: bool = True,
    group_size: int = 16,
    batch_tokens: int = 512,
    progress: bool = False,
    max_variants: int = MAX_VARIANTS,
    observers: Sequence[EditObserver | None] | None = None,
    strict: bool = True,
) -> list[MCScores]:
    """:func:`score_truthfulqa_mc` under each of ``variants``, sharing what they compute alike
    (:func:`~hpredit.evaluation.scoring.score_variants`): one :class:`MCScores` per variant."""
    cands = [_candidates(q) for q in questions]
    items = [(qa_prompt(q.question, primer), [" " + a for a in c]) for q, c in zip(questions, cands)]
    results = score_variants(
        model,
        tok,
        items,
        variants,
        cached,
        group_size,
        batch_tokens,
        progress,
        max_variants=max_variants,
        strict=strict,
        observers=observers,
    )
    return [
        MCScores(
            [QuestionScores(q, dict(zip(c, s))) for q, c, s in zip(questions, cands, r.scores)], r.merged, r.tokens
        )
        for r in results
    ]


# --------------------------------------------------------------------------- generation

_STOP = re.compile(r"\n[ \t\r]*\n|Q:")


def truncate_answer(text: str) -> str:
    """Cut a generation at the first blank line or ``"Q:"`` and strip it."""
    m = _STOP.search(text)
    return (text[: m.start()] if m else text).strip()


def generate_answers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    primer: str = QA_PRIMER,
    max_new_tokens: int = 50,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``questions`` after the QA primer, batched with left padding.

    Rows stop at the first blank line or ``"Q:"`` (HF ``stop_strings``), or after
    ``max_new_tokens``; each answer is then cut there (:func:`truncate_answer`).
    """
    prompts = [qa_prompt(q.question, primer) for q in questions]
    texts = generate_texts(model, tok, prompts, max_new_tokens, batch_size, ["\n\n", "Q:"], progress)
    return [truncate_answer(t) for t in texts]
