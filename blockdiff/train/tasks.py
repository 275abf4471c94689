"""Training data as *tasks*: a task makes batches of (prompt, answer[, fixed]) token ids and knows what a
checkpoint of it needs (tokenizer, generation defaults, an optional evaluation).

Every answer is one canvas (``canvas_length`` tokens, padded with ``pad_id`` and ended by EOS when
shorter). Batches are drawn from a ``random.Random`` the trainer owns, so resuming reproduces the stream.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    prompt: torch.Tensor  # [B, P] long
    answer: torch.Tensor  # [B, C] long
    fixed: torch.Tensor | None = None  # [B, C] bool: infill positions (never noised with --clamp-givens)


class Task:
    name = "task"
    vocab_size: int
    canvas_length: int

    def batch(self, step: int, batch_size: int, rng: random.Random) -> Batch:
        raise NotImplementedError

    def init_model(self, model, generator: torch.Generator) -> None:
        """Task-specific initialisation on top of recipes.init_weights (from-scratch runs only)."""

    def evaluate(self, model, step: int) -> dict:
        return {}

    def tokenizer_json(self) -> dict | None:
        return None

    def generation_config(self) -> dict:
        return {"max_new_tokens": self.canvas_length, "eos_token_id": [1], "pad_token_id": 0, "bos_token_id": 2}

    def describe(self, step: int) -> str:
        return ""


class CopyTask(Task):
    """Trivial task for tests: the answer repeats the prompt (tokens 8..vocab-1)."""

    name = "copy"

    def __init__(self, vocab_size: int = 32, canvas_length: int = 8):
        self.vocab_size, self.canvas_length = vocab_size, canvas_length

    def batch(self, step, batch_size, rng):
        rows = [[rng.randrange(8, self.vocab_size) for _ in range(self.canvas_length)] for _ in range(batch_size)]
        ids = torch.tensor(rows)
        prompt = torch.cat([torch.full((batch_size, 1), 2), ids], dim=1)
        return Batch(prompt, ids.clone())


class JsonlTask(Task):
    """Pre-tokenized pairs, one JSON object a line: {"prompt_ids": [...], "answer_ids": [...]}. Every prompt must
    have the same length (training batches are unpadded); answers shorter than the canvas get EOS then pad: by
    default ids 1 and 0, and a fine-tune's the ids of the checkpoint it starts from (``use_generation_config``),
    so the model learns to stop with the id its sampler stops on."""

    name = "jsonl"

    def __init__(self, path: str, vocab_size: int, canvas_length: int, eos_id: int = 1, pad_id: int = 0):
        self.vocab_size, self.canvas_length = vocab_size, canvas_length
        self.eos_id, self.pad_id = eos_id, pad_id
        self.rows = []
        with open(path, "rb") as f:  # decoded line by line: a byte that is not UTF-8 is named with its line
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM (Windows tools) is no error
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: line {n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                     f"{e.start + 1}); --data is a JSON-lines file") from None
                if not line.strip():
                    continue
                p, a = self._parse(line, f"{path}: line {n}")
                if not self.rows:
                    first = n
                elif len(p) != len(self.rows[0][0]):
                    raise ValueError(f"{path}: line {n}: prompt_ids has {len(p)} ids, line {first}'s has "
                                     f"{len(self.rows[0][0])}: every prompt must have the same length (training "
                                     "batches are unpadded)")
                if len(a) > canvas_length:
                    raise ValueError(f"{path}: line {n}: answer_ids has {len(a)} ids, longer than the canvas "
                                     f"({canvas_length}, --canvas-length)")
                self.rows.append((p, a))
        if not self.rows:
            raise ValueError(f"{path}: no examples")

    def _parse(self, line: str, where: str) -> tuple[list[int], list[int]]:
        """One line's ids, checked here: a bad line failed later as a KeyError traceback or as an error about
        ``input_ids`` that named neither the file nor the line."""
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(d, dict):
            raise ValueError(f'{where}: expected an object {{"prompt_ids": [...], "answer_ids": [...]}}')
        out = []
        for key in ("prompt_ids", "answer_ids"):
            ids = d.get(key)
            if not isinstance(ids, list) or not ids:
                raise ValueError(f"{where}: {key} must be a non-empty list of token ids")
            bad = [i for i in ids if type(i) is not int or not 0 <= i < self.vocab_size]  # bool is no id
            if bad:
                bad = bad[0]
                raise ValueError(f"{where}: {key} holds {bad!r}: token ids are integers in [0, {self.vocab_size}) "
                                 "(--vocab-size)")
            out.append(ids)
        return out[0], out[1]

    def use_generation_config(self, gen: dict) -> None:
        """End and pad answers with the stop and pad ids of ``gen`` (a fine-tuned checkpoint's
        generation_config.json): its first ``eos_token_id``, its ``pad_token_id``."""
        eos = gen.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        for name, v in (("eos_id", eos), ("pad_id", gen.get("pad_token_id"))):
            if type(v) is int and 0 <= v < self.vocab_size:
                setattr(self, name, v)

    def generation_config(self) -> dict:
        return {**super().generation_config(), "eos_token_id": [self.eos_id], "pad_token_id": self.pad_id}

    def _answer(self, a: list[int]) -> list[int]:
        return a if len(a) == self.canvas_length else a + [self.eos_id] + [self.pad_id] * (self.canvas_length - len(a) - 1)

    def batch(self, step, batch_size, rng):
        pick = [self.rows[rng.randrange(len(self.rows))] for _ in range(batch_size)]
        return Batch(torch.tensor([p for p, _ in pick]), torch.tensor([self._answer(a) for _, a in pick]))
