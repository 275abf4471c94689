"""Sudoku as a training task: fresh puzzles every batch, a clue-count curriculum, a quick in-training eval.

Curriculum spec: ``"0:45-70,3000:35-65,8000:25-60"`` = from step 0 draw clue counts uniformly in 45..70,
from step 3000 in 35..65, and so on. Training puzzles blank random cells of a random solution grid
(``generate(unique=False)``, ~2k/s); evaluation puzzles are unique (``generate(unique=True)``).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..train.tasks import Batch, Task
from . import format as fmt
from .puzzles import generate, is_valid_solution, random_solution


def parse_curriculum(spec: str) -> list[tuple[int, int, int]]:
    out = []
    for part in spec.split(","):
        try:
            step, rng = part.split(":")
            lo, hi = rng.split("-")
            out.append((int(step), int(lo), int(hi)))
        except ValueError:
            raise ValueError(f"bad curriculum entry {part!r}: expected STEP:MIN-MAX") from None
    out.sort()
    if out[0][0] != 0:
        raise ValueError("the curriculum must start at step 0")
    for _, lo, hi in out:
        if not 0 <= lo <= hi <= 81:
            raise ValueError(f"bad clue range {lo}-{hi}")
    return out


class SudokuTask(Task):
    name = "sudoku"
    vocab_size = fmt.VOCAB_SIZE
    canvas_length = fmt.CANVAS_LENGTH

    def __init__(self, curriculum: str = "0:45-70", eval_puzzles: int = 64, eval_seed: int = 12345,
                 pool_size: int = 0, pool_seed: int = 0, workers: int = 1, device: str = "cpu"):
        """pool_size > 0: draw solution grids once (``workers`` processes), then make every batch with tensor
        ops on ``device`` - random digit relabelling and transposition of a pooled grid, random blanks - so a
        GPU is never waiting on the Python solver. 0: a fresh grid per example from the solver."""
        self.curriculum = parse_curriculum(curriculum)
        self.eval_puzzles = eval_puzzles
        self.eval_seed = eval_seed
        self._eval_set = None
        self.pool = None
        self.device = device
        if pool_size > 0:
            self.pool = solution_pool(pool_size, pool_seed, workers).to(device)  # [N, 81]

    def clue_range(self, step: int) -> tuple[int, int]:
        lo, hi = self.curriculum[0][1:]
        for s, a, b in self.curriculum:
            if step >= s:
                lo, hi = a, b
        return lo, hi

    def describe(self, step):
        lo, hi = self.clue_range(step)
        return f"clues {lo}-{hi}"

    def batch(self, step, batch_size, rng):
        lo, hi = self.clue_range(step)
        if self.pool is not None:
            return self._pool_batch(lo, hi, batch_size, rng)
        prompts, answers, fixed = [], [], []
        for _ in range(batch_size):
            puzzle, solution = generate(rng, lo, hi, unique=False)
            prompts.append(fmt.encode_prompt(puzzle))
            answers.append(fmt.encode_canvas(solution))
            fixed.append([v != 0 for v in puzzle])
        return Batch(torch.tensor(prompts), torch.tensor(answers), torch.tensor(fixed))

    def _pool_batch(self, lo, hi, B, rng) -> Batch:
        dev = self.pool.device
        g = torch.Generator(device=dev)
        g.manual_seed(rng.randrange(2 ** 62))  # the batch is a function of the trainer's Python RNG
        sol = self.pool[torch.randint(0, len(self.pool), (B,), generator=g, device=dev)]  # [B, 81]
        flip = torch.rand(B, generator=g, device=dev) < 0.5
        sol = torch.where(flip[:, None], sol.view(B, 9, 9).transpose(1, 2).reshape(B, 81), sol)
        perm = torch.rand(B, 9, generator=g, device=dev).argsort(-1) + 1  # digit d -> perm[d - 1]
        sol = perm.gather(1, sol - 1)
        clues = torch.randint(lo, hi + 1, (B, 1), generator=g, device=dev)
        rank = torch.rand(B, 81, generator=g, device=dev).argsort(-1).argsort(-1)
        given = rank < clues  # [B, 81]
        cells = torch.arange(81, device=dev)
        answer = fmt.CELL_BASE + 10 * cells + sol
        prompt_cells = fmt.CELL_BASE + 10 * cells + torch.where(given, sol, 0)
        prompt = torch.cat([torch.full((B, 1), fmt.BOS, device=dev), prompt_cells,
                            torch.full((B, 1), fmt.SOLVE, device=dev)], dim=1)
        return Batch(prompt, answer, given)

    def init_model(self, model, generator):
        structured_embedding_init(model, generator)

    def tokenizer_json(self):
        return fmt.tokenizer_json()

    def generation_config(self):
        return fmt.generation_config()

    def evaluate(self, model, step):
        if self._eval_set is None:
            r = random.Random(self.eval_seed)
            self._eval_set = [generate(r, 40, 50, unique=True) for _ in range(self.eval_puzzles)]
        puzzles = [p for p, _ in self._eval_set]
        grids = quick_solve(model, puzzles)
        solved = sum(is_valid_solution(p, g) for p, g in zip(puzzles, grids))
        cells = blanks = 0
        for (p, s), g in zip(self._eval_set, grids):
            for pv, sv, gv in zip(p, s, g):
                if pv == 0:
                    blanks += 1
                    cells += gv == sv
        return {"solve>=40": solved / len(puzzles), "cell_acc>=40": cells / max(1, blanks)}


def _grids(args) -> list[list[int]]:
    n, seed = args
    r = random.Random(seed)
    return [random_solution(r) for _ in range(n)]


def solution_pool(n: int, seed: int = 0, workers: int = 1) -> torch.Tensor:
    """[n, 81] random complete grids (digits 1..9), drawn in ``workers`` processes."""
    chunks = [(n // workers + (k < n % workers), seed * 1000 + k) for k in range(workers)]
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as p:
            parts = p.map(_grids, chunks)
    else:
        parts = [_grids(c) for c in chunks]
    return torch.tensor([g for part in parts for g in part], dtype=torch.long)


@torch.no_grad()
def structured_embedding_init(model, generator: torch.Generator, std: float = 0.02) -> None:
    """Start each cell token's embedding as row + column + box + value vectors (each normal(0, std)), so
    tokens of one row/column/box or one digit share a direction from step 0. Training moves them freely."""
    H = model.text.hidden_size
    w = model.embed_tokens.weight
    parts = {k: torch.randn(n, H, generator=generator) * std for k, n in
             (("row", 9), ("col", 9), ("box", 9), ("val", 10))}
    for cell in range(81):
        r, c = divmod(cell, 9)
        b = (r // 3) * 3 + c // 3
        for v in range(10):
            e = parts["row"][r] + parts["col"][c] + parts["box"][b] + parts["val"][v]
            w[fmt.cell_token(cell, v)] = (e / 2.0).to(w.dtype)  # sum of 4 -> std back near `std`


@torch.no_grad()
def quick_solve(model, puzzles: list[list[int]], max_steps: int = 48, threshold: float = 0.9,
                seed: int = 0, batch_size: int = 64) -> list[list[int]]:
    """A small confidence-threshold denoising loop for in-training evaluation (the engine's sampler is the real
    one): givens fixed, every step commits the free cells whose top probability exceeds ``threshold`` (at least
    the most confident one), renoises the rest with uniform tokens, feeds the logits back as self-conditioning."""
    out = []
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    dev = model.device
    digit_ids = torch.tensor(fmt.DIGIT_TOKEN_IDS, device=dev)
    for i in range(0, len(puzzles), batch_size):
        chunk = puzzles[i:i + batch_size]
        B = len(chunk)
        prompt = torch.tensor([fmt.encode_prompt(p) for p in chunk], device=dev)
        tmpl = torch.tensor([fmt.canvas_template(p) for p in chunk], device=dev)
        done = tmpl >= 0  # [B, 81]
        cache = model.new_cache(B)
        model.encode(prompt, cache)
        canvas = torch.where(done, tmpl, torch.randint(0, model.vocab_size, tmpl.shape, generator=g).to(dev))
        sc = None
        mask_bias = torch.full((model.vocab_size,), float("-inf"), device=dev)
        mask_bias[digit_ids] = 0
        for _ in range(max_steps):
            if bool(done.all()):
                break
            logits = model.denoise(canvas, cache, self_conditioning_logits=sc)
            sc = logits
            probs = F.softmax(logits + mask_bias, dim=-1)
            conf, tok = probs.max(-1)  # [B, 81]
            conf = conf.masked_fill(done, -1.0)
            accept = (conf > threshold) & ~done
            best = conf.argmax(-1)
            accept[torch.arange(B), best] |= ~done.all(-1)
            canvas = torch.where(accept, tok, canvas)
            done = done | accept
            noise = torch.randint(0, model.vocab_size, tmpl.shape, generator=g).to(dev)
            canvas = torch.where(done, canvas, noise)
        out.extend(fmt.decode_canvas(row) for row in canvas.tolist())
    if was_training:
        model.train()
    return out
