"""Quantized modules that replace ``nn.Linear``, ``Experts`` and the tied embedding after loading.

Each holds its weights as a ``QTensor`` (stored parts from ``tensors.py`` as buffers, so ``state_dict`` is the
checkpoint format) and, after ``prepare()``, in the layout of the kernel that runs it. Kernels, chosen by
measurement on this project's CPU (figures in docs/quantization.md):

- CPU int8: activations quantized per row to int8 on each call, then ``torch._int_mm`` (int8 x int8 -> int32)
  against the transposed view of the stored weight, 3-4x faster than fp32 where the CPU has VNNI; no packed copy.
  It takes every shape on CPU from torch 2.13 on (the floor); should it be missing, or slower than the fp32 matmul
  (AVX2-only CPUs: a single-threaded reference kernel, 20-35x slower; measured once per process by
  ``_int_mm_works``), int8 dequantizes then multiplies (multi-threaded like fp32). fbgemm's dynamic
  int8 linear (``torch.ops.quantized.linear_dynamic``) was as fast but less accurate, needed a packed copy and
  goes through torch's deprecated quantized-tensor API: not used. ``torch._weight_int8pack_mm`` was 30-35x slower
  than fp32 with fp32 activations, dequantize-then-matmul slower than fp32.
- CPU int4: ``torch._weight_int4pack_mm_for_cpu`` with bf16 activations (as fast as the fp32 matmul at mid
  shapes, faster on the LM-head shape; with fp32/fp16 activations it is ~60x slower).
- CPU experts: one packed kernel call per expert that has tokens (a loop: the grouped-mm kernels take float
  weights only, and dequantizing every expert per call was 5-10x slower than the fp32 experts), each on views made
  up front and, for int8, written into one int32 output whose scales are applied once per run of experts; the
  experts dealt to the CPU's threads a run of consecutive experts each (``model/cpu_threads.py``). The int8 tied table is cast a 1,024-row block at a time, so the
  block stays in L2 while the GEMM reads it (2-3x faster than 16,384-row blocks on the AVX2 box).
- CUDA (UNMEASURED: no GPU was lent to this work): int8/int4 dequantize to the compute dtype then matmul, experts
  dequantize then one ``torch._grouped_mm`` per matrix; fp8 via ``torch._scaled_mm`` with per-row activation
  scales.

After ``prepare()`` on CPU int8 weights stay in their stored layout (``torch._int_mm`` reads it); int4 plain
buffers are dropped once packed, so the resident size is the quantized size once.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..model.cpu_threads import each_expert, each_slice, map_expert_blocks, split
from ..model.moe import combine, route
from ..model.norms import gelu_tanh
from .tensors import FP8_MAX, dequantize, unpack_int4


class QTensor(nn.Module):
    """One quantized weight [..., N, K]: buffers ``qweight``, ``qscale`` (and ``qzero`` for int4)."""

    def __init__(self, shape: tuple[int, ...], method: str, group: int = 64):
        super().__init__()
        from .tensors import stored_shapes
        self.shape, self.method, self.group = tuple(shape), method, group
        for name, (s, dt) in stored_shapes(self.shape, method, group).items():
            self.register_buffer(name, torch.empty(s, dtype=dt, device="meta"))
        if method != "int4":
            self.qzero = None
        self.packed = None  # kernel layout after prepare(): per matrix (2-D) or a list per expert (3-D)
        self.int_mm = False  # int8 on CPU through torch._int_mm on the stored layout (set by prepare())
        # A weight cut along its inputs over ranks (blockdiff.distributed): the all-reduce (max) that makes each
        # activation row's quantization scale the whole row's, so the shards' int8 products sum to one process's.
        self.reduce_rows = None

    def parts(self) -> dict[str, torch.Tensor]:
        p = {"qweight": self.qweight, "qscale": self.qscale}
        if self.method == "int4":
            p["qzero"] = self.qzero
        return p

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.parts(), self.method, dtype)

    def extra_repr(self) -> str:
        return f"{self.method}, shape={self.shape}" + (f", group={self.group}" if self.method == "int4" else "")

    # ------------------------------------------------------------------ kernels
    def prepare(self) -> None:
        """Build the kernel layout for the device the buffers are on (CPU: packed, plain buffers dropped)."""
        if self.qweight.device.type != "cpu" or self.method == "fp8":
            return
        if self.method == "int8":
            if _int_mm_works():
                self.int_mm = True
                self.qscale = self.qscale.float()
            return  # else the dequantize path
        mats = [self._matrix(i) for i in range(self.shape[0])] if len(self.shape) == 3 else [self._matrix(None)]
        if any(m is None for m in mats):
            return  # a kernel refused these shapes: stay on the dequantize path
        self.packed = mats if len(self.shape) == 3 else mats[0]
        self.qweight = self.qscale = None
        self.qzero = None

    def _matrix(self, i):
        q = self.qweight if i is None else self.qweight[i]
        s = self.qscale if i is None else self.qscale[i]
        try:
            z = self.qzero if i is None else self.qzero[i]
            w = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).to(torch.int32), 1)
            sz = torch.stack([s.t(), z.t()], dim=-1).contiguous()  # [K/G, N, 2] bf16
            g = self.shape[-1] // s.shape[-1]
            return (w, g, sz)
        except (RuntimeError, NotImplementedError):
            return None

    def matmul(self, x: torch.Tensor, i: int | None = None) -> torch.Tensor:
        """x [M, K] @ W[i].T -> [M, N] in x's dtype (W the whole matrix when i is None)."""
        if self.int_mm:
            xq, xs = quantize_rows(x, self.reduce_rows)
            return self.matmul_q(xq, xs, i).to(x.dtype)
        packed = None if self.packed is None else (self.packed if i is None else self.packed[i])
        if packed is not None:  # int4
            w, g, sz = packed
            return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, g, sz).to(x.dtype)
        if self.method == "fp8" and x.is_cuda:
            try:
                return _fp8_matmul(x, self.qweight if i is None else self.qweight[i],
                                   self.qscale if i is None else self.qscale[i])
            except RuntimeError:  # shapes _scaled_mm refuses (dims not multiples of 16): dequantize instead
                pass
        parts = {k: (v if i is None else v[i]) for k, v in self.parts().items()}
        if self.method == "int8" and not x.is_cuda:
            # Scale the output columns, not the weight: [M, N] multiplies instead of [N, K] (M is ~16 rows per
            # expert), which cut the dequantize path's elementwise time several-fold (docs/benchmarks.md).
            return F.linear(x, parts["qweight"].to(x.dtype)).mul_(parts["qscale"].to(x.dtype))
        return F.linear(x, dequantize(parts, self.method, x.dtype))

    def experts_matmul(self, x: torch.Tensor, counts: list[int], first: int = 0,
                       per_row: torch.Tensor | None = None) -> torch.Tensor:
        """x [R, K]: the rows of experts ``first``, ``first`` + 1, ... (``counts`` rows each, consecutively) -> [R, N],
        each expert's rows times its matrix, one kernel call per expert on this thread. int8 (``int_mm``: ``per_row``
        [R] gives each row's expert): the rows quantized once, each expert's ``_int_mm`` written into its rows of one
        int32 output, every scale applied at once -> fp32, the same products as ``matmul_q`` per expert; int4 and
        the dequantize paths -> x's dtype."""
        N = self.shape[1]
        if not x.shape[0]:
            return x.new_zeros(0, N)
        if self.int_mm:
            xq, xs = quantize_rows(x, self.reduce_rows)
            out = torch.empty(x.shape[0], N, dtype=torch.int32)
            w = self.qweight[first:first + len(counts)].transpose(1, 2).unbind(0)
            return each_expert(torch._int_mm, xq, counts, w, out).float().mul_(
                self.qscale.index_select(0, per_row)).mul_(xs)
        if self.packed is not None:  # int4: bf16 activations, one packed kernel call per expert
            ys = [torch._weight_int4pack_mm_for_cpu(xe, *self.packed[first + i])
                  for i, xe in enumerate(x.to(torch.bfloat16).split(counts)) if counts[i]]
        else:
            ys = [self.matmul(xe, first + i) for i, xe in enumerate(x.split(counts)) if counts[i]]
        return torch.cat(ys).to(x.dtype)

    def matmul_q(self, xq: torch.Tensor, xs: torch.Tensor | None, i: int | None = None) -> torch.Tensor:
        """int8 on CPU (``int_mm``): rows already quantized (``quantize_rows``) -> fp32 [M, N]. ``xs`` None leaves the
        activation scale out (the caller applies it to many products at once)."""
        w, s = (self.qweight, self.qscale) if i is None else (self.qweight[i], self.qscale[i])
        out = torch._int_mm(xq, w.t()).float().mul_(s)
        return out if xs is None else out.mul_(xs)


