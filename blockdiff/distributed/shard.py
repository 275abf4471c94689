"""Cut a loaded DiffusionGemma into one rank's shard: sharded module variants swapped in after loading.

The forward functions of ``blockdiff/model`` are untouched: each module below keeps the interface of the module
it replaces and does its collective inside.

- Attention: the query heads split into contiguous ranges (uneven when they do not divide). Each rank keeps the
  KV heads its query heads read. Where a rank's heads map onto whole GQA groups of one size it keeps those KV heads
  once (the real model's full layers, 16 query heads over 2 KV heads: at TP=4 each rank keeps 1 KV head, the pair
  of ranks that share it both hold it - *replicated*). Otherwise (a rank's heads straddle groups unevenly) it keeps
  one KV head per query head (duplicated rows of ``k_proj``/``v_proj``), so the local GQA factor is 1. ``o_proj``
  is row-parallel: a partial product per rank, summed by an all-reduce.
- Dense MLP and the self-conditioning GeGLU: gate/up column-parallel over the intermediate dimension, down
  row-parallel (all-reduce).
- Experts, TP: each expert's intermediate dimension split (``gate_up_proj`` rows, ``down_proj`` columns), one
  all-reduce of the combined output. EP: whole experts per rank (uneven ranges allowed); every rank already holds
  every token (attention is tensor-parallel, activations replicated), so a rank runs its experts on the tokens
  routed to them and an all-reduce sums the partial outputs - the exchange of routed tokens is that all-reduce.
- Embedding / LM head, vocabulary-parallel: rows split; lookup = local rows (zeros elsewhere) + all-reduce; the LM
  head gives each rank its vocabulary slice of the logits; ``probs @ E`` is a local partial product over the
  rank's slice + all-reduce. ``vocab_parallel_softmax`` turns a rank's logit slice into its slice of the softmax
  with two all-reduces (max, sum): nobody builds a full-vocabulary tensor.
- Quantized weights (int8/int4/fp8 ``QTensor``s) are cut in their stored form (rows for column-parallel; input
  columns for row-parallel, on int4 group boundaries), so each shard computes exactly what one process computes.
- The vision tower, norms, router and RoPE tables stay replicated (small).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, combine, route
from ..quant.tensors import INT4_GROUPS


def split(n: int, world: int, rank: int, align: int = 1) -> tuple[int, int]:
    """Contiguous range [lo, hi) of ``n`` items for ``rank``: sizes differ by at most ``align``; every boundary is a
    multiple of ``align`` (int4 groups) except the end."""
    units = -(-n // align)
    lo_u = units * rank // world
    hi_u = units * (rank + 1) // world
    return min(lo_u * align, n), min(hi_u * align, n)


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks, in place; the autograd-free inference path (shards never train)."""
    dist.all_reduce(x, group=group)
    return x


class _RowMax:
    """All-reduce (max) of per-row activation maxima: int8 weights cut along their inputs then quantize each
    activation row with the whole row's scale, as one process does (``quant.modules.quantize_rows``)."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, amax: torch.Tensor) -> torch.Tensor:
        amax = amax.contiguous()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        return amax


# ---------------------------------------------------------------------------------------------- quantized tensors
def _qtensor_cut(qt, rows=None, cols: tuple[int, int] | None = None, experts: tuple[int, int] | None = None,
                 group=None):
    """A new QTensor holding rows (an index list along the output dim), input columns [lo, hi) and/or experts
    [lo, hi) of ``qt``, in its stored form (before ``prepare()``)."""
    from ..quant.modules import QTensor

    parts = {k: v for k, v in qt.parts().items()}
    if any(v is None for v in parts.values()):
        raise RuntimeError("quantized weights must be sharded before prepare() packs them (load with "
                           "prepare_quantized=False)")
    shape = list(qt.shape)
    int8_like = qt.method in ("int8", "fp8")
    if experts is not None:
        parts = {k: v[experts[0]:experts[1]] for k, v in parts.items()}
        shape[0] = experts[1] - experts[0]
    if rows is not None:
        idx = torch.as_tensor(rows, dtype=torch.long)
        row_dim = {"qweight": -2, "qscale": -1 if int8_like else -2, "qzero": -2}
        parts = {k: v.index_select(v.dim() + row_dim[k], idx) for k, v in parts.items()}
        shape[-2] = len(rows)
    if cols is not None:
        lo, hi = cols
        if int8_like:
            parts["qweight"] = parts["qweight"][..., lo:hi]
        else:
            g = qt.group
            if lo % g or (hi % g and hi != shape[-1]):
                raise ValueError(f"int4 input columns [{lo}, {hi}) do not fall on group boundaries ({g})")
            parts["qweight"] = parts["qweight"][..., lo // 2:hi // 2]
            parts["qscale"] = parts["qscale"][..., lo // g:-(-hi // g)]
            parts["qzero"] = parts["qzero"][..., lo // g:-(-hi // g)]
        shape[-1] = hi - lo
    out = QTensor(tuple(shape), qt.method, qt.group)
    for k, v in parts.items():
        setattr(out, k, v.contiguous())
    if cols is not None:
        out.reduce_rows = _RowMax(group)
    return out


def _col_align(module) -> int:
    """Input-column alignment a row-parallel cut of ``module``'s weight needs (int4: its group size)."""
    from ..quant.modules import QuantLinear
    if isinstance(module, QuantLinear) and module.weight.method == "int4":
        return module.weight.group
    return 1


