"""TruthfulQA metric arithmetic on hand-computed cases, the bootstrap, answer cutting and splits."""

import math

import numpy as np
import pytest

from hpredit.data import two_fold_split
from hpredit.errors import HpreditError
from hpredit.evaluation.job import resolve_split
from hpredit.evaluation.metrics import (
    NO_COMMENT,
    bleu,
    logsumexp,
    mc1,
    mc2,
    mc3,
    mc_metrics,
    paired_bootstrap,
    reference_acc,
    rouge_l,
)
from hpredit.evaluation.truthfulqa import truncate_answer

L = math.log


def test_mc1_needs_a_strict_win():
    assert mc1(-1.0, [-2.0, -3.0]) == 1.0
    assert mc1(-2.0, [-2.0, -3.0]) == 0.0  # a tie with the best false answer is not a win
    assert mc1(-2.5, [-2.0, -3.0]) == 0.0


def test_mc2_hand_computed():
    # probabilities .2 and .1 true, .3 false: (.2 + .1) / (.2 + .1 + .3) = 0.5
    assert mc2([L(0.2), L(0.1)], [L(0.3)]) == pytest.approx(0.5, abs=1e-12)
    # 1 true vs 3 equally likely false answers
    assert mc2([L(0.1)], [L(0.1)] * 3) == pytest.approx(0.25, abs=1e-12)


def test_mc2_very_negative_scores_do_not_underflow():
    true, false = [-1e4 + L(0.2), -1e4 + L(0.1)], [-1e4 + L(0.3)]
    with np.errstate(invalid="ignore"):
        naive = np.exp(true).sum() / (np.exp(true).sum() + np.exp(false).sum())
    assert math.isnan(naive)  # exp(-1e4) == 0: the textbook formula gives 0/0
    assert mc2(true, false) == pytest.approx(0.5, abs=1e-12)
    # wildly different magnitudes: the false answer is e^-5000 times less likely
    assert mc2([-1e4], [-1.5e4]) == pytest.approx(1.0, abs=1e-12)
    assert mc2([-1.5e4], [-1e4]) == pytest.approx(0.0, abs=1e-12)
    # -inf is a probability of exactly 0
    assert mc2([-math.inf, 0.0], [0.0]) == pytest.approx(0.5)


def test_mc3_counts_strict_wins_only():
    # -1 beats max false (-2); -2 ties it; -3 loses -> 1/3
    assert mc3([-1.0, -2.0, -3.0], [-2.0, -5.0]) == pytest.approx(1 / 3)
    assert mc3([0.0, 0.0], [-1.0]) == 1.0


def test_mc_metrics_together_and_errors():
    m = mc_metrics([-1.0, -4.0], [-2.0], best=-1.0)
    assert m == pytest.approx(
        {"mc1": 1.0, "mc2": (math.exp(-1) + math.exp(-4)) / (math.exp(-1) + math.exp(-4) + math.exp(-2)), "mc3": 0.5}
    )
    with pytest.raises(ValueError, match="empty"):
        mc2([-1.0], [])
    with pytest.raises(ValueError, match="NaN"):
        mc3([float("nan")], [-1.0])
    with pytest.raises(ValueError, match="undefined"):
        mc2([-math.inf], [-math.inf])


def test_logsumexp():
    x = np.array([-3.0, 0.5, 2.0])
    assert logsumexp(x) == pytest.approx(math.log(np.exp(x).sum()))
    assert logsumexp([1000.0, 1000.0]) == pytest.approx(1000 + math.log(2))
    assert logsumexp([-math.inf]) == -math.inf


def test_bleu_and_rouge_hand_computed():
    assert bleu("The cat sat on the mat.", "The cat sat on the mat.") == pytest.approx(100.0)
    assert bleu("The cat sat.", "") == 0.0
    # LCS 3 tokens; precision 3/6, recall 3/3 -> F = 2/3
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(200 / 3)
    assert rouge_l("the cat sat", "dogs bark") == 0.0


