"""The Gemma 4 image processor with Pillow: PIL images -> ``pixel_values``, ``image_position_ids`` and the
soft-token count per image, as transformers' ``Gemma4ImageProcessor`` computes them.

Per image: RGB (transparency composited onto white), an aspect-preserving resize (bicubic) to the largest size
whose sides are multiples of ``pooling_kernel_size * patch_size`` and that holds at most
``max_soft_tokens * pooling_kernel_size**2`` patches, pixels scaled to [0, 1], cut into ``patch_size`` squares
(row-major; each patch flattened as row, column, channel), padded to that patch budget with zero patches at
position (-1, -1). An image of ``h x w`` patches gives ``h * w / pooling_kernel_size**2`` soft tokens.

Settings come from the checkpoint: ``processor_config.json`` (its ``image_processor`` entry) or
``preprocessor_config.json``, else the vision config (patch size, pooling kernel, ``default_output_length``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..checks import CheckpointError, read_json

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # what the reference processor accepts


@dataclass
class ImageBatch:
    """The processor's output for one request's images."""

    pixel_values: torch.Tensor  # [N, max_patches, 3 * patch_size**2], float32 in [0, 1]
    image_position_ids: torch.Tensor  # [N, max_patches, 2] (x, y), (-1, -1) for padding
    num_soft_tokens: list[int]  # per image

    def __len__(self) -> int:
        return len(self.num_soft_tokens)


def aspect_preserving_size(height: int, width: int, patch_size: int, max_patches: int, k: int) -> tuple[int, int]:
    """The target (height, width): as in the reference, sides rounded down to multiples of k * patch_size."""
    target_px = max_patches * patch_size ** 2
    factor = math.sqrt(target_px / (height * width))
    side = k * patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ValueError(f"an image of {width}x{height} pixels cannot be resized to a patch grid")
    longest = (max_patches // k ** 2) * side
    if th == 0:  # very wide: one row of pooling blocks
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:  # very tall
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    if th * tw > target_px:
        raise ValueError(f"an image of {width}x{height} pixels would need more than {max_patches} patches")
    return th, tw


@dataclass
class ImageProcessor:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280
    do_convert_rgb: bool = True
    do_resize: bool = True
    resample: int = 3  # PIL.Image.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple = (0.0, 0.0, 0.0)
    image_std: tuple = (1.0, 1.0, 1.0)

    def __post_init__(self):
        for name in ("patch_size", "pooling_kernel_size", "max_soft_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"image processor {name} must be a positive integer, got {v!r}")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})

    @classmethod
    def from_dir(cls, path: str, vision_config=None) -> "ImageProcessor":
        """The checkpoint's image-processor settings (see the module docstring)."""
        for file in ("processor_config.json", "preprocessor_config.json"):
            p = os.path.join(path, file)
            if os.path.exists(p):
                d = read_json(p, "the image processor's settings")  # a broken file fails naming itself
                if file == "processor_config.json":
                    if not isinstance(d.get("image_processor"), dict):
                        continue  # a processor config without image settings: try the next file
                    d = d["image_processor"]
                try:
                    out = cls.from_dict(d)
                except (TypeError, ValueError) as e:
                    raise CheckpointError(f"{p}: invalid image processor settings: {e}") from None
                why = out.mismatch(vision_config)
                if why:
                    raise CheckpointError(f"{p}: the image processor does not fit the checkpoint's vision tower "
                                          f"(config.json vision_config): {why}")
                return out
        if vision_config is None:
            return cls()
        return cls(patch_size=vision_config.patch_size, pooling_kernel_size=vision_config.pooling_kernel_size,
                   max_soft_tokens=vision_config.default_output_length or 280)

    def mismatch(self, vision_config) -> str | None:
        """Why images this processor makes cannot go through a tower of ``vision_config`` (None: they can). Every
        image would fail in the engine otherwise (patch shape, pooling), or every wide or tall one would (a patch
        grid longer than the tower's position table: up to ``max_soft_tokens * pooling_kernel_size`` patches)."""
        if vision_config is None:
            return None
        for name in ("patch_size", "pooling_kernel_size"):
            mine, tower = getattr(self, name), getattr(vision_config, name)
            if mine != tower:
                return f"{name} is {mine}, the tower's is {tower}"
        table = getattr(vision_config, "position_embedding_size", None)
        longest = self.max_soft_tokens * self.pooling_kernel_size
        if self.do_resize and table is not None and longest > table:
            return (f"max_soft_tokens {self.max_soft_tokens} lets a wide or tall image be {longest} patches long, "
                    f"beyond the tower's position table of {table} (position_embedding_size)")
        return None

    # ------------------------------------------------------------------ one image
    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize."""
        th, tw = aspect_preserving_size(height, width, self.patch_size, self.max_patches, self.pooling_kernel_size)
        return tw, th

    def soft_tokens(self, width: int, height: int) -> int:
        tw, th = self.target_size(width, height) if self.do_resize else (width, height)
        return (tw // self.patch_size) * (th // self.patch_size) // self.pooling_kernel_size ** 2

    def _rgb(self, image):
        from PIL import Image

        if not self.do_convert_rgb:
            return image
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")

    def _patches(self, image) -> tuple[np.ndarray, np.ndarray]:
        image = self._rgb(image)
        if self.do_resize:
            tw, th = self.target_size(*image.size)
            if (tw, th) != image.size:
                image = image.resize((tw, th), resample=self.resample)
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[..., None]
        arr = np.moveaxis(arr, -1, 0)  # [C, H, W]
        if self.do_rescale:
            arr = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            arr = ((arr - mean) / std).astype(np.float32)
        C, H, W = arr.shape
        ps = self.patch_size
        if H % ps or W % ps:
            raise ValueError(f"an image of {W}x{H} pixels is not a whole number of {ps}-pixel patches "
                             "(do_resize is off in the processor config)")
        ph, pw = H // ps, W // ps
        patches = arr.reshape(C, ph, ps, pw, ps).transpose(1, 3, 2, 4, 0).reshape(ph * pw, ps * ps * C)
        xs, ys = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
        return patches, np.stack([xs, ys], axis=-1).reshape(ph * pw, 2)

    # ------------------------------------------------------------------ a request's images
    def __call__(self, images) -> ImageBatch:
        """A PIL image or a list of them -> ``ImageBatch`` (every image padded to ``max_patches``)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        P = self.max_patches
        pv, pos, counts = [], [], []
        for image in images:
            patches, positions = self._patches(image)
            n = patches.shape[0]
            if n > P:
                raise ValueError(f"an image gives {n} patches; the processor allows {P}")
            counts.append(n // self.pooling_kernel_size ** 2)
            pv.append(np.pad(patches, ((0, P - n), (0, 0))))
            pos.append(np.pad(positions, ((0, P - n), (0, 0)), constant_values=-1))
        if not pv:
            d = 3 * self.patch_size ** 2
            return ImageBatch(torch.zeros(0, P, d), torch.zeros(0, P, 2, dtype=torch.long), [])
        return ImageBatch(torch.from_numpy(np.stack(pv)), torch.from_numpy(np.stack(pos)).long(), counts)
