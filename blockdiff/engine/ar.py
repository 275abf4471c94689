"""Autoregressive decoding with the encoder's causal next-token head: one token per forward.

The baseline DiffusionGemma's speed claims are made against, and the left-to-right half of the
diffusion-vs-autoregressive comparison on the same weights.
"""

from __future__ import annotations

import torch

from ..model import DiffusionGemma


@torch.no_grad()
def ar_generate(
    model: DiffusionGemma,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: list[int] | tuple[int, ...] = (),
    allowed_token_ids: list[int] | None = None,
) -> list[list[int]]:
    """Greedy decoding of a batch of prompts (different lengths allowed). Rows stop at an EOS id (kept) or
    after ``max_new_tokens``. ``allowed_token_ids`` restricts the argmax to a subset of the vocabulary."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dev = model.device
    B = len(prompts)
    S = max(len(p) for p in prompts)
    ids = torch.zeros(B, S, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    cache = model.new_cache(B)
    logits = model.encode(ids.to(dev), cache, lengths=[len(p) for p in prompts], logits="last")  # [B, V]
    bias = None
    if allowed_token_ids is not None:
        bias = torch.full((model.vocab_size,), float("-inf"), device=dev)
        bias[torch.tensor(allowed_token_ids, device=dev)] = 0.0
    eos = set(eos_token_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        nxt = (logits if bias is None else logits + bias).argmax(-1).tolist()
        for b in range(B):
            if not done[b]:
                out[b].append(nxt[b])
                done[b] = nxt[b] in eos or len(out[b]) >= max_new_tokens
        if all(done):
            break
        logits = model.encode(torch.tensor(nxt, device=dev)[:, None], cache, logits="last")
    return out
