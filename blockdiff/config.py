"""Typed configs parsed from a checkpoint's ``config.json`` and ``generation_config.json``.

Unknown keys are ignored (``from_dict``), so newer checkpoints with extra fields still load.
Per-layer attention geometry is resolved here once, so the model never re-derives it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from .checks import CheckpointError, check_field_types, read_json

SLIDING = "sliding_attention"
FULL = "full_attention"

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


# Sizes and counts that must be at least 1 (None: not set, where the field may be).
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
             "max_position_embeddings", "num_experts", "top_k_experts", "moe_intermediate_size")


@dataclass
class LayerSpec:
    """Attention geometry of one layer."""

    layer_type: str  # SLIDING | FULL
    head_dim: int
    num_kv_heads: int
    has_v_proj: bool  # full layers reuse the keys as values
    sliding_window: int | None


@dataclass
class TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = 30.0
    use_bidirectional_attention: str | None = None
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    per_layer_config: dict | None = None
    layers: list[LayerSpec] = field(default_factory=list, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
        known = {f.name for f in fields(cls)} - {"layers"}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg._resolve()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layers",)}
        out["model_type"] = "diffusion_gemma_text"
        return {k: v for k, v in out.items() if v is not None}

    def _resolve(self) -> None:
        from .model.norms import activation
        activation(self.hidden_activation)  # refuses an activation blockdiff does not run, naming it
        if self.use_bidirectional_attention == "all":
            # a bidirectional encoder with a halved window; the reference's attention itself fails on it (is_causal
            # passed twice, transformers 5.23), so there is nothing to be equal to
            raise ValueError("use_bidirectional_attention='all' is not supported (the encoder must be causal)")
        if self.use_bidirectional_attention not in (None, "vision"):
            raise ValueError(f"unsupported use_bidirectional_attention {self.use_bidirectional_attention!r} "
                             "(null or 'vision')")
        if not self.num_experts or not self.top_k_experts or not self.moe_intermediate_size:
            raise ValueError("DiffusionGemma needs num_experts, top_k_experts and moe_intermediate_size")
        for name in _POSITIVE:  # (a 0 divided by, or indexed: ZeroDivisionError / IndexError from deep inside)
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if self.top_k_experts > self.num_experts:  # (the router's top-k failed at the first request)
            raise ValueError(f"top_k_experts {self.top_k_experts} is more than the {self.num_experts} experts "
                             "(num_experts)")
        if self.final_logit_softcapping == 0:  # the reference divides the logits by it; null is "no soft-cap"
            raise ValueError("final_logit_softcapping 0 divides the logits by 0 (the reference's come out 0 or NaN): "
                             "use null for no soft-cap")
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for t in self.layer_types:
            if t not in (SLIDING, FULL):
                raise ValueError(f"unknown layer type {t!r}")
        # The reference forces the last layer to full attention.
        self.layer_types[-1] = FULL
        if SLIDING in self.layer_types and self.sliding_window < 2:
            # the cache keeps window - 1 positions: none at 1, and the reference's denoiser then fails on the
            # mismatch of its mask and keys (transformers 5.23): nothing to be equal to
            raise ValueError(f"sliding_window must be at least 2, got {self.sliding_window}")
        if self.rope_parameters is None:
            self.rope_parameters = {k: dict(v) for k, v in _DEFAULT_ROPE.items()}
        for t in set(self.layer_types):
            if t not in self.rope_parameters:
                raise ValueError(f"rope_parameters has no entry for {t}")
            if not isinstance(self.rope_parameters[t], dict) or "rope_theta" not in self.rope_parameters[t]:
                raise ValueError(f"rope_parameters[{t!r}] must be an object with a rope_theta")

        overrides: dict[int, dict] = {}
        if self.per_layer_config is not None:
            # Saved form: only layers that differ from the global values are listed ({} = none differ).
            overrides = {}
            for k, v in self.per_layer_config.items():
                if not isinstance(k, int) and not (isinstance(k, str) and k.isdigit()):
                    raise ValueError(f"per_layer_config: keys are layer indices, got {k!r}")
                if not isinstance(v, dict):
                    raise ValueError(f"per_layer_config[{k}] must be an object, got {v!r}")
                overrides[int(k)] = dict(v)
            for i, o in overrides.items():  # the reference's attention reads these two per layer, no other key
                other = sorted(set(o) - {"head_dim", "num_key_value_heads"})
                if other:
                    raise ValueError(f"per_layer_config[{i}]: {other[0]} per layer is not supported (blockdiff reads "
                                     "head_dim and num_key_value_heads per layer)")
                if not 0 <= i < self.num_hidden_layers:
                    raise ValueError(f"per_layer_config: layer {i} is not in [0, {self.num_hidden_layers})")
                for key, v in o.items():
                    if not isinstance(v, int) or isinstance(v, bool):
                        raise ValueError(f"per_layer_config[{i}].{key} must be an integer, got {v!r}")
        else:
            # Form of the released config.json: global_* keys apply to every full-attention layer.
            glob = {"head_dim": self.global_head_dim if self.global_head_dim is not None else 512}
            if self.num_global_key_value_heads is not None:
                glob["num_key_value_heads"] = self.num_global_key_value_heads
            overrides = {i: glob for i, t in enumerate(self.layer_types) if t == FULL}
        self.layers = []
        for i, t in enumerate(self.layer_types):
            o = overrides.get(i, {})
            spec = LayerSpec(
                layer_type=t,
                head_dim=int(o.get("head_dim", self.head_dim)),
                num_kv_heads=int(o.get("num_key_value_heads", self.num_key_value_heads)),
                has_v_proj=t == SLIDING,
                sliding_window=self.sliding_window if t == SLIDING else None,
            )
            for key, v in (("head_dim", spec.head_dim), ("num_key_value_heads", spec.num_kv_heads)):
                if v < 1:
                    raise ValueError(f"layer {i}: {key} must be a positive integer, got {v}")
            if self.num_attention_heads % spec.num_kv_heads:
                raise ValueError(
                    f"layer {i}: {self.num_attention_heads} attention heads not divisible by {spec.num_kv_heads} KV heads"
                )
            self.layers.append(spec)
        from .model.norms import rope_inv_freq, rope_scaling
        for t in sorted(set(self.layer_types)):  # every RoPE type and its keys checked here, named in the error
            params, dim = self.rope_parameters[t], next(s.head_dim for s in self.layers if s.layer_type == t)
            try:
                rope_inv_freq(params, dim, self.max_position_embeddings)
                rope_scaling(params, self.max_position_embeddings)
            except KeyError as e:
                raise ValueError(f"rope_parameters[{t!r}] (rope_type {params.get('rope_type')!r}) needs {e}") from None
            except ValueError as e:
                raise ValueError(f"rope_parameters[{t!r}]: {e}") from None

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))


@dataclass
class VisionConfig:
    """The Gemma 4 vision tower (``config.json["vision_config"]``); defaults are transformers' Gemma4VisionConfig."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    default_output_length: int | None = None  # soft tokens per image when no processor config says otherwise

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        if d.get("model_type") not in (None, "gemma4_vision"):
            raise ValueError(f"unsupported vision_config model_type {d.get('model_type')!r} (blockdiff runs the "
                             "Gemma 4 vision tower, 'gemma4_vision')")
        if cfg.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"unsupported vision hidden_activation {cfg.hidden_activation!r}")
        rope = cfg.rope_parameters or {}
        if rope.get("rope_type", "axial") not in ("axial", "default"):  # the tower only has 2-D axial RoPE
            raise ValueError(f"unsupported vision rope_type {rope.get('rope_type')!r} (the Gemma 4 vision tower "
                             "uses 2-D axial RoPE)")
        cfg.rope_parameters = {"rope_type": "axial", "rope_theta": float(rope.get("rope_theta", 100.0))}
        if cfg.head_dim % 4:
            raise ValueError(f"vision head_dim must be a multiple of 4 (2-D RoPE), got {cfg.head_dim}")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"vision: {cfg.num_attention_heads} attention heads not divisible by "
                             f"{cfg.num_key_value_heads} KV heads")
        return cfg


