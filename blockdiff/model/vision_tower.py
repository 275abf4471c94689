"""The Gemma 4 vision tower and the multimodal embedder: image patches -> soft tokens in the text hidden size.

Contract (the reference's names and meaning):

- ``pixel_values`` ``[N, P, 3 * patch_size**2]``: N images, each as P patches (row-major over the resized image,
  each patch flattened as (row, column, channel)), values in [0, 1]; trailing padding patches are allowed.
- ``image_position_ids`` ``[N, P, 2]``: each patch's (x, y) = (column, row) in the patch grid; (-1, -1) marks
  a padding patch.
- ``VisionEncoder.image_features(pixel_values, image_position_ids)`` -> ``[T, text_hidden]``: every image's soft
  tokens, image after image, where an image of ``n`` real patches gives ``n / pooling_kernel_size**2`` tokens.

The tower: a linear patch embedding plus learned x and y position tables; bidirectional encoder layers with
2-D axial RoPE (the first half of each head rotates with x, the second half with y), q/k/v norms, attention
scale 1 and GeGLU MLPs; average pooling of ``k x k`` patch blocks, a ``sqrt(hidden)`` scale and, optionally,
standardisation. The embedder is a scale-free RMSNorm and a linear map into the text hidden size.

Padding patches are dropped before the encoder (each image runs on its own real patches): they are masked
out of every attention and every pool in the reference, so the result is the same and the cost is not paid.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import RMSNorm


class ClippableLinear(nn.Module):
    """A bias-free linear with optional input/output clamps (``use_clipped_linears``; the bounds are buffers
    stored in the checkpoint)."""

    def __init__(self, cfg: VisionConfig, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=False)
        self.clipped = cfg.use_clipped_linears
        if self.clipped:
            for name, v in (("input_min", -float("inf")), ("input_max", float("inf")),
                            ("output_min", -float("inf")), ("output_max", float("inf"))):
                self.register_buffer(name, torch.tensor(v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = torch.clamp(x, self.output_min, self.output_max)
        return x


def axial_rope(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [P, 2] (x, y) -> cos, sin [P, D]: x frequencies twice, then y frequencies twice."""
    freqs = positions[..., None].float() * inv_freq  # [P, 2, D/4]
    fx, fy = freqs[:, 0], freqs[:, 1]
    emb = torch.cat([fx, fx, fy, fy], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Standard rotate-half RoPE on x [P, H, d] with cos/sin [P, d]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [P, H, D]: the first D/2 channels rotate with the x position, the last D/2 with the y position."""
    h = x.shape[-1] // 2
    return torch.cat([_rotate(x[..., :h], cos[:, :h], sin[:, :h]), _rotate(x[..., h:], cos[:, h:], sin[:, h:])], -1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = ClippableLinear(cfg, h, self.n_heads * self.head_dim)
        self.k_proj = ClippableLinear(cfg, h, self.n_kv * self.head_dim)
        self.v_proj = ClippableLinear(cfg, h, self.n_kv * self.head_dim)
        self.o_proj = ClippableLinear(cfg, self.n_heads * self.head_dim, h)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        P = x.shape[0]  # x [P, hidden]: one image's patches, all attending to all
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(P, self.n_heads, self.head_dim)), cos, sin)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(P, self.n_kv, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(P, self.n_kv, self.head_dim))
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, P, D]
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=1.0)[0]  # [H, P, D]
        return self.o_proj(out.transpose(0, 1).reshape(P, self.n_heads * self.head_dim))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = ClippableLinear(cfg, cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = ClippableLinear(cfg, cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = ClippableLinear(cfg, cfg.intermediate_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.hidden_activation == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x, cos, sin):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, cfg.position_embedding_size, cfg.hidden_size))

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """patches [P, 3 * ps * ps] in [0, 1], positions [P, 2] -> [P, hidden]."""
        x = self.input_proj((2 * (patches - 0.5)).to(self.input_proj.weight.dtype))  # [0, 1] -> [-1, 1]
        table = self.position_embedding_table
        return x + F.embedding(positions[:, 0], table[0]) + F.embedding(positions[:, 1], table[1])


class VisionTower(nn.Module):
    """Checkpoint names under ``model.encoder.vision_tower.``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([VisionLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))
        theta = cfg.rope_parameters["rope_theta"]
        half = cfg.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half)),
                             persistent=False)

    def rebuild_buffers(self, device) -> None:
        """Non-persistent tables after a meta-device build (the loader calls this)."""
        theta, half = self.config.rope_parameters["rope_theta"], self.config.head_dim // 2
        self.inv_freq = (1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))).to(device)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One image: patches [P, 3 * ps * ps], positions [P, 2] (no padding) -> soft tokens [P / k^2, hidden]."""
        cfg = self.config
        k = cfg.pooling_kernel_size
        x = self.patch_embedder(patches, positions)
        cos, sin = axial_rope(self.inv_freq, positions, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin)
        pooled = pool_patches(x, positions, k)
        h = pooled.to(x.dtype).float() * cfg.hidden_size ** 0.5  # scaled in fp32: can exceed the fp16 range
        if cfg.standardize:
            h = (h - self.std_bias.float()) * self.std_scale.float()
        return h.to(x.dtype)


class MultimodalEmbedder(nn.Module):
    """Checkpoint names under ``model.encoder.embed_vision.``: scale-free RMSNorm, then a linear map."""

    def __init__(self, cfg: VisionConfig, text_hidden: int):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(cfg.hidden_size, text_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class VisionEncoder(nn.Module):
    """The tower and the embedder together: ``image_features(pixel_values, image_position_ids)``."""

    def __init__(self, cfg: VisionConfig, text_hidden: int):
        super().__init__()
        self.config = cfg
        self.tower = VisionTower(cfg)
        self.embedder = MultimodalEmbedder(cfg, text_hidden)

    def check_inputs(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> None:
        ps = self.config.patch_size
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != 3 * ps * ps:
            raise ValueError(f"pixel_values must be [images, patches, {3 * ps * ps}] (3 x {ps} x {ps} per patch), "
                             f"got shape {tuple(pixel_values.shape)}")
        if image_position_ids is None or tuple(image_position_ids.shape) != (*pixel_values.shape[:2], 2):
            got = None if image_position_ids is None else tuple(image_position_ids.shape)
            raise ValueError(f"image_position_ids must be [images, patches, 2] = {(*pixel_values.shape[:2], 2)}, "
                             f"got {got}")
        if image_position_ids.numel() and int(image_position_ids.max()) >= self.config.position_embedding_size:
            raise ValueError(f"image_position_ids exceed the vision tower's position table "
                             f"({self.config.position_embedding_size} positions per axis)")

    def image_features(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor,
                       keys: list | None = None, memo: "FeatureMemo | None" = None) -> torch.Tensor:
        """[N, P, 3 ps^2], [N, P, 2] -> [T, text_hidden]: each image's soft tokens, in image order. With ``keys`` (a
        digest per image, ``ImageInputs.digests``) and a ``memo``, an image the memo holds skips the tower (its
        output is the tower's own for that image, computed alone: the same values)."""
        self.check_inputs(pixel_values, image_position_ids)
        if keys is not None and len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} image keys for {pixel_values.shape[0]} images")
        dev = self.embedder.embedding_projection.weight.device
        out = []
        for n in range(pixel_values.shape[0]):  # images differ in real-patch count: one pass each
            key = keys[n] if keys is not None and memo is not None else None
            f = memo.get(key) if key is not None else None
            if f is None:
                pos = image_position_ids[n].to(dev).long()
                real = (pos != -1).any(dim=-1)
                if not bool(real.any()):
                    raise ValueError(f"image {n} has no patches (every image_position_ids entry is -1)")
                f = self.tower(pixel_values[n].to(dev)[real], pos[real])
                if key is not None:
                    memo.put(key, f)
            out.append(f)
        feats = torch.cat(out) if out else pixel_values.new_zeros(0, self.config.hidden_size)
        return self.embedder(feats)

    def soft_token_count(self, image_position_ids: torch.Tensor) -> list[int]:
        k2 = self.config.pooling_kernel_size ** 2
        return [int((p != -1).any(dim=-1).sum()) // k2 for p in image_position_ids]


class FeatureMemo:
    """The vision tower's output per image (before the embedder), keyed by the image's digest, the least recently
    used evicted past ``capacity_bytes``. The engine keeps one beside its prefix cache: an image the prefix cache
    cannot serve (its tokens end in a prompt's last, partial block, or it comes twice in one prompt) skips the
    tower when it comes again. Only the calling thread uses it."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes, self.nbytes = capacity_bytes, 0
        self.items: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key) -> torch.Tensor | None:
        f = self.items.get(key)
        if f is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return f

    def put(self, key, f: torch.Tensor) -> None:
        size = f.numel() * f.element_size()
        if size > self.capacity_bytes or key in self.items:
            return
        self.items[key] = f
        self.nbytes += size
        while self.nbytes > self.capacity_bytes:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()


# ---------------------------------------------------------------------------------------------- the encode hook
def scatter_image_features(model, x: torch.Tensor, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                           image_position_ids: torch.Tensor | None, image_keys: list | None = None,
                           image_memo: FeatureMemo | None = None) -> torch.Tensor:
    """x [B, S, H] text embeddings -> the same with every image-token position (row-major over the batch)
    replaced by the next soft token of ``model.vision.image_features(...)`` (``image_keys`` / ``image_memo``: see
    there)."""
    if model.vision is None:
        raise ValueError("the model has no vision tower (a text-only checkpoint): it cannot take images")
    image_id = model.config.image_token_id
    feats = model.vision.image_features(pixel_values, image_position_ids, image_keys, image_memo)  # [T, H]
    where = input_ids.to(x.device) == image_id  # [B, S]
    n = int(where.sum())
    if n != feats.shape[0]:
        raise ValueError(f"the prompt holds {n} image tokens (id {image_id}) but the images give "
                         f"{feats.shape[0]} soft tokens")
    return x.masked_scatter(where[..., None], feats.to(x.dtype))


def image_blocks(text_config, mm_token_type_ids: torch.Tensor | None, shape, device) -> torch.Tensor | None:
    """[B, S] index of the image each token belongs to (one per run of image tokens), -1 for text; None when
    image tokens attend causally (no ``mm_token_type_ids``, or ``use_bidirectional_attention`` is not "vision")."""
    if mm_token_type_ids is None or text_config.use_bidirectional_attention != "vision":
        return None
    t = torch.as_tensor(mm_token_type_ids, device=device)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"mm_token_type_ids must have the shape of input_ids {tuple(shape)}, got {tuple(t.shape)}")
    vision = (t == 1) | (t == 2)
    starts = vision.clone()
    starts[:, 1:] &= ~vision[:, :-1]
    return torch.where(vision, torch.cumsum(starts.long(), dim=1) - 1, -1)


def same_image(blocks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """blocks [B, S] (image index or -1), valid [B, S] -> bool [B, S, S]: query and key in the same image."""
    return (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0) & valid[:, None, :]


def pool_patches(x: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """k x k average pooling of one image's patch features x [P, H] by patch position ([P, 2], (x, y); the grid a
    multiple of k on both sides) -> fp32 [P / k^2, H], bins in row-major order of the pooled grid.

    Each bin's k*k patches are added one at a time in patch order (a stable sort groups them): the sums of the
    reference's ``index_add_`` on the CPU, bit for bit, and deterministic on a GPU too, where ``index_add_``'s atomic
    adds land in any order (deterministic mode's equal tokens would not hold for image prompts)."""
    P = x.shape[0]
    n_out = P // (k * k)
    if n_out * k * k != P:
        raise ValueError(f"an image has {P} patches, not a multiple of pooling_kernel_size**2 = {k * k}")
    grid_w = int(positions[:, 0].max()) + 1
    bins = positions[:, 0] // k + (grid_w // k) * (positions[:, 1] // k)  # [P]
    order = torch.argsort(bins, stable=True)
    if not torch.equal(bins[order], torch.arange(n_out, device=bins.device).repeat_interleave(k * k)):
        raise ValueError(f"an image's patch positions do not tile a grid of {k} x {k} pooling windows")
    parts = (x.float() / (k * k)).index_select(0, order).view(n_out, k * k, -1)
    pooled = parts[:, 0].clone()
    for j in range(1, k * k):
        pooled += parts[:, j]
    return pooled
