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

from ..kv_cache import KVCache

EPS = 1e-3


class _Row:
    """One row of a ``TrainCache``: records each layer's keys/values as ``encode`` appends them."""

    def __init__(self, n_layers: int):
        self.keys: list[list] = [[] for _ in range(n_layers)]
        self.values: list[list] = [[] for _ in range(n_layers)]
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[layer].append(k)
        self.values[layer].append(v)

    def fork(self) -> "_Row":
        out = _Row(len(self.keys))
        out.keys = [list(x) for x in self.keys]
        out.values = [list(x) for x in self.values]
        out.length = self.length
        return out


class TrainCache(KVCache):
    """A ``KVCache`` for training batches: rows keep their chunks in lists (joined once per read, never grown by
    copying) and every position (a training sequence must fit the sliding window); autograd flows through."""

    def __init__(self, rows: list[_Row]):
        self.seqs = rows

    @classmethod
    def empty(cls, n_layers: int, batch_size: int) -> "TrainCache":
        return cls([_Row(n_layers) for _ in range(batch_size)])

    def fork(self, rows: list[int] | None = None) -> "TrainCache":
        pick = self.seqs if rows is None else [self.seqs[i] for i in rows]
        return TrainCache([s.fork() for s in pick])

    def layer_kv(self, layer: int) -> list:
        """Per row: (keys, values) [Hkv, P, D] of ``layer``, or None (the KVCache interface)."""
        out = []
        for s in self.seqs:
            ks, vs = s.keys[layer], s.values[layer]
            if not ks:
                out.append(None)
            else:
                out.append((ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, dim=1), torch.cat(vs, dim=1)))
        return out


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
    cache = TrainCache.empty(len(model.layers), B)
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
