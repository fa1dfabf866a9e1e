"""The inputs of :func:`llm_dvfs.meter.concurrency.attribute_served`: what an engine records.

:class:`ServedRequest` (one request's life and its tokens' emission times), :class:`EngineStep`
(one forward step: which requests it served, how many prefill / decode tokens each) and
:class:`PhaseWeights` (how a step's energy is split over them). Import them from
``llm_dvfs.meter.concurrency``; they live here to keep that module short. Plain data: no torch,
no monitor. Times are host monotonic seconds, the monitor's timeline (``time.monotonic()`` on
Linux).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from llm_dvfs.errors import ConfigError

__all__ = ["ServedRequest", "EngineStep", "PhaseWeights", "DEFAULT_WEIGHTS_SOURCE"]

# Measured on the lent H200 (2026-12-02, bench/phase_weights.py, arch:llama-3.2-1b bf16, KV
# context 256, prefill 32-1024 tokens, decode batch 1-64): fitting E_step = c0 + c_p P + c_d D on
# active energy, c_p = 3.09 mJ per prompt token, c_d = 9.95 mJ per decode token (R^2 0.998),
# c_p / c_d = 0.311 [95 % CI 0.292, 0.343]; on total energy 0.284 [0.159, 1.176] (R^2 0.84).
DEFAULT_PREFILL_PER_TOKEN = 0.31
DEFAULT_WEIGHTS_SOURCE = (
    "measured: H200, arch:llama-3.2-1b bf16, context 256, bench/phase_weights.py 2026-12-02: "
    "a prompt token costs 0.311 [0.292, 0.343] of a decode token (active-energy fit, R^2 0.998); "
    "re-measure for other models/GPUs with bench/phase_weights.py")


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class ServedRequest:
    """One request as an engine served it, on the host monotonic timeline (s).

    Attributes:
        request_id: unique within one call of :func:`attribute_served`.
        t_arrival_s: when the request reached the engine (client send time for an endpoint).
        t_admit_s: when the engine admitted it to a batch (None: unknown, e.g. an endpoint).
        t_first_token_s: emission of the first output token (None: ``token_times_s[0]``).
        token_times_s: emission time of every output token, non-decreasing; tokens of one
            streamed chunk carry the same time. Length ``n_output_tokens``.
        t_end_s: when the request finished (result returned, stream closed, or failed).
        n_prompt_tokens, n_output_tokens: token counts; ``n_output_tokens == 0`` = failed.
        stop_reason: engine's reason (eos, length, error, ...), for the record.
        extra: anything else the engine wants to carry (not used here).
    """

    request_id: str
    t_arrival_s: float
    t_admit_s: Optional[float]
    t_first_token_s: Optional[float]
    token_times_s: np.ndarray
    t_end_s: float
    n_prompt_tokens: int
    n_output_tokens: int
    stop_reason: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.request_id = str(self.request_id)
        self.token_times_s = np.asarray(self.token_times_s, dtype=np.float64).ravel()

    @property
    def failed(self) -> bool:
        """No output token: the request gets zero energy."""
        return self.n_output_tokens == 0

    @property
    def t_start_s(self) -> float:
        """Start of service: admission when known, else arrival."""
        return float(self.t_admit_s) if self.t_admit_s is not None else float(self.t_arrival_s)

    @property
    def queue_s(self) -> float:
        """Admission minus arrival, s (NaN when admission is unknown)."""
        return float(self.t_admit_s) - self.t_arrival_s if self.t_admit_s is not None else math.nan

    @property
    def ttft_s(self) -> float:
        """First token minus arrival, s (NaN without tokens)."""
        if self.t_first_token_s is not None:
            return float(self.t_first_token_s) - self.t_arrival_s
        return float(self.token_times_s[0]) - self.t_arrival_s if self.token_times_s.size else math.nan

    @property
    def tpot_s(self) -> float:
        """Mean time between output tokens after the first, s (NaN with fewer than 2)."""
        n = self.token_times_s.size
        return float(self.token_times_s[-1] - self.token_times_s[0]) / (n - 1) if n >= 2 else math.nan

    @property
    def latency_s(self) -> float:
        """End minus arrival, s."""
        return float(self.t_end_s) - float(self.t_arrival_s)


@dataclass
class EngineStep:
    """One engine forward step on the host timeline (s): the requests it served.

    Attributes:
        t_start_s, t_end_s: the step's interval (launch to outputs available).
        prefill_tokens: {request_id: prompt tokens processed in this step} (a chunk of a prompt
            with chunked prefill).
        decode_tokens: {request_id: tokens decoded in this step} (1 per running request; more
            with speculative decoding).
    """

    t_start_s: float
    t_end_s: float
    prefill_tokens: dict[str, int] = field(default_factory=dict)
    decode_tokens: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PhaseWeights:
    """How one step's energy is split over its requests: request ``r`` gets
    ``E_step · (w_p·p_r + w_d·d_r) / Σ(w_p·p + w_d·d)`` for ``p`` prefill and ``d`` decode tokens.

    Only the ratio ``w_p / w_d`` matters. The default, 0.31 : 1, is measured (below); a cost
    model (docs/attribution.md) would say 1:1: a step's energy is ``c0 + c_p·P + c_d·D``, where
    ``c0`` (reading the weights from HBM once, launches, the static power over that time) is shared by every token of the
    step, and the marginal cost of a token is its share of the weight matmuls, ``2·params``
    FLOPs, the same in both phases; a decode token adds the read of its KV cache, a prefill
    token its attention over the prompt, both second order for short contexts. Sharing ``c0``
    in proportion to ``c_p·P + c_d·D`` is the usual "overhead in proportion to use" rule. The
    real ratio is measured on the GPU with ``bench/phase_weights.py`` (prefill-only and
    decode-only steps at known token counts, ``c_p / c_d`` with a bootstrap CI) and passed as
    ``PhaseWeights(ratio, 1.0, source="bench/phase_weights.py ...")``.

    Raises:
        ConfigError: a negative or non-finite weight, or both zero.
    """

    prefill_per_token: float = DEFAULT_PREFILL_PER_TOKEN
    decode_per_token: float = 1.0
    source: str = DEFAULT_WEIGHTS_SOURCE

    def __post_init__(self) -> None:
        p, d = float(self.prefill_per_token), float(self.decode_per_token)
        if not (math.isfinite(p) and math.isfinite(d)) or p < 0 or d < 0 or p + d == 0:
            raise ConfigError(f"phase weights must be finite, >= 0 and not both 0, got prefill {p}, decode {d}")

    def work(self, prefill_tokens: float, decode_tokens: float) -> float:
        """Weighted work of ``prefill_tokens`` and ``decode_tokens`` (dimensionless)."""
        return float(self.prefill_per_token) * prefill_tokens + float(self.decode_per_token) * decode_tokens

    @property
    def ratio(self) -> float:
        """``w_p / w_d`` (inf when decode tokens weigh nothing)."""
        d = float(self.decode_per_token)
        return float(self.prefill_per_token) / d if d > 0 else math.inf