def quantize_rows(x: torch.Tensor, reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 scale [M, 1]): symmetric per-row dynamic quantization of activations.
    ``reduce``: applied to the per-row maxima (rows split over ranks: an all-reduce of the max)."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    if reduce is not None:
        amax = reduce(amax)
    xs = amax.clamp_(min=1e-12).div_(127.0)
    return torch.round(x / xs).to(torch.int8), xs


def _int_mm_works() -> bool:
    """torch._int_mm on this CPU build is exact (int8 x int8 -> int32) AND faster than the fp32 matmul it replaces.

    Speed is measured once per process: on CPUs with VNNI / AMX it is 3-4x faster than fp32, but on AVX2-only CPUs
    (this project's 2-core AMD EPYC box) torch falls back to a reference kernel that was 20-35x slower than the fp32
    matmul and single-threaded (docs/benchmarks.md, "Every core"): there int8 multiplies the dequantized weight."""
    global _INT_MM
    if _INT_MM is None:
        try:
            a = torch.ones(2, 8, dtype=torch.int8)
            _INT_MM = bool((torch._int_mm(a, a.t()) == 8).all()) and _int_mm_is_faster()
        except (RuntimeError, NotImplementedError, AttributeError):
            _INT_MM = False
    return _INT_MM


def _int_mm_is_faster(m: int = 64, k: int = 512, n: int = 512) -> bool:
    """Best of 3 timings of one mid-size product (a few ms in all on a fast kernel) against the fp32 matmul."""
    import time
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    xf, wf = xq.float(), wq.float()

    def best(fn) -> float:
        fn()  # first call: kernel selection, allocations
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(lambda: torch._int_mm(xq, wq.t())) < best(lambda: xf @ wf.t())


