"""blockdiff: an inference engine for block-diffusion language models (DiffusionGemma)."""

import os

# Before torch loads OpenMP (it reads this once, at load): an idle OpenMP thread otherwise spins for ~300,000 pause
# loops (~10 ms on this project's CPU) after every parallel op, taking the core that the expert worker threads need
# (model/cpu_threads.py, docs/benchmarks.md "Every core"). Has no effect where torch was imported first.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from .config import GenerationDefaults, ModelConfig, TextConfig
from .kv_cache import KVCache
from .loader import load_model, save_model
from .model import DiffusionGemma
from .engine.llm import LLM, RequestOutput
from .sampling.params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "DiffusionGemma", "GenerationDefaults", "KVCache", "ModelConfig", "TextConfig", "load_model",
           "save_model"]
__version__ = "0.1.0"
