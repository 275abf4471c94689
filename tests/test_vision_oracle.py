"""Images in the prompt: blockdiff's vision tower, soft-token scatter and image attention masks equal the
transformers reference (the oracle) on tiny random multimodal checkpoints, in two vision configurations.

The oracle is driven the way its ``generate`` drives it: the encoder gets the mask mapping built by
``create_masks_for_generate(..., mm_token_type_ids=...)`` (its plain ``forward`` ignores ``mm_token_type_ids``).
Run with ``-s`` to print the largest logit difference per configuration. Seen here (fp32, CPU, torch 2.13,
transformers 5.23, logits std ~2): patch8_pool2_clipped 5.8e-06, patch16_pool3_gqa_std 5.6e-06.
"""

from __future__ import annotations

import pytest
import torch

from blockdiff import load_model
from fixtures import BOI_ID, BOS_ID, EOI_ID, IMAGE_ID, TINY_VISION_CONFIGS, load_oracle, make_checkpoint

TOL = 1e-4
MAX_DIFF: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MAX_DIFF:
        print("\nlargest |blockdiff - oracle| logit difference after image prompts:")
        for name, d in MAX_DIFF.items():
            print(f"  {name:24s} {d:.2e}")


@pytest.fixture(scope="module")
def mm_checkpoints(tmp_path_factory):
    return {name: make_checkpoint(tmp_path_factory.mktemp(name), vision=v, seed=i + 3, with_tokenizer=False)
            for i, (name, v) in enumerate(TINY_VISION_CONFIGS.items())}


def random_images(vcfg: dict, grids: list[tuple[int, int]], max_patches: int, g: torch.Generator):
    """Images as the processor lays them out: grids (w, h) in patches, row-major, padded with (-1, -1)."""
    ps = vcfg["patch_size"]
    pv = torch.zeros(len(grids), max_patches, 3 * ps * ps)
    pos = torch.full((len(grids), max_patches, 2), -1, dtype=torch.long)
    for n, (w, h) in enumerate(grids):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos[n, :w * h] = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
        pv[n, :w * h] = torch.rand(w * h, 3 * ps * ps, generator=g)
    return pv, pos


def image_prompt(counts: list[int], V: int, g: torch.Generator) -> torch.Tensor:
    def text(n):
        return torch.randint(100, V, (n,), generator=g).tolist()
    ids = [BOS_ID] + text(5)
    for c in counts:
        ids += [BOI_ID] + [IMAGE_ID] * c + [EOI_ID] + text(3)
    return torch.tensor([ids])


def _oracle_encode(ref, ids, cache, **images):
    from transformers import DynamicCache  # noqa: F401  (cache built by the caller)

    S = ids.shape[1]
    start = cache.get_seq_length()
    position_ids = torch.arange(start, start + S)[None]
    mask = ref.model.encoder.create_masks_for_generate(
        config=ref.config, inputs_embeds=torch.empty(1, S, 0), attention_mask=torch.ones(1, start + S, dtype=torch.bool),
        past_key_values=cache, position_ids=position_ids, mm_token_type_ids=images.pop("mm_token_type_ids", None))
    ref.model.encoder(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=position_ids, **images)


def _new_oracle_cache(ref):
    from transformers import DynamicCache

    return DynamicCache(config=ref.config.get_text_config(decoder=True))


def _close(name, ours, theirs):
    d = (ours - theirs).abs().max().item()
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), d)
    assert d < TOL, f"{name}: max abs logit difference {d:.3e}"
    return d


@pytest.mark.parametrize("name", list(TINY_VISION_CONFIGS))
@torch.no_grad()
def test_denoise_logits_after_an_image_prompt_equal_oracle_over_two_canvases(name, mm_checkpoints):
    path = mm_checkpoints[name]
    model, ref = load_model(path, dtype=torch.float32), load_oracle(path)
    vcfg = TINY_VISION_CONFIGS[name]
    k = vcfg["pooling_kernel_size"]
    g = torch.Generator().manual_seed(11)
    grids = [(2 * k, 3 * k), (5 * k, k)]  # two images of different shapes: 6 and 5 soft tokens
    pv, pos = random_images(vcfg, grids, max_patches=70 * k * k, g=g)
    ids = image_prompt([6, 5], model.vocab_size, g)
    mm = (ids == IMAGE_ID).long()
    C, V = model.canvas_length, model.vocab_size

    cache, rcache = model.new_cache(1), _new_oracle_cache(ref)
    model.encode(ids, cache, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=mm)
    _oracle_encode(ref, ids, rcache, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=mm)
    for canvas_no in range(2):
        canvas = torch.randint(0, V, (1, C), generator=g)
        sc = torch.randn(1, C, V, generator=g) * 3
        ours = model.denoise(canvas, cache, self_conditioning_logits=sc)
        _close(name, ours, ref(decoder_input_ids=canvas, past_key_values=rcache, self_conditioning_logits=sc).logits)
        if canvas_no == 0:  # commit the canvas (no images in it) and go on
            committed = torch.randint(0, V, (1, C), generator=g)
            model.encode(committed, cache)
            _oracle_encode(ref, committed, rcache)
    assert cache.lengths == [ids.shape[1] + C]


