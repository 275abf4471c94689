"""blockdiff: an inference engine for block-diffusion language models (DiffusionGemma)."""

import importlib
import os

# Before torch loads OpenMP (it reads this once, at load): an idle OpenMP thread otherwise spins for ~300,000 pause
# loops (~10 ms on this project's CPU) after every parallel op, taking the core that the expert worker threads need
# (model/cpu_threads.py, docs/benchmarks.md "Every core"). Has no effect where torch was imported first.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

# The public names load on first use (PEP 562), so `import blockdiff.cli` does not import torch: the command line
# then imports it inside main(), where a Ctrl-C during the seconds it takes is "blockdiff: interrupted", not a
# traceback from the console script's own import line.
_EXPORTS = {"GenerationDefaults": ".config", "ModelConfig": ".config", "TextConfig": ".config",
            "KVCache": ".kv_cache", "load_model": ".loader", "save_model": ".loader", "DiffusionGemma": ".model",
            "LLM": ".engine.llm", "RequestOutput": ".engine.llm", "SamplingParams": ".sampling.params"}

__all__ = ["LLM", "RequestOutput", "SamplingParams", "DiffusionGemma", "GenerationDefaults", "KVCache", "ModelConfig", "TextConfig", "load_model",
           "save_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blockdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