@dataclass
class ModelConfig:
    text: TextConfig
    canvas_length: int = 256
    tie_word_embeddings: bool = True
    raw: dict = field(default_factory=dict, repr=False)
    # Multimodal: the vision tower (None = text-only) and the ids of the image tokens in the prompt.
    vision: VisionConfig | None = None
    image_token_id: int | None = 258_880
    boi_token_id: int | None = 255_999
    eoi_token_id: int | None = 258_882

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in (None, "diffusion_gemma"):
            raise ValueError(f"unsupported model_type {mt!r}: blockdiff runs 'diffusion_gemma' checkpoints")
        text = d.get("text_config")
        if text is None:
            raise ValueError("config.json has no text_config")
        if not isinstance(text, dict):
            raise ValueError(f"text_config must be an object, got {type(text).__name__}")
        check_field_types(TextConfig, text, "text_config.")
        if not isinstance(d.get("tie_word_embeddings", True), bool):
            raise ValueError("tie_word_embeddings must be a boolean")
        # absent: the reference config's default; 0 or null were run as 256 here (the reference divides by it)
        canvas = d.get("canvas_length", 256)
        if not isinstance(canvas, int) or isinstance(canvas, bool) or canvas <= 0:
            raise ValueError(f"canvas_length must be a positive integer, got {canvas!r}")
        vision = d.get("vision_config")
        ids = {k: d.get(k, getattr(cls, k)) for k in ("image_token_id", "boi_token_id", "eoi_token_id")}
        return cls(text=TextConfig.from_dict(text), canvas_length=canvas,
                   tie_word_embeddings=d.get("tie_word_embeddings", True), raw=d,
                   vision=VisionConfig.from_dict(vision) if isinstance(vision, dict) else None, **ids)

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        d = read_json(path, "the model config")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError, KeyError) as e:  # one line naming the file, whatever the config got wrong
            raise CheckpointError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.raw) if self.raw else {}
        d.update({
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": self.text.to_dict(),
        })
        return d


