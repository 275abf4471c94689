"""A prompt with images -> the token ids the model reads and the processed images that go with them.

The prompt marks each image with one image token (``<|image|>``, ``config.json["image_token_id"]``), as the
Gemma 4 chat template writes it for an image content part. As the reference processor does, each placeholder
becomes ``<|image>`` + ``<|image|>`` x (the image's soft tokens) + ``<image|>`` (boi / image / eoi ids from
config.json); a placeholder already wrapped in boi ... eoi keeps its wrapper. A prompt whose image tokens
are already expanded (their count equals the images' soft tokens) is taken as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .processor import ImageBatch, ImageProcessor


@dataclass
class ImageInputs:
    """What ``model.encode`` needs beside the prompt ids (the engine passes it with the prompt only)."""

    pixel_values: torch.Tensor  # [N, P, 3 * ps^2]
    image_position_ids: torch.Tensor  # [N, P, 2]
    num_soft_tokens: list[int]

    def mm_token_type_ids(self, ids: list[int], image_token_id: int) -> torch.Tensor:
        """[1, S]: 1 at image tokens, 0 elsewhere (the reference processor's ``mm_token_type_ids``)."""
        return (torch.tensor([ids]) == image_token_id).long()


class ImagePrompter:
    """Expands image placeholders and processes the images for one model (``None`` images: nothing to do)."""

    def __init__(self, processor: ImageProcessor | None, image_token_id: int | None, boi_token_id: int | None,
                 eoi_token_id: int | None, has_vision: bool, placeholder: str = "<|image|>"):
        self.processor = processor
        self.image_id, self.boi_id, self.eoi_id = image_token_id, boi_token_id, eoi_token_id
        self.has_vision = has_vision
        self.placeholder = placeholder  # the image token's text, for messages

    @classmethod
    def for_model(cls, model, path: str | None, tokenizer=None) -> "ImagePrompter":
        cfg = model.config
        has_vision = getattr(model, "vision", None) is not None
        proc = None
        if has_vision:
            proc = ImageProcessor.from_dir(path, cfg.vision) if path else ImageProcessor(
                patch_size=cfg.vision.patch_size, pooling_kernel_size=cfg.vision.pooling_kernel_size,
                max_soft_tokens=cfg.vision.default_output_length or 280)
        text = tokenizer.id_to_token(cfg.image_token_id) if tokenizer is not None and cfg.image_token_id is not None \
            else None
        return cls(proc, cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id, has_vision, text or "<|image|>")

    def check_can_take_images(self) -> None:
        if not self.has_vision:
            raise ValueError("the model has no vision tower (a text-only checkpoint): it cannot take images")

    def prepare(self, ids: list[int], images: list) -> tuple[list[int], ImageInputs | None]:
        """(prompt ids, PIL images) -> (ids with every image expanded to its soft tokens, ImageInputs)."""
        if not images:
            return list(ids), None
        self.check_can_take_images()
        batch: ImageBatch = self.processor(list(images))
        return self.expand(ids, batch.num_soft_tokens), ImageInputs(batch.pixel_values, batch.image_position_ids,
                                                                      batch.num_soft_tokens)

    def expand(self, ids: list[int], counts: list[int]) -> list[int]:
        found = sum(1 for t in ids if t == self.image_id)
        if found == sum(counts) and found > 0 and found != len(counts):
            return list(ids)  # already expanded
        if found != len(counts):
            raise ValueError(f"the prompt has {found} image placeholder(s) ({self.placeholder}) for {len(counts)} "
                             f"image(s): put one {self.placeholder} where each image goes")
        out, n = [], 0
        for i, t in enumerate(ids):
            if t != self.image_id:
                out.append(t)
                continue
            wrapped = i > 0 and ids[i - 1] == self.boi_id and i + 1 < len(ids) and ids[i + 1] == self.eoi_id
            out += ([] if wrapped else [self.boi_id]) + [self.image_id] * counts[n] + ([] if wrapped else [self.eoi_id])
            n += 1
        return out

    def tokens_per_image(self, width: int, height: int) -> int:
        """Prompt tokens one image of this size costs: its soft tokens plus boi and eoi."""
        self.check_can_take_images()
        return self.processor.soft_tokens(width, height) + 2
