"""Which tensors get quantized, and turning checkpoint tensors into the quantized model's state while loading.

``QuantPlan`` is used by the loader one tensor at a time (``add``), so the full-precision model never exists:
each weight is quantized as it is read and only its stored parts are kept. It understands three inputs:

- plain full-precision tensors (quantized when the plan has a method and the tensor is a target),
- blockdiff's own quantized layout (``NAME.qweight`` / ``NAME.qscale`` / ``NAME.qzero``, written by
  ``blockdiff quantize``; the method is in config.json ``quantization_config``),
- the compressed-tensors FP8 layout (``NAME`` in float8_e4m3fn + ``NAME_scale``, e.g. ``weight`` +
  ``weight_scale``), dequantized per tensor (and re-quantized when a method is asked for).

Targets: attention, dense-MLP and self-conditioning linears, the routed experts and (with ``embedding``) the tied
embedding / LM head in int8. Routers, norms and scalars stay in full precision.
"""

from __future__ import annotations


import re

import torch

from ..config import TextConfig
from ..heap import malloc_trim
from .tensors import int4_group, quantize, stored_shapes

METHODS = ("int8", "int4", "fp8")
QUANT_PARTS = ("qweight", "qscale", "qzero")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


class QuantizationError(ValueError):
    pass


def parse_method(quantization) -> tuple[str, int] | None:
    """None/"none" -> None; "int8" | "int4[-all][-g32|-g64|-g128]" | "fp8" -> (method, group). The int4 scope
    (``-all`` or not) is read by ``int4_scope``."""
    if quantization in (None, "", "none"):
        return None
    q = str(quantization).lower()
    m = re.fullmatch(r"int4(?:-all)?(?:-g(\d+))?", q)
    if m:
        group = int(m.group(1) or 64)
        if group not in (32, 64, 128):
            raise QuantizationError(f"int4 group size must be 32, 64 or 128, got {group}")
        return "int4", group
    if q in ("int8", "fp8"):
        return q, 64
    raise QuantizationError(f"unknown quantization {quantization!r}; use one of int8, int4 (int4-g32, int4-g128, "
                            "int4-all), fp8 or none")


def int4_scope(quantization) -> str:
    """Which weights ``int4`` puts in 4 bits: "experts" (the default: the routed experts, ~90% of the real model's
    bytes, with attention, the dense MLP and the self-conditioning MLP in int8, like llama.cpp's mixed K-quants)
    or "all" (``int4-all``: every quantized linear in 4 bits)."""
    return "all" if "-all" in str(quantization or "").lower() else "experts"


_EXPERT_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")


def check_device(method: str, device) -> None:
    """One clear line when the device cannot run the method (fp8 needs a CUDA GPU with compute capability 8.9+)."""
    if method != "fp8":
        return
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise QuantizationError(f"quantization 'fp8' needs a CUDA GPU with compute capability 8.9 or newer "
                                f"(Ada, Hopper, Blackwell); the device is {dev.type}: use int8 or int4")
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 9):
        raise QuantizationError(f"quantization 'fp8' needs compute capability 8.9 or newer; "
                                f"{torch.cuda.get_device_name(dev)} has {cap[0]}.{cap[1]}: use int8 or int4")


