"""GGUF quantized tensors onto blockdiff's int8 / int4 kernels: Q4_0 / Q4_K repacked without re-quantizing, every
other type converted a few rows at a time, and the loader never dequantizes a whole target tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blockdiff.loader import load_model
from blockdiff.quant import gguf_repack
from blockdiff.quant.tensors import dequantize, quantize
from gguf_fixtures import denoise_logits, write_gguf
from test_gguf import _kquant_bytes

gguf = pytest.importorskip("gguf")


def _file_tensors(tmp_path, tensors: dict):
    """{name: (array, type)} -> the reader's tensors by name."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    path = str(tmp_path / "t.gguf")
    w = gguf.GGUFWriter(path, "diffusion-gemma")
    for name, (arr, kind) in tensors.items():
        if arr.dtype == np.uint8:
            w.add_tensor(name, arr, raw_dtype=T[kind])
        else:
            w.add_tensor(name, quants.quantize(arr, T[kind]), raw_dtype=T[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _file_values(t) -> torch.Tensor:
    from gguf import quants
    shape = tuple(int(x) for x in reversed(list(t.shape)))
    return torch.from_numpy(quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32))


def test_q4_0_and_q4_k_are_repacked_into_int4_g32_without_requantizing(tmp_path):
    rng = np.random.default_rng(0)
    ts = _file_tensors(tmp_path, {"q40": (rng.standard_normal((3, 8, 64)).astype(np.float32), "Q4_0"),
                                  "q4k": (_kquant_bytes("Q4_K", 6, 512, 1), "Q4_K")})
    for name in ("q40", "q4k"):
        t = ts[name]
        want = _file_values(t)
        parts = gguf_repack.tensor_parts(t, "int4", 32)
        got = dequantize(parts, "int4")
        # Only the scales' rounding to bf16 (8 bits of mantissa) separates the two: far below a 4-bit step.
        step = want.abs().amax() / 8
        assert (got - want).abs().max() <= step / 16, name
        requantized = dequantize(quantize(want.reshape(-1, want.shape[-1]), "int4", 32), "int4").reshape(want.shape)
        assert (got - want).abs().mean() < (requantized - want).abs().mean() / 2, name  # bf16 zeros limit Q4_K


@pytest.mark.parametrize("kind, method", [("Q8_0", "int8"), ("Q5_0", "int8"), ("Q6_K", "int8"),
                                          ("Q8_0", "int4"), ("Q4_0", "int8"), ("F32", "int8")])
def test_other_types_convert_a_few_rows_at_a_time_to_the_same_parts(tmp_path, monkeypatch, kind, method):
    rng = np.random.default_rng(1)
    arr = (_kquant_bytes(kind, 4 * 10, 256, 2).reshape(4, 10, -1) if kind == "Q6_K"
           else rng.standard_normal((4, 10, 256)).astype(np.float32))
    t = _file_tensors(tmp_path, {"w": (arr, kind)})["w"]
    monkeypatch.setattr(gguf_repack, "ROWS", 3)  # several chunks per matrix
    got = gguf_repack.tensor_parts(t, method, 64)
    want = quantize(_file_values(t), method, 64)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_loading_never_dequantizes_a_whole_target_tensor(tiny_checkpoint, tiny_model, tmp_path, monkeypatch):
    from blockdiff.quant import gguf as gg
    from blockdiff.quant.modules import QuantExperts

    path = write_gguf(tiny_checkpoint, str(tmp_path / "q.gguf"), types={"exps": "Q4_0"}, default_type="Q8_0")
    whole = []
    real = gg._tensor
    monkeypatch.setattr(gg, "_tensor", lambda t: whole.append(t.name) or real(t))
    m = load_model(path)  # default: int4-g32 (Q4_0 experts repacked), int8 elsewhere
    assert isinstance(m.layers[0].experts, QuantExperts)
    assert whole and all(("norm" in n or "scale" in n or "inp" in n) for n in whole), whole  # only small tensors
    ref = denoise_logits(tiny_model)
    assert (denoise_logits(m) - ref).norm() / ref.norm() < 0.6  # the existing GGUF tolerance
