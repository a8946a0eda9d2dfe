"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

import torch

from .llama import KVCache, Llama


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V] with those of the ids in `seen` [B, n] divided by `penalty` where positive and
    multiplied by it where negative (an id seen twice counts once)."""
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]. temperature 0 means greedy (argmax).

    repetition_penalty (CTRL, Keskar et al. 2019; transformers' `repetition_penalty`): the logit
    of every token in `seen` [B, n] (the context so far) is divided by it when positive and
    multiplied by it when negative, before temperature and the cut-offs; 1 leaves them alone.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = penalize_repetition(logits, seen, repetition_penalty)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first one always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Llama,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Extend prompts input_ids [B, T0] by up to max_new_tokens; returns [B, T0 + n].

    repetition_penalty applies to every token of the row so far (prompt padding excepted).

    Prompts of different lengths are left-padded with attention_mask [B, T0] (0 on padding);
    positions then start at each row's first real token. Rows that produced `eos_token_id`
    keep emitting it; generation stops early once every row has.
    """
    B, T0 = input_ids.shape
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    cache = KVCache(model.config, B, T0 + max_new_tokens, device=input_ids.device, dtype=param.dtype)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
        position_ids = None
    else:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T0]
    explicit_mask = position_ids is not None
    next_pos = attention_mask.long().sum(-1, keepdim=True)  # [B, 1]

    out = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = model(
        input_ids, position_ids=position_ids, attention_mask=attention_mask if explicit_mask else None,
        kv_cache=cache,
    )  # [B, T0, V]
    try:
        for _ in range(max_new_tokens):
            # A padding position stands for the row's last token, which the penalty covers anyway.
            seen = torch.where(attention_mask.bool(), out, out[:, -1:]) if repetition_penalty != 1.0 else None
            tok = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                              repetition_penalty=repetition_penalty, seen=seen)
            if eos_token_id is not None:
                tok = torch.where(finished, torch.full_like(tok, eos_token_id), tok)
                finished |= tok == eos_token_id
            out = torch.cat([out, tok[:, None]], dim=1)
            if (eos_token_id is not None and bool(finished.all())) or out.size(1) == T0 + max_new_tokens:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(tok[:, None])], dim=1)
            logits = model(
                tok[:, None],
                position_ids=next_pos if explicit_mask else None,
                attention_mask=attention_mask if explicit_mask else None,
                kv_cache=cache,
            )  # [B, 1, V]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return out
