"""The DiffusionGemma denoising step, as pure functions of (logits, random numbers, per-row params, canvas state).

One step, for each canvas of a batch (``logits`` [B, C, V], soft-capped, from ``model.denoise``):

1. temperature: linear schedule t_max -> t_min over the remaining steps (step n of N uses
   t = t_min + (t_max - t_min) * (N - n) / N, computed in fp32 like the reference);
2. entropy of every position; accept the lowest-entropy positions while
   (cumulative entropy - the largest accepted) <= entropy_bound;
3. accepted positions take a token sampled from the tempered distribution, the others are renoised
   with uniform random tokens;
4. the canvas is finished when the argmax canvas was stable for ``stability_threshold`` steps and the
   mean entropy is below ``confidence_threshold`` (or the step cap is hit); the argmax canvas is committed;
5. the tempered distribution, as a soft embedding, conditions the next step.

``default_step`` runs the whole batch at once with per-row parameters as tensors and no host
synchronisation (no ``.item()``, ``.tolist()``, ``nonzero`` or boolean indexing, no data-dependent
shape): its random numbers are counter-based hashes of (seed, canvas, step, position) from
``counter_rng``, so a row's draws do not depend on the batch. Its [B, C, V] work happens in place in
the one logits buffer, ``ROW_CHUNK`` rows at a time, so the temporaries stay a few ``ROW_CHUNK x V``
buffers whatever the batch.

``reference_step`` draws random numbers exactly as the transformers reference does (a full-vocabulary
sample at every position, then a full-canvas ``randint`` from the request's ``torch.Generator``), one
canvas at a time, so seeded runs are token-for-token equal to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kv_cache import to_device
from . import counter_rng
from .penalties import apply_penalties, penalty_rows
from .truncation import row_params, truncate

ROW_CHUNK = 32  # rows of [B*C, V] processed at once: bounds the temporaries to a few ROW_CHUNK x V buffers


@dataclass
class StepResult:
    canvas: torch.Tensor  # [..., C] next canvas (accepted tokens kept, the rest renoised)
    argmax: torch.Tensor  # [..., C] argmax canvas (the draft; committed when the canvas finishes)
    accepted: torch.Tensor  # [..., C] bool, positions accepted this step
    entropy: torch.Tensor  # [..., C]
    probs: torch.Tensor  # [..., C, V] tempered distribution (for self-conditioning); the logits buffer
    mean_entropy: torch.Tensor  # [...] mean entropy over the free (non-template) positions
    confident: torch.Tensor  # [...] bool: mean_entropy < confidence_threshold


@dataclass
class RowParams:
    """Per-row sampling parameters of a batch, as tensors on the logits' device (built once per tick)."""

    step: torch.Tensor  # int32 [B] 0-based denoising step within the canvas
    max_steps: torch.Tensor  # int32 [B]
    t_min: torch.Tensor  # fp32 [B]
    t_span: torch.Tensor  # fp32 [B] t_max - t_min (rounded from double like the reference's python scalar)
    entropy_bound: torch.Tensor  # fp32 [B]
    confidence: torch.Tensor  # fp32 [B] confidence_threshold
    seed: torch.Tensor  # int64 [B]
    canvas_index: torch.Tensor  # int64 [B] which canvas of the request this is (0, 1, ...)
    fixed: torch.Tensor | None = None  # bool [B, C] template positions (None: no row has any)
    template: torch.Tensor | None = None  # int64 [B, C] their tokens (0 elsewhere)
    disallowed: torch.Tensor | None = None  # bool [B, V] tokens a row may never draw (None: no row has any)
    # Truncation of the distribution a token is drawn from (None: no row sets it; rows that do not get the
    # value that cuts nothing: top_k = V, top_p = 1, min_p = 0).
    top_k: torch.Tensor | None = None  # int64 [B]
    top_p: torch.Tensor | None = None  # fp32 [B]
    min_p: torch.Tensor | None = None  # fp32 [B]
    # temperature 0 (``greedy`` rows): accepted positions take the argmax instead of a draw (None: no row is).
    greedy: torch.Tensor | None = None  # bool [B]
    all_greedy: bool = False  # host: every row is greedy, so nothing is drawn (no CDF over the vocabulary)
    # Penalties and logit_bias, applied to the logits before anything else (None: no row sets any):
    # ``rep`` divides positive / multiplies negative logits of seen tokens (1 elsewhere), then ``bias`` is added
    # (logit_bias - presence_penalty * [in output] - frequency_penalty * count in output).
    rep: torch.Tensor | None = None  # fp32 [B, V]
    bias: torch.Tensor | None = None  # fp32 [B, V]

    @property
    def truncates(self) -> bool:
        return self.top_k is not None or self.top_p is not None or self.min_p is not None

    @classmethod
    def build(cls, rows: list[dict], device, canvas_length: int, vocab_size: int) -> "RowParams":
        """rows: dicts with step, max_steps, t_min, t_max, entropy_bound, confidence, seed, canvas_index and
        optional fixed [C] bool / template [C] / allowed (list of ids) / top_k / top_p / min_p. One host-to-device
        copy per field."""
        device = torch.device(device)

        def col(key, dtype):  # pinned + non-blocking on CUDA: a pageable copy would wait for the device
            return to_device(torch.tensor([r[key] for r in rows], dtype=dtype), device)

        span = torch.tensor([r["t_max"] - r["t_min"] for r in rows], dtype=torch.float32)
        out = cls(step=col("step", torch.int32), max_steps=col("max_steps", torch.int32),
                  t_min=col("t_min", torch.float32), t_span=to_device(span, device),
                  entropy_bound=col("entropy_bound", torch.float32), confidence=col("confidence", torch.float32),
                  seed=col("seed", torch.int64), canvas_index=col("canvas_index", torch.int64))
        if any(r.get("fixed") is not None for r in rows):
            C = canvas_length
            out.fixed = torch.stack([r["fixed"].to(device) if r.get("fixed") is not None
                                     else torch.zeros(C, dtype=torch.bool, device=device) for r in rows])
            out.template = torch.stack([r["template"].to(device) if r.get("fixed") is not None
                                        else torch.zeros(C, dtype=torch.long, device=device) for r in rows])
        if any(r.get("disallowed") is not None for r in rows):
            out.disallowed = torch.stack([r["disallowed"].to(device) if r.get("disallowed") is not None
                                          else torch.zeros(vocab_size, dtype=torch.bool, device=device)
                                          for r in rows])
        if any(r.get("greedy") for r in rows):
            out.greedy = col("greedy", torch.bool)
            out.all_greedy = all(r.get("greedy") for r in rows)
        out.rep, out.bias = penalty_rows(rows, vocab_size, device)
        out.top_k = row_params([r.get("top_k") for r in rows], vocab_size, torch.int64, device)
        out.top_p = row_params([r.get("top_p") for r in rows], 1.0, torch.float32, device)
        out.min_p = row_params([r.get("min_p") for r in rows], 0.0, torch.float32, device)
        return out


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Temperature of 0-based ``step``; the reference counts remaining steps N..1 and computes in fp32."""
    remaining = torch.tensor(max_steps - step, dtype=torch.int32)
    return t_min + (t_max - t_min) * (remaining / max_steps)


def row_temperature(p: RowParams) -> torch.Tensor:
    """fp32 [B]: ``temperature`` for every row at once, bit-equal to the scalar version."""
    return p.t_min + p.t_span * ((p.max_steps - p.step) / p.max_steps)


def acceptance_mask(entropy: torch.Tensor, entropy_bound) -> torch.Tensor:
    """entropy [..., C] -> bool [..., C]: the lowest-entropy positions whose summed entropy minus the largest
    of them stays within the bound (an upper bound on their joint mutual information). ``entropy_bound``:
    a number or a tensor [...] (one bound per row)."""
    if isinstance(entropy_bound, torch.Tensor):
        entropy_bound = entropy_bound[..., None]
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
                   t_max: float, entropy_bound: float, generator: torch.Generator,
                   confidence_threshold: float = 0.0) -> StepResult:
    """The reference's step for one canvas ([C, V]), drawing from ``generator`` in the reference's order."""
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
    mean_h = h.mean()
    return StepResult(new_canvas, argmax, accepted, h, probs, mean_h, mean_h < confidence_threshold)


def initial_canvas(seed: torch.Tensor, canvas_index: torch.Tensor, canvas_length: int, vocab_size: int,
                   fixed: torch.Tensor | None = None, template: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C] uniform random tokens for a canvas's start (step -1 of the counter-based streams)."""
    step = torch.full_like(seed, -1)
    c = counter_rng.randint(seed, canvas_index, step, counter_rng.INIT, canvas_length, vocab_size)
    return c if fixed is None else torch.where(fixed, template, c)


