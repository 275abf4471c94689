"""Test helpers shared by every test file: tiny DiffusionGemma checkpoints and oracle runs.

Checkpoints are built with the transformers reference (the oracle) and saved with ``save_pretrained``, so
blockdiff loads exactly what the released format looks like. Every RMSNorm weight, router scale and
``layer_scalar`` (encoder and decoder separately) is moved away from its neutral value, and the projections are
scaled so logits have a std of order 1+: a norm, scalar or projection wired to the wrong place shows up as a
logit difference instead of hiding under near-zero activations.

Nothing here is imported by ``blockdiff/``; transformers is imported lazily, only by the helpers that need it.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from blockdiff.bench.checkpoints import byte_symbols

# The tiny text model every test starts from; make_checkpoint(text_overrides=...) changes any key.
TINY_TEXT_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=32,
    sliding_window=8,
    max_position_embeddings=2048,
)

# A vision tower is always built by the oracle; this one keeps checkpoints at a few hundred KB.
TINY_VISION_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=8)

# Image tokens of multimodal test checkpoints, at small ids inside the tiny vocab (the released ids are 255999,
# 258880 and 258882, with the same strings).
BOI_ID, IMAGE_ID, EOI_ID = 60, 61, 62
IMAGE_TOKENS = {BOI_ID: "<|image>", IMAGE_ID: "<|image|>", EOI_ID: "<image|>"}

# Two tiny vision towers that differ in every knob the reference has: patch size, pooling kernel, depth, GQA,
# clipped linears, standardisation. Position tables cover the widest patch grid of 70 soft tokens.
TINY_VISION_CONFIGS = {
    "patch8_pool2_clipped": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, head_dim=8, patch_size=8, pooling_kernel_size=2,
                                 position_embedding_size=160, use_clipped_linears=True, standardize=False),
    "patch16_pool3_gqa_std": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, patch_size=16, pooling_kernel_size=3,
                                  position_embedding_size=224, use_clipped_linears=False, standardize=True,
                                  rope_parameters={"rope_type": "axial", "rope_theta": 50.0}),
}

# generation_config.json of google/diffusiongemma-26B-A4B-it (see the project's shared/REFERENCE.md).
RELEASED_GENERATION_CONFIG = {
    "max_denoising_steps": 48,
    "max_new_tokens": 256,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "t_max": 0.8,
    "t_min": 0.4,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50],
    "pad_token_id": 0,
}

# Specials at the real Gemma ids.
SPECIAL_TOKENS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 50: "<|tool_response>",
                  105: "<|turn>", 106: "<turn|>"}
PAD_ID, EOS_ID, BOS_ID, TURN_START_ID, TURN_END_ID = 0, 1, 2, 105, 106

# Gemma 4's chat shape: <bos><|turn>role\ncontent<turn|>\n ... and <|turn>model\n to prompt the model.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}\n"
    "{%- if role not in ['system', 'user', 'model'] %}"
    "{{ raise_exception('unknown role ' ~ message['role']) }}{% endif %}\n"
    "{{- '<|turn>' ~ role ~ '\\n' ~ (message['content'] | trim) ~ '<turn|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}\n"
)

# The same with content-part lists as the real Gemma 4 template renders them: an image part is <|image|> in place.
MM_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}\n"
    "{{- '<|turn>' ~ role ~ '\\n' }}\n"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}{% else %}\n"
    "{%- for item in message['content'] %}\n"
    "{%- if item['type'] == 'text' %}{{- item['text'] | trim }}"
    "{%- elif item['type'] == 'image' %}{{- '<|image|>' }}{% endif %}\n"
    "{%- endfor %}{% endif %}\n"
    "{{- '<turn|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}\n"
)


# ---------------------------------------------------------------------------------------------- checkpoints
def make_checkpoint(path, text_overrides: dict | None = None, canvas_length: int = 16,
                    generation_config: dict | None = None, perturb: bool = True, seed: int = 0,
                    with_tokenizer: bool = True, vision: dict | None = None, max_soft_tokens: int = 70,
                    processor_file: str = "processor_config.json") -> str:
    """Build a tiny random DiffusionGemma with the oracle, save it in the released layout at ``path``.

    Writes config.json, model.safetensors (vision tower included), generation_config.json with the released
    values (updated by ``generation_config``), and with ``with_tokenizer`` a byte-level tokenizer.json,
    tokenizer_config.json and chat_template.jinja. Deterministic in ``seed``. Returns ``path`` as a str.

    ``vision`` (a vision_config dict) makes a multimodal checkpoint: the image tokens at ``IMAGE_TOKENS`` (also in
    the tokenizer), ``use_bidirectional_attention="vision"`` unless ``text_overrides`` says otherwise, a perturbed
    vision tower, and the image processor's settings in ``processor_file`` (``processor_config.json``, nested
    as transformers 5 writes it, or the flat ``preprocessor_config.json``).
    """
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    path = str(path)
    os.makedirs(path, exist_ok=True)
    text = dict(TINY_TEXT_CONFIG)
    if vision is not None:
        text["use_bidirectional_attention"] = "vision"
    text.update(text_overrides or {})
    mm = {} if vision is None else dict(boi_token_id=BOI_ID, image_token_id=IMAGE_ID, eoi_token_id=EOI_ID)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "forcing last layer to full attention" etc.
    hf_logging.disable_progress_bar()
    try:
        config = DiffusionGemmaConfig(text_config=text, vision_config=dict(vision or TINY_VISION_CONFIG),
                                      canvas_length=canvas_length, **mm)
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config)
        if perturb:
            _perturb(model, seed)
            if vision is not None:
                _perturb_vision(model, seed)
        model.save_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    gen = dict(RELEASED_GENERATION_CONFIG)
    gen.update(generation_config or {})
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    if with_tokenizer:
        write_tokenizer(path, text["vocab_size"], image_tokens=vision is not None)
    if vision is not None:
        write_processor_config(path, config.vision_config, max_soft_tokens, processor_file)
    return path


def image_processor_kwargs(vision_config, max_soft_tokens: int) -> dict:
    """The Gemma 4 image processor's settings for a vision tower (the keys its saved config holds)."""
    return {"patch_size": vision_config.patch_size, "pooling_kernel_size": vision_config.pooling_kernel_size,
            "max_soft_tokens": max_soft_tokens}


