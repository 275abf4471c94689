"""Deterministic mode holds on every shape: with ``batch_invariant`` (``LLM(..., deterministic=True)``) a row's
logits, and so a seeded request's output, are bit-identical alone or in any batch, over checkpoints with odd
hidden sizes, head dims, vocabulary sizes, expert counts and canvas lengths, prompts of different lengths, and a
prompt with an image. (Batched GEMMs round differently at another row count: hidden 200 showed 8e-6 apart.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blockdiff import LLM, SamplingParams, load_model
from blockdiff.kv_cache import KVCache
from fixtures import TINY_VISION_CONFIG, make_checkpoint

# Each differs from the tiny default in the sizes that pick GEMM / attention kernels' blocking.
CONFIGS = {
    "h200-e7-v1000": (dict(vocab_size=1000, hidden_size=200, intermediate_size=300, head_dim=24, global_head_dim=40,
                           num_experts=7, top_k_experts=3, moe_intermediate_size=65, num_attention_heads=5,
                           num_key_value_heads=1, num_global_key_value_heads=1), 17),
    "h136-e3-v777": (dict(vocab_size=777, hidden_size=136, intermediate_size=250, head_dim=34, global_head_dim=34,
                          num_experts=3, top_k_experts=1, moe_intermediate_size=50, num_attention_heads=4,
                          num_key_value_heads=2), 32),
    "h72-e5-v509": (dict(vocab_size=509, hidden_size=72, intermediate_size=97, head_dim=12, global_head_dim=20,
                         num_experts=5, top_k_experts=2, moe_intermediate_size=33, num_attention_heads=3,
                         num_key_value_heads=1), 13),
}


@pytest.fixture(scope="module")
def odd_paths(tmp_path_factory):
    return {name: make_checkpoint(tmp_path_factory.mktemp(name), text_overrides=over, canvas_length=C, seed=i)
            for i, (name, (over, C)) in enumerate(CONFIGS.items())}


def _prompts(n: int, V: int) -> list[list[int]]:
    return [[2] + [(7 * i + 13 * j) % (V - 10) + 5 for j in range(3 + 11 * i)] for i in range(n)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_invariant_model_rows_equal_rows_alone(odd_paths, name):
    """encode (last-token logits) and denoise (logits, with self-conditioning): each row of a batch of 4 equals
    the row computed alone, bit for bit."""
    m = load_model(odd_paths[name], dtype=torch.float32)
    m.batch_invariant = True
    C, V, H = m.canvas_length, m.vocab_size, m.text.hidden_size
    prompts = _prompts(4, V)
    width = max(map(len, prompts))
    padded = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    together = [m.new_sequence() for _ in prompts]
    alone = [m.new_sequence() for _ in prompts]
    with torch.no_grad():
        last = m.encode(padded, KVCache(together), lengths=[len(p) for p in prompts], logits="last")
        for b, p in enumerate(prompts):
            one = m.encode(torch.tensor([p]), KVCache([alone[b]]), logits="last")
            assert torch.equal(one[0], last[b]), f"encode row {b}"
        g = torch.Generator().manual_seed(0)
        canvas = torch.randint(0, V, (4, C), generator=g)
        sc = torch.randn(4, C, H, generator=g)
        mask = torch.tensor([True, False, True, True])
        logits = m.denoise(canvas, KVCache(together), self_conditioning_embeds=sc, self_conditioning_mask=mask)
        for b in range(4):
            one = m.denoise(canvas[b:b + 1], KVCache([alone[b]]), self_conditioning_embeds=sc[b:b + 1],
                            self_conditioning_mask=mask[b:b + 1])
            assert torch.equal(one[0], logits[b]), f"denoise row {b}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_seeded_requests_are_bit_identical_alone_and_batched_on_odd_shapes(odd_paths, name):
    llm = LLM(odd_paths[name], dtype="float32", deterministic=True)
    prompts = _prompts(4, llm.model.vocab_size)
    params = [SamplingParams(max_new_tokens=2 * llm.model.canvas_length, seed=10 + i, max_denoising_steps=4,
                             ignore_eos=True, logprobs=2) for i in range(4)]
    together = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    for p, sp, out in zip(prompts, params, together):
        alone = llm.generate(prompt_token_ids=[p], sampling_params=sp)[0]
        assert alone.token_ids == out.token_ids
        assert alone.logprobs == out.logprobs  # the distributions too, not only their argmax


def test_image_prompt_is_bit_identical_alone_and_batched(tmp_path):
    path = make_checkpoint(tmp_path / "mm", vision=dict(TINY_VISION_CONFIG, patch_size=8, pooling_kernel_size=2,
                                                        position_embedding_size=160),
                           text_overrides=dict(hidden_size=72, intermediate_size=97, vocab_size=509), seed=5)
    llm = LLM(path, dtype="float32", deterministic=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB")
    image_prompt = {"prompt": "<bos>see <|image|> now", "multi_modal_data": {"image": img}}
    prompts = [image_prompt, "<bos>plain text prompt", "<bos>x"]
    params = [SamplingParams(max_new_tokens=20, seed=3 + i, max_denoising_steps=4, ignore_eos=True)
              for i in range(3)]
    together = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, together):
        assert llm.generate([p], sp)[0].token_ids == out.token_ids
