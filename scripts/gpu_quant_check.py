"""GPU check of the quantized paths (run on a lent CUDA machine; nothing here has been run yet).

    python scripts/gpu_quant_check.py [--preset mid] [--steps 5]

Writes a random checkpoint of the preset, loads it in bf16 and with int8 / int4 / fp8 (fp8 only on compute
capability >= 8.9), and prints for each: the relative error of the denoise logits against bf16, the mean time of
one denoise step (canvas of the preset, batch 1, after one warm-up, torch.cuda.synchronize around it), and the
CUDA memory allocated by the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    from blockdiff.bench.checkpoints import write_random_checkpoint
    from blockdiff.loader import load_model
    from blockdiff.quant import QuantizationError

    print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tmp, args.preset)
        ref = None
        for method in (None, "int8", "int4", "fp8"):
            torch.cuda.empty_cache()
            m0 = torch.cuda.memory_allocated()
            try:
                model = load_model(path, dtype="bfloat16", device="cuda", quantization=method)
            except QuantizationError as e:
                print(f"{method}: {e}")
                continue
            weights_mb = (torch.cuda.memory_allocated() - m0) / 2 ** 20
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, model.vocab_size, (1, model.canvas_length), generator=g).cuda()
            cache = model.new_cache(1)
            with torch.no_grad():
                model.encode(torch.randint(0, model.vocab_size, (1, 64), generator=g).cuda(), cache)
                logits = model.denoise(ids, cache)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(args.steps):
                    model.denoise(ids, cache)
                torch.cuda.synchronize()
                step_ms = (time.perf_counter() - t) / args.steps * 1e3
            if ref is None:
                ref = logits
            err = float((logits - ref).norm() / ref.norm())
            print(f"{method or 'bf16'}: weights {weights_mb:.0f} MB, denoise step {step_ms:.1f} ms, "
                  f"logit rel. error vs bf16 {err:.4f}, finite {bool(torch.isfinite(logits).all())}", flush=True)
            del model, cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