def target_shapes(cfg: TextConfig, embedding: bool) -> dict[str, tuple[int, ...]]:
    """Model tensor name -> full-precision shape, for every tensor the plan quantizes."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {}
    for i, spec in enumerate(cfg.layers):
        p, d = f"layers.{i}.", spec.head_dim
        out[p + "self_attn.q_proj.weight"] = (cfg.num_attention_heads * d, h)
        out[p + "self_attn.k_proj.weight"] = (spec.num_kv_heads * d, h)
        if spec.has_v_proj:
            out[p + "self_attn.v_proj.weight"] = (spec.num_kv_heads * d, h)
        out[p + "self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * d)
        out[p + "mlp.gate_proj.weight"] = (inter, h)
        out[p + "mlp.up_proj.weight"] = (inter, h)
        out[p + "mlp.down_proj.weight"] = (h, inter)
        out[p + "experts.gate_up_proj"] = (cfg.num_experts, 2 * cfg.moe_intermediate_size, h)
        out[p + "experts.down_proj"] = (cfg.num_experts, h, cfg.moe_intermediate_size)
    for n in ("gate_proj", "up_proj"):
        out[f"self_conditioning.{n}.weight"] = (inter, h)
    out["self_conditioning.down_proj.weight"] = (h, inter)
    if embedding:
        out["embed_tokens.weight"] = (cfg.vocab_size, h)
    return out


class QuantPlan:
    """Quantize-while-loading for one model. ``method`` None: only decode stored formats (FP8 -> dtype)."""

    def __init__(self, cfg: TextConfig, method: str | None, group: int = 64, embedding: bool = True,
                 device="cpu", dtype=torch.float32, stored: str | None = None, scope: str = "experts"):
        if scope not in ("experts", "all"):
            raise QuantizationError(f"int4 scope must be 'experts' or 'all', got {scope!r}")
        self.cfg, self.method, self.group, self.scope = cfg, method, group, scope
        self.device, self.dtype = torch.device(device), dtype
        self.stored = stored  # the method of a blockdiff-quantized checkpoint, else None
        self.targets = target_shapes(cfg, embedding) if method else {}
        self.state: dict[str, torch.Tensor] = {}
        self.sources: set[str] = set()  # model names fully received
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ per-tensor decisions
    def tensor_method(self, name: str) -> str:
        """The method for one target: the embedding is always int8; int4 covers the routed experts only unless the
        scope is "all", and falls back to int8 for rows no int4 group size divides."""
        if name == "embed_tokens.weight":
            return "int8"
        if self.method == "int4" and self.scope == "experts" and not name.endswith(_EXPERT_SUFFIXES):
            return "int8"
        if self.method == "int4" and int4_group(self.targets[name][-1], self.group) is None:
            return "int8"
        return self.method

    def tensor_group(self, name: str) -> int:
        return int4_group(self.targets[name][-1], self.group) or self.group

    def route(self, name: str, all_names: set[str], dtype_of) -> tuple[str | None, str | None]:
        """A checkpoint name -> (the weight it belongs to, part): part None for a plain tensor, "qweight" /
        "qscale" / "qzero" for blockdiff's layout, "fp8" / "fp8_scale" for compressed-tensors; (None, None) to
        skip (static activation scales, which weight-only and dynamic-activation paths never use)."""
        base, _, last = name.rpartition(".")
        if last in QUANT_PARTS and base:
            return base, last
        if name.endswith("input_scale") and name[:-len("input_scale")] + "weight" in all_names:
            return None, None
        if name.endswith("_scale") and name[:-len("_scale")] in all_names:
            return name[:-len("_scale")], "fp8_scale"
        if dtype_of(name) in _FP8_DTYPES:
            return name, "fp8"
        return name, None

    # ------------------------------------------------------------------ loading
    def add(self, ours: str, part: str | None, t: torch.Tensor, want: tuple[int, ...], ckpt_name: str) -> None:
        if part is None:
            if tuple(t.shape) != want:
                raise QuantizationError(f"tensor {ckpt_name} has shape {tuple(t.shape)}, the config implies {want}")
            self._convert(ours, t)
            return
        if part in QUANT_PARTS and self.stored is None:
            raise QuantizationError(f"tensor {ckpt_name} is quantized but config.json has no blockdiff "
                                    "quantization_config")
        got = self._pending.setdefault(ours, {})
        got[part] = t
        if part in QUANT_PARTS:
            if ours not in self.targets:
                raise QuantizationError(f"tensor {ckpt_name}: {ours} is not quantized by "
                                        f"'{self.stored}' checkpoints")
            need = stored_shapes(want, self.tensor_method(ours), self.tensor_group(ours))
            if set(got) == set(need):
                for k, (shape, dt) in need.items():
                    v = got[k]
                    if tuple(v.shape) != shape or v.dtype != dt:
                        raise QuantizationError(
                            f"corrupt quantized tensor {ours}.{k}: {v.dtype} {tuple(v.shape)}, expected {dt} {shape} "
                            f"for a {self.stored} weight of shape {want}")
                    self.state[f"{ours}.{k}"] = v.to(self.device, copy=True)
                del self._pending[ours]
                self.sources.add(ours)
        elif set(got) == {"fp8", "fp8_scale"}:
            w = got["fp8"]
            if tuple(w.shape) != want:
                raise QuantizationError(f"tensor {ckpt_name} has shape {tuple(w.shape)}, the config implies {want}")
            del self._pending[ours]
            self._convert(ours, _dequant_fp8(w, got["fp8_scale"], ours))

    def add_parts(self, ours: str, parts: dict[str, torch.Tensor], want: tuple[int, ...], source: str) -> None:
        """A target already in its stored parts (GGUF blocks repacked or converted in chunks, ``gguf_repack``)."""
        need = stored_shapes(want, self.tensor_method(ours), self.tensor_group(ours))
        for k, (shape, dt) in need.items():
            v = parts.get(k)
            if v is None or tuple(v.shape) != shape or v.dtype != dt:
                got = None if v is None else f"{v.dtype} {tuple(v.shape)}"
                raise QuantizationError(f"tensor {source}: its {k} came out as {got}, expected {dt} {shape}")
            self.state[f"{ours}.{k}"] = v.to(self.device)
        self.sources.add(ours)

    def _convert(self, ours: str, t: torch.Tensor) -> None:
        if ours in self.targets:
            t = t.to(self.device)
            method = self.tensor_method(ours)
            for k, v in quantize(t, method, self.group).items():
                self.state[f"{ours}.{k}"] = v
        else:
            # copy=True: safetensors' CPU buffers are only 4-16-byte aligned (see loader.py).
            self.state[ours] = t.to(device=self.device, dtype=self.dtype, copy=True)
        self.sources.add(ours)

    def check_complete(self) -> None:
        if self._pending:
            names = sorted(self._pending)
            raise QuantizationError("incomplete quantized tensors (a part is missing): " + ", ".join(
                f"{n} has only {sorted(self._pending[n])}" for n in names[:4]))

    # ------------------------------------------------------------------ the model
    def install(self, model) -> None:
        """Swap the targeted modules of a (meta) model for quantized ones (before load_state_dict)."""
        from .modules import QuantEmbedding, QuantExperts, QuantLinear

        def lin(parent, attr, name):
            old = getattr(parent, attr)
            if old is None or name not in self.targets:
                return
            setattr(parent, attr, QuantLinear(old.in_features, old.out_features, self.tensor_method(name),
                                              self.tensor_group(name), bias=old.bias is not None))

        for i, layer in enumerate(model.layers):
            for a in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin(layer.self_attn, a, f"layers.{i}.self_attn.{a}.weight")
            for a in ("gate_proj", "up_proj", "down_proj"):
                lin(layer.mlp, a, f"layers.{i}.mlp.{a}.weight")
            gu, dn = f"layers.{i}.experts.gate_up_proj", f"layers.{i}.experts.down_proj"
            if gu in self.targets:
                e, two_i, h = self.targets[gu]
                layer.experts = QuantExperts(e, h, two_i // 2, (self.tensor_method(gu), self.tensor_method(dn)),
                                             (self.tensor_group(gu), self.tensor_group(dn)), layer.experts.act)
        for a in ("gate_proj", "up_proj", "down_proj"):
            lin(model.self_conditioning, a, f"self_conditioning.{a}.weight")
        if "embed_tokens.weight" in self.targets:
            model.embed_tokens = QuantEmbedding(*self.targets["embed_tokens.weight"])

    def finalize(self, model, prepare: bool = True) -> None:
        """Build the kernel layouts (CPU: packed weights, plain buffers dropped), after ``load_state_dict``.
        ``prepare=False`` keeps the stored layout (a model about to be sharded over ranks prepares after)."""
        from .modules import prepare_quantized

        self.state.clear()  # the model holds the tensors now: packing then frees each plain copy as it goes
        if prepare:
            prepare_quantized(model)
        if self.device.type == "cpu":
            malloc_trim()


def _dequant_fp8(w: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """compressed-tensors FP8: per-tensor ([] / [1]), per-channel ([N, 1] / [N], leading expert dims allowed) or
    block ([N/b, K/b]) scales -> fp32 weight."""
    s = scale.float()
    wf = w.float()
    *lead, n, k = w.shape
    if s.numel() == 1:
        return wf * s.reshape(())
    if s.shape[-1] == 1 and s.dim() == w.dim() and tuple(s.shape[:-1]) == tuple(w.shape[:-1]):
        return wf * s
    if tuple(s.shape) == tuple(w.shape[:-1]):
        return wf * s[..., None]
    bn, bk = (-(-n // s.shape[-2]), -(-k // s.shape[-1])) if s.dim() >= 2 else (0, 0)
    if s.dim() == w.dim() and tuple(s.shape[:-2]) == tuple(lead) and bn == bk:  # square blocks (e.g. 128 x 128)
        full = s.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
        return wf * full
    raise QuantizationError(f"{name}: FP8 scale of shape {tuple(scale.shape)} does not fit the weight "
                            f"{tuple(w.shape)} (expected per-tensor, per-channel or block scales)")

