"""The DiffusionGemma training objective ("base-sft"): decoder diffusion loss + encoder next-token loss.

For a batch of (prompt, answer) pairs, answer = one canvas of ``C`` tokens:

- **encoder**: causal pass over [prompt; answer] (``model.encode``), cross-entropy of the soft-capped
  next-token logits on the answer tokens (the last prompt position predicts ``answer[0]``);
- **decoder**: draw ``t ~ U(eps, 1 - eps)`` per example, replace each canvas token with probability ``t`` by a
  uniformly random vocabulary token (uniform-state noise), denoise it against the *prompt's* cached
  keys/values, cross-entropy against the clean canvas over every canvas position;
- **self-conditioning**: with probability ``sc_prob`` per example a first, gradient-free denoise pass gives
  logits that condition the second; the other examples get a zeroed signal through
  ``self_conditioning_mask`` (softmax of zero logits would be a uniform belief, not "no signal").

``fixed`` (optional, [B, C] bool) marks infill positions that are never noised (``--clamp-givens``): the
canvas_template positions of the matching inference mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LayerSpec
from ..kv_cache import Prefix

EPS = 1e-3


class TrainCache:
    """The cache of a training batch (the view interface of ``kv_cache.KVCache``): per layer, the batch's key/value
    chunks ``[B, Hkv, S_i, D]`` in a list (joined once per read, never grown by copying), every position kept (a
    training sequence must fit the sliding window); autograd flows through. Every row encodes the same tokens
    count per call (training batches are rectangular)."""

    def __init__(self, specs: list[LayerSpec], batch_size: int):
        self.specs = specs
        self.batch_size = batch_size
        self.keys: list[list] = [[] for _ in specs]
        self.values: list[list] = [[] for _ in specs]
        self.length = 0

    @classmethod
    def empty(cls, specs: list[LayerSpec], batch_size: int) -> "TrainCache":
        return cls(specs, batch_size)

    @property
    def lengths(self) -> list[int]:
        return [self.length] * self.batch_size

    def fork(self, rows: list[int] | None = None) -> "TrainCache":
        """A copy that can grow on its own (chunks are shared, not copied); ``rows`` picks (and repeats) rows."""
        out = TrainCache(self.specs, self.batch_size if rows is None else len(rows))
        pick = (lambda t: t) if rows is None else (lambda t: t[torch.as_tensor(rows, device=t.device)])
        out.keys = [[pick(t) for t in ks] for ks in self.keys]
        out.values = [[pick(t) for t in vs] for vs in self.values]
        out.length = self.length
        return out

    def begin(self, new_tokens, width: int, device, dtype) -> "_TrainView":
        if new_tokens is not None and any(n != width for n in new_tokens):
            raise ValueError("a TrainCache encodes the same number of tokens in every row")
        return _TrainView(self, new_tokens is not None, width, torch.device(device), dtype)


class _TrainView:
    def __init__(self, cache: TrainCache, encoding: bool, width: int, device, dtype):
        self.cache, self.encoding, self.width, self.device, self.dtype = cache, encoding, width, device, dtype
        self.lengths = cache.lengths
        self.start = torch.full((cache.batch_size,), cache.length, dtype=torch.long, device=device)

    def prefix(self, window) -> Prefix:
        B, L = self.cache.batch_size, self.cache.length
        pos = torch.arange(L, device=self.device)[None].expand(B, L)
        lo = 0 if window is None else max(0, L - (window - 1))
        return Prefix(pos, torch.ones(B, L, dtype=torch.bool, device=self.device), [(lo, L)] * B, window)

    def sources(self, layer: int):
        return (*self.read(layer), None)

    def read(self, layer: int):
        ks, vs = self.cache.keys[layer], self.cache.values[layer]
        if not ks:
            spec = self.cache.specs[layer]
            empty = torch.zeros(self.cache.batch_size, spec.num_kv_heads, 0, spec.head_dim, device=self.device,
                                dtype=self.dtype)
            return empty, empty
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def write(self, layer: int, k_new, v_new) -> None:
        self.cache.keys[layer].append(k_new)
        self.cache.values[layer].append(v_new)

    def commit(self) -> None:
        self.cache.length += self.width


@dataclass
class LossOutput:
    loss: torch.Tensor
    decoder: float
    encoder: float
    noised_fraction: float
    canvas_accuracy: float  # argmax == clean over the noised positions


def corrupt(answer: torch.Tensor, vocab_size: int, generator: torch.Generator, eps: float = EPS,
            fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform-state noise: answer [B, C] -> (noisy [B, C], noised [B, C] bool)."""
    B, C = answer.shape
    dev = answer.device
    t = torch.rand(B, 1, generator=generator, device=dev) * (1 - 2 * eps) + eps  # [B, 1]
    noised = torch.rand(B, C, generator=generator, device=dev) < t
    if fixed is not None:
        noised &= ~fixed
    random_tokens = torch.randint(0, vocab_size, (B, C), generator=generator, device=dev)
    return torch.where(noised, random_tokens, answer), noised


