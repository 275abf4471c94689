"""Offline API in the shape vLLM users know: ``LLM(path).generate(...)`` and ``LLM(path).chat(...)``.

All prompts of one call are admitted together and batched by the engine tick by tick.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from ..config import GenerationDefaults
from ..loader import is_gguf, load_model, resolve_path
from ..model import DiffusionGemma
from ..sampling.params import SamplingParams
from .engine import Engine
from .model_state import Event, Metrics, ModelState


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only; ends with the EOS id when it stopped on EOS
    text: str | None
    finish_reason: str  # "stop" | "length" | "abort"
    metrics: Metrics


def load_tokenizer(path: str):
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        return None
    from ..tokenizer import Tokenizer
    return Tokenizer.from_dir(path)


class LLM:
    """``deterministic=True``: a seeded request's output is bit-identical alone or in any batch (the model and
    the sampler compute every request as they would alone; slower under load). The default batches the whole
    tick; a seed then fixes every random draw, but batched arithmetic may round differently (see
    docs/serving.md, "What a seed guarantees"). ``quantization``: see blockdiff/quant (a ``.gguf`` path brings
    its own configuration, weights and tokenizer)."""

    def __init__(self, model: str, dtype="auto", device: str = "cpu", max_num_seqs: int = 64,
                 deterministic: bool = False, quantization: str | None = None, quantize_embedding: bool = True):
        if is_gguf(model):  # config, weights and tokenizer all come from the one file
            from ..quant.gguf import load_gguf
            self.model_path = model
            self.model, self.tokenizer, self.defaults = load_gguf(model, dtype=dtype, device=device,
                                                                  quantization=quantization,
                                                                  quantize_embedding=quantize_embedding)
            self.model.batch_invariant = bool(deterministic)
            self.engine = Engine(self.model, self.defaults, self.tokenizer, max_num_seqs=max_num_seqs)
            return
        path = resolve_path(model)
        self.model_path = path
        self.model = load_model(path, dtype=dtype, device=device, quantization=quantization,
                                quantize_embedding=quantize_embedding)
        self.model.batch_invariant = bool(deterministic)
        self.defaults = GenerationDefaults.from_dir(path, self.model.text.eos_ids)
        self.tokenizer = load_tokenizer(path)
        self.engine = Engine(self.model, self.defaults, self.tokenizer, max_num_seqs=max_num_seqs)

    @property
    def deterministic(self) -> bool:
        return self.engine.deterministic

    @classmethod
    def from_model(cls, model: DiffusionGemma, tokenizer=None, generation_defaults: GenerationDefaults | None = None,
                   max_num_seqs: int = 64, deterministic: bool | None = None) -> "LLM":
        """Wrap a model already in memory; ``deterministic=None`` keeps its ``batch_invariant`` setting."""
        self = cls.__new__(cls)
        if deterministic is not None:
            model.batch_invariant = bool(deterministic)
        self.model_path = None
        self.model, self.tokenizer = model, tokenizer
        self.defaults = generation_defaults or GenerationDefaults.from_dict({}, model.text.eos_ids)
        self.engine = Engine(model, self.defaults, tokenizer, max_num_seqs=max_num_seqs)
        return self

    # ------------------------------------------------------------------ prompts
    def _encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass prompt_token_ids instead of text")
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def _decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        on_event: Callable[[Event], None] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts (text) or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is not None:
            texts = list(prompts)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("prompts must be strings (use prompt_token_ids for token ids)")
            id_lists = [self._encode_text(t) for t in texts]
        else:
            id_lists = [list(x) for x in prompt_token_ids]
            if id_lists and isinstance(id_lists[0], int):
                raise ValueError("prompt_token_ids must be a list of token-id lists")
            texts = [None] * len(id_lists)
        if not id_lists:
            return []
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(id_lists)
        else:
            params = list(sampling_params)
            if len(params) != len(id_lists):
                raise ValueError(f"{len(params)} sampling params for {len(id_lists)} prompts")
        # Validate everything before running anything: a bad request never half-runs a batch.
        states = [self.engine.make_state(ids, p, on_event=on_event, request_index=i)
                  for i, (ids, p) in enumerate(zip(id_lists, params))]
        return self._run(states, texts, use_tqdm)

    def _run(self, states: list[ModelState], texts, use_tqdm: bool) -> list[RequestOutput]:
        for s in states:
            self.engine.scheduler.add(s)
        pending = {s.request_id for s in states}
        done = 0
        try:
            while pending:
                for s in self.engine.step():
                    if s.request_id in pending:
                        pending.discard(s.request_id)
                        done += 1
                        if use_tqdm:
                            print(f"\r[blockdiff] {done}/{len(states)} requests done", end="", file=sys.stderr)
        except BaseException:
            for rid in pending:  # leave no half-run request behind in the engine
                self.engine.abort(rid)
            raise
        if use_tqdm:
            print(file=sys.stderr)
        outs = []
        for s, text in zip(states, texts):
            out_text = self._decode(s.output_ids)
            if out_text is not None and s.params.stop and s.constraint is None:  # stops never cut constrained text
                cut = min((out_text.find(x) for x in s.params.stop if x in out_text), default=-1)
                if cut >= 0:
                    out_text = out_text[:cut]
            outs.append(RequestOutput(s.request_id, text, s.prompt_ids, list(s.output_ids), out_text,
                                      s.finish_reason, s.metrics))
        return outs

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, rendered with the
        checkpoint's chat template."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer, so it has no chat template")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        convs = [messages] if isinstance(messages[0], dict) else messages
        ids = [self.tokenizer.encode_chat(c, add_generation_prompt=True, **(chat_template_kwargs or {}))
               for c in convs]
        return self.generate(prompt_token_ids=ids, sampling_params=sampling_params, on_event=on_event)

