"""Cost of an image: vision-tower encode time per image and prompt tokens per image, at a given vision shape.

    python scripts/vision_cost.py --threads 1 --out vision.json

Builds the vision tower + embedder with random weights (the released shape by default: see ``RELEASED_VISION``),
runs ``image_features`` on processed images of several sizes and soft-token budgets, and reports per image: the
resized size, real patches, soft tokens, prompt tokens (soft tokens + boi + eoi) and the median encode time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from blockdiff.config import VisionConfig
from blockdiff.model.vision_tower import VisionEncoder
from blockdiff.vision.processor import ImageProcessor

# Assumed vision_config of google/diffusiongemma-26B-A4B-it (the Gemma 4 26B-A4B tower; REFERENCE.md gives 27
# layers): SigLIP-so400m widths with Gemma 4's GeGLU MLP and 2-D RoPE; 280 soft tokens per image by default.
RELEASED_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
                       position_embedding_size=10240, standardize=True, use_clipped_linears=False,
                       default_output_length=280)
TEXT_HIDDEN = 2816
SIZES = [(1024, 768), (768, 768), (1920, 1080), (400, 300), (2000, 200)]  # prompt tokens for all of these
TIMED = [(1024, 768), (2000, 200)]  # encode time for these (a few minutes per image at 280 tokens on 1 CPU thread)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


@torch.no_grad()
def run(budgets: list[int], repeats: int, layers: int | None, dtype: torch.dtype, device: str,
        warmup: int = 0) -> dict:
    cfg = VisionConfig.from_dict(dict(RELEASED_VISION, **({"num_hidden_layers": layers} if layers else {})))
    torch.manual_seed(0)
    enc = VisionEncoder(cfg, TEXT_HIDDEN)
    for p in enc.parameters():
        p.normal_(0, 0.02)
    enc = enc.to(device=device, dtype=dtype).eval()
    enc.tower.rebuild_buffers(device)
    params = sum(p.numel() for p in enc.parameters())
    rows = []
    for budget in budgets:
        proc = ImageProcessor(patch_size=cfg.patch_size, pooling_kernel_size=cfg.pooling_kernel_size,
                              max_soft_tokens=budget)
        for w, h in SIZES:
            from PIL import Image

            img = Image.new("RGB", (w, h), (120, 30, 200))
            batch = proc(img)
            n = batch.num_soft_tokens[0]
            tw, th = proc.target_size(w, h)
            row = {"max_soft_tokens": budget, "image": f"{w}x{h}", "resized": f"{tw}x{th}",
                   "patches": n * cfg.pooling_kernel_size ** 2, "soft_tokens": n, "prompt_tokens": n + 2}
            if (w, h) in TIMED:
                wall, cpu = [], []
                for _ in range(warmup + repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    feats = enc.image_features(batch.pixel_values.to(device), batch.image_position_ids.to(device))
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                assert feats.shape == (n, TEXT_HIDDEN)
                row.update(encode_wall_s=round(statistics.median(wall[warmup:]), 2),
                           encode_cpu_s=round(statistics.median(cpu[warmup:]), 2))
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return {"vision_config": RELEASED_VISION | ({"num_hidden_layers": layers} if layers else {}),
            "parameters": params, "dtype": str(dtype), "device": device, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", default="70,280", help="max_soft_tokens values (comma-separated)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0, help="untimed runs first (first-call overheads are small "
                    "next to a multi-second encode)")
    ap.add_argument("--layers", type=int, help="override the tower depth (a quick smoke run)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run([int(b) for b in a.budgets.split(",")], a.repeats, a.layers, getattr(torch, a.dtype), a.device,
              a.warmup)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