@torch.no_grad()
def default_step(logits: torch.Tensor, canvas: torch.Tensor, p: RowParams) -> StepResult:
    """One step for a batch of canvases, ``logits`` [B, C, V] fp32 (overwritten with the tempered
    probabilities, returned as ``probs``), ``canvas`` [B, C]. Same distribution as ``reference_step``;
    random numbers are counter-based (``counter_rng``), so a row's result does not depend on the others.

    Penalties and logit_bias (``p.rep`` / ``p.bias``) change the logits first; greedy rows (``p.greedy``) take
    the argmax at accepted positions. Template positions (``p.fixed``) are always accepted with their template
    token and left out of the entropy budget and the confidence mean; ``p.disallowed`` tokens get probability
    zero. ``p.top_k`` /
    ``p.top_p`` / ``p.min_p`` cut the distribution a token is drawn from (``truncation.truncate``); entropy,
    acceptance, the argmax and the returned probabilities use the whole tempered distribution.
    """
    B, C, V = logits.shape
    if p.rep is not None or p.bias is not None:
        apply_penalties(logits, p.rep, p.bias, ROW_CHUNK)
    if p.disallowed is not None:
        logits.masked_fill_(p.disallowed[:, None, :], float("-inf"))  # broadcast, in place
    logits.div_(row_temperature(p)[:, None, None])
    argmax = logits.argmax(dim=-1)  # [B, C]
    h, sampled = entropy_and_draw(logits, lambda: counter_rng.uniform(p.seed, p.canvas_index, p.step.long(),
                                                                      counter_rng.SAMPLE, C), p, argmax)
    noise = counter_rng.randint(p.seed, p.canvas_index, p.step.long(), counter_rng.RENOISE, C, V)
    new_canvas, argmax, accepted, mean_h = accept_and_renoise(h, argmax, sampled, noise, p)
    return StepResult(new_canvas, argmax, accepted, h, logits, mean_h, mean_h < p.confidence)


