"""How generation ends: EOS ids of the generation config, the task's stop strings, and, after
the fact, why each row of a batch ended and how many tokens it generated.

``generate`` ends a sequence at any EOS id of ``model.generation_config`` (Llama-3 instruct
models have several) and, given a ``StopStringCriteria``, when the generated text completes a
stop string; it then pads the row and does not say which check fired. :func:`finish_reasons`
replays the checks on the CPU to recover that (``stop_reason`` and ``tokens_out`` of the
results). Imports transformers only in :func:`build_stop_criteria`.
"""
from __future__ import annotations

from typing import Any, Sequence

#: values of the ``stop_reason`` column: the sequence generated an EOS id of the model's
#: generation_config, completed one of the task's stop strings, or ran to max_new_tokens
STOP_REASONS = ("eos", "stop_string", "max_new_tokens")


def build_stop_criteria(tokenizer: Any, stops: Sequence[str]) -> tuple[Any, Any]:
    """(``StoppingCriteriaList`` for ``generate``, a CPU copy of its criterion for
    :func:`finish_reasons`) matching ``stops``, as ``generate(stop_strings=stops,
    tokenizer=tokenizer)`` builds it.

    Build it once and pass it as ``stopping_criteria=``: building reads and sorts the whole
    vocabulary (~0.1 s for 18k tokens, more for 128k), which ``stop_strings=`` would repeat in
    every ``generate`` call, inside the measured window. The copy is shallow on purpose:
    calling the criterion moves its tensors to the ids' device by rebinding them, so the copy's
    stay on the CPU.
    """
    import copy

    from transformers import StoppingCriteriaList, StopStringCriteria

    crit = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stops))
    return StoppingCriteriaList([crit]), copy.copy(crit)


def eos_token_ids(loaded: Any) -> list[int]:
    """The EOS ids generation stops at: the model's ``generation_config.eos_token_id`` (an int
    or a list), else the tokenizer's EOS (what :meth:`GenerationSettings.generate_kwargs` then
    passes), else none."""
    gc = getattr(loaded.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    if hasattr(eos, "tolist"):
        eos = eos.tolist()
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def finish_reasons(sequences: Any, prompt_len: int, *, eos_ids: Sequence[int],
                   stop: Any = None) -> tuple[list[int], list[str]]:
    """Tokens generated and stop reason of each row of a ``generate`` output.

    ``generate`` does not say why a row ended; after a row ends it is filled with pad ids, which
    may equal an EOS id or complete nothing. So this replays the same checks on the CPU, step by
    step, as ``generate`` made them: the first EOS id (any of ``eos_ids``) or the first step at
    which ``stop`` (a ``StopStringCriteria`` on the CPU) matches ends the row; a row that ends at
    neither ran to ``max_new_tokens``. When the EOS and a stop string end a row at the same step,
    the reason is ``eos``. A few milliseconds per batch, outside the measured window.

    Args:
        sequences: output ids, shape (batch, prompt_len + steps), on any device.
        prompt_len: the padded input length.
        eos_ids: EOS ids generation stopped at ([] when EOS was suppressed, as with a fixed
            output length).
        stop: the stop-string criterion generate used, or None.
    Returns:
        (tokens per row, up to and including the token that ended it; reasons per row).
    """
    import numpy as np

    seq = sequences.detach().cpu() if hasattr(sequences, "detach") else sequences
    gen = np.asarray(seq[:, prompt_len:])
    n, steps = gen.shape
    counts = np.full(n, steps, dtype=np.int64)
    reasons = ["max_new_tokens"] * n
    if eos_ids and steps:
        is_eos = np.isin(gen, list(eos_ids))
        for r in np.flatnonzero(is_eos.any(axis=1)):
            counts[r] = int(is_eos[r].argmax()) + 1
            reasons[r] = "eos"
    if stop is not None:
        open_rows = np.ones(n, dtype=bool)
        for i in range(steps):
            open_rows &= counts > i   # rows that generated token i
            if not open_rows.any():
                break
            hit = np.asarray(stop(seq[:, : prompt_len + i + 1], None)).astype(bool) & open_rows
            for r in np.flatnonzero(hit):
                if not (reasons[r] == "eos" and counts[r] == i + 1):
                    counts[r], reasons[r] = i + 1, "stop_string"
            open_rows &= ~hit
    return [int(c) for c in counts], reasons


__all__ = ["STOP_REASONS", "build_stop_criteria", "eos_token_ids", "finish_reasons"]
