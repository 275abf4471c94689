"""Training DiffusionGemma-architecture models (never imported by inference code)."""
