"""The DiffusionGemma denoising step, as pure functions of (logits, generator, params, canvas state).

One step, for one request's canvas (``logits`` [C, V], soft-capped, from ``model.denoise``):

1. temperature: linear schedule t_max -> t_min over the remaining steps (step n of N uses
   t = t_min + (t_max - t_min) * (N - n) / N, computed in fp32 like the reference);
2. entropy of every position; accept the lowest-entropy positions while
   (cumulative entropy - the largest accepted) <= entropy_bound;
3. accepted positions take a token sampled from the tempered distribution, the others are renoised
   with uniform random tokens;
4. the canvas is finished when the argmax canvas was stable for ``stability_threshold`` steps and the
   mean entropy is below ``confidence_threshold`` (or the step cap is hit); the argmax canvas is committed;
5. the tempered distribution, as a soft embedding, conditions the next step.

``reference_step`` draws random numbers exactly as the transformers reference does (a full-vocabulary
sample at every position, then a full-canvas ``randint``), so seeded runs are token-for-token equal.
``fast_step`` keeps the same distribution but samples only the accepted positions and keeps the
[C, V] temporaries to the one logits buffer (processed in row chunks, in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .truncation import truncate

ROW_CHUNK = 32  # rows of [C, V] processed at once in fast_step: bounds temporaries to ROW_CHUNK x V


@dataclass
class StepResult:
    canvas: torch.Tensor  # [C] next canvas (accepted tokens kept, the rest renoised)
    argmax: torch.Tensor  # [C] argmax canvas (the draft; committed when the canvas finishes)
    accepted: torch.Tensor  # [C] bool, positions accepted this step
    entropy: torch.Tensor  # [C]
    probs: torch.Tensor  # [C, V] tempered distribution (for self-conditioning)
    mean_entropy: float


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Temperature of 0-based ``step``; the reference counts remaining steps N..1 and computes in fp32."""
    remaining = torch.tensor(max_steps - step, dtype=torch.int32)
    return t_min + (t_max - t_min) * (remaining / max_steps)


def acceptance_mask(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """entropy [..., C] -> bool [..., C]: the lowest-entropy positions whose summed entropy minus the largest
    of them stays within the bound (an upper bound on their joint mutual information)."""
    sorted_h, order = torch.sort(entropy, dim=-1, descending=False)
    keep = torch.cumsum(sorted_h, dim=-1) - sorted_h <= entropy_bound
    return torch.scatter(torch.zeros_like(keep), -1, order, keep)


def reference_entropy(processed: torch.Tensor) -> torch.Tensor:
    """Entropy exactly as torch.distributions.Categorical(logits=...).entropy() computes it (its clamp to the
    dtype's min is a no-op for the finite, soft-capped logits and is skipped)."""
    norm = processed - processed.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(norm, dim=-1)
    return -(norm * probs).sum(-1)


def reference_step(logits: torch.Tensor, canvas: torch.Tensor, step: int, max_steps: int, t_min: float,
                   t_max: float, entropy_bound: float, generator: torch.Generator) -> StepResult:
    """The reference's step for one canvas, drawing from ``generator`` in the reference's order."""
    C, V = logits.shape
    processed = logits / temperature(step, max_steps, t_min, t_max)
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs, num_samples=1, generator=generator).view(C)
    argmax = torch.argmax(processed, dim=-1)
    h = reference_entropy(processed[None])[0]
    accepted = acceptance_mask(h[None], entropy_bound)[0]
    kept = torch.where(accepted, sampled, canvas)
    noise = torch.randint(0, V, (1, C), generator=generator, device=logits.device)[0]
    new_canvas = torch.where(~accepted, noise, kept)
    return StepResult(new_canvas, argmax, accepted, h, probs, float(h.mean()))


def fast_step(logits: torch.Tensor, canvas: torch.Tensor, step: int, max_steps: int, t_min: float, t_max: float,
              entropy_bound: float, generator: torch.Generator, fixed: torch.Tensor | None = None,
              template: torch.Tensor | None = None, disallowed: torch.Tensor | None = None,
              truncation: tuple | None = None) -> StepResult:
    """Same distribution as ``reference_step`` with far less work. Overwrites ``logits`` with the tempered
    probabilities (returned as ``probs``).

    fixed [C] bool / template [C]: infill positions, always accepted with their template token, excluded
    from the entropy budget and the confidence mean. disallowed [K]: token ids that may never be drawn.
    truncation (top_k, top_p, min_p), each None or a number: cut the distribution a token is drawn from at an
    accepted position (``truncation.truncate``); entropy, acceptance, argmax and ``probs`` use the whole one.
    """
    C, V = logits.shape
    if disallowed is not None and disallowed.numel():
        logits.index_fill_(1, disallowed, float("-inf"))
    logits.div_(temperature(step, max_steps, t_min, t_max))
    argmax = logits.argmax(dim=-1)
    h = torch.empty(C, dtype=logits.dtype, device=logits.device)
    for i in range(0, C, ROW_CHUNK):
        p = torch.softmax(logits[i:i + ROW_CHUNK], dim=-1)
        h[i:i + ROW_CHUNK] = torch.special.entr(p).sum(-1)
        logits[i:i + ROW_CHUNK] = p
    probs = logits
    if fixed is not None:
        h_rank = h.masked_fill(fixed, 0.0)
        accepted = acceptance_mask(h_rank[None], entropy_bound)[0] | fixed
        free = ~fixed
        mean_h = float(h[free].mean()) if bool(free.any()) else 0.0
        argmax = torch.where(fixed, template, argmax)
    else:
        accepted = acceptance_mask(h[None], entropy_bound)[0]
        mean_h = float(h.mean())
    new_canvas = torch.randint(0, V, (C,), generator=generator, device=logits.device)
    rows = accepted.nonzero().view(-1)
    if fixed is not None:
        new_canvas = torch.where(fixed, template, new_canvas)
        rows = (accepted & ~fixed).nonzero().view(-1)
    if rows.numel():
        # Inverse-CDF sampling: one uniform per accepted row instead of V exponentials per row.
        p = probs[rows]  # [n, V]
        if truncation is not None:
            n, dev = rows.numel(), logits.device
            k, tp, mp = (None if x is None else torch.full((n,), x, device=dev) for x in truncation)
            p = truncate(p, top_k=k, top_p=tp, min_p=mp)
        cdf = p.cumsum(dim=-1)
        u = torch.rand(rows.numel(), 1, generator=generator, device=logits.device, dtype=cdf.dtype)
        tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=V - 1).view(-1)
        new_canvas[rows] = tok
    return StepResult(new_canvas, argmax, accepted, h, probs, mean_h)


class StabilityTracker:
    """The reference's adaptive stop: the argmax canvas equal to each of the last ``threshold`` ones."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.history: list[torch.Tensor] = []

    def update(self, argmax: torch.Tensor) -> bool:
        if self.threshold == 0:
            return True
        stable = len(self.history) == self.threshold and all(bool(torch.equal(h, argmax)) for h in self.history)
        self.history = (self.history + [argmax])[-self.threshold:]
        return stable
