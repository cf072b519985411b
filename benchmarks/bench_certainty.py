"""Certainty of labelled answer sets under every similarity measure, in one run.

Prints, per set of five answers (latentexplainer_plugin/evaluation/answer_sets.py), the certainty
under agree, embed, bow (the paper's) and bow-refined, then per measure the lowest agreeing and
highest disagreeing certainty, the gap between them and how many sets its default threshold puts
on the wrong side.

    python benchmarks/bench_certainty.py
"""

from __future__ import annotations

import time

from latentexplainer_plugin.evaluation.answer_sets import AGREEING, DISAGREEING
from latentexplainer_plugin.types import Response
from latentexplainer_plugin.uncertainty import SIMILARITIES, get_similarity, select_explanation

MEASURES = ("agree", "embed", "bow", "bow-refined")


def main() -> None:
    assert set(MEASURES) == set(SIMILARITIES), "update MEASURES"
    t0 = time.perf_counter()
    scores: dict[str, dict[str, float]] = {m: {} for m in MEASURES}
    print(f"{'set':34s} " + " ".join(f"{m:>11s}" for m in MEASURES))
    for label, group in (("agreeing", AGREEING), ("disagreeing", DISAGREEING)):
        for name, texts in group.items():
            row = []
            for m in MEASURES:
                c = select_explanation([Response(t) for t in texts], m, threshold=0.0).certainty
                scores[m][f"{label}:{name}"] = c
                row.append(f"{c:11.3f}")
            print(f"{label[:5]} {name:28s} " + " ".join(row))
    print()
    print(f"{'measure':12s} {'threshold':>9s} {'min agreeing':>13s} {'max disagreeing':>16s} {'gap':>7s} {'wrong side':>11s}")
    for m in MEASURES:
        t = get_similarity(m).default_threshold
        agree = [v for k, v in scores[m].items() if k.startswith("agreeing:")]
        disagree = [v for k, v in scores[m].items() if k.startswith("disagreeing:")]
        wrong = sum(v < t for v in agree) + sum(v >= t for v in disagree)
        print(f"{m:12s} {t:9.2f} {min(agree):13.3f} {max(disagree):16.3f} {min(agree) - max(disagree):7.3f} "
              f"{wrong:>4d} of {len(agree) + len(disagree)}")
    print(f"\n{len(AGREEING)} agreeing and {len(DISAGREEING)} disagreeing sets, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
