"""Bootstrap confidence intervals, multiple-testing correction and seeded random streams.

Array functions with no knowledge of the result tables (numpy; scipy for the q-values);
:mod:`llm_dvfs.analysis.summary`, :mod:`llm_dvfs.analysis.feature_stats` and the report build on
them.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Iterable

import numpy as np

# Bootstrap matrices larger than this many elements are drawn in chunks (memory, not speed).
_BOOT_CHUNK_ELEMS = 4_000_000


def keyed_rng(seed: int, *parts: Any) -> np.random.Generator:
    """A generator seeded by ``seed`` and the ``repr`` of ``parts``: one stream per (group,
    clock point, metric), so that results do not depend on the order groups are visited in."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF] + [zlib.crc32(repr(p).encode()) for p in parts])


def bootstrap_medians(values: np.ndarray, n_boot: int, rng: np.random.Generator,
                      stat: str = "median") -> np.ndarray:
    """``n_boot`` medians (or means, ``stat="mean"``) of resamples with replacement of
    ``values``; vectorised (one ``n_boot × n`` index draw, in chunks for very large n).

    Returns an empty array when ``values`` is empty. NaNs must be removed by the caller.
    """
    if stat not in ("median", "mean"):
        raise ValueError(f"stat must be 'median' or 'mean', got {stat!r}")
    v = np.sort(np.asarray(values, dtype=float))
    n = v.size
    if n == 0 or n_boot <= 0:
        return np.empty(0)
    out = np.empty(n_boot)
    step = max(1, _BOOT_CHUNK_ELEMS // n)
    lo, hi = (n - 1) // 2, n // 2
    for i in range(0, n_boot, step):
        m = min(step, n_boot - i)
        idx = rng.integers(0, n, size=(m, n), dtype=np.int64 if n > 2**31 - 1 else np.int32)
        if stat == "mean":
            out[i:i + m] = v[idx].mean(axis=1)
        else:
            # v is sorted, so the median of v[idx] is v at the median of idx: sorting small
            # integer rows is several times faster than a float median of the gathered values.
            idx.sort(axis=1)
            out[i:i + m] = 0.5 * (v[idx[:, lo]] + v[idx[:, hi]])
    return out


def median_ci(values: Iterable[float], *, n_boot: int = 2000, ci: float = 0.95,
              seed: int = 0) -> tuple[float, float, float]:
    """Median of ``values`` (NaNs ignored) and its percentile-bootstrap ``ci`` interval.

    Returns ``(median, low, high)``; ``low``/``high`` are NaN with fewer than 2 finite values
    (one sample says nothing about spread), all three are NaN with none.
    """
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    med = float(np.median(v))
    if v.size < 2:
        return (med, math.nan, math.nan)
    boots = bootstrap_medians(v, n_boot, np.random.default_rng(seed))
    lo, hi = np.percentile(boots, [50 * (1 - ci), 50 * (1 + ci)])
    return (med, float(lo), float(hi))


def bh_qvalues(p: Iterable[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate) through
    :func:`scipy.stats.false_discovery_control` (scipy >= 1.11), over the finite values; NaNs
    (tests that could not be made) stay NaN and do not count as tests.

    Raises:
        ValueError: a finite p-value outside [0, 1].
    """
    # scipy here only: the summary (and the end-of-run console) import this module for the bootstrap
    from scipy.stats import false_discovery_control

    p = np.asarray(list(p), dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q
