"""Observed orders of convergence: least-squares slopes of log(error) against
log(1/N), local slopes between consecutive N, and whether a fit reads as an order."""

import math
from collections.abc import Sequence

import numpy as np


def _error_points(steps: Sequence[int], errs: Sequence[float]) -> list[tuple]:
    """The (N, error) pairs whose error is finite and positive, sorted by N."""
    finite = [(n, e) for n, e in zip(steps, errs) if e is not None]
    return sorted((n, e) for n, e in finite if e > 0 and math.isfinite(e))


def fit_slope(steps: Sequence[int], errs: Sequence[float]) -> float:
    """Least-squares slope of log(error) against log(1/N) over the finite positive
    errors: the observed order of convergence (NaN with fewer than two points)."""
    pts = _error_points(steps, errs)
    if len(set(n for n, _ in pts)) < 2:
        return math.nan
    ns = np.asarray([p[0] for p in pts], float)
    es = np.asarray([p[1] for p in pts], float)
    return float(np.polyfit(-np.log(ns), np.log(es), 1)[0])


# The fitted slope is an order only where the local slopes (between consecutive N)
# agree to within this; otherwise the errors are pre-asymptotic (or at round-off).
SLOPE_SPREAD = 0.3


def local_slopes(steps: Sequence[int], errs: Sequence[float]) -> list[float]:
    """The slopes of log(error) against log(1/N) between consecutive N (sorted by N),
    over the finite positive errors."""
    pts = _error_points(steps, errs)
    return [
        math.log(e0 / e1) / math.log(n1 / n0)
        for (n0, e0), (n1, e1) in zip(pts, pts[1:])
        if n1 != n0
    ]


def is_asymptotic(steps: Sequence[int], errs: Sequence[float]) -> bool:
    """Whether a fitted slope over these errors reads as an order of convergence: at
    least three N, and local slopes that differ by at most `SLOPE_SPREAD`."""
    ls = local_slopes(steps, errs)
    return len(ls) >= 2 and max(ls) - min(ls) <= SLOPE_SPREAD


def add_slopes(records: list[dict]) -> list[dict]:
    """Sets `slope` and `slope_discrete` on every record: the fitted order of its
    (problem, sampler, adjoint, wrt) series over all N measured; and `asymptotic`:
    whether that fit (against the continuous truth where there is one, else against
    DTO) is an order (`is_asymptotic`), not a pre-asymptotic one."""
    series: dict[tuple, list[dict]] = {}
    for r in records:
        series.setdefault(
            (r["problem"], r["sampler"], r["adjoint"], r["wrt"]), []
        ).append(r)
    for rs in series.values():
        ns = [r["steps"] for r in rs]
        errs = [r["rel_error"] for r in rs]
        s = fit_slope(ns, errs)
        sd = fit_slope(ns, [r["rel_error_discrete"] for r in rs])
        if not math.isfinite(s):
            errs = [r["rel_error_discrete"] for r in rs]
        asym = is_asymptotic(ns, errs)
        for r in rs:
            r["slope"], r["slope_discrete"], r["asymptotic"] = s, sd, asym
    return records
