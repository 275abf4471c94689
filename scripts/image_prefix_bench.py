"""A multi-turn chat about one image, with and without the prefix cache (prompts with images).

    python scripts/image_prefix_bench.py --turns 4 --repeats 3

Builds a random checkpoint with a mid-size text model and a small vision tower (tests/fixtures.py, with
transformers as the builder; nothing is downloaded) under --dir, then runs the same chat through two
``LLM``s, one with ``prefix_cache_bytes`` and one without: every turn resends the image and the whole history,
as chat clients do. Per turn: the prompt's tokens, the tokens the cache supplied, the vision tower's passes
(images it computed), and the median wall time of the request (one canvas, a few denoising steps, so the prompt's encode is a
visible share), the two LLMs alternated per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/image_prefix_bench")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--image-last", action="store_true",
                   help="the first message ends with the image (its tokens end in the prompt's last, partial block)")
    a = p.parse_args()
    from fixtures import make_checkpoint

    from blockdiff import LLM, SamplingParams

    path = os.path.join(a.dir, "ckpt")
    if not os.path.exists(os.path.join(path, "config.json")):
        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=64, patch_size=16, pooling_kernel_size=3,
                      position_embedding_size=256)
        text = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, global_head_dim=128, num_global_key_value_heads=2,
                    num_experts=8, top_k_experts=2, moe_intermediate_size=256, vocab_size=4096,
                    sliding_window=256)
        make_checkpoint(path, text_overrides=text, canvas_length=32, vision=vision, max_soft_tokens=280)
    torch.set_num_threads(a.threads)
    llms = {"cold": LLM(path, dtype="float32"), "cached": LLM(path, dtype="float32", prefix_cache_bytes=1 << 30)}
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")
    params = SamplingParams(seed=0, max_new_tokens=32, ignore_eos=True, max_denoising_steps=a.steps)

    seen = {"n": 0}  # the vision tower's passes (one per image it computes)
    for llm in llms.values():
        tower = llm.model.vision.tower
        orig = tower.forward

        def counted(*args, orig=orig, **kw):
            seen["n"] += 1
            return orig(*args, **kw)
        tower.forward = counted

    def chat(llm, history: str, turn: int):
        if not history:  # --image-last: the first message is text, then the image
            prompt = "<bos><|turn>user\nWhat is in this picture, seen from here? <|image|><turn|>\n<|turn>model\n"
        else:
            prompt = history + f"<|turn>user\nQuestion {turn} about the picture, please answer briefly.<turn|>\n" \
                               "<|turn>model\n"
        seen["n"] = 0
        t0 = time.perf_counter()
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [image]}}, params)[0]
        wall = time.perf_counter() - t0
        return out, wall, seen["n"], prompt + out.text + "<turn|>\n"

    rows = {}
    for r in range(a.repeats + 1):  # round 0 warms up
        for name, llm in (llms.items() if r % 2 else reversed(list(llms.items()))):
            if name == "cached":  # a fresh cache (and vision memo) each round: the same chat from its first turn
                llm.engine.prefix_cache.__init__(llm.model.kv_pool, 1 << 30)
                llm.engine.image_memo.__init__(llm.engine.image_memo.capacity_bytes)
            history = "<bos><|turn>user\nLook at this: <|image|><turn|>\n<|turn>model\nI see it.<turn|>\n"
            if a.image_last:
                history = ""
            for turn in range(a.turns):
                out, wall, images, history = chat(llm, history, turn)
                if r:
                    rows.setdefault((turn, name), []).append(
                        (len(out.prompt_token_ids), out.metrics.cached_tokens, images, wall))
    print(f"threads {a.threads}, {a.steps} denoising steps, one canvas of 32 per turn; median of {a.repeats} rounds")
    print(f"{'turn':>4} {'prompt':>7} | {'cold ms':>8} {'imgs':>4} | {'cached':>7} {'imgs':>4} {'ms':>8} | speed-up")
    for turn in range(a.turns):
        c, w = rows[(turn, "cold")], rows[(turn, "cached")]
        cm, wm = (statistics.median(x[3] for x in v) * 1e3 for v in (c, w))
        print(f"{turn:>4} {c[0][0]:>7} | {cm:8.1f} {c[0][2]:>4} | {w[0][1]:>7} {w[0][2]:>4} {wm:8.1f} | {cm / wm:.2f}x")


if __name__ == "__main__":
    main()
