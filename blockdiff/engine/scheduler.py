"""Which requests encode (prompt reads and block commits) and which denoise this engine tick.

The scheduler decides and never computes: it sees ``ModelState`` phases and returns a
``SchedulerOutput``. Requests join and leave at any tick; no request waits for another's canvas.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .model_state import ModelState, Phase


@dataclass
class SchedulerOutput:
    encode: list[ModelState] = field(default_factory=list)  # WAITING (prompt) or COMMITTING (canvas)
    denoise: list[ModelState] = field(default_factory=list)  # denoise after this tick's encodes

    @property
    def empty(self) -> bool:
        return not self.encode and not self.denoise


def check_max_num_seqs(v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"max_num_seqs must be an integer >= 1, got {v!r}")
    return v


class Scheduler:
    def __init__(self, max_num_seqs: int = 16, max_encode_tokens: int = 8192):
        check_max_num_seqs(max_num_seqs)
        self.max_num_seqs = max_num_seqs
        self.max_encode_tokens = max_encode_tokens
        self.waiting: deque[ModelState] = deque()
        self.running: list[ModelState] = []

    def add(self, state: ModelState) -> None:
        self.waiting.append(state)

    def abort(self, request_id: str) -> ModelState | None:
        for q in (self.running, self.waiting):
            for s in list(q):
                if s.request_id == request_id:
                    q.remove(s)
                    s.finish("abort")
                    return s
        return None

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        out = SchedulerOutput()
        budget = self.max_encode_tokens
        for s in self.running:
            if s.phase is Phase.DENOISING:
                out.denoise.append(s)
            elif s.phase in (Phase.WAITING, Phase.COMMITTING):
                n = len(s.prompt_ids) if s.phase is Phase.WAITING else s.canvas_length
                if out.encode and n > budget:
                    continue  # encode it next tick; at least one encode always runs
                budget -= n
                out.encode.append(s)
                out.denoise.append(s)
        return out

    def collect_finished(self) -> list[ModelState]:
        done = [s for s in self.running if s.finished]
        if done:
            self.running = [s for s in self.running if not s.finished]
        return done
