"""Where a ``generate_until`` request stops: its generation arguments, and a per-prompt stop.

lm-eval's own HF model stops a batch only when every prompt has met the *same* stop sequence,
so a prompt that stopped early keeps generating (and spending energy) until the others stop.
:class:`StopAtSequences` stops each prompt on its own, at EOS or at the first of its ``until``
sequences, looked for as lm-eval looks for them (in the decoded last ``len(tokens(stop)) + 2``
generated tokens: never in the prompt), and records after how many tokens it stopped: that is
what the prompt generated (``tokens_out``), and what its energy attribution counts. The batch
ends when every prompt has stopped.

Nothing here imports lm_eval; transformers is imported when a criterion is built.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from llm_dvfs.errors import ConfigError

log = logging.getLogger(__name__)

#: lm-eval's aliases of the token limit, in its order of priority
_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def gen_settings(gen_kwargs: Any, default_max_gen_toks: int,
                 eos_text: Optional[str]) -> tuple[list[str], int, dict[str, Any]]:
    """``(until, max_gen_toks, generate kwargs)`` of a request's ``gen_kwargs``, read as lm-eval
    reads them: ``until`` a string or a list (the EOS text is appended); the token limit from
    ``max_gen_toks`` > ``max_new_tokens`` > ``max_tokens`` > ``max_completion_tokens``, else
    ``default_max_gen_toks``; ``do_sample`` defaults to ``temperature > 0``. Greedy decoding
    clears temperature/top_p/top_k (a checkpoint's sampling defaults do not apply to it). Other
    keys go to ``generate`` unchanged; ``max_length`` is dropped (the token limit rules).

    Raises:
        ConfigError: ``gen_kwargs`` is not a dict, ``until`` is neither a string nor a list, or
            the token limit is not a positive integer.
    """
    if not isinstance(gen_kwargs, dict):
        raise ConfigError(f"generate_until expects a dict of generation arguments, got {type(gen_kwargs).__name__}")
    kw = dict(gen_kwargs)
    until = kw.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif isinstance(until, (list, tuple)):
        until = [str(s) for s in until]
    else:
        raise ConfigError(f"'until' must be a string or a list of strings, got {until!r}")
    if eos_text and eos_text not in until:
        until.append(eos_text)
    limits = [kw.pop(k, None) for k in _MAX_TOKEN_KEYS]
    limit = next((v for v in limits if v is not None), default_max_gen_toks)
    try:
        max_gen = int(limit)
    except (TypeError, ValueError):
        raise ConfigError(f"max_gen_toks must be a positive integer, got {limit!r}") from None
    if max_gen < 1:
        raise ConfigError(f"max_gen_toks must be a positive integer, got {limit!r}")
    if kw.pop("max_length", None) is not None:
        log.warning("generation argument max_length ignored: max_gen_toks=%d bounds the generation", max_gen)
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    do_sample = kw.pop("do_sample", None)
    if do_sample is None:
        do_sample = temperature > 0.0
    if do_sample:
        kw["do_sample"] = True
        if temperature > 0.0:  # 0 with sampling is refused by transformers: keep its default then
            kw["temperature"] = temperature
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return until, max_gen, kw


def _ids(eos: Any) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, (list, tuple, set)):
        return {int(e) for e in eos}
    return {int(eos)}


def stop_criteria(tokenizer: Any, until: Sequence[str], prompt_len: int, batch_size: int,
                  eos_token_id: Any) -> Any:
    """A ``StoppingCriteriaList`` holding a fresh :class:`StopAtSequences` (its ``[0]``)."""
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([_criterion_class()(tokenizer, until, prompt_len, batch_size, eos_token_id)])


_CLASS: Optional[type] = None


def _criterion_class() -> type:
    """:class:`StopAtSequences`, built on first use (keeps transformers out of import)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from transformers import StoppingCriteria

    class StopAtSequences(StoppingCriteria):
        """Per prompt: stopped at an EOS id, or once a stop sequence is in its generated text.

        ``stopped_at[j]``: tokens prompt ``j`` had generated when it stopped (0 = not stopped).
        """

        def __init__(self, tokenizer: Any, until: Sequence[str], prompt_len: int, batch_size: int,
                     eos_token_id: Any) -> None:
            self.tokenizer = tokenizer
            self.until = [s for s in until if s]
            self.prompt_len = int(prompt_len)
            self.eos = _ids(eos_token_id)
            # lm-eval's look-back: a stop sequence may be generated in more pieces than it encodes to
            self.lookback = max([len(tokenizer.encode(s, add_special_tokens=False)) + 2 for s in self.until],
                                default=1)
            self.stopped_at = [0] * int(batch_size)

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            n = int(input_ids.shape[1]) - self.prompt_len
            open_rows = [j for j, s in enumerate(self.stopped_at) if s == 0]
            if n > 0 and open_rows:
                lo = max(self.prompt_len, int(input_ids.shape[1]) - self.lookback)
                tails = input_ids[open_rows, lo:].tolist()
                for j, ids in zip(open_rows, tails):
                    if ids[-1] in self.eos:
                        self.stopped_at[j] = n
                    elif self.until:
                        text = self.tokenizer.decode(ids, skip_special_tokens=False)
                        if any(s in text for s in self.until):
                            self.stopped_at[j] = n
            return torch.tensor([s > 0 for s in self.stopped_at], dtype=torch.bool, device=input_ids.device)

    _CLASS = StopAtSequences
    return _CLASS


def generated_lengths(criteria: Any, sequences: Any, prompt_len: int) -> list[int]:
    """Tokens each prompt generated: where its criterion stopped it, else every step of the call
    (the token limit)."""
    steps = int(sequences.shape[1]) - int(prompt_len)
    return [s if s > 0 else steps for s in criteria[0].stopped_at]


__all__ = ["gen_settings", "stop_criteria", "generated_lengths"]
