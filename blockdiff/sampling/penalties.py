"""Presence, frequency and repetition penalties and logit_bias: per-request state on the device and the
batched logits transform the sampler applies first (``sampler.default_step``), without host synchronisation."""

from __future__ import annotations

import torch

from ..kv_cache import to_device


def penalty_rows(rows: list[dict], V: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(rep [B, V], bias [B, V]) from each row's optional ``penalty`` (``Penalties``), or None where no row has
    one. Device work only: the rows' counts stay on the device (no host synchronisation)."""
    pens = [r.get("penalty") for r in rows]
    if all(x is None for x in pens):
        return None, None
    rep = bias = None
    if any(x is not None and x.rep is not None for x in pens):
        rep = torch.stack([x.rep_row() if x is not None and x.rep is not None
                           else torch.ones(V, dtype=torch.float32, device=device) for x in pens])
    if any(x is not None and x.has_bias for x in pens):
        bias = torch.stack([x.bias_row() if x is not None and x.has_bias
                            else torch.zeros(V, dtype=torch.float32, device=device) for x in pens])
    return rep, bias


class Penalties:
    """One request's penalties and logit_bias over its vocabulary, on the device.

    "Seen" on a canvas: ``repetition_penalty`` applies to the tokens of the prompt and of the committed canvases
    (the output so far); ``presence_penalty`` / ``frequency_penalty`` to the committed output tokens only (as
    OpenAI counts generated text). Tokens of the canvas being denoised are drafts, not seen: counting them would
    push each position away from its own draft. ``logit_bias`` applies everywhere."""

    def __init__(self, params, prompt_ids: list[int], V: int, device):
        device = torch.device(device)
        self.presence = float(params.presence_penalty or 0.0)
        self.frequency = float(params.frequency_penalty or 0.0)
        r = params.repetition_penalty
        self.rep = None if r in (None, 1) else float(r)
        self.counts = torch.zeros(V, dtype=torch.float32, device=device)  # output occurrences per token
        self.prompt_seen = None
        if self.rep is not None:
            self.prompt_seen = torch.zeros(V, dtype=torch.bool, device=device)
            self.prompt_seen[to_device(torch.tensor(sorted(set(prompt_ids)), dtype=torch.long), device)] = True
        self.logit_bias = None
        if params.logit_bias:
            ids = to_device(torch.tensor(list(params.logit_bias), dtype=torch.long), device)
            vals = to_device(torch.tensor(list(params.logit_bias.values()), dtype=torch.float32), device)
            self.logit_bias = torch.zeros(V, dtype=torch.float32, device=device).index_put_((ids,), vals)
        self.has_bias = self.logit_bias is not None or self.presence != 0 or self.frequency != 0

    def commit(self, tokens: list[int]) -> None:
        """Count a committed canvas's output tokens."""
        if tokens:
            ids = to_device(torch.tensor(tokens, dtype=torch.long), self.counts.device)
            self.counts.index_add_(0, ids, torch.ones(len(tokens), dtype=torch.float32, device=ids.device))

    def rep_row(self) -> torch.Tensor:
        seen = (self.prompt_seen | (self.counts > 0)).float()
        return 1.0 + (self.rep - 1.0) * seen

    def bias_row(self) -> torch.Tensor:
        out = -(self.presence * (self.counts > 0).float() + self.frequency * self.counts)
        return out if self.logit_bias is None else out + self.logit_bias


def apply_penalties(logits: torch.Tensor, rep: torch.Tensor | None, bias: torch.Tensor | None, chunk: int) -> None:
    """In place on ``logits`` [B, C, V]: seen tokens' positive logits divided by ``rep`` [B, V] and negative ones
    multiplied (``chunk`` positions of one canvas at a time, so the temporaries stay chunk x V), then ``bias``
    [B, V] added (broadcast, no temporary)."""
    if rep is not None:
        inv = rep.reciprocal()  # [B, V]: one multiply per entry instead of a divide, a multiply and a select
        B, C, _ = logits.shape
        for b in range(B):
            for j in range(0, C, chunk):
                rows = logits[b, j:j + chunk]  # [<=chunk, V]
                rows.mul_(torch.where(rows > 0, inv[b], rep[b]))
    if bias is not None:
        logits.add_(bias[:, None, :])
