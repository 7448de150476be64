"""Repeated rounds for the benchmark scripts (`--rounds R`): this machine's speed drifts by tens of percent
within minutes, so a script measures its grid R times, alternating which model goes first, and compares
models through ratios of points taken in the same round (back to back) rather than through medians taken
minutes apart.

A point is a dict with a `round` (0 when absent), a value under `value_key` when it succeeded, and the key
fields that identify it; `key` maps a point to those fields.
"""

from __future__ import annotations

import statistics
from typing import Callable, Hashable

__all__ = ["merge_rounds", "paired_ratio", "format_ratio", "alternate"]


def alternate(names: list[str], rnd: int) -> list[str]:
    """The run order of round `rnd`: as given in even rounds, reversed in odd ones."""
    return list(names) if rnd % 2 == 0 else list(reversed(names))


def merge_rounds(points: list[dict], key: Callable[[dict], Hashable], value_key: str,
                 peak_key: str | None = None) -> dict:
    """key -> one point: the median of `value_key` over the rounds (each round's value kept under
    `round_values`), the largest `peak_key`; a point that failed in any round is reported by that failure."""
    groups: dict = {}
    for p in points:
        groups.setdefault(key(p), []).append(p)
    merged = {}
    for k, ps in groups.items():
        failed = [p for p in ps if value_key not in p]
        if failed:
            merged[k] = failed[0]
            continue
        out = {**ps[0], value_key: statistics.median(p[value_key] for p in ps),
               "round_values": [p[value_key] for p in ps]}
        if peak_key is not None:
            peaks = [p[peak_key] for p in ps if p.get(peak_key) is not None]
            out[peak_key] = max(peaks) if peaks else None
        merged[k] = out
    return merged


def paired_ratio(points: list[dict], key: Callable[[dict], Hashable], value_key: str, numerator: Hashable,
                 denominator: Hashable):
    """numerator's value / denominator's value within each round where both succeeded: (median, min, max)
    over those rounds, or None."""
    by = {(key(p), p.get("round", 0)): p for p in points}
    ratios = []
    for rnd in sorted({p.get("round", 0) for p in points}):
        a, b = by.get((numerator, rnd), {}), by.get((denominator, rnd), {})
        if value_key in a and value_key in b and b[value_key]:
            ratios.append(a[value_key] / b[value_key])
    return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None


def format_ratio(r) -> str:
    """'1.75x', or '1.75x (1.51-1.98)' when the rounds differ; '-' for None."""
    if r is None:
        return "-"
    lo, hi = f"{r[1]:.2f}", f"{r[2]:.2f}"
    return f"{r[0]:.2f}x" if lo == hi else f"{r[0]:.2f}x ({lo}-{hi})"
