"""The decision rule in words: the reason a report, the worklist and the RIS give for a decision.

Text only (no numpy, no torch), so the node, which shows and reads these reasons, does not load the
networks' libraries (:mod:`contract.decision` holds the rule itself).
"""

from __future__ import annotations

import re

__all__ = ["decision_reason", "reason_threshold"]


def _number(value: float, other: float) -> str:
    """``value`` with enough digits (3 to 6) to differ in print from ``other`` when they differ."""
    for digits in range(3, 7):
        if f"{value:.{digits}f}" != f"{other:.{digits}f}" or value == other:
            return f"{value:.{digits}f}"
    return repr(value)


def decision_reason(
    probability: float, area_px: int, probability_threshold: float, min_area_px: int, segmented: bool = True
) -> str:
    """The rule behind :func:`flag_decision`'s answer, in words for the report and the worklist:
    "classifier 0.999 >= 0.500, but segmented area 120 px < minimum 262 px". ``segmented`` False:
    a classifier-only bundle, whose rule is the threshold alone."""
    p, t = _number(probability, probability_threshold), _number(probability_threshold, probability)
    if not segmented:
        relation = "<" if probability < probability_threshold else ">="
        return f"classifier {p} {relation} threshold {t} (classifier only, no segmentation)"
    if probability < probability_threshold:
        return f"classifier {p} < threshold {t}"
    if area_px < min_area_px:
        return f"classifier {p} >= threshold {t}, but segmented area {area_px} px < minimum {min_area_px} px"
    return f"classifier {p} >= threshold {t} and segmented area {area_px} px >= minimum {min_area_px} px"


_THRESHOLD = re.compile(r"threshold (\d+(?:\.\d+)?)")


def reason_threshold(reason: str | None) -> float | None:
    """The classifier threshold named in a :func:`decision_reason` text (None when it names none)."""
    found = _THRESHOLD.search(reason or "")
    return float(found.group(1)) if found else None
