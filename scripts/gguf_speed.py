"""Interleaved median ms per denoise step: blockdiff's own int8/int4 (from safetensors) vs the same weights' GGUF.

    python scripts/gguf_speed.py THREADS   # reads /tmp/speed/mid (see scripts/gguf_memory.py)
"""
import statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
from blockdiff.loader import load_model
d = "/tmp/speed/mid"
models = {"int8 (safetensors)": load_model(d + "/ckpt", quantization="int8"),
          "Q8_0 .gguf -> int8": load_model(d + "/mid-q8_0.gguf"),
          "int4-g32 (safetensors)": load_model(d + "/ckpt", quantization="int4-g32"),
          "Q4_0 experts .gguf -> int4-g32": load_model(d + "/mid-q4_0.gguf")}
g = torch.Generator().manual_seed(0)
V = 32768
prompt = torch.randint(256, V, (1, 64), generator=g); canvas = torch.randint(0, V, (1, 128), generator=g)
caches = {}
for k, m in models.items():
    caches[k] = m.new_cache(1)
    with torch.no_grad():
        m.encode(prompt, caches[k]); m.denoise(canvas, caches[k])
times = {k: [] for k in models}
for r in range(5):
    for k, m in models.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            m.denoise(canvas, caches[k])
        times[k].append(time.perf_counter() - t0)
for k, v in times.items():
    print(f"| {k} | {1000 * statistics.median(v):.0f} |")
