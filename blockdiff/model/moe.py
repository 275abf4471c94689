"""Routed mixture of experts: the router, the device-side routing metadata and the grouped expert GEMMs.

``route(idx, E)`` turns the router's choices into everything a grouped GEMM needs - the (token, slot) pairs
sorted by expert, each pair's token, the per-expert end offsets - computed on the device with a fixed number of
ops and no host read (expert counts by ``scatter_add_``, offsets by ``cumsum``). ``combine`` undoes the sort with a
gather and sums each token's top-k slots in slot order: no ``index_add_`` atomics, so the result does not depend on
the order the hardware happens to add in. A quantized experts module reuses both and swaps only the GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .cpu_threads import each_expert, map_expert_blocks, spans_of, workers
from .norms import RMSNorm, activation

_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GROUPED_MM_UNSUPPORTED: set = set()  # (device type, dtype) pairs whose grouped-mm kernel raised once


@torch.library.custom_op("blockdiff::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [N, K] rows grouped by expert, w [E, K, M], offs [E] int32 group ends -> [N, M].

    ``torch._grouped_mm`` behind a custom op: its registered shape function (what ``torch.compile`` traces with)
    accepts only bf16, while the CPU kernel also runs fp32; this op's shape function is dtype-agnostic."""
    return torch._grouped_mm(x, w, offs=offs)


@grouped_mm.register_fake
def _grouped_mm_shape(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


class Router(nn.Module):
    """Top-k router on the raw residual: unscaled RMSNorm * scale * hidden^-0.5 -> softmax -> top-k, renormalised,
    times a per-expert scale."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.root = cfg.hidden_size ** -0.5
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> weights [N, K] (fp32), expert ids [N, K]."""
        h = self.norm(x) * self.scale * self.root
        probs = F.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


@dataclass
class Routing:
    """Device-side routing metadata of N tokens with top-K experts each (no host values)."""

    order: torch.Tensor  # [N*K] long: flat (token, slot) pair ids sorted by expert (stable)
    token_of: torch.Tensor  # [N*K] long: the token of each sorted pair (rows to gather from x)
    inverse: torch.Tensor  # [N*K] long: where each flat pair sits in the sorted order
    counts: torch.Tensor  # [E] long: pairs per expert
    offsets: torch.Tensor  # [E] int32: end offset of each expert's group (``_grouped_mm``'s ``offs``)


def route(idx: torch.Tensor, num_experts: int) -> Routing:
    """idx [N, K] expert ids -> ``Routing``."""
    K = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=idx.device))
    return Routing(order, order // K, inverse, counts, torch.cumsum(counts, 0).to(torch.int32))


def combine(y_sorted: torch.Tensor, routing: Routing, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y_sorted [N*K, H] (expert-sorted pair outputs), weights [N, K] -> [N, H]: sum over slots 0..K-1 in order."""
    N, K = weights.shape
    y = y_sorted.index_select(0, routing.inverse).view(N, K, -1)  # [N, K, H] back in (token, slot) order
    out = y[:, 0] * weights[:, :1]
    for s in range(1, K):
        out = out + y[:, s] * weights[:, s:s + 1]
    return out.to(dtype)


def grouped_mm_usable(x: torch.Tensor, *inner_dims: int) -> bool:
    """Whether ``torch._grouped_mm`` can run here: inference (it has no backward for empty groups), a supported
    dtype, 16-byte aligned rows, and a kernel that has not refused this device/dtype before."""
    if not _GROUPED_MM or torch.is_grad_enabled() or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    if (x.device.type, x.dtype) in _GROUPED_MM_UNSUPPORTED:
        return False
    el = x.element_size()
    return all(d * el % 16 == 0 for d in inner_dims)


class Experts(nn.Module):
    """Routed GeGLU experts stored as 3-D tensors: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = e
        self.act = activation(cfg.hidden_activation)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights/idx [N, K] -> [N, H]. Sparse: each expert runs only on the tokens routed to it."""
        return self.forward_with(x, weights, idx)[0]

    def forward_with(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, side=()) -> tuple:
        """``forward`` plus the results of ``side`` tasks ((multiply-adds, callable) pairs, independent of the
        experts: the layer's dense MLP), run on the CPU's worker threads beside the experts when they are used."""
        r = route(idx, self.num_experts)
        xs = x.index_select(0, r.token_of)  # [N*K, H] grouped by expert
        y = None
        I2, H = self.gate_up_proj.shape[1:]
        if x.device.type == "cpu" and workers() > 1:
            # CPU with several threads: whole experts per thread, a run of consecutive experts each, the dense MLP
            # beside them (cpu_threads.py); the grouped kernel is a single-threaded loop over experts there, and one
            # ~16-row GEMM is too small to split.
            counts = r.counts.tolist()
            y, done = map_expert_blocks(partial(self._block, xs, counts), counts, 3 * H * I2 // 2, xs, H, side)
            return combine(y, r, weights, x.dtype), done
        if grouped_mm_usable(x, H, I2 // 2):
            # One GEMM per weight matrix for every token of the batch: each expert's weights are read once.
            try:
                gate, up = grouped_mm(xs, self.gate_up_proj.transpose(1, 2), r.offsets).chunk(2, dim=-1)
                y = grouped_mm(self.act(gate) * up, self.down_proj.transpose(1, 2), r.offsets)
            except RuntimeError:  # a device/dtype this build's kernel lacks (some GPUs): loop from now on
                _GROUPED_MM_UNSUPPORTED.add((x.device.type, x.dtype))
        if y is None:
            y = self._looped(xs, r)
        return combine(y, r, weights, x.dtype), [g() for _, g in side]

    def _block(self, xs: torch.Tensor, counts: list[int], blk: list) -> torch.Tensor:
        """One run of consecutive experts on this thread: one ``mm`` per expert written into its rows, the
        activation once over the run's rows."""
        (e0, a, _), (e1, _, b) = blk[0], blk[-1]
        c, x = counts[e0:e1 + 1], xs[a:b]
        gu = each_expert(torch.mm, x, c, self.gate_up_proj[e0:e1 + 1].transpose(1, 2).unbind(0),
                         x.new_empty(b - a, self.gate_up_proj.shape[1]))
        gate, up = gu.chunk(2, dim=-1)
        return each_expert(torch.mm, self.act(gate) * up, c, self.down_proj[e0:e1 + 1].transpose(1, 2).unbind(0),
                           x.new_empty(b - a, self.down_proj.shape[1]))

    def _looped(self, xs: torch.Tensor, r: Routing) -> torch.Tensor:
        """One matmul pair per expert: for autograd (training) and dtypes without a grouped kernel. Reads the
        counts back to the host once (a sync: this path is not the inference hot path where grouped mm works)."""
        return torch.cat([self._expert(xs[a:b], e) for e, a, b in spans_of(r.counts.tolist())])

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[e])
