"""STAND-IN (issue 15): only the two record types the serving engines produce.

The real module (written separately) replaces this file; it adds ``attribute_served``.
All times are host monotonic seconds on the monitor's timeline (``now_ns() * 1e-9``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ServedRequest", "EngineStep"]


@dataclass
class ServedRequest:
    """One served request as an engine or client recorded it (times in host monotonic s)."""

    request_id: str
    t_arrival_s: float
    t_admit_s: float | None
    t_first_token_s: float | None
    token_times_s: np.ndarray
    t_end_s: float
    n_prompt_tokens: int
    n_output_tokens: int
    stop_reason: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class EngineStep:
    """One engine iteration: its host interval and the tokens each request processed in it."""

    t_start_s: float
    t_end_s: float
    prefill_tokens: dict[str, int]
    decode_tokens: dict[str, int]
