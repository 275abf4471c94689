"""top_k / min_p / top_p truncation of a distribution before a token is drawn from it, and the log-probabilities
the engine reports for output tokens. Pure functions over rows of probabilities with per-row parameters, so one
call serves a batch where each request sets its own values (or none).
"""

from __future__ import annotations

import torch

from ..kv_cache import to_device


def truncate(probs: torch.Tensor, top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
             min_p: torch.Tensor | None = None) -> torch.Tensor:
    """probs [N, V] (need not sum to 1) -> the same with every cut token set to 0 (not renormalised: inverse-CDF
    sampling scales by the row's total).

    Per row (each parameter [N], or None for no row): keep the ``top_k`` most likely tokens (``top_k >= V``: all)
    and the tokens with ``p >= min_p * max p`` (``min_p = 0``: all), then, of those, the smallest most-likely-first
    set whose mass reaches ``top_p`` of what is left (``top_p = 1``: all). The most likely token always stays.
    """
    N, V = probs.shape
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [N, V]
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if top_k is not None:
        keep &= torch.arange(V, device=probs.device)[None] < top_k[:, None]
    if min_p is not None:
        keep &= sorted_p >= min_p[:, None].to(sorted_p.dtype) * sorted_p[:, :1]
    if top_p is not None:
        kept = sorted_p * keep
        cum = kept.cumsum(-1)
        before = cum - kept  # mass of the more likely kept tokens
        cut = before >= top_p[:, None].to(cum.dtype) * cum[:, -1:]
        keep &= ~cut | (top_p[:, None] >= 1)  # top_p = 1 keeps even zero-mass tails: untouched rows stay exact
    keep[:, 0] = True
    mask = torch.zeros_like(keep).scatter_(-1, order, keep)
    return probs.masked_fill(~mask, 0.0)


def row_params(values: list, fill, dtype, device) -> torch.Tensor | None:
    """Per-row parameter tensor from per-request values (None -> ``fill``, the value that cuts nothing); None when
    no row sets one."""
    if all(v is None for v in values):
        return None
    return to_device(torch.tensor([fill if v is None else v for v in values], dtype=dtype), torch.device(device))


def logprob_columns(probs: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """probs [B, C, V] (each position's distribution), tokens [B, C] -> int64 [B, C * (1 + 2k)] to ride along the
    tick's one device-to-host copy: the fp32 bit patterns of log p(token) [C] and of the k largest log p [C, k],
    then those k token ids [C, k]."""
    B, C, _ = probs.shape
    logp = probs.gather(-1, tokens[..., None]).squeeze(-1).log()  # [B, C]
    cols = [logp.view(torch.int32).long()]
    if k:
        top_p, top_ids = probs.topk(k, dim=-1)  # [B, C, k]
        cols += [top_p.log().view(torch.int32).long().view(B, C * k), top_ids.view(B, C * k)]
    return torch.cat(cols, 1)


def split_logprob_row(row: list[int], C: int, k: int, want: int) -> list:
    """One row of ``logprob_columns`` (host ints) -> per position (logprob, [(id, logprob), ...] ``want`` most
    likely first)."""
    def floats(bits):
        return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).tolist()

    lp = floats(row[:C])
    if not want:
        return [(x, []) for x in lp]
    top = floats(row[C:C + C * k])
    ids = row[C + C * k:C + 2 * C * k]
    return [(lp[c], list(zip(ids[c * k:c * k + want], top[c * k:c * k + want]))) for c in range(C)]
