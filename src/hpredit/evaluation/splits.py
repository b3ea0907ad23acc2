"""Which items an evaluation runs on: the seeded 40/10/50 split or ITI's 2-fold split."""

from __future__ import annotations

from typing import Any

from ..data import split_questions, two_fold_split
from ..errors import HpreditError

__all__ = ["SPLITS", "resolve_split"]

SPLITS = ("train", "val", "test", "all", "fold0", "fold1")


def resolve_split(n: int, split: str, seed: int = 0) -> tuple[list[int], dict]:
    """Question (or group) indices of ``split`` among ``n``, and a record of the split to save.

    ``train``/``val``/``test``/``all``: the 40/10/50 split (:func:`hpredit.data.split_questions`);
    ``fold0``/``fold1``: the test half of fold 0/1 of ITI's 2-fold split
    (:func:`hpredit.data.two_fold_split`). Both are seeded by ``seed``.
    """
    if split not in SPLITS:
        raise HpreditError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split.startswith("fold"):
        folds = two_fold_split(n, seed)
        indices = folds[int(split[-1])].test
        record: dict[str, Any] = {"scheme": "2-fold (ITI)", "folds": [f.to_dict() for f in folds]}
    else:
        qsplit = split_questions(n, seed)
        indices = qsplit.indices(split)
        record = {"scheme": "40/10/50", **qsplit.to_dict()}
    if not indices:
        raise HpreditError(f"split {split!r} has no questions ({n} questions in the data, seed {seed})")
    return list(indices), {"name": split, "seed": seed, **record}
