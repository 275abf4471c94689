"""The generators the benchmark times, each as ``fn(seed) -> RunResult`` over the same weights and prompt.

- ``blockdiff-default`` / ``blockdiff-reference``: ``LLM.generate`` in the two rng modes; ``blockdiff-fast``: the
  default rng in fast mode (approximate, ``engine/fast.py``);
- ``oracle``: the transformers reference's ``generate`` (imported lazily: never a runtime dependency);
- ``ar-bN``: greedy autoregressive decoding with the encoder's causal next-token head, N rows at once.

Every diffusion run takes exactly ``steps`` denoising steps per canvas: early stopping is disabled by a
stability threshold above the step count (the argmax history can then never fill up).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

ORACLE_MISSING = ("the oracle side of the benchmark needs the transformers reference "
                  "(pip install 'transformers==5.23.0', or `pip install -e .[test]`); pass --no-oracle to skip it")


@dataclass
class RunResult:
    tokens: int  # generated tokens, all rows together
    forwards: int  # model forwards per row that produced them (denoising steps, or AR decode steps)
    first_row: list[int]  # the first row's tokens (for the reference-vs-oracle check)


def blockdiff_system(llm, prompts: list[list[int]], max_new_tokens: int, steps: int, rng: str,
                     fast: bool = False) -> Callable:
    from ..sampling.params import SamplingParams

    base = SamplingParams(max_new_tokens=max_new_tokens, max_denoising_steps=steps,
                          stability_threshold=steps + 1, rng=rng, ignore_eos=True, fast=fast)

    def run(seed: int) -> RunResult:
        params = [dataclasses.replace(base, seed=seed + i) for i in range(len(prompts))]
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        return RunResult(sum(len(o.token_ids) for o in outs), max(o.metrics.denoise_steps for o in outs),
                         list(outs[0].token_ids))
    return run


def load_oracle(path: str, dtype: torch.dtype, device: str):
    try:
        from transformers import DiffusionGemmaForBlockDiffusion
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ImportError(ORACLE_MISSING) from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the (untrained) vision tower as missing
    try:
        return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).to(device).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def oracle_system(ref, prompts: list[list[int]], max_new_tokens: int, steps: int, canvas_length: int) -> Callable:
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("the oracle benchmark needs prompts of equal length")
    ids = torch.tensor(prompts, dtype=torch.long, device=ref.device)

    @torch.no_grad()
    def run(seed: int) -> RunResult:
        torch.manual_seed(seed)
        out = ref.generate(ids, max_new_tokens=max_new_tokens, max_denoising_steps=steps,
                           stability_threshold=steps + 1)
        seqs = out.sequences if hasattr(out, "sequences") else out
        new = seqs[:, ids.shape[1]:]
        # The reference stops after a canvas holding EOS; count the canvases it actually denoised.
        canvases = math.ceil(new.shape[1] / canvas_length)
        new = new[:, :max_new_tokens]
        return RunResult(new.numel(), canvases * steps, new[0].tolist())
    return run


def ar_system(model, prompt: list[int], batch: int, max_new_tokens: int) -> Callable:
    from ..engine.ar import ar_generate

    def run(seed: int) -> RunResult:  # greedy: the seed is unused
        out = ar_generate(model, [list(prompt) for _ in range(batch)], max_new_tokens)
        return RunResult(sum(len(r) for r in out), max(len(r) for r in out), list(out[0]))
    return run
