"""blockdiff: an inference engine for block-diffusion language models (DiffusionGemma)."""

from .config import GenerationDefaults, ModelConfig, TextConfig
from .kv_cache import KVCache
from .loader import load_model, save_model
from .model import DiffusionGemma
from .engine.llm import LLM, RequestOutput
from .sampling.params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "DiffusionGemma", "GenerationDefaults", "KVCache", "ModelConfig", "TextConfig", "load_model",
           "save_model"]
__version__ = "0.1.0"
