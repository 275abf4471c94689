"""Images as users send them decode to the picture a viewer shows: files that Pillow opens under another name
(a phone camera's JPEG with an MPF segment opens as "MPO"), 16-bit grayscale PNGs, data: URLs written with an
upper-case scheme. No model: the loader and the processor only."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from blockdiff.vision.media import ImageLoader
from blockdiff.vision.processor import ImageProcessor

PROC = ImageProcessor(patch_size=8, pooling_kernel_size=2, max_soft_tokens=70)


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_a_jpeg_carrying_more_pictures_mpo_loads_as_its_first_picture():
    photo, extra = noise(64, 48, 1), noise(16, 12, 2)
    data = encoded(photo, "MPO", save_all=True, append_images=[extra])
    assert data[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(data)).format == "MPO"  # a JPEG file to any viewer
    got = ImageLoader().load(data, "'messages[0].content[0]'")
    first = Image.open(io.BytesIO(data))
    first.load()  # frame 0: the photo as the JPEG decoder gives it
    assert got.size == (64, 48)
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(first.convert("RGB")))
    # and it is the same picture as that photo sent as a plain JPEG
    plain = ImageLoader().load(encoded(photo, "JPEG"))
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(plain.convert("RGB")))


@pytest.mark.parametrize("transparent", [False, True])
def test_a_16_bit_grayscale_png_reaches_the_processor_as_its_8_bit_picture(transparent):
    rng = np.random.default_rng(3)
    a16 = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    a16[5:9, 5:9] = 4660  # a value a tRNS chunk can mark transparent
    kw = {"transparency": 4660} if transparent else {}
    data = encoded(Image.fromarray(a16), "PNG", **kw)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # what Pillow opens it as
    eight = Image.fromarray((a16 >> 8).astype(np.uint8))  # each sample's high byte
    if transparent:
        eight.putalpha(Image.fromarray(np.where(a16 == 4660, 0, 255).astype(np.uint8)))
    want = PROC([ImageLoader().load(encoded(eight, "PNG"))]).pixel_values
    got = PROC([ImageLoader().load(data)]).pixel_values
    assert np.asarray(want).std() > 0.1  # a real picture (a clipped 16-bit one is nearly all white)
    assert np.array_equal(got.numpy(), want.numpy())


def test_a_data_url_scheme_in_capitals_is_a_data_url():
    data = encoded(noise(20, 10))
    b64 = base64.b64encode(data).decode()
    want = np.asarray(ImageLoader().load(data))
    for url in ("DATA:image/png;base64," + b64, "Data:IMAGE/PNG;BASE64," + b64):
        assert np.array_equal(np.asarray(ImageLoader().load(url, "'messages[0].content[0]'")), want)


def test_a_file_url_is_percent_decoded_as_path_as_uri_writes_it(tmp_path):
    from blockdiff.vision.media import MediaLimits

    img = noise(12, 8)
    (tmp_path / "my photo #1.png").write_bytes(encoded(img))
    loader = lambda: ImageLoader(MediaLimits(allowed_local_media_path=str(tmp_path)))  # noqa: E731
    want = np.asarray(img)
    uri = (tmp_path / "my photo #1.png").as_uri()
    assert "%20" in uri and "%23" in uri
    for url in (uri, uri.replace("file://", "FILE://"), uri.replace("file://", "file://localhost"),
                str(tmp_path / "my photo #1.png")):  # a plain path is taken as written
        assert np.array_equal(np.asarray(loader().load(url, "'messages[0].content[0]'")), want)
    with pytest.raises(ValueError, match="outside the allowed media folder"):  # decoding opens no way out
        loader().load(uri.rsplit("/", 1)[0] + "/%2E%2E/x.png")


def test_a_cut_file_opened_with_pil_is_a_value_error_naming_the_image(tmp_path):
    """README: "A bad image is a ValueError saying what is wrong" -- also a PIL image whose file Image.open() only
    started to read (it reads the header; the pixels come later, in the processor, as an OSError before)."""
    data = encoded(noise(64, 48), "PNG")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"^image 0: the PNG image could not be decoded \(image file is truncated"):
        PROC(ImageLoader().load_all([Image.open(tmp_path / "cut.png")]))
    good = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(ImageLoader().load(good)), np.asarray(noise(64, 48)))