# The reference's built-in defaults, used where generation_config.json is silent.
REFERENCE_GENERATION_DEFAULTS = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


# The keys the reference's DiffusionGemmaGenerationConfig takes (transformers 5.23): it refuses any other.
GENERATION_CONFIG_KEYS = frozenset({
    "max_new_tokens", "max_length", "return_dict_in_generate", "max_denoising_steps", "sampler_config", "t_min",
    "t_max", "stability_threshold", "confidence_threshold", "cache_implementation", "cache_config",
    "disable_compile", "bos_token_id", "pad_token_id", "eos_token_id", "_commit_hash", "_from_model_config",
    "transformers_version"})
# generation_config.json's cache_implementation values (transformers 5.23): those whose tokens are the default
# dynamic cache's (offloading moves the same tensors between devices), and the static ones (a sliding layer's
# cache holds sliding_window positions instead of sliding_window - 1: other tokens).
SAME_TOKENS_CACHES = ("dynamic", "offloaded")
STATIC_CACHES = ("static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked", "offloaded_hybrid",
                 "offloaded_hybrid_chunked")


@dataclass
class GenerationDefaults:
    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], model_eos: list[int] | None = None) -> "GenerationDefaults":
        vals = dict(REFERENCE_GENERATION_DEFAULTS)
        for k in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max",
                  "stability_threshold", "confidence_threshold"):
            if d.get(k) is not None:
                vals[k] = d[k]
        sc = d.get("sampler_config")
        if isinstance(sc, dict) and sc.get("entropy_bound") is not None:
            vals["entropy_bound"] = sc["entropy_bound"]
        eos = d.get("eos_token_id")
        if eos is None:
            eos = model_eos or []
        eos = [eos] if isinstance(eos, int) else list(eos)
        return cls(**vals, eos_token_ids=eos, pad_token_id=d.get("pad_token_id"))

    @classmethod
    def from_dir(cls, path: str) -> "GenerationDefaults":
        """The defaults of a checkpoint folder, as the reference reads them: from ``generation_config.json`` only.
        Without that file, or without ``eos_token_id`` in it, the reference stops on no EOS id (it never falls back
        to config.json's ``eos_token_id``), and neither does this."""
        p = os.path.join(path, "generation_config.json")
        if not os.path.exists(p):
            return cls.from_dict({})
        d = read_json(p, "the generation config")
        check_generation_config(d, p)
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{p}: {e}") from None


