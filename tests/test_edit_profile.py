"""The edit profile (issue 27): what an edit does per layer, measured through attach(observe=…).

Figures against a float64 reference computed here from the construction (known angles, known
added vectors); padding left out; the KV cache's calls counted once; every editor kind attached.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpredit.compare import markdown_table, summarise_matched
from hpredit.evaluation.side_effects import EditProfile
from hpredit.results import CompareResult, Provenance

from .conftest import EDITOR_KINDS, random_editor, tiny_model


def _rotate(h: np.ndarray, theta: float, rng: np.random.Generator) -> np.ndarray:
    """``h`` turned by ``theta`` radians in a random plane containing it (norm kept)."""
    u = h / np.linalg.norm(h)
    w = rng.standard_normal(h.shape)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    return np.linalg.norm(h) * (math.cos(theta) * u + math.sin(theta) * w)


def test_rotations_give_their_angles_and_padding_is_left_out():
    rng = np.random.default_rng(0)
    batch, seq, d = 3, 5, 16
    before = rng.standard_normal((batch, seq, d))
    after = before.copy()
    attention = np.ones((batch, seq), dtype=np.int64)
    attention[0, :2] = 0  # left padding
    attention[2, -1] = 0  # right padding
    thetas = []
    for b in range(batch):
        for s in range(seq):
            if (b + s) % 3 == 0:
                continue  # left as is
            theta = rng.uniform(0.01, 2.5)
            after[b, s] = _rotate(before[b, s], theta, rng)
            if attention[b, s]:
                thetas.append(math.degrees(theta))
    prof = EditProfile()
    prof(
        7, torch.tensor(before, dtype=torch.float32), torch.tensor(after, dtype=torch.float32), torch.tensor(attention)
    )
    got = prof.summary()["layers"]["7"]
    ref = np.array(thetas)
    assert got["tokens"] == int(attention.sum())
    assert got["edited"] == pytest.approx(len(thetas) / attention.sum())
    # float32 inputs: an angle is good to ~1e-5 degrees; a wrong formula (acos of cos, radians) is far off
    assert got["angle_deg"]["mean"] == pytest.approx(ref.mean(), abs=1e-3)
    assert got["angle_deg"]["std"] == pytest.approx(ref.std(), abs=1e-3)
    chords = 2 * np.sin(np.radians(ref) / 2)  # ‖h' − h‖ / ‖h‖ of a rotation by θ
    assert got["delta_rel"]["mean"] == pytest.approx(chords.mean(), abs=1e-5)
    assert abs(got["norm_change"]["mean"]) < 1e-5 and got["norm_change"]["max_abs"] < 1e-5
    assert prof.summary()["all"] == got  # one layer: pooled is that layer


def test_an_added_vector_is_its_norm_relative_to_the_activation_and_layers_pool():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    v = torch.randn(8, generator=g, dtype=torch.float64)
    prof = EditProfile()
    prof(0, h, h + v)
    prof(1, h, h)  # an identity: no token changed
    rel = (v.norm() / h.norm(dim=-1)).flatten().numpy()
    norm = ((h + v).norm(dim=-1) / h.norm(dim=-1) - 1).flatten().numpy()
    cos = ((h + v) * h).sum(-1) / ((h + v).norm(dim=-1) * h.norm(dim=-1))
    angles = np.degrees(np.arccos(cos.flatten().numpy()))
    s = prof.summary()
    one = s["layers"]["0"]
    assert one["edited"] == 1.0 and s["layers"]["1"]["edited"] == 0.0
    assert s["layers"]["1"]["angle_deg"]["mean"] is None
    assert one["delta_rel"]["mean"] == pytest.approx(rel.mean(), rel=1e-9)
    assert one["norm_change"]["mean"] == pytest.approx(norm.mean(), rel=1e-9)
    assert one["angle_deg"]["mean"] == pytest.approx(angles.mean(), rel=1e-7)
    assert s["all"]["tokens"] == 16 and s["all"]["edited"] == 0.5  # pooled over both layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rounding_alone_is_not_an_edit(dtype):
    """A token off by one unit in the last place in half its entries (what an edit that leaves a token
    alone may return after recomputing it) is not counted as changed; twice the tolerance is."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 6, 32, generator=g).to(dtype)
    half = torch.rand(h.shape, generator=g) < 0.5
    again = torch.where(half, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    prof = EditProfile()
    prof(3, h, again)
    assert prof.summary()["layers"]["3"]["edited"] == 0.0
    tol = max(1e-5, torch.finfo(dtype).eps)
    moved = (h.double() * (1 + 2 * tol)).to(dtype)
    prof(4, h, moved)
    assert prof.summary()["layers"]["4"]["edited"] == 1.0


@pytest.mark.parametrize("kind", EDITOR_KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_every_editor_profiled_through_attach_with_padding(kind, side):
    """Attached with observe=: one record per edited layer, padding left out, strength 0 edits nothing,
    the norm-keeping methods keep it on every changed token."""
    model = tiny_model()
    ed = random_editor(kind, model)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    prof = EditProfile()
    with torch.no_grad(), ed.attach(model, strength=1.0, observe=prof):
        model(input_ids=ids, attention_mask=mask)
    s = prof.summary()
    assert sorted(int(i) for i in s["layers"]) == sorted({int(x) for x in ed.layers})
    for layer in s["layers"].values():
        assert layer["tokens"] == int(mask.sum())
    assert s["all"]["edited"] > 0
    if kind in ("hpr", "hpr-no-gate", "hpr-bias", "caa-norm", "angular", "spherical"):
        assert s["all"]["norm_change"]["max_abs"] < 1e-5
    zero = EditProfile()
    with torch.no_grad(), ed.attach(model, strength=0.0, observe=zero):
        model(input_ids=ids, attention_mask=mask)
    assert zero.summary()["all"]["edited"] == 0.0


def test_generate_with_a_kv_cache_profiles_each_token_once():
    model = tiny_model()
    ed = random_editor("caa", model, layers=[1])
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    prof = EditProfile()
    with torch.no_grad(), ed.attach(model, strength=1.0, observe=prof):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # the prompt's real tokens, then 3 calls of one new token per row (the 4th token is never fed back)
    assert prof.summary()["layers"]["1"]["tokens"] == int(mask.sum()) + 3 * 2


def _row(method: str, seed: int, items: list[float], angle: float) -> dict:
    profile = {
        "tokens": 10,
        "edited": 0.5,
        "angle_deg": {"mean": angle, "std": 1.0, "max_abs": angle},
        "delta_rel": {"mean": 0.1, "std": 0.0, "max_abs": 0.1},
        "norm_change": {"mean": 0.0, "std": 0.0, "max_abs": 0.0},
    }
    return {
        "seed": seed,
        "method": method,
        "target": 0.1,
        "status": "hit",
        "strength": 1.0,
        "test": {"mc2": float(np.mean(items))},
        "test_items": items,
        "kl": 0.1,
        "ppl": 3.0,
        "profile": {"layers": {"1": profile}, "all": profile},
    }


def test_the_table_has_a_profile_and_hpr_against_the_best_of_the_rotation_family():
    rows = [
        {"seed": s, "method": "none", "target": None, "status": "unedited", "strength": 0.0,
         "test": {"mc2": 0.4}, "test_items": [0.4] * 4, "kl": 0.0, "ppl": 2.0, "profile": None}
        for s in (0, 1)
    ]  # fmt: skip
    for s in (0, 1):
        rows += [
            _row("hpr", s, [0.6, 0.5, 0.7, 0.6], 5.0 + s),
            _row("caa", s, [0.7, 0.6, 0.7, 0.7], 2.0),  # the best other method
            _row("mirror", s, [0.5, 0.5, 0.6, 0.5], 1.0),  # the best of the rotation family
            _row("angular", s, [0.4, 0.5, 0.5, 0.5], 0.5),
        ]
    methods = ["none", "hpr", "caa", "mirror", "angular"]
    summary = summarise_matched(rows, methods, ["mc2"], "mc2", [0.1])
    assert summary["paired"]["0.1"]["other"] == "caa"
    fam = summary["paired_family"]["0.1"]["rotation family"]
    assert fam["other"] == "mirror" and fam["mean"] == pytest.approx(0.075)
    assert summary["targets"]["0.1"]["hpr"]["profile"]["angle_deg.mean"]["mean"] == pytest.approx(5.5)
    setting = {"protocol": "matched", "seeds": [0, 1], "metrics": ["mc2"], "primary": "mc2", "targets": [0.1]}
    text = markdown_table(
        CompareResult(Provenance("test", None, {}, {}), {**setting, "kl_tol": 0.05}, rows, [], summary, 1.0)
    )
    assert "hpr − mirror (the best of the rotation family here), MC2: +0.0750" in text
    assert "| hpr | 0.500 ± 0.000 | 5.50 ± 0.50 |" in text
