"""Per seed, per method and target: the primary metric and the edit profile, from a compare result.

    python benchmarks/profile_report.py benchmarks/results/rotation-family/truthfulqa-limit60 [--layers]

Prints one markdown table per target: for each method and seed, the test metric, the gain over the
unedited model of that seed, and the pooled edit profile (tokens edited, angle mean and spread,
‖Δh‖/‖h‖, norm change); with ``--layers``, the fraction edited and the mean angle per edited layer.
What it reads is what ``hpredit compare`` writes (``profile`` in each row of ``results.json``).
"""

import argparse
import json
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("result", type=Path, help="a compare output directory (results.json)")
parser.add_argument("--layers", action="store_true", help="also each edited layer's fraction edited and angle")
args = parser.parse_args()

result = json.loads((args.result / "results.json").read_text())
primary = result.get("primary", "mc2")
rows = result["runs"]
unedited = {r["seed"]: r["test"][primary] for r in rows if r["method"] == "none"}
targets = sorted({r["target"] for r in rows if r.get("target") is not None})


def fmt(v, f: str) -> str:
    return "–" if v is None else format(v, f)


for t in targets:
    print(f"\n**KL target {t:g}**\n")
    head = f"| method | seed | {primary} | gain | tokens edited | angle (deg) | spread | ‖Δh‖/‖h‖ | norm change |"
    print(head + (" per layer: edited, angle |" if args.layers else ""))
    print("|---" * (9 + args.layers) + "|")
    for r in rows:
        if r.get("target") != t or r.get("test") is None:
            continue
        p = (r.get("profile") or {}).get("all")
        m = r["test"][primary]
        gain = None if r["seed"] not in unedited else m - unedited[r["seed"]]
        cells = [r["method"], str(r["seed"]), f"{m:.4f}", fmt(gain, "+.4f")]
        if p:
            cells += [
                f"{p['edited']:.3f}",
                fmt(p["angle_deg"]["mean"], ".2f"),
                fmt(p["angle_deg"]["std"], ".2f"),
                fmt(p["delta_rel"]["mean"], ".3f"),
                fmt(p["norm_change"]["mean"], "+.1e"),
            ]
        else:
            cells += ["–"] * 5
        if args.layers:
            per = (r.get("profile") or {}).get("layers", {})
            cells.append(
                " ".join(f"{i}: {v['edited']:.2f}/{fmt(v['angle_deg']['mean'], '.1f')}°" for i, v in per.items())
            )
        print("| " + " | ".join(cells) + " |")
