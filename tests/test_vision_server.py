"""Images through the server and the CLI: the official openai client sends a base64 image in an ``image_url``
part and gets the answer ``LLM.chat`` gives; every bad image input is a 400 with one line that says what is
wrong (remote URL, undecodable, truncated, unsupported format, bad base64, too many images / bytes / pixels,
local files without or outside ``--allowed-local-media-path``, a text-only checkpoint); the CLI's ``--image``."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from blockdiff import LLM, SamplingParams
from blockdiff.cli import main
from blockdiff.server import build_app
from blockdiff.vision.media import MediaLimits
from fixtures import TINY_VISION_CONFIGS, make_checkpoint
from test_server import LiveServer

MODEL = "tiny-mm"
X = {"max_denoising_steps": 3, "rng": "reference"}


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def strip_vision(src: str, dst) -> str:
    """A copy of a checkpoint without its vision tensors (config.json untouched): loads text-only."""
    shutil.copytree(src, dst)
    with safe_open(f"{src}/model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if "vision" not in k}
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="module")
def mm_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mm_serve"), vision=TINY_VISION_CONFIGS["patch8_pool2_clipped"],
                           seed=9, generation_config={"max_denoising_steps": 3, "max_new_tokens": 16})


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    picture(60, 40, 1).save(d / "ok.png")
    return d


@pytest.fixture(scope="module")
def servers(mm_path, media_dir, tmp_path_factory):
    llm = LLM(mm_path, dtype=torch.float32)
    limits = MediaLimits(max_images=2, max_bytes=200_000, max_pixels=100_000,
                         allowed_local_media_path=str(media_dir))
    text_only = LLM(strip_vision(mm_path, tmp_path_factory.mktemp("x") / "text_only"), dtype=torch.float32)
    # The server's engine runs on its own thread: the LLM the tests call directly must be another one.
    s = {"mm": LiveServer(build_app(LLM(mm_path, dtype=torch.float32), MODEL, media_limits=limits)),
         "strict": LiveServer(build_app(LLM(mm_path, dtype=torch.float32), MODEL)),  # no local files
         "text": LiveServer(build_app(text_only, MODEL))}
    s["llm"] = llm
    yield s
    for k in ("mm", "strict", "text"):
        s[k].close()


def ask(server, *parts, text="What is this?", **extra):
    content = [*parts, {"type": "text", "text": text}]
    return server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                   max_tokens=16, seed=3, extra_body={**X, **extra})


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_openai_client_sends_a_base64_image_and_gets_llm_chats_answer(servers):
    img = picture(90, 70, 5)
    resp = ask(servers["mm"], image_part(data_url(encoded(img))))
    want = servers["llm"].chat([{"role": "user", "content": [{"type": "image", "image": img},
                                                             {"type": "text", "text": "What is this?"}]}],
                               SamplingParams(max_new_tokens=16, seed=3, **X))[0]
    assert resp.choices[0].message.content == want.text
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    n = servers["llm"].images.processor.soft_tokens(90, 70)
    assert resp.usage.prompt_tokens > n + 2  # the image's soft tokens + boi + eoi are in the prompt
    other = ask(servers["mm"], image_part(data_url(encoded(picture(90, 70, 6)))))
    assert other.choices[0].message.content != resp.choices[0].message.content


def test_the_responses_api_takes_an_input_image_as_chat_takes_an_image_url(servers):
    url = data_url(encoded(picture(90, 70, 5)))
    r = servers["mm"].client().responses.create(model=MODEL, max_output_tokens=16, extra_body={"seed": 3, **X},
                                                input=[{"role": "user", "content": [
                                                    {"type": "input_image", "image_url": url},
                                                    {"type": "input_text", "text": "What is this?"}]}])
    want = ask(servers["mm"], image_part(url))
    assert r.output_text == want.choices[0].message.content
    assert r.usage.input_tokens == want.usage.prompt_tokens


def test_local_file_only_under_the_allowed_folder(servers, media_dir, tmp_path):
    ok = ask(servers["mm"], image_part(f"file://{media_dir / 'ok.png'}"))
    assert ok.choices[0].finish_reason in ("stop", "length")
    outside = tmp_path / "secret.png"
    picture(10, 10).save(outside)
    for server, url, msg in [
            (servers["mm"], f"file://{outside}", "outside the allowed media folder"),
            (servers["mm"], f"{media_dir}/../{outside.name}", "outside the allowed media folder"),
            (servers["strict"], f"file://{media_dir / 'ok.png'}", "--allowed-local-media-path")]:
        with pytest.raises(openai.BadRequestError, match=msg):
            ask(server, image_part(url))


PNG = encoded(picture(64, 48, 2))
JPEG, WEBP = encoded(picture(64, 48, 2), "JPEG"), encoded(picture(64, 48, 2), "WEBP")
BAD_INPUTS = {
    "remote_url": ([image_part("https://example.com/cat.png")], "remote image URLs are not fetched"),
    "undecodable": ([image_part(data_url(b"this is not an image at all"))], "not a decodable image"),
    "truncated": ([image_part(data_url(PNG[:len(PNG) // 2]))], "could not be decoded"),
    # cut inside the header: PIL knows the format but fails while opening it (not while decoding the pixels)
    "truncated_header_jpeg": ([image_part(data_url(JPEG[:200], "image/jpeg"))], "could not be decoded"),
    "truncated_header_webp": ([image_part(data_url(WEBP[:40], "image/webp"))], "could not be decoded"),
    "unsupported_format": ([image_part(data_url(encoded(picture(8, 8), "TIFF"), "image/tiff"))],
                           "unsupported image format TIFF"),
    "bad_base64": ([image_part("data:image/png;base64,@@@not-base64@@@")], "not valid base64"),
    "not_an_image_mime": ([image_part("data:text/plain;base64,aGVsbG8=")], "is not an image"),
    "too_many_images": ([image_part(data_url(PNG))] * 3, "the request has 3 images; the limit is 2"),
    "too_many_pixels": ([image_part(data_url(encoded(Image.new("RGB", (400, 300), (9, 99, 199)))))],
                        "limit of 100000 pixels"),  # a flat image: a few hundred bytes, 120k pixels
    "too_many_bytes": ([image_part(data_url(encoded(picture(300, 250), "BMP"), "image/bmp"))], "200000-byte limit"),
    "malformed_part": ([{"type": "image_url", "image_url": {}}], "image_url.url"),
    "empty_url": ([image_part("")], "'messages[0].content[0].image_url.url' must be a non-empty string (a "
                  "data:image/...;base64 URL), got an empty string"),
    "unknown_part": ([{"type": "input_audio", "input_audio": {}}], "'input_audio'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_image_input_is_a_400_with_one_clear_line(servers, case):
    parts, msg = BAD_INPUTS[case]
    with pytest.raises(openai.BadRequestError) as e:
        ask(servers["mm"], *parts)
    message = e.value.body["message"]
    assert msg in message and "\n" not in message and e.value.status_code == 400
    # param names the part when one image is at fault (the field the message names: the part, or the field in
    # it), the list when their number is
    want = {"too_many_images": "messages", "malformed_part": "messages[0].content[0].image_url.url",
            "empty_url": "messages[0].content[0].image_url.url"}.get(case, "messages[0].content[0]")
    assert e.value.body["param"] == want
    assert message.startswith(f"'{want}'") or case == "too_many_images"


@pytest.mark.parametrize("image_url, field", [("data:x", None), ({"url": ""}, ".url"), ({"url": 7}, ".url"),
                                               ({}, ".url"), ("", None)])
def test_a_malformed_second_image_url_part_is_named_to_its_field_in_param(servers, image_url, field):
    part = {"type": "image_url", "image_url": image_url}
    with pytest.raises(openai.BadRequestError) as e:
        ask(servers["mm"], image_part(data_url(PNG)), part)
    want = "messages[0].content[1].image_url" + (field or "")
    assert e.value.body["param"] == want and e.value.body["message"].startswith(f"'{want}' must be")


@pytest.mark.parametrize("url, message", [("", "'input[0].content[1].image_url' must not be empty"),
                                          ("data:image/png;base64,@@@", "'input[0].content[1]': the data: URL is")])
def test_a_bad_input_image_is_named_in_the_responses_apis_own_fields(servers, url, message):
    with pytest.raises(openai.BadRequestError) as e:
        servers["mm"].client().responses.create(model=MODEL, max_output_tokens=8, extra_body=X, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                         {"type": "input_image", "image_url": url}]}])
    assert e.value.body["message"].startswith(message)
    assert e.value.body["param"] == message.split("'")[1]


def test_a_bad_second_image_is_named_in_param(servers):
    with pytest.raises(openai.BadRequestError) as e:
        ask(servers["mm"], image_part(data_url(PNG)), image_part("data:image/png;base64,@@@"))
    assert e.value.body["param"] == "messages[0].content[1]"
    assert e.value.body["message"].startswith("'messages[0].content[1]': ")


def test_image_to_a_text_only_checkpoint_is_a_400(servers):
    with pytest.raises(openai.BadRequestError, match="no vision tower"):
        ask(servers["text"], image_part(data_url(PNG)))
    ok = servers["text"].client().chat.completions.create(model=MODEL, max_tokens=8, extra_body=X,
                                                          messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content is not None  # text still works


@pytest.mark.parametrize("content, param", [
    ("say <|image|> please", "messages[0].content"),  # no image at all: it would stand for none
    ([image_part(data_url(PNG)), {"type": "text", "text": "is it <|image|>?"}], "messages[0].content[1]"),
])
def test_the_image_tokens_text_in_a_message_is_a_400_naming_the_part(servers, content, param):
    with pytest.raises(openai.BadRequestError) as e:
        servers["mm"].client().chat.completions.create(model=MODEL, max_tokens=8, extra_body=X,
                                                       messages=[{"role": "user", "content": content}])
    assert e.value.body["param"] == param and "image token" in e.value.body["message"]
    with pytest.raises(ValueError, match=r"image token: put each image in an image_url part"):
        servers["llm"].chat([{"role": "user", "content": content}])
    # A text-only checkpoint has no images to confuse it with: the text is its own business.
    if isinstance(content, str):
        ok = servers["text"].client().chat.completions.create(model=MODEL, max_tokens=8, extra_body=X,
                                                              messages=[{"role": "user", "content": content}])
        assert ok.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------------------------- offline API errors
def test_llm_rejects_bad_image_prompts_with_clear_errors(servers):
    llm = servers["llm"]
    img = picture(32, 32)
    with pytest.raises(ValueError, match=r"0 image placeholder\(s\) \(<\|image\|>\) for 1 image"):
        llm.generate({"prompt": "no placeholder here", "multi_modal_data": {"image": img}})
    with pytest.raises(ValueError, match="multi_modal_data takes only 'image'"):
        llm.generate({"prompt": "<|image|>", "multi_modal_data": {"video": img}})
    with pytest.raises(ValueError, match="remote image URLs"):
        llm.chat([{"role": "user", "content": [image_part("http://x/y.png"), {"type": "text", "text": "?"}]}])


# ---------------------------------------------------------------------------------------------- CLI
ARGS = ["--max-new-tokens", "16", "--steps", "3", "--seed", "0", "--rng", "reference"]


def test_cli_run_with_an_image_equals_llm_chat(mm_path, servers, media_dir, capsys):
    assert main(["run", mm_path, "describe this", "--image", str(media_dir / "ok.png"), *ARGS]) == 0
    answer = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[0]
    want = servers["llm"].chat([{"role": "user", "content": [
        {"type": "image", "image": Image.open(media_dir / "ok.png")}, {"type": "text", "text": "describe this"}]}],
        SamplingParams(max_new_tokens=16, max_denoising_steps=3, seed=0, rng="reference"))[0]
    assert answer == want.text


@pytest.mark.parametrize("case", ["missing", "undecodable", "text_only"])
def test_cli_image_errors_exit_2_with_one_line(case, mm_path, servers, tmp_path, capsys):
    model, image = mm_path, str(tmp_path / "none.png")
    if case == "undecodable":
        (tmp_path / "junk.png").write_bytes(b"junk")
        image = str(tmp_path / "junk.png")
    if case == "text_only":
        model = strip_vision(mm_path, tmp_path / "t")
        picture(20, 20).save(tmp_path / "fine.png")
        image = str(tmp_path / "fine.png")
    assert main(["run", model, "describe this", "--image", image, *ARGS]) == 2
    err = capsys.readouterr().err
    err = "".join(ln for ln in err.splitlines(keepends=True) if " INFO " not in ln)  # the loader's info lines
    assert err.count("\n") == 1 and "--image" in err and "Traceback" not in err
    assert {"missing": "No such file", "undecodable": "not a decodable image", "text_only": "no vision tower"}[case] \
        in err


def test_image_ids_outside_the_vocab_are_a_clear_error(tiny_checkpoint):
    # The default tiny checkpoint has a vision tower but the released image ids (258880...) in a 512-token vocab.
    llm = LLM(tiny_checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match="image token ids .* not all inside its vocabulary of 512"):
        llm.chat([{"role": "user", "content": [{"type": "image", "image": picture(32, 32)},
                                               {"type": "text", "text": "?"}]}])


def test_data_urls_without_padding_or_in_the_url_safe_alphabet_decode_to_the_same_image():
    """Encoders differ: some leave base64's '=' padding off, some use the URL-safe alphabet (- and _ for + and /)."""
    from blockdiff.vision.media import ImageLoader

    # a picture whose PNG encoding is not a multiple of 3 bytes long and contains '+' or '/' when encoded
    raw = next(e for e in (encoded(picture(9, 5 + i, seed=i)) for i in range(40))
               if len(e) % 3 and set(base64.b64encode(e).decode()) & set("+/"))
    std = base64.b64encode(raw).decode()
    expected = np.asarray(ImageLoader().load(data_url(raw)))
    for text in (std.rstrip("="), base64.urlsafe_b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
                 .rstrip("=")):
        assert text != std
        got = ImageLoader().load("data:image/png;base64," + text)
        assert np.array_equal(np.asarray(got), expected)
    with pytest.raises(ValueError, match="not valid base64"):  # still refused: characters of neither alphabet
        ImageLoader().load("data:image/png;base64," + std[:8] + "*" + std[9:])