def check_generation_config(d: dict, path: str) -> None:
    """The generation_config.json keys blockdiff reads must hold values of the right type."""
    known = {k: v for k, v in d.items() if k in REFERENCE_GENERATION_DEFAULTS and v is not None}
    try:
        check_field_types(GenerationDefaults, known)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    unknown = [k for k in d if k not in GENERATION_CONFIG_KEYS]
    if unknown:
        # The reference's generation config takes these keys only and refuses to load any other; blockdiff would
        # ignore it, and a sampling knob of another model's generation config (temperature, top_p, do_sample) or a
        # key of a newer reference would change nothing here without a word.
        raise CheckpointError(f"{path}: {unknown[0]}={d[unknown[0]]!r} is not a key of the reference's generation "
                              "config (it refuses to load the file): remove it (temperature, top_p, top_k and the "
                              "like are per-request sampling fields)")
    sc = d.get("sampler_config")
    if isinstance(sc, dict):
        cls_name = sc.get("_cls_name")
        extra = [k for k in sc if k not in ("_cls_name", "entropy_bound")]
        if cls_name not in (None, "EntropyBoundSamplerConfig") or extra:
            what = f"_cls_name={cls_name!r}" if extra == [] else f"{extra[0]}={sc[extra[0]]!r}"
            raise CheckpointError(f"{path}: sampler_config.{what} is not supported (blockdiff runs the reference's "
                                  "EntropyBoundSamplerConfig, whose one field is entropy_bound)")
    if d.get("max_length") is not None:
        # the reference lets max_length override a max_new_tokens of exactly 256 and stop generation mid-budget;
        # blockdiff budgets with max_new_tokens only, so it refuses what it would otherwise silently ignore
        raise CheckpointError(f"{path}: max_length={d['max_length']!r} is not supported (blockdiff budgets "
                              "generation with max_new_tokens): remove it or set max_new_tokens instead")
    cache = d.get("cache_implementation")
    if cache is not None and cache not in SAME_TOKENS_CACHES:
        # blockdiff generates as the reference's default dynamic cache does; these change the reference's tokens
        if cache in STATIC_CACHES:
            why = ("the reference's static cache lets the canvas see sliding_window cached positions of a sliding "
                   "layer where its default dynamic cache keeps sliding_window - 1, so its tokens differ")
        elif cache == "quantized":
            why = "the reference's quantized cache stores keys/values in fewer bits, so its tokens differ"
        else:
            why = "the reference does not know it (it refuses to load this file)"
        raise CheckpointError(f"{path}: cache_implementation={cache!r} is not supported ({why}): remove it, or set "
                              "it to \"dynamic\", which blockdiff runs exactly")
    eos, pad = d.get("eos_token_id"), d.get("pad_token_id")
    if not (eos is None or is_int(eos) or (isinstance(eos, list) and all(map(is_int, eos)))):
        raise CheckpointError(f"{path}: eos_token_id must be an integer or an array of integers, got {eos!r}")
    if not (pad is None or is_int(pad)):
        raise CheckpointError(f"{path}: pad_token_id must be an integer, got {pad!r}")
    sc = d.get("sampler_config")
    if sc is not None and not isinstance(sc, dict):
        raise CheckpointError(f"{path}: sampler_config must be an object, got {sc!r}")
    eb = sc.get("entropy_bound") if isinstance(sc, dict) else None
    if eb is not None and (isinstance(eb, bool) or not isinstance(eb, (int, float))):
        raise CheckpointError(f"{path}: sampler_config.entropy_bound must be a number, got {eb!r}")
    # and in range: the bounds a request's own values must meet (a negative step count or token budget here
    # would quietly change every request that does not set its own)
    from .sampling.fields import ParamError, ParamsFields, check_fields

    values = {k: v for k, v in known.items() if k in ParamsFields.model_fields}
    if eb is not None:
        values["entropy_bound"] = eb
    try:
        check_fields(ParamsFields, values)
    except ParamError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if values.get("t_min") is not None and values.get("t_max") is not None and values["t_max"] <= values["t_min"]:
        raise CheckpointError(f"{path}: t_max must be greater than t_min, got t_max={values['t_max']}, "
                              f"t_min={values['t_min']}")
