"""Resident memory of a model loaded from safetensors or GGUF files, each load in a fresh process.

    python scripts/gguf_memory.py DIR

DIR holds ``ckpt/`` (a checkpoint folder, e.g. ``blockdiff bench``'s random "mid" written by
``blockdiff.bench.checkpoints.write_random_checkpoint``) and ``*.gguf`` files converted from it (written with
``tests/gguf_fixtures.write_gguf``, the layout of llama.cpp's DiffusionGemma converter). For each, in a process that
already loaded the same file once (so one-time runtime set-up is not counted): the growth of the resident set from
a second load (after it and a malloc_trim), and its peak during that load (/proc/self/status VmRSS / VmHWM, the
peak reset through /proc/self/clear_refs), as fractions of the fp32 safetensors model.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

CHILD = r"""
import gc, json, sys, torch
torch.set_num_threads(1)
import blockdiff
from blockdiff.loader import load_model
import blockdiff.quant.gguf, blockdiff.quant.gguf_repack, blockdiff.model, gguf, gguf.quants, safetensors.torch  # noqa
from blockdiff.heap import malloc_trim
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, q = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None)
first = load_model(path, quantization=q)  # one-time runtime set-up (kernels, thread pools) happens here
gc.collect()
malloc_trim()  # what glibc keeps cached after a load is not the model's
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
m = load_model(path, quantization=q)  # the second load: what one more model costs
gc.collect()
malloc_trim()
print(json.dumps({"rss": status("VmRSS") - base, "peak": status("VmHWM") - base}))
"""


def measure(path: str, quantization: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", CHILD, path, quantization or "-"], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    d = (argv or sys.argv[1:])[0]
    ckpt = os.path.join(d, "ckpt")
    runs = [("safetensors fp32", ckpt, None), ("safetensors -> int8", ckpt, "int8"),
            ("safetensors -> int4", ckpt, "int4-g32")]
    runs += [(os.path.basename(p), p, None) for p in sorted(glob.glob(os.path.join(d, "*.gguf")))]
    base = None
    print("| load | resident after load (MB) | x fp32 | peak during load (MB) | x fp32 |\n|---|---|---|---|---|")
    for name, path, q in runs:
        r = measure(path, q)
        base = base or r
        print(f"| {name} | {r['rss'] / 2**20:.0f} | {r['rss'] / base['rss']:.2f} | {r['peak'] / 2**20:.0f} | "
              f"{r['peak'] / base['rss']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
