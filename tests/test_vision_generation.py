"""Images through the APIs: reference-mode generation with images equals the oracle's ``generate`` token for
token; ``LLM.generate`` with ``multi_modal_data`` and ``llm.chat`` with ``image_url`` parts build the same
prompt as the reference processor would (placeholder -> boi + soft tokens + eoi); bad image input fails with
one clear line."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from blockdiff import LLM, SamplingParams
from fixtures import (BOI_ID, EOI_ID, IMAGE_ID, TINY_VISION_CONFIGS, image_processor_kwargs, load_oracle,
                      make_checkpoint, oracle_generate)


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def mm_paths(tmp_path_factory):
    return {name: make_checkpoint(tmp_path_factory.mktemp(name), vision=v, seed=20 + i,
                                  processor_file=("processor_config.json", "preprocessor_config.json")[i])
            for i, (name, v) in enumerate(TINY_VISION_CONFIGS.items())}


def reference_inputs(path, ids: list[int], images):
    """pixel_values / image_position_ids from transformers' processor; mm_token_type_ids as its processor
    makes them."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    ref = load_oracle(path)
    proc = Gemma4ImageProcessorPil(**image_processor_kwargs(ref.config.vision_config, 70))
    out = proc(images, return_tensors="pt")
    t = torch.tensor([ids])
    return {"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"],
            "mm_token_type_ids": (t == IMAGE_ID).long()}, out["num_soft_tokens_per_image"].tolist()


@pytest.mark.parametrize("name,seed", [("patch8_pool2_clipped", 0), ("patch16_pool3_gqa_std", 1)])
def test_reference_mode_with_images_equals_oracle_generate(mm_paths, name, seed):
    path = mm_paths[name]
    llm = LLM(path, dtype="float32")
    images = [picture(120, 90, seed), picture(50, 160, seed + 7)]
    params = SamplingParams(max_new_tokens=20, seed=seed, rng="reference", max_denoising_steps=12)
    out = llm.generate({"prompt": "<bos>Look: <|image|> and <|image|> - which?",
                        "multi_modal_data": {"image": images}}, params)[0]
    ids = out.prompt_token_ids
    kwargs, counts = reference_inputs(path, ids, images)
    # The reference processor's expansion: each <|image|> -> <|image> + <|image|> x n + <image|>.
    text_ids = llm.tokenizer.encode("<bos>Look: <|image|> and <|image|> - which?")
    i = text_ids.index(IMAGE_ID)
    j = text_ids.index(IMAGE_ID, i + 1)
    assert ids == (text_ids[:i] + [BOI_ID] + [IMAGE_ID] * counts[0] + [EOI_ID] + text_ids[i + 1:j] + [BOI_ID]
                   + [IMAGE_ID] * counts[1] + [EOI_ID] + text_ids[j + 1:])
    expected = oracle_generate(path, ids, seed, 20, max_denoising_steps=12, **kwargs)
    assert out.token_ids == expected and len(expected) > 0
    # Another image, other tokens (the image reaches the output).
    other = llm.generate({"prompt": "<bos>Look: <|image|> and <|image|> - which?",
                          "multi_modal_data": {"image": [picture(120, 90, 99), images[1]]}}, params)[0]
    assert other.prompt_token_ids == ids and other.token_ids != out.token_ids


def test_chat_image_url_parts_expand_like_the_processor_and_equal_generate(mm_paths):
    path = mm_paths["patch8_pool2_clipped"]
    llm = LLM(path, dtype="float32")
    img = picture(200, 100, 3)
    params = SamplingParams(max_new_tokens=8, seed=4, rng="reference", max_denoising_steps=6)
    chat = llm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(img)}},
        {"type": "text", "text": "What is in the picture?"}]}], params)[0]
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}])
    assert rendered.count("<|image|>") == 1
    n = llm.images.processor.soft_tokens(200, 100)
    expanded = rendered.replace("<|image|>", "<|image>" + "<|image|>" * n + "<image|>")
    assert chat.prompt_token_ids == llm.tokenizer.encode(expanded)
    # The same prompt through generate() with the PIL image gives the same tokens.
    gen = llm.generate({"prompt_token_ids": llm.tokenizer.encode(rendered), "multi_modal_data": {"image": img}},
                       params)[0]
    assert gen.prompt_token_ids == chat.prompt_token_ids and gen.token_ids == chat.token_ids


def test_string_only_chat_template_gets_inline_placeholders(mm_paths, tmp_path):
    import shutil

    from fixtures import CHAT_TEMPLATE

    dst = tmp_path / "plain_template"
    shutil.copytree(mm_paths["patch8_pool2_clipped"], dst)
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # knows only string content
    llm = LLM(str(dst), dtype="float32")
    out = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                  {"type": "image", "image": picture(64, 64, 1)}]}],
                   SamplingParams(max_new_tokens=4, max_denoising_steps=2, seed=0))[0]
    n = llm.images.processor.soft_tokens(64, 64)
    assert out.prompt_token_ids.count(IMAGE_ID) == n and out.prompt_token_ids.count(BOI_ID) == 1


def test_chat_prompt_and_pixels_equal_transformers_gemma4_processor(mm_paths, monkeypatch):
    """The real ``Gemma4Processor.apply_chat_template`` (the checkpoint's template, its image processor, our tokenizer
    with the image tokens declared) gives the ids, pixels, positions and mm_token_type_ids blockdiff builds."""
    import os

    from transformers import PreTrainedTokenizerFast, ProcessorMixin
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    from blockdiff.vision.chat import extract_images

    path = mm_paths["patch16_pool3_gqa_std"]
    llm = LLM(path, dtype="float32")
    tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(path, "tokenizer.json"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                              "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"})
    # Its video processor needs torchvision (not installable beside this torch): skip the class check, pass None.
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    proc = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                           image_processor=Gemma4ImageProcessorPil(**image_processor_kwargs(
                               load_oracle(path).config.vision_config, 70)),
                           tokenizer=tok, video_processor=None, chat_template=llm.tokenizer.chat_template)
    a, b = picture(300, 120, 1), picture(90, 400, 2)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "and"},
                                         {"type": "image", "image": b}, {"type": "text", "text": "Compare them."}]}]
    want = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True,
                                    return_tensors="pt")
    m, sources, wheres = extract_images(msgs)
    ids, images = llm._with_images(llm.tokenizer.encode_chat(m), sources, wheres)
    assert ids == want["input_ids"][0].tolist()
    assert torch.equal(images.pixel_values, want["pixel_values"])
    assert torch.equal(images.image_position_ids, want["image_position_ids"].long())
    assert images.mm_token_type_ids(ids, IMAGE_ID).tolist() == want["mm_token_type_ids"].tolist()
    assert len(set(images.num_soft_tokens)) == 2  # two shapes, two counts
