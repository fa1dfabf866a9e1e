"""Log-likelihood scoring: forward passes that give what ``loglik`` tasks are scored on.

Run these outside measured windows (they are extra forward passes, not part of the workload).
"""
from __future__ import annotations

from typing import Any, Sequence

from llm_dvfs.workload.tasks.base import LoglikResult, Sample


def choice_logliks(model: Any, tokenizer: Any, context: str,
                   continuations: Sequence[str], *, add_special_tokens: bool = True) -> list[LoglikResult]:
    """Log-likelihood of each continuation after ``context``, in one batched forward pass.

    Tokenisation follows lm-evaluation-harness: trailing spaces of the context move to the
    continuation; the continuation's tokens are those of ``tokenize(context + continuation)``
    beyond the length of ``tokenize(context)``. Special tokens (e.g. a BOS) are added as the
    tokenizer does by default (``add_special_tokens=False``: none, for a context that carries
    them already, as a chat-templated prompt does); an empty context starts from BOS (or EOS).
    Sums are in nats, computed in float32.

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``).
        tokenizer: its tokenizer.
        context: the prompt.
        continuations: candidate continuations (e.g. HellaSwag endings with a leading space).

    Returns:
        One :class:`LoglikResult` per continuation, in order.
    """
    import torch

    if not continuations:
        return []
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuations = [context[-n_space:] + c for c in continuations]
        context = context[:-n_space]
    if context:
        ctx_ids = list(tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"])
    else:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx_ids = [start]
    seqs, spans = [], []
    for c in continuations:
        if context:
            cont = list(tokenizer(context + c, add_special_tokens=add_special_tokens)["input_ids"])[len(ctx_ids):]
        else:
            cont = list(tokenizer(c, add_special_tokens=False)["input_ids"])
        if not cont:
            raise ValueError(f"continuation {c!r} has no tokens of its own after the context")
        seqs.append(ctx_ids + cont)
        spans.append((len(ctx_ids), len(cont)))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = getattr(model, "device", None) or next(model.parameters()).device
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: positions of real tokens stay 0..len-1
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for i, (start, n) in enumerate(spans):
        # logits at position p predict token p+1
        lp = torch.log_softmax(logits[i, start - 1: start - 1 + n].float(), dim=-1)
        target = ids[i, start: start + n].to(lp.device)
        tok_lp = lp.gather(-1, target[:, None])[:, 0]
        greedy = bool((lp.argmax(-1) == target).all())
        out.append(LoglikResult(float(tok_lp.sum()), n, greedy))
    return out


def sample_logliks(model: Any, tokenizer: Any, sample: Sample, *,
                   add_special_tokens: bool = True) -> list[LoglikResult]:
    """:func:`choice_logliks` of ``sample.choices`` after ``sample.prompt`` (for ``loglik`` tasks)."""
    if not sample.choices:
        raise ValueError(f"sample {sample.sample_id} has no choices to score")
    return choice_logliks(model, tokenizer, sample.prompt, sample.choices,
                          add_special_tokens=add_special_tokens)


__all__ = ["choice_logliks", "sample_logliks"]
