"""The released 26B-A4B shape with random weights, quantized while it is built: load memory and one denoise step.

``blockdiff bench --random-config full --quantization int4 [--prompt-len 64]``

The model is built on the meta device; each tensor is then drawn at random (normal(0, 0.02) for matrices, ones for
norms and scalars) and quantized on its own, so no full-precision copy of the model ever exists: peak memory is the
quantized model plus one tensor. The routed experts (22.8B of the 25.8B weights) take a shortcut: per layer one
expert matrix is drawn and quantized, and every expert gets random codes with that matrix's scales (drawing and
quantizing all 7,680 expert matrices costs ~9 CPU-minutes here; the codes occupy exactly the same memory and run
through the same kernels). The build stops with an error when the machine has under 2 GB available. Reported: resident memory after
loading, peak resident memory (``ru_maxrss``), the time to build, one encode of the prompt and one denoise step.
"""

from __future__ import annotations

import gc
import json
import resource
import time

import psutil
import torch

from ..heap import lean_heap


def _rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 30


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _check_available(name: str, floor_gb: float = 2.0) -> None:
    avail = psutil.virtual_memory().available / 2 ** 30
    if avail < floor_gb:
        raise MemoryError(f"stopped before {name}: only {avail:.1f} GB of memory left on this machine")


@torch.no_grad()
def random_quantized_model(preset: str, quantization: str, seed: int = 0, log=print, layers: int | None = None):
    from ..config import ModelConfig
    from ..model import DiffusionGemma
    from ..quant import parse_method
    from ..quant.plan import QuantPlan, int4_scope
    from ..quant.tensors import quantize
    from .checkpoints import config_dict

    parsed = parse_method(quantization)
    if parsed is None or parsed[0] == "fp8":
        raise ValueError("the in-memory random model needs --quantization int8 or int4")
    cd = config_dict(preset)
    if layers is not None:  # a prefix of the layer stack (same per-layer shapes), for extrapolating memory
        t = cd["text_config"]
        t["num_hidden_layers"], t["layer_types"] = layers, t["layer_types"][:layers]
    config = ModelConfig.from_dict(cd)
    plan = QuantPlan(config.text, parsed[0], parsed[1], embedding=True, scope=int4_scope(quantization))
    with torch.device("meta"):
        model = DiffusionGemma(config)
    g = torch.Generator().manual_seed(seed)
    tensors = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if not n.startswith("inv_freq_")]
    for i, (name, t) in enumerate(tensors):
        _check_available(name)
        if t.dim() == 3 and name in plan.targets:  # experts: random codes, one quantized matrix's scales
            method = plan.tensor_method(name)
            template = quantize(torch.randn(t.shape[1:], generator=g).mul_(0.02), method, parsed[1])
            E = t.shape[0]
            for k, v in template.items():
                if k == "qweight":
                    hi = 256 if method == "int4" else 128
                    lo = 0 if method == "int4" else -127
                    plan.state[f"{name}.{k}"] = torch.randint(lo, hi, (E, *v.shape), generator=g, dtype=v.dtype)
                else:
                    plan.state[f"{name}.{k}"] = v[None].expand(E, *v.shape).clone()
            plan.sources.add(name)
        elif t.dim() >= 2:
            plan.add(name, None, torch.randn(t.shape, generator=g).mul_(0.02), tuple(t.shape), name)
        else:
            plan.add(name, None, torch.ones(t.shape), tuple(t.shape), name)
        if name.endswith("experts.down_proj"):
            log(f"  built {name.split('.experts')[0]}: RSS {_rss_gb():.2f} GB")
    plan.install(model)
    model.load_state_dict(plan.state, strict=False, assign=True)
    plan.finalize(model)
    del plan
    gc.collect()
    from ..model.layers import rope_inv_freq
    for lt in set(config.text.layer_types):
        spec = next(s for s in config.text.layers if s.layer_type == lt)
        setattr(model, f"inv_freq_{lt}", rope_inv_freq(config.text.rope_parameters[lt], spec.head_dim))
    return model.eval()


@torch.no_grad()
def run(preset: str, quantization: str, prompt_len: int = 64, seed: int = 0, log=print,
        layers: int | None = None) -> dict:
    t0 = time.perf_counter()
    rss0 = _rss_gb()
    with lean_heap("cpu"):  # as load_model does (blockdiff/heap.py)
        model = random_quantized_model(preset, quantization, seed, log, layers)
        gc.collect()
    built = time.perf_counter() - t0
    rss_loaded = _rss_gb()
    peak_built = _peak_gb()
    log(f"built and quantized in {built:.0f} s; RSS {rss_loaded:.2f} GB (peak {peak_built:.2f} GB)")
    g = torch.Generator().manual_seed(seed)
    V, C = model.vocab_size, model.canvas_length
    cache = model.new_cache(1)
    t1 = time.perf_counter()
    model.encode(torch.randint(0, V, (1, prompt_len), generator=g), cache)
    t2 = time.perf_counter()
    logits = model.denoise(torch.randint(0, V, (1, C), generator=g), cache)
    t3 = time.perf_counter()
    soft = model.soft_embeddings(logits.softmax(-1))  # the next step's self-conditioning input
    t4 = time.perf_counter()
    report = {"preset": preset, "quantization": quantization, "layers": model.text.num_hidden_layers, "canvas": C, "prompt_len": prompt_len,
              "threads": torch.get_num_threads(), "rss_before_gb": round(rss0, 2),
              "rss_after_load_gb": round(rss_loaded, 2), "peak_rss_after_build_gb": round(peak_built, 2),
              "peak_rss_gb": round(_peak_gb(), 2), "rss_after_step_gb": round(_rss_gb(), 2),
              "build_s": round(built, 1), "encode_s": round(t2 - t1, 2), "denoise_step_s": round(t3 - t2, 2),
              "self_conditioning_s": round(t4 - t3, 2), "logits_finite": bool(torch.isfinite(logits).all()),
              "soft_shape": list(soft.shape)}
    log(json.dumps(report))
    return report
