"""CPU kernel candidates for quantized weights, timed at one thread on the mid-size model's shapes.

    python scripts/quant_kernels.py

Linear [M=128 canvas tokens] x [N, K] for fp32 F.linear, fbgemm dynamic int8 (torch.ops.quantized.linear_dynamic),
torch._weight_int8pack_mm, dequantize-then-matmul (int8, int4), torch._weight_int4pack_mm_for_cpu with bf16 and
fp32 activations; and one layer of 32 experts (top-4 of 128 tokens) as fp32 grouped mm, an fbgemm per-expert
loop, dequantize-all + grouped mm and an int4pack per-expert loop; and the tied int8 embedding's two vocabulary-sized
products (LM head [128 x 512] @ [32768 x 512]^T, self-conditioning probs [128 x 32768] @ [32768 x 512]) per candidate
kernel. Prints ms per call (medians of 5 after warm-up) and, where it matters, the relative error against fp32.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
from blockdiff.model.cpu_threads import spans_of  # noqa: E402
from blockdiff.quant.modules import QTensor, QuantExperts  # noqa: E402
from blockdiff.quant.tensors import dequantize, quantize  # noqa: E402


def ms(fn, n=5):
    fn()
    ts = []
    for _ in range(n):
        t = time.process_time()
        fn()
        ts.append((time.process_time() - t) * 1e3)
    return round(statistics.median(ts), 2)


def packed(w, method, group=64):
    """A prepared QTensor (int8: torch._int_mm on the stored layout) and its parts."""
    q = QTensor(tuple(w.shape), method, group)
    parts = quantize(w, method, group)
    for k, v in parts.items():
        setattr(q, k, v)
    q.prepare()
    return q, parts


class Fbgemm:
    """The candidate blockdiff no longer uses: fbgemm's dynamic int8 linear on a packed copy (torch's deprecated
    quantized-tensor API), per matrix or per expert."""

    def __init__(self, w):
        parts = quantize(w, "int8")
        q, s = parts["qweight"], parts["qscale"]
        mats = [(q, s)] if w.dim() == 2 else list(zip(q, s))
        self.packed = [torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(
            qi, si.double(), torch.zeros(qi.shape[0], dtype=torch.long), 0), None) for qi, si in mats]

    def matmul(self, x, i=None):
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed[0 if i is None else i])


def expert_rows(g, E=32, H=512, I=256, T=128, K=4):
    """One layer of E experts (top-K of T tokens): the fp32 grouped product and every candidate's callable, each
    returning the layer's output rows grouped by expert ([T * K, H])."""
    gu, dn = torch.randn(E, 2 * I, H, generator=g) * 0.02, torch.randn(E, H, I, generator=g) * 0.02
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    xs = torch.randn(T, H, generator=g)[order // K]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    cl = counts.tolist()

    def grouped(a, b):
        gate, up = torch._grouped_mm(xs, a.transpose(1, 2), offs=offs).chunk(2, -1)
        return torch._grouped_mm(F.gelu(gate, approximate="tanh") * up, b.transpose(1, 2), offs=offs)

    def loop(qa, qb):
        out, st = [], 0
        for e, n in enumerate(cl):
            if n:
                gate, up = qa.matmul(xs[st:st + n], e).chunk(2, -1)
                out.append(qb.matmul(F.gelu(gate, approximate="tanh") * up, e))
                st += n
        return torch.cat(out)

    ref = grouped(gu, dn)
    rows = {"fp32 grouped mm": lambda: grouped(gu, dn)}
    qe = QuantExperts(E, H, I, ("int8", "int8"))
    qe.gate_up_proj, qe.down_proj = packed(gu, "int8")[0], packed(dn, "int8")[0]
    # the path QuantExperts runs on the CPU: one run of consecutive experts (here all of them, as on one thread),
    # the rows quantized once per matrix, one torch._int_mm per expert (QTensor.experts_matmul)
    run, per_row = spans_of(cl), flat[order]
    rows["int8 _int_mm per expert, rows quantized once per matrix (used)"] = lambda: qe._block(xs, cl, per_row, run)
    fa, fb = Fbgemm(gu), Fbgemm(dn)
    rows["int8 fbgemm per-expert packed loop"] = lambda: loop(fa, fb)
    for m in ("int8", "int4"):
        qa, pa = packed(gu, m)
        qb, pb = packed(dn, m)
        if m == "int4":
            rows[f"{m} per-expert packed loop (used)"] = lambda qa=qa, qb=qb: loop(qa, qb)
        rows[f"{m} dequantize all + grouped mm"] = lambda pa=pa, pb=pb, m=m: grouped(dequantize(pa, m),
                                                                                   dequantize(pb, m))
    return ref, rows


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("| shape [M x K] @ [N x K]^T | fp32 | int8 _int_mm (used) | fbgemm int8 | _weight_int8pack_mm | "
          "dequant int8 + mm | int4pack (bf16 act.) | int4pack (fp32 act.) | dequant int4 + mm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for M, K, N in [(128, 512, 1024), (128, 1024, 512), (128, 512, 32768)]:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.02
        q8, p8 = packed(w, "int8")
        f8 = Fbgemm(w)
        q4, p4 = packed(w, "int4")
        wp, gs, sz = q4.packed
        row = [ms(lambda: F.linear(x, w)), ms(lambda: q8.matmul(x)), ms(lambda: f8.matmul(x)),
               ms(lambda: torch._weight_int8pack_mm(x, p8["qweight"], p8["qscale"]), n=1),
               ms(lambda: F.linear(x, dequantize(p8, "int8"))), ms(lambda: q4.matmul(x)),
               ms(lambda: torch._weight_int4pack_mm_for_cpu(x, wp, gs, sz.float()), n=1),
               ms(lambda: F.linear(x, dequantize(p4, "int4")))]
        print(f"| [{M} x {K}] @ [{N} x {K}] | " + " | ".join(map(str, row)) + " |", flush=True)

    ref, rows = expert_rows(g)
    print("\n| one expert layer (32 experts, 128 tokens, top-4) | ms | rel. error vs fp32 |\n|---|---:|---:|")
    for name, fn in rows.items():
        print(f"| {name} | {ms(fn)} | {float((fn() - ref).norm() / ref.norm()):.4f} |", flush=True)

    embedding(g)


def embedding(g):
    """The int8 table's LM head and probs @ E candidates (QuantEmbedding uses _int_mm and, with native bf16, bf16)."""
    from blockdiff.quant.modules import QuantEmbedding
    V, H, M = 32768, 512, 128
    emb = QuantEmbedding(V, H)
    parts = quantize(torch.randn(V, H, generator=g) * 0.02, "int8")
    q, s = parts["qweight"], parts["qscale"]
    emb.weight.qweight, emb.weight.qscale = q, s
    emb.prepare()
    deq = q.float() * s[:, None]
    h = torch.randn(M, H, generator=g)
    probs = torch.softmax(torch.randn(M, V, generator=g) * 3, -1)
    ref_head, ref_mix = h @ deq.T, probs @ deq
    zeros = torch.zeros(V, dtype=torch.long)
    pk = torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(q, s.double(), zeros, 0), None)
    pkT = torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(
        q.t().contiguous(), torch.ones(H, dtype=torch.double), torch.zeros(H, dtype=torch.long), 0), None)

    def rel(a, b):
        return f"{float((a - b).norm() / b.norm()):.4f}"

    def mix(dt):
        emb.mix_dtype = dt
        return emb.mix(probs, torch.float32)

    def int8_probs():
        ps = probs * s
        sc = ps.amax(-1, keepdim=True) / 127
        return torch._int_mm(torch.round(ps / sc).to(torch.int8), q).float() * sc

    rows = {
        "LM head: fp32 matmul": (lambda: h @ deq.T, ref_head),
        "LM head: fbgemm on a packed copy": (lambda: torch.ops.quantized.linear_dynamic(h, pk), ref_head),
        "LM head: torch._int_mm on the plain table (used)": (lambda: emb.project(h), ref_head),
        "probs @ E: fp32 matmul of a dequantized table": (lambda: mix(torch.float32), ref_mix),
        "probs @ E: bf16 matmul of a dequantized table (used with native bf16)": (lambda: mix(torch.bfloat16),
                                                                                 ref_mix),
        "probs @ E: fbgemm on a transposed packed copy": (
            lambda: torch.ops.quantized.linear_dynamic(probs * s * 1000, pkT) / 1000, ref_mix),
        "probs @ E: torch._int_mm on int8 probabilities": (int8_probs, ref_mix),
    }
    print("\n| tied int8 embedding, mid shape | ms | rel. error vs fp32 |\n|---|---:|---:|")
    for name, (fn, ref) in rows.items():
        print(f"| {name} | {ms(fn)} | {rel(fn(), ref)} |", flush=True)


if __name__ == "__main__":
    main()
