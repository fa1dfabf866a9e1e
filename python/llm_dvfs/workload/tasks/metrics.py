"""Quality metrics shared by the tasks: ROUGE-L and log-likelihood argmax helpers."""
from __future__ import annotations

import re
from typing import Any, Sequence

from llm_dvfs.workload.tasks.base import LoglikResult

_WORD_RE = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Tokens as ROUGE sees them: lowercase alphanumeric runs (everything else separates)."""
    return _WORD_RE.findall(text.lower())


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts (longest common subsequence of :func:`rouge_tokens`).

    ``P = lcs/len(candidate)``, ``R = lcs/len(reference)``, ``F1 = 2PR/(P+R)``; 0.0 when either
    side has no tokens or nothing is shared. No stemming, no stopword removal.
    """
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    if not c or not r:
        return 0.0
    lcs = _lcs_len(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def logliks(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        out.append(float(v.loglik if isinstance(v, LoglikResult) else v))
    return out


def argmax(xs: Sequence[float]) -> int:
    # first maximum, like numpy.argmax
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


__all__ = ["rouge_tokens", "rouge_l_f1"]
