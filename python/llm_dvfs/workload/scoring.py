"""Log-likelihood scoring: forward passes that give what ``loglik`` tasks are scored on.

Two layers: :func:`encode_pair` splits a (context, continuation) pair into token ids as
lm-evaluation-harness does, and :func:`token_logliks` scores any number of such id pairs in one
batched forward pass. :func:`choice_logliks` (the sweep's multiple-choice tasks) and the
lm-evaluation-harness model (:mod:`llm_dvfs.lm_eval.model`) are both built on them.

The sweep runs these outside measured windows (extra forward passes, not part of its workload);
the lm-evaluation-harness model measures them, because there they are the workload.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from llm_dvfs.workload.tasks.base import LoglikResult, Sample


def encode_pair(tokenizer: Any, context: str, continuation: str, *,
                add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a pair, split as lm-evaluation-harness splits it.

    Trailing whitespace of the context moves to the continuation (``"Answer: "`` + ``"yes"`` is
    scored as ``"Answer:"`` + ``" yes"``, the way a word boundary is tokenised); the continuation's
    ids are those of ``tokenize(context + continuation)`` beyond the length of
    ``tokenize(context)``, special tokens (e.g. a BOS) added as the tokenizer does by default. An
    empty context becomes the BOS token (EOS where there is none), unless the continuation already
    starts with it, in which case that token is the context. ``add_special_tokens=False`` adds
    none, for a context that carries them already (a chat-templated prompt).

    Returns:
        Two lists of token ids; the continuation's may be empty (a continuation that tokenises
        into the context's last token), which :func:`token_logliks` rejects.
    """
    if not context:
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if cont and cont[0] == start:
            return cont[:1], cont[1:]
        return [start], cont
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = list(tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"])
    ctx = list(tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"])
    return ctx, whole[len(ctx):]


def fed_tokens(n_context: int, n_continuation: int, max_length: Optional[int] = None) -> int:
    """Tokens a pair puts through the model in :func:`token_logliks`: context + continuation
    minus the last token (whose logits predict nothing scored), at most ``max_length``."""
    n = n_context + n_continuation - 1
    return n if max_length is None else min(n, int(max_length))


def token_logliks(model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                  pad_token_id: int = 0, max_length: Optional[int] = None) -> list[LoglikResult]:
    """Log-likelihood of each continuation's ids after its context's ids: one forward pass.

    The rows (context + continuation without its last token, see :func:`fed_tokens`) are padded
    on the right, so the positions of real tokens stay ``0..len-1`` in every row. A row longer
    than ``max_length`` loses tokens from the left (the context first, as lm-evaluation-harness
    truncates); the continuation tokens still inside the row are scored (``n_tokens`` says how
    many). Sums are in nats, computed in float32.

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...).logits``).
        pairs: ``(context ids, continuation ids)``; the context must be non-empty.
        pad_token_id: id written into padded positions (masked, never scored).
        max_length: the model's context in tokens; None = no truncation.

    Returns:
        One :class:`LoglikResult` per pair (``loglik``, ``n_tokens`` scored, ``is_greedy``:
        every scored token is the argmax of its logits).

    Raises:
        ValueError: a pair with an empty context or continuation.
    """
    import torch

    if not pairs:
        return []
    rows, spans = [], []
    for k, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"pair {k}: the {'context' if not ctx else 'continuation'} has no tokens "
                             "(an empty continuation, or one that tokenises into the context)")
        full = list(ctx) + list(cont)
        keep = full if max_length is None else full[-(int(max_length) + 1):]
        n = min(len(cont), len(keep) - 1)
        rows.append(keep[:-1])
        spans.append((len(keep) - 1 - n, n))  # first scored target position in the row, count
    width = max(len(r) for r in rows)
    device = getattr(model, "device", None) or next(model.parameters()).device
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for i, (start, n) in enumerate(spans):
        # logits at position p predict token p+1: targets start+1 .. start+n of the full sequence
        lp = torch.log_softmax(logits[i, start: start + n].float(), dim=-1)
        full = list(pairs[i][0]) + list(pairs[i][1])
        target = torch.tensor(full[len(full) - n:], dtype=torch.long, device=lp.device)
        tok_lp = lp.gather(-1, target[:, None])[:, 0]
        greedy = bool((lp.argmax(-1) == target).all())
        out.append(LoglikResult(float(tok_lp.sum()), n, greedy))
    return out


def choice_logliks(model: Any, tokenizer: Any, context: str,
                   continuations: Sequence[str], *, add_special_tokens: bool = True) -> list[LoglikResult]:
    """Log-likelihood of each continuation after ``context``, in one batched forward pass.

    Tokenisation follows lm-evaluation-harness (:func:`encode_pair`): trailing whitespace of
    the context moves to the continuation; the continuation's tokens are those of
    ``tokenize(context + continuation)`` beyond the length of ``tokenize(context)``. Special
    tokens (e.g. a BOS) are added as the tokenizer does by default (``add_special_tokens=False``:
    none, for a context that carries them already, as a chat-templated prompt does); an empty
    context starts from BOS (or EOS). Sums are in nats, computed in float32.

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``).
        tokenizer: its tokenizer.
        context: the prompt.
        continuations: candidate continuations (e.g. HellaSwag endings with a leading space).

    Returns:
        One :class:`LoglikResult` per continuation, in order.

    Raises:
        ValueError: a continuation without tokens of its own after the context.
    """
    if not continuations:
        return []
    pairs = []
    for c in continuations:
        ctx, cont = encode_pair(tokenizer, context, c, add_special_tokens=add_special_tokens)
        if not cont:
            raise ValueError(f"continuation {c!r} has no tokens of its own after the context")
        pairs.append((ctx, cont))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return token_logliks(model, pairs, pad_token_id=pad)


def sample_logliks(model: Any, tokenizer: Any, sample: Sample, *,
                   add_special_tokens: bool = True) -> list[LoglikResult]:
    """:func:`choice_logliks` of ``sample.choices`` after ``sample.prompt`` (for ``loglik`` tasks)."""
    if not sample.choices:
        raise ValueError(f"sample {sample.sample_id} has no choices to score")
    return choice_logliks(model, tokenizer, sample.prompt, sample.choices,
                          add_special_tokens=add_special_tokens)


__all__ = ["encode_pair", "fed_tokens", "token_logliks", "choice_logliks", "sample_logliks"]