def entropy_and_draw(logits: torch.Tensor, uniforms, p: RowParams,
                     argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tempered ``logits`` [B, S, V] (overwritten with their probabilities), ``uniforms()`` -> one uniform per
    position [B, S], ``argmax`` [B, S] of the logits -> (entropy fp32 [B, S], sampled token [B, S]), ``ROW_CHUNK``
    positions at a time. ``default_step`` passes the whole canvas (S = C); fast mode (``engine/fast.py``) only its
    undecided positions. Greedy rows (temperature 0) take the argmax; when every row is greedy nothing is drawn
    (no uniforms, no cumulative sum and search over the vocabulary)."""
    B, S, V = logits.shape
    dev = logits.device
    flat = logits.view(B * S, V)
    h = torch.empty(B * S, dtype=torch.float32, device=dev)
    draw = not p.all_greedy
    if draw:
        sampled = torch.empty(B * S, dtype=torch.long, device=dev)
        u = uniforms().reshape(B * S, 1)
        cdf = torch.empty(min(ROW_CHUNK, B * S), V, dtype=torch.float32, device=dev)
    for i in range(0, B * S, ROW_CHUNK):
        rows = flat[i:i + ROW_CHUNK]
        n = rows.shape[0]
        probs = torch.softmax(rows, dim=-1, dtype=torch.float32)  # fp32 whatever the logits' dtype
        # entropy = logsumexp(l) - sum(p * l): 2x cheaper than summing entr(p) (a log per entry); disallowed
        # tokens (-inf, probability 0) are clamped to the lowest float first so that 0 * l stays 0
        if p.disallowed is not None:
            rows.clamp_(min=torch.finfo(rows.dtype).min)
        h[i:i + n] = torch.logsumexp(rows, dim=-1) - torch.linalg.vecdot(probs, rows.to(torch.float32))
        rows.copy_(probs)
        if not draw:
            continue
        # Inverse-CDF sampling (``inverse_cdf_draw``): one uniform per position instead of V exponentials.
        if p.truncates:  # per position: its row's cut (rows that set none are left bit-identical)
            r = torch.arange(i, i + n, device=dev) // S
            probs = truncate(probs, *(None if t is None else t[r] for t in (p.top_k, p.top_p, p.min_p)))
        sampled[i:i + n] = inverse_cdf_draw(probs, u[i:i + n], out=cdf[:n])
    h = h.clamp_(min=0.0).view(B, S)  # the difference can round to -1e-7 on a one-hot row
    if not draw:
        return h, argmax
    sampled = sampled.view(B, S)
    if p.greedy is not None:  # temperature 0: the argmax where a row is greedy
        sampled = torch.where(p.greedy[:, None], argmax, sampled)
    return h, sampled


def inverse_cdf_draw(probs: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """probs [N, V] (need not sum to 1; cut or masked tokens at 0), u [N, 1] uniforms in [0, 1) -> one token per
    row [N]. The target is kept strictly below the row's total, so a token of probability zero is never picked.
    ``out``: an [N, V] fp32 buffer for the cumulative sum."""
    V = probs.shape[-1]
    c = torch.cumsum(probs, dim=-1, out=out)
    total = c[:, -1:]
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(c, x, right=True).clamp_(max=V - 1).view(-1)


def accept_and_renoise(h: torch.Tensor, argmax: torch.Tensor, sampled: torch.Tensor, noise: torch.Tensor,
                       p: RowParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole canvases [B, C] -> (next canvas, argmax, accepted, mean entropy [B]): the entropy-bound acceptance,
    template positions (``p.fixed``) always accepted with their token and left out of the budget and the mean."""
    if p.fixed is not None:
        free = ~p.fixed
        accepted = acceptance_mask(h.masked_fill(p.fixed, 0.0), p.entropy_bound) | p.fixed
        n_free = free.sum(-1)
        mean_h = torch.where(n_free > 0, (h * free).sum(-1) / n_free.clamp(min=1), torch.zeros_like(h[:, 0]))
        argmax = torch.where(p.fixed, p.template, argmax)
        new_canvas = torch.where(p.fixed, p.template, torch.where(accepted, sampled, noise))
    else:
        accepted = acceptance_mask(h, p.entropy_bound)
        mean_h = h.mean(-1)
        new_canvas = torch.where(accepted, sampled, noise)
    return new_canvas, argmax, accepted, mean_h


def same_as_previous(argmax: torch.Tensor, previous: torch.Tensor, has_previous: torch.Tensor) -> torch.Tensor:
    """bool [B]: the argmax canvas equals the previous step's (the stability rule's unit), on the device."""
    return (argmax == previous).all(-1) & has_previous