def _cut_linear(lin: nn.Module, rows=None, cols: tuple[int, int] | None = None, bias: bool = True,
                group=None) -> nn.Module:
    """nn.Linear / QuantLinear -> a plain module of the same kind with the given output rows / input columns.
    ``bias=False`` drops the bias (row-parallel layers add it once, after the all-reduce)."""
    from ..quant.modules import QuantLinear

    b = lin.bias if bias else None
    if b is not None and rows is not None:
        b = b[torch.as_tensor(rows, dtype=torch.long)]
    if isinstance(lin, QuantLinear):
        w = _qtensor_cut(lin.weight, rows=rows, cols=cols, group=group)
        out = QuantLinear.__new__(QuantLinear)
        nn.Module.__init__(out)
        out.in_features, out.out_features = w.shape[-1], w.shape[-2]
        out.weight = w
        out.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        return out
    w = lin.weight
    if rows is not None:
        w = w[torch.as_tensor(rows, dtype=torch.long)]
    if cols is not None:
        w = w[:, cols[0]:cols[1]]
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    out.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    if b is not None:
        out.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
    return out


class RowParallelLinear(nn.Module):
    """A linear over a slice of the input features: local partial product, all-reduce, then the bias once."""

    def __init__(self, local: nn.Module, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.local = local
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.local(x).contiguous(), self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _row_parallel(lin: nn.Module, cols: tuple[int, int], group) -> RowParallelLinear:
    return RowParallelLinear(_cut_linear(lin, cols=cols, bias=False, group=group), lin.bias, group)


# ---------------------------------------------------------------------------------------------- attention
def local_kv_heads(n_heads: int, n_kv: int, lo: int, hi: int) -> list[int]:
    """The KV heads (global ids, in local order) a rank with query heads [lo, hi) keeps (see module docstring)."""
    rep = n_heads // n_kv
    kv = [h // rep for h in range(lo, hi)]
    distinct = sorted(set(kv))
    counts = {k: kv.count(k) for k in distinct}
    if len(set(counts.values())) == 1:  # whole groups of one size: each KV head once, local GQA factor = count
        return distinct
    return kv  # uneven groups: one KV head per query head (local GQA factor 1)


def check_world_size(text, world: int, expert_parallel: bool) -> None:
    """The limits ``shard_model`` enforces, read from the text config (``config.TextConfig``) before any rank is
    started: a world larger than the heads (or, with EP, the experts) is refused in a line, not after spawning N
    processes that each load the whole checkpoint only to refuse it."""
    if world > text.num_attention_heads:
        raise ValueError(f"tensor_parallel_size {world} exceeds the {text.num_attention_heads} attention heads of a "
                         "layer")
    if expert_parallel and text.num_experts and world > text.num_experts:
        raise ValueError(f"expert parallel over {world} ranks needs at least {world} experts, the model has "
                         f"{text.num_experts}")


def check_int4_split(plan, world: int, expert_parallel: bool) -> None:
    """Before any rank starts: every row-parallel weight ``plan`` (quant.plan.QuantPlan) stores in int4 must give
    each of ``world`` ranks whole groups of its inputs (``shard_model`` cuts int4 only on group boundaries). A
    layer whose inputs are one or two groups otherwise failed on every rank after each had loaded the checkpoint,
    with an error that did not name int4's groups as the cause."""
    if plan is None or plan.method != "int4":
        return
    cfg = plan.cfg
    for name, shape in plan.targets.items():
        row_parallel = name.endswith(("down_proj.weight", "o_proj.weight")) or (
            name.endswith("experts.down_proj") and not expert_parallel)
        if not row_parallel or plan.tensor_method(name) != "int4":
            continue
        K, g = shape[-1], plan.tensor_group(name)
        if name.endswith("o_proj.weight"):  # cut by heads: every boundary a multiple of the group
            D = K // cfg.num_attention_heads
            ok = all(split(cfg.num_attention_heads, world, r)[0] * D % g == 0 for r in range(world))
        else:
            ok = K // g >= world
        if not ok:
            smaller = [h for h in INT4_GROUPS if h < g and K % h == 0 and K // h >= world]
            raise ValueError(f"tensor_parallel_size {world} cannot split {name} in int4: its {K} inputs are stored "
                             f"in groups of {g} ({K // g} group{'s' if K // g != 1 else ''}), and a rank takes "
                             "whole groups only; use a smaller tensor_parallel_size"
                             + (f", int4 with groups of {smaller[0]} (int4-g{smaller[0]})" if smaller else "")
                             + (", expert parallel" if name.endswith("experts.down_proj") else "") + " or int8")


def shard_attention(attn: nn.Module, world: int, rank: int, group=None) -> None:
    """In place: the rank's query heads, the KV heads they read, a row-parallel o_proj."""
    H, Hkv, D = attn.n_heads, attn.n_kv, attn.head_dim
    if world > H:
        raise ValueError(f"tensor_parallel_size {world} exceeds the {H} attention heads of a layer")
    lo, hi = split(H, world, rank)
    kv = local_kv_heads(H, Hkv, lo, hi)
    q_rows = list(range(lo * D, hi * D))
    kv_rows = [k * D + j for k in kv for j in range(D)]
    attn.q_proj = _cut_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _cut_linear(attn.k_proj, rows=kv_rows)
    if attn.v_proj is not None:
        attn.v_proj = _cut_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _row_parallel(attn.o_proj, (lo * D, hi * D), group)
    if attn.encoder_bias is not None:  # the encode pass's own biases, cut like the projections they belong to
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            if name in attn.encoder_bias:
                attn.encoder_bias[name] = nn.Parameter(attn.encoder_bias[name].detach()[rows].clone(),
                                                       requires_grad=False)
    attn.n_heads, attn.n_kv = hi - lo, len(kv)
    attn.spec = dataclasses.replace(attn.spec, num_kv_heads=len(kv))


# ---------------------------------------------------------------------------------------------- GeGLU MLPs
def shard_geglu(mlp: nn.Module, world: int, rank: int, group=None) -> None:
    """In place: gate/up column-parallel, down row-parallel over the intermediate dimension (DenseMLP and the
    self-conditioning block share these names)."""
    inter = mlp.gate_proj.out_features
    lo, hi = split(inter, world, rank, _col_align(mlp.down_proj))
    if hi <= lo:
        raise ValueError(f"tensor_parallel_size {world} leaves a rank without intermediate features ({inter})")
    rows = list(range(lo, hi))
    mlp.gate_proj = _cut_linear(mlp.gate_proj, rows=rows)
    mlp.up_proj = _cut_linear(mlp.up_proj, rows=rows)
    mlp.down_proj = _row_parallel(mlp.down_proj, (lo, hi), group)


# ---------------------------------------------------------------------------------------------- experts
class ParallelExperts(nn.Module):
    """Tensor-parallel experts: each rank holds a slice of every expert's intermediate dimension; the combined
    partial outputs are summed by one all-reduce."""

    def __init__(self, local: nn.Module, group=None):
        super().__init__()
        self.local = local
        self.num_experts = local.num_experts
        self.group = group

    def forward(self, x, weights, idx):
        return all_reduce(self.local(x, weights, idx).contiguous(), self.group)


class ExpertParallel(nn.Module):
    """Expert-parallel: this rank holds experts [lo, hi) whole. Every rank sees every token; each runs only the
    (token, slot) pairs routed to its experts and the partial outputs are summed by an all-reduce. One host read per
    layer (how many pairs are local), the price of running only those rows."""

    def __init__(self, local: nn.Module, lo: int, hi: int, num_experts: int, group=None):
        super().__init__()
        self.local, self.lo, self.hi = local, lo, hi
        self.num_experts = num_experts
        self.group = group

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n_local = self.hi - self.lo
        mine = (idx >= self.lo) & (idx < self.hi)
        # Pairs of other ranks' experts go to an extra bucket sorted last; only the local prefix runs.
        local_idx = torch.where(mine, idx - self.lo, torch.full_like(idx, n_local))
        r = route(local_idx, n_local + 1)
        n = int(r.offsets[n_local - 1]) if n_local else 0
        y = torch.zeros(idx.numel(), x.shape[-1], dtype=x.dtype, device=x.device)
        if n:
            # The local pairs, already in local-expert order: the inner experts run them as n one-slot tokens.
            pairs = r.order[:n]
            sub_idx = local_idx.reshape(-1)[pairs][:, None]  # [n, 1]
            ones = torch.ones(n, 1, dtype=torch.float32, device=x.device)
            y[:n] = self.local(x.index_select(0, r.token_of[:n]), ones, sub_idx)
        out = combine(y, r, weights * mine, x.dtype)
        return all_reduce(out.contiguous(), self.group)


def _cut_experts(experts: nn.Module, rows_gu=None, cols_down=None, expert_range: tuple[int, int] | None = None,
                 group=None) -> nn.Module:
    """Experts / QuantExperts -> same kind with gate_up rows, down input columns and/or a range of experts."""
    from ..quant.modules import QuantExperts

    if isinstance(experts, QuantExperts):
        out = QuantExperts.__new__(QuantExperts)
        nn.Module.__init__(out)
        out.gate_up_proj = _qtensor_cut(experts.gate_up_proj, rows=rows_gu, experts=expert_range)
        out.down_proj = _qtensor_cut(experts.down_proj, cols=cols_down, experts=expert_range, group=group)
        out.num_experts = out.gate_up_proj.shape[0]
        out.act = experts.act  # the config's hidden_activation
        return out
    gu, dn = experts.gate_up_proj, experts.down_proj
    if expert_range is not None:
        gu, dn = gu[expert_range[0]:expert_range[1]], dn[expert_range[0]:expert_range[1]]
    if rows_gu is not None:
        gu = gu[:, torch.as_tensor(rows_gu, dtype=torch.long)]
    if cols_down is not None:
        dn = dn[:, :, cols_down[0]:cols_down[1]]
    out = Experts.__new__(Experts)
    nn.Module.__init__(out)
    out.num_experts = gu.shape[0]
    out.act = experts.act  # the config's hidden_activation
    out.gate_up_proj = nn.Parameter(gu.detach().clone().contiguous(), requires_grad=False)
    out.down_proj = nn.Parameter(dn.detach().clone().contiguous(), requires_grad=False)
    return out


def shard_experts(layer: nn.Module, world: int, rank: int, expert_parallel: bool, group=None) -> None:
    experts = layer.experts
    E = experts.num_experts
    if expert_parallel:
        if world > E:
            raise ValueError(f"expert parallel over {world} ranks needs at least {world} experts, the model has {E}")
        lo, hi = split(E, world, rank)
        layer.experts = ExpertParallel(_cut_experts(experts, expert_range=(lo, hi)), lo, hi, E, group)
        return
    I = experts.down_proj.shape[-1]
    align = experts.down_proj.group if getattr(experts.down_proj, "method", None) == "int4" else 1
    lo, hi = split(I, world, rank, align)
    if hi <= lo:
        raise ValueError(f"tensor_parallel_size {world} leaves a rank without expert features ({I})")
    rows = list(range(lo, hi)) + list(range(I + lo, I + hi))
    layer.experts = ParallelExperts(_cut_experts(experts, rows_gu=rows, cols_down=(lo, hi), group=group), group)


# ---------------------------------------------------------------------------------------------- vocabulary
class VocabParallelEmbedding(nn.Module):
    """The tied embedding / LM head with rows [lo, hi) of the vocabulary on this rank. Same interface as the
    quantized table the model already knows (``lookup``, ``project``, ``mix``)."""

    def __init__(self, local: nn.Module | torch.Tensor, lo: int, hi: int, vocab: int, hidden: int, group=None):
        super().__init__()
        if isinstance(local, torch.Tensor):
            self.weight = nn.Parameter(local.detach().clone().contiguous(), requires_grad=False)
            self.table = None
        else:
            self.weight = None
            self.table = local  # QuantEmbedding of the local rows
        self.lo, self.hi = lo, hi
        self.num_embeddings, self.embedding_dim = vocab, hidden
        self.group = group

    def lookup(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        inside = (ids >= self.lo) & (ids < self.hi)
        local = torch.where(inside, ids - self.lo, torch.zeros_like(ids))
        e = F.embedding(local, self.weight).to(dtype) if self.table is None else self.table.lookup(local, dtype)
        return all_reduce((e * inside[..., None].to(dtype)).contiguous(), self.group)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> this rank's logit slice [..., hi - lo] (not soft-capped)."""
        return F.linear(h, self.weight) if self.table is None else self.table.project(h)

    def mix(self, probs: torch.Tensor, dtype) -> torch.Tensor:
        """probs [..., hi - lo] (this rank's slice of each distribution) -> probs @ E [..., H], summed over ranks."""
        if self.table is None:
            part = torch.matmul(probs.to(self.weight.dtype), self.weight).to(dtype)
        else:
            part = self.table.mix(probs, dtype)
        return all_reduce(part.contiguous(), self.group)


def vocab_parallel_softmax(logits: torch.Tensor, group=None) -> torch.Tensor:
    """A rank's logit slice [..., v] -> its slice of softmax over the whole vocabulary (fp32): the max and the sum
    of exponentials are all-reduced, never the vocabulary."""
    x = logits.float()
    m = x.amax(dim=-1, keepdim=True).contiguous()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = (x - m).exp_()
    s = e.sum(dim=-1, keepdim=True).contiguous()
    dist.all_reduce(s, group=group)
    return e.div_(s)


def shard_embedding(model: nn.Module, world: int, rank: int, group=None) -> tuple[int, int]:
    from ..quant.modules import QuantEmbedding

    V, Hd = model.text.vocab_size, model.text.hidden_size
    lo, hi = split(V, world, rank)
    emb = model.embed_tokens
    if isinstance(emb, nn.Embedding):
        local = emb.weight[lo:hi]
    elif isinstance(emb, QuantEmbedding):
        local = QuantEmbedding.__new__(QuantEmbedding)
        nn.Module.__init__(local)
        local.num_embeddings, local.embedding_dim = hi - lo, Hd
        local.weight = _qtensor_cut(emb.weight, rows=list(range(lo, hi)))
        local.int_mm, local.mix_dtype = False, None
    else:
        raise ValueError(f"cannot shard an embedding of type {type(emb).__name__}")
    model.embed_tokens = VocabParallelEmbedding(local, lo, hi, V, Hd, group)
    return lo, hi


# ---------------------------------------------------------------------------------------------- the whole model
def shard_model(model: nn.Module, world: int, rank: int, expert_parallel: bool = False, group=None,
                prepare: bool = True) -> nn.Module:
    """In place: ``model`` (loaded whole, quantized weights not yet prepared) becomes rank ``rank``'s shard.
    Builds the rank's KV pool with its local KV heads, then prepares quantized kernels (``prepare=False`` leaves
    them on the dequantize-then-matmul path: see ``launch.Group.load``)."""
    from ..kv_cache import KVPool
    from ..quant.modules import prepare_quantized

    if world < 2:
        if prepare:
            prepare_quantized(model)
        return model
    for layer in model.layers:
        shard_attention(layer.self_attn, world, rank, group)
        shard_geglu(layer.mlp, world, rank, group)
        shard_experts(layer, world, rank, expert_parallel, group)
    shard_geglu(model.self_conditioning, world, rank, group)
    model.vocab_range = shard_embedding(model, world, rank, group)
    specs = [layer.self_attn.spec for layer in model.layers]
    model._kv_pool = KVPool(specs, device=model.device, dtype=model.dtype)
    if prepare:
        prepare_quantized(model)
    return model


def weight_bytes(model: nn.Module, text_only: bool = False) -> int:
    """Bytes of the weights this process holds (parameters + buffers + packed quantized layouts); ``text_only``
    leaves the vision tower out (replicated on every rank)."""
    from ..quant.modules import QTensor

    skip = set()
    if text_only and getattr(model, "vision", None) is not None:
        skip = {t.data_ptr() for t in list(model.vision.parameters()) + list(model.vision.buffers())}
    seen, total = set(skip), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, QTensor) and m.packed is not None:
            for p in (m.packed if isinstance(m.packed, list) else [m.packed]):
                for t in (p if isinstance(p, tuple) else (p,)):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
    return total