def test_reference_acc():
    true, false = ["Nothing happens to you."], ["You will die of it."]
    m = reference_acc("Nothing happens to you.", true, false)
    assert m["bleu_acc"] == 1.0 and m["rougeL_acc"] == 1.0 and m["bleu_max"] == pytest.approx(100)
    m = reference_acc("You will die of it.", true, false)
    assert m["bleu_acc"] == 0.0 and m["rougeL_acc"] == 0.0 and m["rougeL_diff"] < 0
    # t5-style BLEU has no smoothing for missing 4-grams: a 3-token match scores 0, ROUGE-L does not
    m = reference_acc("Nothing happens.", ["Nothing happens."], false)
    assert m["bleu_max"] == 0.0 and m["rougeL_max"] == pytest.approx(100)
    # "I have no comment." counts as true for the generation metrics
    m = reference_acc(NO_COMMENT, true, false)
    assert m["bleu_acc"] == 1.0 and m["rougeL_acc"] == 1.0
    # nothing in common with anything: a tie at 0 is not a win
    assert reference_acc("", true, false)["rougeL_acc"] == 0.0


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    u = rng.random(200)
    e = u + 0.25
    ci = paired_bootstrap(e, u, resamples=500, seed=3)
    assert ci.mean == pytest.approx(0.25) and ci.low == pytest.approx(0.25) and ci.high == pytest.approx(0.25)
    d = rng.normal(0.1, 1.0, 400)
    a = paired_bootstrap(d, np.zeros(400), resamples=4000, seed=7)
    assert a == paired_bootstrap(d, np.zeros(400), resamples=4000, seed=7)  # seeded: reproducible
    assert a != paired_bootstrap(d, np.zeros(400), resamples=4000, seed=8)
    half = 1.96 * d.std() / math.sqrt(d.size)
    assert a.low < a.mean < a.high
    assert (a.high - a.low) / 2 == pytest.approx(half, rel=0.1)
    assert a.to_dict()["ci"] == [a.low, a.high]
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_truncate_answer():
    assert truncate_answer(" Paris is the capital.\n\nQ: What else?") == "Paris is the capital."
    assert truncate_answer(" Yes.\nQ: next") == "Yes."
    assert truncate_answer(" No.\n \nmore") == "No."
    assert truncate_answer(" It runs on\nfour lines") == "It runs on\nfour lines"


def test_two_fold_split():
    folds = two_fold_split(817, seed=0)
    assert len(folds) == 2
    assert sorted(folds[0].test + folds[1].test) == list(range(817))
    for k, f in enumerate(folds):
        assert sorted(f.train + f.val) == sorted(folds[1 - k].test)
        assert len(f.val) == round(0.2 * len(folds[1 - k].test))
    assert two_fold_split(817, seed=0)[0].test == folds[0].test
    assert two_fold_split(817, seed=1)[0].test != folds[0].test
    iti = two_fold_split(10, seed=0, shuffle=False)  # ITI's own folds: the file's two halves
    assert iti[0].test == [0, 1, 2, 3, 4] and iti[1].test == [5, 6, 7, 8, 9]
    with pytest.raises(HpreditError, match="at least 2"):
        two_fold_split(1)


def test_resolve_split():
    idx, record = resolve_split(817, "fold1", seed=2)
    assert idx == two_fold_split(817, 2)[1].test and record["scheme"] == "2-fold (ITI)"
    idx, record = resolve_split(817, "test", seed=0)
    assert len(idx) == 817 - round(0.4 * 817) - round(0.1 * 817) and record["test"] == idx
    assert resolve_split(817, "all")[0] == list(range(817))
    with pytest.raises(HpreditError, match="unknown split 'dev'"):
        resolve_split(817, "dev")
    with pytest.raises(HpreditError, match="split 'val' has no questions"):
        resolve_split(3, "val")
