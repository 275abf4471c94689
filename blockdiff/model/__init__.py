from .diffusion_gemma import DiffusionGemma

__all__ = ["DiffusionGemma"]