_INT_MM: bool | None = None


def _fp8_matmul(x: torch.Tensor, qw: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp32) -> per-row fp8 activations; torch._scaled_mm with row-wise scales (sm89+). Unmeasured."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    xs = amax / FP8_MAX  # [M, 1]
    xq = (x.float() / xs).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(xq, qw.t(), scale_a=xs, scale_b=qs.float()[None, :], out_dtype=torch.bfloat16)
    return out.to(x.dtype)


class QuantLinear(nn.Module):
    """Drop-in for ``nn.Linear`` with a quantized weight (bias, if any, stays full precision)."""

    def __init__(self, in_features: int, out_features: int, method: str, group: int = 64, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = QTensor((out_features, in_features), method, group)
        self.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight.matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantExperts(nn.Module):
    """Drop-in for ``layers.Experts`` with quantized gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, inter: int, methods: tuple[str, str],
                 groups: tuple[int, int] = (64, 64), act=gelu_tanh):
        super().__init__()
        self.num_experts = num_experts
        self.act = act  # the config's hidden_activation (the Experts module this replaces has it)
        self.gate_up_proj = QTensor((num_experts, 2 * inter, hidden), methods[0], groups[0])
        self.down_proj = QTensor((num_experts, hidden, inter), methods[1], groups[1])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights/idx [N, K] -> [N, H]. Routing and combine are the full-precision module's."""
        return self.forward_with(x, weights, idx)[0]

    def forward_with(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, side=()) -> tuple:
        """``forward`` plus the results of ``side`` tasks, as ``Experts.forward_with``."""
        r = route(idx, self.num_experts)
        xs = x.index_select(0, r.token_of)  # [N*K, H] grouped by expert
        if x.is_cuda:
            return combine(self._grouped(xs, r.offsets), r, weights, x.dtype), [g() for _, g in side]
        # CPU (or another accelerator without the grouped path: no worker threads there): one kernel call per
        # expert that has tokens (measured fastest here, see module doc); on the CPU the experts cut into one run of
        # consecutive experts per worker thread (model/cpu_threads.py), dealt out with the side tasks. Where the
        # down projection's activation scales are all-reduced over ranks (blockdiff.distributed) that collective
        # must run on this thread: one run.
        counts = r.counts.tolist()
        int_mm = self.gate_up_proj.int_mm or self.down_proj.int_mm
        per_row = idx.reshape(-1).index_select(0, r.order) if int_mm else None  # the expert of each sorted row
        alone = x.device.type != "cpu" or self.down_proj.reduce_rows is not None
        H, I = self.down_proj.shape[1:]
        y, done = map_expert_blocks(partial(self._block, xs, counts, per_row), counts, 3 * H * I, xs, H, side,
                                    1 if alone else None, x.device)
        return combine(y.to(xs.dtype), r, weights, x.dtype), done

    def _block(self, xs: torch.Tensor, counts: list[int], per_row: torch.Tensor | None, blk: list) -> torch.Tensor:
        """One run of consecutive experts on this thread: both matrices, the activation once over the run's rows."""
        (e0, a, _), (e1, _, b) = blk[0], blk[-1]
        c, rows = counts[e0:e1 + 1], None if per_row is None else per_row[a:b]
        gate, up = self.gate_up_proj.experts_matmul(xs[a:b], c, e0, rows).chunk(2, dim=-1)
        return self.down_proj.experts_matmul(self.act(gate) * up, c, e0, rows)

    def _grouped(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """GPU: dequantize each expert tensor once per call to the compute dtype, then one grouped GEMM per matrix
        (no per-expert loop, no host sync). UNMEASURED: no GPU was available to this work."""
        dt = xs.dtype
        gate, up = torch._grouped_mm(xs, self.gate_up_proj.dequantize(dt).transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return torch._grouped_mm(self.act(gate) * up, self.down_proj.dequantize(dt).transpose(1, 2), offs=offs)


class QuantEmbedding(nn.Module):
    """The tied embedding / LM head in int8 (per vocabulary row): lookup, LM head and probs @ E, all three from the
    one plain int8 table (held once).

    CPU kernels (measured, docs/quantization.md): the LM head quantizes the hidden states per row to int8 and runs
    ``torch._int_mm`` against the transposed table view (as fast as an fbgemm-packed copy, without the second
    copy); ``probs @ E`` dequantizes the table a block of rows at a time to bf16 where the CPU has native bf16
    matmuls (AVX512-BF16 / AMX: 2.3x faster than the fp32 product, 0.2% relative error), else to fp32."""

    # rows of the table per block: bounds the temporaries to one block, and keeps the block cast to the compute dtype
    # in the core's L2 while the GEMM reads it: 1,024 rows made the int8 LM head 2.7x faster than 16,384 on this
    # AVX2 CPU (and faster than the fp32 table, which streams from memory; docs/benchmarks.md "Every core")
    ROWS = 1024
    GPU_ROWS = 16384  # on a GPU the block only bounds the temporaries: fewer, larger launches

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = vocab, hidden
        self.weight = QTensor((vocab, hidden), "int8")
        self.int_mm = False  # the LM head through torch._int_mm (set by prepare() on CPU)
        self.mix_dtype = None  # the dtype probs @ E is computed in (None: the model's)

    def prepare(self) -> None:
        if self.weight.qweight.device.type != "cpu":
            return
        self.int_mm = _int_mm_works()
        self.mix_dtype = torch.bfloat16 if _cpu_has_fast_bf16() else None

    def lookup(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        w = self.weight
        return F.embedding(ids, w.qweight).to(dtype) * w.qscale[ids].to(dtype)[..., None]

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> logits [..., V] (not soft-capped), fp32 on the int8 path."""
        flat = h.reshape(-1, h.shape[-1])
        w = self.weight
        if self.int_mm:
            xq, xs = quantize_rows(flat)
            out = torch.empty(flat.shape[0], self.num_embeddings, dtype=torch.float32, device=flat.device)
            for a, b in self._chunks():
                torch.mul(torch._int_mm(xq, w.qweight[a:b].t()), w.qscale[a:b].float(), out=out[:, a:b])
            out.mul_(xs)
        else:
            # the scale on the [M, rows] output rather than the [rows, H] table block (fewer multiplies); the
            # vocabulary dealt to the CPU's threads, each casting its own part of the table a block at a time
            # (each block's product written straight into its columns of the logits: no concatenation)
            out = torch.empty(flat.shape[0], self.num_embeddings, dtype=flat.dtype, device=flat.device)

            def part(lo: int, hi: int) -> None:
                for a, b in self._chunks(lo, hi):
                    o = out[:, a:b]
                    torch.mm(flat, w.qweight[a:b].to(flat.dtype).t(), out=o)
                    o.mul_(w.qscale[a:b].to(flat.dtype))
            each_slice(part, self.num_embeddings, flat.numel() * self.num_embeddings, device=flat.device)
        return out.reshape(*h.shape[:-1], self.num_embeddings)

    def mix(self, probs: torch.Tensor, dtype) -> torch.Tensor:
        """probs [..., V] -> probs @ E [..., H] in ``dtype``, dequantizing the table a block of rows at a time."""
        cdt = self.mix_dtype or dtype
        flat = probs.reshape(-1, probs.shape[-1])
        w = self.weight

        def part(lo: int, hi: int) -> torch.Tensor:  # the vocabulary rows [lo, hi), a block at a time
            out = None
            for a, b in self._chunks(lo, hi):
                y = ((flat[:, a:b].to(dtype) * w.qscale[a:b].to(dtype)).to(cdt) @ w.qweight[a:b].to(cdt)).to(dtype)
                out = y if out is None else out.add_(y)
            return out
        # on the CPU the vocabulary dealt to its threads, the partial products summed
        out = split(part, self.num_embeddings, flat.numel() * self.embedding_dim, dim=None, device=flat.device)
        return out.reshape(*probs.shape[:-1], self.embedding_dim)


    def _chunks(self, lo: int = 0, hi: int | None = None):
        hi = self.num_embeddings if hi is None else hi
        rows = self.ROWS if self.weight.qweight.device.type == "cpu" else self.GPU_ROWS
        return [(a, min(a + rows, hi)) for a in range(lo, hi, rows)]


def _cpu_has_fast_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX): there bf16 is faster than fp32; on AVX2-only CPUs it is slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def prepare_quantized(model: nn.Module) -> None:
    """Build the kernel layout of every quantized module of ``model`` (CPU: packed weights, plain buffers dropped).
    Run once, after the weights are final (loaded, and sharded when the model is split over ranks)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.weight.prepare()
        elif isinstance(m, QuantExperts):
            m.gate_up_proj.prepare()
            m.down_proj.prepare()
        elif isinstance(m, QuantEmbedding):
            m.prepare()


def has_quantized_modules(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is held quantized (an FP8 checkpoint dequantized while loading is not)."""
    return any(isinstance(m, (QTensor, QuantLinear, QuantExperts, QuantEmbedding)) for m in model.modules())
