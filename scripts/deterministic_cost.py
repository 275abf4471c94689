"""Deterministic vs default mode: one batched generate of N seeded requests, same process, same checkpoint.

    python scripts/deterministic_cost.py mid 8 4 128   # preset, requests, denoising steps, max_new_tokens
"""
import sys, time, tempfile, torch
torch.set_num_threads(1)
from blockdiff import LLM, SamplingParams
from blockdiff.bench.checkpoints import write_random_checkpoint
preset, n, steps, toks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
path = write_random_checkpoint(tempfile.mkdtemp(), preset)
llm = LLM(path, dtype="float32")
V = llm.model.vocab_size
prompts = [[2] + [(7 * i + 13 * j) % (V - 10) + 5 for j in range(8 + 5 * i)] for i in range(n)]
params = [SamplingParams(max_new_tokens=toks, seed=i, max_denoising_steps=steps, ignore_eos=True) for i in range(n)]
res = {}
for mode in ("default", "deterministic", "default", "deterministic"):
    llm.model.batch_invariant = mode == "deterministic"
    t = time.perf_counter(); llm.generate(prompt_token_ids=prompts, sampling_params=params)
    res.setdefault(mode, []).append(time.perf_counter() - t)
print({k: [round(x, 2) for x in v] for k, v in res.items()}, "ratio(best)", round(min(res["deterministic"]) / min(res["default"]), 2))