def diffusion_loss(model, prompt: torch.Tensor, answer: torch.Tensor, generator: torch.Generator,
                   fixed: torch.Tensor | None = None, sc_prob: float = 0.5, eps: float = EPS,
                   encoder_weight: float = 1.0, decoder_weight: float = 1.0,
                   canvases_per_prompt: int = 1) -> LossOutput:
    """prompt [B, P], answer [B, C] (C = the model's canvas length), both on the model's device.

    ``canvases_per_prompt`` K > 1 denoises K independently noised copies of each answer against the same
    encoded prompt (one encoder pass, K decoder passes): more decoder signal per encoder FLOP."""
    invariant = getattr(model, "batch_invariant", None)
    if invariant:
        # Per-row expert dispatch keeps inference batch-invariant; training wants one batched dispatch.
        model.batch_invariant = False
    try:
        return _diffusion_loss(model, prompt, answer, generator, fixed, sc_prob, eps, encoder_weight,
                               decoder_weight, canvases_per_prompt)
    finally:
        if invariant:
            model.batch_invariant = invariant


def _diffusion_loss(model, prompt, answer, generator, fixed, sc_prob, eps, encoder_weight, decoder_weight,
                    canvases_per_prompt) -> LossOutput:
    B, C = answer.shape
    if C != model.canvas_length:
        raise ValueError(f"answers must be one canvas ({model.canvas_length} tokens), got {C}")
    V = model.vocab_size
    window = min((s.sliding_window for s in model.text.layers if s.sliding_window), default=None)
    if window is not None and prompt.shape[1] + C > window:
        raise ValueError(f"prompt + canvas ({prompt.shape[1] + C}) must fit the sliding window ({window})")
    cache = TrainCache.empty(model.text.layers, B)
    enc_prompt = model.encode(prompt, cache, logits="all")  # [B, P, V]
    prompt_cache = cache.fork()  # the decoder sees only the prompt
    enc_answer = model.encode(answer, cache, logits="all")  # [B, C, V]
    enc_logits = torch.cat([enc_prompt[:, -1:], enc_answer[:, :-1]], dim=1)  # [B, C, V]: predicts answer
    enc_loss = F.cross_entropy(enc_logits.reshape(-1, V), answer.reshape(-1))

    if canvases_per_prompt > 1:
        K = canvases_per_prompt
        prompt_cache = prompt_cache.fork([b for b in range(B) for _ in range(K)])
        answer = answer.repeat_interleave(K, dim=0)  # [B*K, C]
        fixed = None if fixed is None else fixed.repeat_interleave(K, dim=0)
        B = B * K
    noisy, noised = corrupt(answer, V, generator, eps, fixed)
    use_sc = torch.rand(B, generator=generator, device=answer.device) < sc_prob  # [B]
    sc_logits = None
    if bool(use_sc.any()):
        idx = use_sc.nonzero()[:, 0]
        with torch.no_grad():  # first pass only for the rows that use it
            first = model.denoise(noisy[idx], prompt_cache.fork(idx.tolist()))  # [b, C, V]
        sc_logits = torch.zeros(B, C, V, device=first.device, dtype=first.dtype)
        sc_logits[idx] = first
    logits = model.denoise(noisy, prompt_cache, self_conditioning_logits=sc_logits,
                           self_conditioning_mask=use_sc)
    dec_loss = F.cross_entropy(logits.reshape(-1, V), answer.reshape(-1))
    loss = decoder_weight * dec_loss + encoder_weight * enc_loss
    with torch.no_grad():
        hit = (logits.argmax(-1) == answer) & noised
        acc = float(hit.sum()) / max(1, int(noised.sum()))
    return LossOutput(loss, float(dec_loss.detach()), float(enc_loss.detach()), float(noised.float().mean()), acc)
