"""Images in: the Gemma 4 image processor (``processor``), image loading with limits (``media``) and the
prompt's image placeholders expanded to soft tokens (``prompt``). The vision tower itself is
``blockdiff.model.vision_tower`` (a model part: weights and forward pass)."""