@pytest.mark.parametrize("name", list(TINY_VISION_CONFIGS))
@torch.no_grad()
def test_the_image_and_its_bidirectional_mask_reach_the_logits(name, mm_checkpoints):
    model = load_model(mm_checkpoints[name], dtype=torch.float32)
    vcfg = TINY_VISION_CONFIGS[name]
    k = vcfg["pooling_kernel_size"]
    g = torch.Generator().manual_seed(5)
    pv, pos = random_images(vcfg, [(3 * k, 2 * k)], max_patches=70 * k * k, g=g)
    pv2, _ = random_images(vcfg, [(3 * k, 2 * k)], max_patches=70 * k * k, g=g)
    ids = image_prompt([6], model.vocab_size, g)
    mm = (ids == IMAGE_ID).long()
    canvas = torch.randint(0, model.vocab_size, (1, model.canvas_length), generator=g)

    def logits(pixels, types):
        cache = model.new_cache(1)
        model.encode(ids, cache, pixel_values=pixels, image_position_ids=pos, mm_token_type_ids=types)
        return model.denoise(canvas, cache)

    base = logits(pv, mm)
    assert (logits(pv2, mm) - base).abs().max() > 1e-2  # another image, other logits
    assert (logits(pv, None) - base).abs().max() > 1e-3  # causal image tokens: other logits
    assert torch.equal(logits(pv, mm), base)  # and the same inputs give the same logits


@torch.no_grad()
def test_image_features_equal_oracle_vision_tower_with_padding_patches(mm_checkpoints):
    name = "patch16_pool3_gqa_std"
    path = mm_checkpoints[name]
    model, ref = load_model(path, dtype=torch.float32), load_oracle(path)
    k = TINY_VISION_CONFIGS[name]["pooling_kernel_size"]
    g = torch.Generator().manual_seed(2)
    pv, pos = random_images(TINY_VISION_CONFIGS[name], [(k, 4 * k), (3 * k, 3 * k)], 70 * k * k, g)
    ours = model.vision.image_features(pv, pos)
    theirs = ref.model.encoder.get_image_features(pv, pos).pooler_output
    assert ours.shape == theirs.shape == (4 + 9, model.text.hidden_size)
    assert (ours - theirs).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- loading
def test_every_vision_tensor_of_the_released_layout_loads_and_saves_back(mm_checkpoints, tmp_path):
    from safetensors import safe_open

    from blockdiff.loader import save_model

    path = mm_checkpoints["patch8_pool2_clipped"]
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        vision = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("model.encoder.vision_tower.",
                                                                         "model.encoder.embed_vision."))}
    assert any(k.endswith("input_max") for k in vision) and any(k.endswith("embedding_projection.weight")
                                                                 for k in vision)
    model = load_model(path, dtype=torch.float32)
    assert model.vision is not None
    save_model(model, str(tmp_path / "out"))
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if k in vision}
    assert saved.keys() == vision.keys() and all(torch.equal(saved[k], vision[k]) for k in vision)


def test_checkpoint_without_vision_tensors_loads_text_only_and_partial_tower_fails(mm_checkpoints, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from blockdiff.loader import CheckpointError

    src = mm_checkpoints["patch8_pool2_clipped"]
    with safe_open(f"{src}/model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, keep in (("text_only", lambda k: "vision" not in k),
                       ("partial", lambda k: not k.endswith("layers.0.mlp.up_proj.linear.weight"))):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        save_file({k: v for k, v in tensors.items() if keep(k)}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
        if name == "text_only":
            model = load_model(str(dst), dtype=torch.float32)
            assert model.vision is None and not any("vision" in n for n, _ in model.named_parameters())
            ids = torch.tensor([[BOS_ID, IMAGE_ID, 5]])
            with pytest.raises(ValueError, match="no vision tower"):
                model.encode(ids, model.new_cache(1), pixel_values=torch.zeros(1, 4, 192),
                             image_position_ids=torch.zeros(1, 4, 2, dtype=torch.long))
        else:
            with pytest.raises(CheckpointError, match="missing tensors: .*layers.0.mlp.up_proj.linear.weight"):
                load_model(str(dst), dtype=torch.float32)


@pytest.mark.parametrize("k,w,h", [(2, 6, 4), (3, 9, 3)])
def test_patch_pooling_equals_index_add_bit_for_bit_in_any_patch_order(k, w, h):
    """The vision tower's k x k pooling adds each window's patches one at a time in patch order, not with
    index_add_ (whose atomic adds are nondeterministic on a GPU): on the CPU it must equal the reference's
    index_add_ to the bit, whatever order the patches come in; positions that do not tile the windows are refused."""
    from blockdiff.model.vision_tower import pool_patches
    g = torch.Generator().manual_seed(k)
    pos = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1).reshape(-1, 2)
    pos = pos[torch.randperm(pos.shape[0], generator=g)]
    x = torch.randn(pos.shape[0], 16, generator=g) * 3
    bins = pos[:, 0] // k + (w // k) * (pos[:, 1] // k)
    want = torch.zeros(pos.shape[0] // (k * k), 16).index_add_(0, bins, x / (k * k))
    assert torch.equal(pool_patches(x, pos, k), want)
    bad = pos.clone()
    bad[0] = bad[1]  # two patches at one position: one window short, another one over
    with pytest.raises(ValueError, match="do not tile"):
        pool_patches(x, bad, k)