def write_processor_config(path, vision_config, max_soft_tokens: int, file: str) -> None:
    ip = {"image_processor_type": "Gemma4ImageProcessor", "do_convert_rgb": True, "do_resize": True,
          "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
          "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
          **image_processor_kwargs(vision_config, max_soft_tokens)}
    body = {"processor_class": "Gemma4Processor", "image_seq_length": max_soft_tokens, "image_processor": ip} \
        if file == "processor_config.json" else ip
    with open(os.path.join(str(path), file), "w") as f:
        json.dump(body, f, indent=2)


@torch.no_grad()
def _perturb_vision(model, seed: int) -> None:
    """The vision tower's neutral values (norms, position tables, clip bounds, standardisation) moved off neutral,
    from a generator of its own (the text weights stay what ``_perturb`` made them)."""
    g = torch.Generator().manual_seed(seed + 777)
    enc = model.model.encoder
    for name, p in list(enc.vision_tower.named_parameters()) + list(enc.embed_vision.named_parameters()):
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.copy_(0.15 + 0.3 * torch.rand(p.shape, generator=g))  # keep attention (scale 1) unsaturated
        elif "norm" in name:
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif name.endswith("position_embedding_table"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.7 / p.shape[1] ** 0.5)
    for name, b in enc.vision_tower.named_buffers():
        if name.endswith("std_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.5)
        elif name.endswith("std_scale"):
            b.copy_(0.05 + 0.1 * torch.rand(b.shape, generator=g))
        elif name.endswith(("input_min", "output_min")):
            b.fill_(-1.0 - float(torch.rand((), generator=g)))  # bounds that clip the tails
        elif name.endswith(("input_max", "output_max")):
            b.fill_(1.0 + float(torch.rand((), generator=g)))


@torch.no_grad()
def _perturb(model, seed: int) -> None:
    """Move every neutral-valued weight away from neutral and scale projections so logits are O(1+)."""
    g = torch.Generator().manual_seed(seed + 12345)
    text = model.config.text_config
    hidden = text.hidden_size
    gain = 0.7  # projections a little under unit gain: O(1) activations, a denoising loop that stays stable

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    def uniform(shape, lo=0.5, hi=1.5):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    # named_parameters() yields each tied (encoder == decoder) parameter once.
    for name, p in model.named_parameters():
        if ".vision_tower." in name or ".embed_vision." in name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("embed_tokens.weight"):
            p.copy_(normal(p.shape, 2.0 / hidden ** 0.5))  # tied LM head: logit std ~2
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            # Attention runs at scale 1.0: q/k norm weights near 1 make q.k ~ head_dim-sized, the softmax
            # saturates and the self-conditioning loop amplifies any difference ~20x per denoising step
            # (blockdiff and the oracle would then sample apart within a few steps). ~0.3 keeps it contractive.
            p.copy_(uniform(p.shape, 0.15, 0.45))
        elif "norm" in name and leaf == "weight":
            p.copy_(uniform(p.shape))
        elif name.endswith("router.scale") or name.endswith("router.per_expert_scale"):
            p.copy_(uniform(p.shape))
        elif name.endswith("router.proj.weight"):
            # The router sees norm(x) * scale / sqrt(hidden): a large std gives decisive (tie-free) routing.
            p.copy_(normal(p.shape, 3.0))
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            p.copy_(normal(p.shape, gain / p.shape[-1] ** 0.5))
        elif leaf == "weight" and p.dim() == 2:  # every nn.Linear
            p.copy_(normal(p.shape, gain / p.shape[1] ** 0.5))
        elif leaf == "bias":
            p.copy_(normal(p.shape, 0.1))
    # layer_scalar buffers are not tied: encoder and decoder get different values.
    for layers in (model.model.encoder.language_model.layers, model.model.decoder.layers):
        for layer in layers:
            layer.layer_scalar.copy_(uniform(layer.layer_scalar.shape))


# ---------------------------------------------------------------------------------------------- tokenizer
# The chat roles first (one token each, as in Gemma: "<|turn>user\n" is 3 tokens), then frequent English pairs so
# ordinary text gets some merges, then any byte pairs to fill the vocab. Each entry is (its prefix) + (last char).
_COMMON_PAIRS = ["mo", "mod", "mode", "model", "us", "use", "user", "sy", "sys", "syst", "syste", "system",
                 "Ġt", "Ġa", "he", "in", "th", "er", "re", "on", "Ġs", "an", "Ġo", "en", "at", "es", "Ġw", "nd",
                 "or", "it", "is", "ou", "Ġc", "Ġb", "ed", "ar", "Ġm", "Ġf", "Ġp", "al", "ing", "Ġth", "Ġthe"]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of the byte-level alphabet (GPT-2 style), in byte order."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    symbols = byte_symbols()  # byte order, so ids stay stable across tokenizers versions
    assert set(symbols) == alphabet
    return symbols


def _merges(symbols: list[str], n: int) -> list[tuple[str, str]]:
    out, seen = [], set(symbols)
    for token in _COMMON_PAIRS:  # build each multi-char token from its prefix (which must already exist)
        if len(out) >= n:
            return out
        a, b = token[:-1], token[-1]
        if a in seen and b in seen and token not in seen:
            out.append((a, b))
            seen.add(token)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ"] + symbols
    for a in letters:
        for b in letters:
            if len(out) >= n:
                return out
            if a + b not in seen:
                out.append((a, b))
                seen.add(a + b)
    raise ValueError(f"cannot build {n} merges")


def build_tokenizer(vocab_size: int, image_tokens: bool = False, extra_specials: dict | None = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` ids and the Gemma specials at their real ids
    (with ``image_tokens``, the image tokens of ``IMAGE_TOKENS`` too; ``extra_specials``: {id: token} more)."""
    specials = {**SPECIAL_TOKENS, **(IMAGE_TOKENS if image_tokens else {}), **(extra_specials or {})}
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    if vocab_size < max(specials) + 1 or vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is too small for 256 bytes + the Gemma specials")
    symbols = _byte_symbols()
    merges = _merges(symbols, vocab_size - len(specials) - 256)
    free_ids = (i for i in range(vocab_size) if i not in specials)
    vocab = {tok: i for i, tok in specials.items()}
    for tok in symbols + [a + b for a, b in merges]:
        vocab[tok] = next(free_ids)
    assert len(vocab) == vocab_size
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Specials already sit in the vocab, so they keep their ids.
    tok.add_special_tokens([AddedToken(specials[i], special=True, normalized=False)
                            for i in sorted(specials)])
    # Like Gemma's tokenizer.json: add_special_tokens=True prepends <bos>.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS_ID)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def write_tokenizer(path, vocab_size: int, chat_template: str | None = CHAT_TEMPLATE,
                    image_tokens: bool = False, extra_specials: dict | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja unless ``chat_template`` is None)."""
    path = str(path)
    if chat_template == CHAT_TEMPLATE and image_tokens:
        chat_template = MM_CHAT_TEMPLATE
    build_tokenizer(vocab_size, image_tokens, extra_specials).save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                   "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
                   "model_max_length": 1_000_000}, f, indent=2)
    if chat_template is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(chat_template)


# ---------------------------------------------------------------------------------------------- oracle
@functools.lru_cache(maxsize=4)
def _load_oracle(path: str, mtime: float):
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()


def load_oracle(path):
    """The transformers reference model for a checkpoint folder (fp32, eval; cached per folder)."""
    path = str(path)
    return _load_oracle(path, os.path.getmtime(os.path.join(path, "model.safetensors")))


def oracle_generate(path, input_ids, seed: int, max_new_tokens: int, **model_kwargs):
    """``torch.manual_seed(seed); ref.generate(input_ids, max_new_tokens=n)``; the new tokens, cut to n and after
    the first EOS (inclusive, EOS ids from the checkpoint's generation config).

    ``input_ids``: a list of ids, a 1-D tensor or a [1, S] tensor -> list[int]; a [B, S] tensor with B > 1 ->
    one list per row. ``model_kwargs`` go to ``generate`` (``pixel_values``, ``image_position_ids``,
    ``mm_token_type_ids``).
    """
    ref = load_oracle(path)
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    single = ids.dim() == 1 or ids.shape[0] == 1
    if ids.dim() == 1:
        ids = ids[None]
    torch.manual_seed(seed)
    out = ref.generate(ids, max_new_tokens=max_new_tokens, **model_kwargs)
    seqs = out.sequences if hasattr(out, "sequences") else out
    eos = ref.generation_config.eos_token_id
    eos = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    rows = []
    for row in seqs[:, ids.shape[1]:].tolist():
        row = row[:max_new_tokens]
        for i, t in enumerate(row):
            if t in eos:
                row = row[:i + 1]
                break
        rows.append(row)
    return rows[0] if single else rows
