"""blockdiff's Pillow image processor gives the same pixel_values, image_position_ids and soft-token counts as
transformers' Gemma 4 image processor (its PIL backend, which needs no torchvision), for images of many sizes,
aspect ratios and modes, with settings read from the checkpoint's processor config (nested or flat file)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blockdiff.config import VisionConfig
from blockdiff.vision.processor import ImageProcessor

# (width, height, mode): landscape, portrait, very wide and very tall (one row of pooling blocks), tiny
# (upscaled), square, and modes with alpha, a palette and one channel.
IMAGES = [(640, 480, "RGB"), (333, 1000, "RGB"), (3000, 40, "RGB"), (30, 2500, "RGB"), (17, 23, "RGB"),
          (256, 256, "RGBA"), (200, 120, "P"), (90, 300, "L"), (48, 48, "RGB")]

SETTINGS = [dict(patch_size=8, pooling_kernel_size=2, max_soft_tokens=70),
            dict(patch_size=16, pooling_kernel_size=3, max_soft_tokens=140),
            dict(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280)]  # the released settings


def make_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "RGBA":
        a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        return Image.fromarray(a, "RGBA")
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return img.convert("P") if mode == "P" else img


def reference(settings: dict):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(**settings)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"p{s['patch_size']}k{s['pooling_kernel_size']}"
                         f"t{s['max_soft_tokens']}")
def test_processor_outputs_equal_transformers_gemma4_image_processor(settings):
    ours, ref = ImageProcessor(**settings), reference(settings)
    images = [make_image(w, h, m, i) for i, (w, h, m) in enumerate(IMAGES)]
    got = ours(images)
    want = ref(images, return_tensors="pt")
    assert got.pixel_values.dtype == want["pixel_values"].dtype == torch.float32
    assert torch.equal(got.pixel_values, want["pixel_values"])
    assert torch.equal(got.image_position_ids, want["image_position_ids"].long())
    assert got.num_soft_tokens == want["num_soft_tokens_per_image"].tolist()
    for img, n in zip(images, got.num_soft_tokens):  # the count is known from the size alone
        assert ours.soft_tokens(*img.size) == n
    assert len(set(got.num_soft_tokens)) > 3  # the sizes really differ


@pytest.mark.parametrize("file", ["processor_config.json", "preprocessor_config.json"])
def test_settings_come_from_the_checkpoints_processor_config(file, tmp_path):
    ip = {"image_processor_type": "Gemma4ImageProcessor", "patch_size": 8, "pooling_kernel_size": 2,
          "max_soft_tokens": 140, "resample": 2, "do_convert_rgb": True}
    body = {"processor_class": "Gemma4Processor", "image_processor": ip} if file == "processor_config.json" else ip
    (tmp_path / file).write_text(json.dumps(body))
    p = ImageProcessor.from_dir(str(tmp_path))
    assert (p.patch_size, p.pooling_kernel_size, p.max_soft_tokens, p.resample) == (8, 2, 140, 2)
    img = make_image(300, 200, "RGB", 0)
    ref = reference({k: v for k, v in ip.items() if k != "image_processor_type"})(img, return_tensors="pt")
    assert torch.equal(p(img).pixel_values, ref["pixel_values"])


def test_without_a_processor_config_the_vision_config_decides(tmp_path):
    vc = VisionConfig.from_dict({"patch_size": 14, "pooling_kernel_size": 2, "default_output_length": 560})
    p = ImageProcessor.from_dir(str(tmp_path), vc)
    assert (p.patch_size, p.pooling_kernel_size, p.max_soft_tokens) == (14, 2, 560)
    assert ImageProcessor.from_dir(str(tmp_path)).max_soft_tokens == 280


@pytest.mark.parametrize("change, words", [({"patch_size": 16}, "patch_size is 16, the tower's is 8"),
                                           ({"pooling_kernel_size": 3}, "pooling_kernel_size is 3, the tower's is 2"),
                                           ({"max_soft_tokens": 140}, "280 patches long, beyond the tower's position "
                                                                      "table of 160")])
def test_a_processor_config_that_does_not_fit_the_vision_tower_is_refused_at_load(tmp_path, change, words):
    """Images it makes would fail in the engine, every one (patch shape, pooling) or every wide or tall one (patch
    positions past the tower's position table): the checkpoint is refused naming the file, not each request."""
    from blockdiff.checks import CheckpointError

    vc = VisionConfig.from_dict({"patch_size": 8, "pooling_kernel_size": 2, "position_embedding_size": 160})
    ip = {"patch_size": 8, "pooling_kernel_size": 2, "max_soft_tokens": 70}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": ip}))
    assert ImageProcessor.from_dir(str(tmp_path), vc).max_soft_tokens == 70  # 70 * 2 = 140 positions fit
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {**ip, **change}}))
    with pytest.raises(CheckpointError, match="processor_config.json: the image processor does not fit") as e:
        ImageProcessor.from_dir(str(tmp_path), vc)
    assert words in str(e.value)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"p{s['patch_size']}k{s['pooling_kernel_size']}"
                         f"t{s['max_soft_tokens']}")
def test_the_longest_patch_grid_is_max_soft_tokens_times_the_pooling_kernel(settings):
    """The bound the load-time check uses is reached: a very wide or very tall image spans exactly that many
    patches along its long side (positions 0 .. max_soft_tokens * k - 1)."""
    p = ImageProcessor(**settings)
    longest = settings["max_soft_tokens"] * settings["pooling_kernel_size"]
    for w, h, axis in ((5000, 3, 0), (3, 5000, 1)):
        pos = p(make_image(w, h, "RGB", 0)).image_position_ids[0]
        assert int(pos[:, axis].max()) == longest - 1
