"""A prompt with images -> the token ids the model reads and the processed images that go with them.

The prompt marks each image with one image token (``<|image|>``, ``config.json["image_token_id"]``), as the
Gemma 4 chat template writes it for an image content part. As the reference processor does, each placeholder
becomes ``<|image>`` + ``<|image|>`` x (the image's soft tokens) + ``<image|>`` (boi / image / eoi ids from
config.json); a placeholder already wrapped in boi ... eoi keeps its wrapper. A prompt whose image tokens
are already expanded (their count equals the images' soft tokens) is taken as it is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from .processor import ImageBatch, ImageProcessor
from .chat import refuse_image_token_text


@dataclass
class ImageInputs:
    """What ``model.encode`` needs beside the prompt ids (the engine passes it with the prompt only)."""

    pixel_values: torch.Tensor  # [N, P, 3 * ps^2]
    image_position_ids: torch.Tensor  # [N, P, 2]
    num_soft_tokens: list[int]

    _digests: list[int] | None = field(default=None, repr=False, compare=False)

    def mm_token_type_ids(self, ids: list[int], image_token_id: int) -> torch.Tensor:
        """[1, S]: 1 at image tokens, 0 elsewhere (the reference processor's ``mm_token_type_ids``)."""
        return (torch.tensor([ids]) == image_token_id).long()

    # ------------------------------------------------------------------ prefix caching
    def digests(self) -> list[int]:
        """Per image, a 128-bit digest (BLAKE2b) of what the vision tower reads: its pixel values, patch positions
        and soft-token count. Computed once."""
        if self._digests is None:
            out = []
            for n, count in enumerate(self.num_soft_tokens):
                h = hashlib.blake2b(digest_size=16)
                for t in (self.pixel_values[n], self.image_position_ids[n]):
                    t = t.detach().cpu().contiguous()
                    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                h.update(str(count).encode())
                out.append(int.from_bytes(h.digest(), "little"))
            self._digests = out
        return self._digests

    def cache_keys(self, ids: list[int], image_token_id: int) -> list:
        """``ids`` with each image token replaced by ``("image", digest of its image)`` (the images' soft tokens in
        order, as the encode scatters them): the prefix cache's key of a prompt with images. Equal placeholder ids
        no longer say "the same prompt" unless the images are the same too; text before the first image keys as
        plain text."""
        image_of = [n for n, c in enumerate(self.num_soft_tokens) for _ in range(c)]
        d, out, k = self.digests(), [], 0
        for t in ids:
            if t == image_token_id and k < len(image_of):
                out.append(("image", d[image_of[k]]))
                k += 1
            else:
                out.append(t)
        return out

    def splits_at(self, ids: list[int], image_token_id: int, r: int) -> bool:
        """Whether the encode may start at position ``r`` (reusing ``ids[:r]`` from the cache): not inside a run of
        image tokens (an image's tokens see each other both ways, so they are encoded in one pass) and with whole
        images on each side."""
        if 0 < r < len(ids) and ids[r - 1] == image_token_id and ids[r] == image_token_id:
            return False
        return sum(1 for t in ids[:r] if t == image_token_id) in (0, *accumulate(self.num_soft_tokens))

    def after(self, ids: list[int], image_token_id: int, r: int) -> "ImageInputs | None":
        """The images whose tokens lie in ``ids[r:]`` (``splits_at(r)``), or None when all lie before ``r``."""
        before = sum(1 for t in ids[:r] if t == image_token_id)
        first = next(i for i, c in enumerate((0, *accumulate(self.num_soft_tokens))) if c == before)
        if first == len(self.num_soft_tokens):
            return None
        if first == 0:
            return self
        return ImageInputs(self.pixel_values[first:], self.image_position_ids[first:], self.num_soft_tokens[first:],
                           None if self._digests is None else self._digests[first:])


class ImagePrompter:
    """Expands image placeholders and processes the images for one model (``None`` images: nothing to do)."""

    def __init__(self, processor: ImageProcessor | None, image_token_id: int | None, boi_token_id: int | None,
                 eoi_token_id: int | None, has_vision: bool, placeholder: str = "<|image|>"):
        self.processor = processor
        self.image_id, self.boi_id, self.eoi_id = image_token_id, boi_token_id, eoi_token_id
        self.has_vision = has_vision
        self.placeholder = placeholder  # the image token's text, for messages
        self.vocab_size: int | None = None

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
        out = cls(proc, cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id, has_vision, text or "<|image|>")
        out.vocab_size = model.vocab_size
        return out

    def check_can_take_images(self) -> None:
        if not self.has_vision:
            raise ValueError("the model has no vision tower (a text-only checkpoint): it cannot take images")
        if self.vocab_size is not None and not all(
                t is not None and 0 <= t < self.vocab_size for t in (self.image_id, self.boi_id, self.eoi_id)):
            raise ValueError(f"the model cannot take images: its image token ids ({self.boi_id}, {self.image_id}, "
                             f"{self.eoi_id}) are not all inside its vocabulary of {self.vocab_size}")

    def check_texts(self, messages) -> None:
        """On a model that takes images, no message text may hold the image token's text (``ParamError``)."""
        if self.has_vision:
            refuse_image_token_text(messages, self.placeholder)

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
