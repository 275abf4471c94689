"""``blockdiff bench --random-config full``: the released shape built on the device per tensor, the bandwidth
floor's arithmetic, and the CPU smoke run of scripts/gpu_bench.sh (the script the GPU machine runs)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from blockdiff.bench import full_shape_ticks as fullshape
from blockdiff.bench.full_shape_ticks import build_random_model, bytes_read, peak_bandwidth, shape_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_full_shape_is_the_released_text_config():
    t = shape_config("full").text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (2816, 30, 16, 262144)
    assert (t.num_experts, t.top_k_experts, t.moe_intermediate_size, t.intermediate_size) == (128, 8, 704, 2112)
    full = [i for i, s in enumerate(t.layers) if s.layer_type == "full_attention"]
    assert full == [5, 11, 17, 23, 29]
    sliding, glob = t.layers[0], t.layers[5]
    assert (sliding.num_kv_heads, sliding.head_dim, sliding.has_v_proj, sliding.sliding_window) == (8, 256, True, 1024)
    assert (glob.num_kv_heads, glob.head_dim, glob.has_v_proj) == (2, 512, False)
    assert shape_config("full").canvas_length == 256
    # ~25.3B text parameters, counted on the meta device (nothing allocated)
    from blockdiff.model import DiffusionGemma
    with torch.device("meta"):
        m = DiffusionGemma(shape_config("full"))
    assert 24e9 < sum(p.numel() for p in m.parameters()) < 27e9
    assert shape_config("full", layers=6).text.num_hidden_layers == 6


def test_random_model_is_built_per_tensor_in_the_target_dtype():
    config = shape_config("full-smoke")
    model = build_random_model(config, torch.device("cpu"), torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == "cpu", name
        assert torch.isfinite(p.float()).all(), name
    from blockdiff.model.layers import rope_inv_freq
    t = config.text
    for lt in set(t.layer_types):
        spec = next(s for s in t.layers if s.layer_type == lt)
        assert torch.equal(getattr(model, f"inv_freq_{lt}"), rope_inv_freq(t.rope_parameters[lt], spec.head_dim))
    w = model.layers[0].experts.gate_up_proj.float()
    assert abs(float(w.std()) - 0.02) < 0.002
    assert float(model.layers[0].layer_scalar) == 1.0


def test_bandwidth_floor_counts_every_weight_and_the_logits():
    model = build_random_model(shape_config("full-smoke"), torch.device("cpu"), torch.float32)
    br = bytes_read(model, batch=2, prompt_len=8)
    params = sum(p.numel() * 4 for p in model.parameters())
    C, V = model.canvas_length, model.vocab_size
    assert br["expert_fraction"] > 0.99  # 64 tokens, top-2 of 8: every expert is read
    assert br["logits_write_read"] == 2 * 2 * C * V * 4
    assert br["embedding_second_read"] == V * model.text.hidden_size * 4
    assert abs(br["weights_non_expert"] + br["experts_read"] - params) <= params * 0.01
    assert br["total"] == pytest.approx(params * br["expert_fraction"] + br["embedding_second_read"] + br["kv_prefix"]
                                        + br["logits_write_read"], rel=0.01)
    assert peak_bandwidth(torch.device("cpu"), 3350e9) == (3350e9, "--peak-bandwidth")
    assert peak_bandwidth(torch.device("cpu"))[0] is None
    names = dict(fullshape.PEAK_BANDWIDTH)
    assert names["h100"] == 3.35e12 and names["h200"] == 4.8e12


def test_gpu_bench_script_smoke_run_on_cpu(tmp_path):
    env = dict(os.environ, GPU_BENCH_SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH=ROOT)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_bench.sh")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "full.json").read_text())
    assert report["shape"] == "full-smoke" and report["settings"]["device"] == "cpu"
    C = report["model"]["canvas_length"]
    assert [(x["batch"], x["fast"]) for x in report["results"]] == [(1, False), (1, True), (2, False), (2, True)]
    for x in report["results"]:
        step = x["step_ms_min"] / 1000
        assert step > 0 and x["step_ms_median"] >= x["step_ms_min"]
        assert x["tok_per_s_16_steps"] == pytest.approx(x["batch"] * C / (16 * step), rel=0.01)
        assert x["tok_per_s_48_steps"] == pytest.approx(x["batch"] * C / (48 * step), rel=0.01)
        assert x["bytes_read"]["total"] > 0 and x["floor_ms"] is None  # no bandwidth figure for a CPU
    assert "gpu_bench: done" in r.stdout
