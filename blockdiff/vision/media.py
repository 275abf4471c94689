"""Images from where requests point: PIL images, raw bytes, ``data:`` URLs (base64), local files (only under an
allowed folder). Remote URLs are refused: the server fetches nothing. Every failure is a ``ValueError`` with one
line saying what was wrong (the HTTP layer answers 400 with it).

Limits are per request (``MediaLimits``): image count, encoded bytes, decoded pixels; the pixel count is read
from the image header before anything is decoded, so an oversized image costs no memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass

from ..sampling.fields import ParamError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what a request may send
# Pillow's names for files of those formats: a JPEG that carries more pictures in an MPF segment (phone cameras:
# a depth map, an HDR gain map, a preview) opens as "MPO"; it is a JPEG, its first picture the photo.
_FORMAT_OF = {"MPO": "JPEG"}


@dataclass
class MediaLimits:
    max_images: int = 8  # per request
    max_bytes: int = 5 << 20  # encoded bytes of all images of a request
    max_pixels: int = 40_000_000  # decoded pixels of all images of a request
    allowed_local_media_path: str | None = None  # a folder: file paths / file:// URLs under it may be read

    def __post_init__(self):
        for name in ("max_images", "max_bytes", "max_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.allowed_local_media_path is not None:
            p = os.path.realpath(os.path.expanduser(self.allowed_local_media_path))
            if not os.path.isdir(p):
                raise ValueError(f"allowed_local_media_path {self.allowed_local_media_path!r} is not a folder")
            self.allowed_local_media_path = p


class ImageLoader:
    """Loads one request's images, counting them against ``MediaLimits``."""

    def __init__(self, limits: MediaLimits | None = None):
        self.limits = limits or MediaLimits()
        self.count = self.bytes = self.pixels = 0

    def load_all(self, sources: list, wheres: list[str] | None = None) -> list:
        """Every image of a request; ``wheres`` names each in errors (default "image 0", "image 1"...)."""
        if len(sources) > self.limits.max_images:
            raise ValueError(f"the request has {len(sources)} images; the limit is {self.limits.max_images}")
        return [self.load(s, wheres[i] if wheres else i) for i, s in enumerate(sources)]

    def load(self, source, where: str | int = 0):
        """A PIL image, bytes, a data: URL, a file:// URL or a local path -> a loaded PIL image. A failure is a
        ``ParamError`` whose ``param`` is ``where`` when it names a request part (``'messages[0].content[1]'``),
        so the server's 400 points at the part, not only at ``messages``."""
        what = f"image {where}" if isinstance(where, int) else where
        try:
            return self._load(source, what)
        except ValueError as e:
            raise ParamError(str(e), None if isinstance(where, int) else where.strip("'")) from None

    def _load(self, source, what: str):
        from PIL import Image

        self.count += 1
        if self.count > self.limits.max_images:
            raise ValueError(f"the request has more than {self.limits.max_images} images")
        if isinstance(source, Image.Image):
            self._count_pixels(what, *source.size)
            try:  # Image.open() reads only the header: a cut or corrupt file fails here, as bytes would
                source.load()
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                kind = f"{source.format} image" if source.format else "image"
                raise ValueError(f"{what}: the {kind} could not be decoded ({e})") from None
            return source
        if isinstance(source, (bytes, bytearray)):
            return self._decode(bytes(source), what)
        if not isinstance(source, str):
            raise ValueError(f"{what}: expected an image, bytes or a URL string, got {type(source).__name__}")
        url = source.strip()
        if url[:5].lower() == "data:":  # URL schemes are case-insensitive (RFC 3986)
            return self._decode(self._data_url(url, what), what)
        is_file_url = url[:7].lower() == "file://"
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not is_file_url:
            raise ValueError(f"{what}: remote image URLs are not fetched ({url.split('://')[0]}://...): send the "
                             "image inline as a data: URL (data:image/png;base64,...)")
        return self._decode(self._local_file(_file_url_path(url) if is_file_url else url, what), what)

    # ------------------------------------------------------------------ sources
    def _data_url(self, url: str, what: str) -> bytes:
        m = re.match(r"^data:([^,;]*)((?:;[^,;]*)*),(.*)$", url, re.S | re.I)
        if not m:
            raise ValueError(f"{what}: malformed data: URL (expected data:image/<type>;base64,<data>)")
        mime, params, payload = m.group(1).lower(), m.group(2), m.group(3)
        if mime and not mime.startswith("image/"):
            raise ValueError(f"{what}: a data: URL of type {mime!r} is not an image")
        if ";base64" not in params.lower():
            raise ValueError(f"{what}: only base64 data: URLs are supported (data:image/<type>;base64,...)")
        if len(payload) * 3 // 4 > self.limits.max_bytes:  # refuse before decoding
            raise ValueError(f"{what}: the image is larger than the {self.limits.max_bytes}-byte limit")
        payload = re.sub(r"\s+", "", payload)
        # Lenient where browsers and encoders differ: padding left off, and the URL-safe alphabet (- and _).
        payload += "=" * (-len(payload) % 4)
        if "-" in payload or "_" in payload:
            payload = payload.replace("-", "+").replace("_", "/")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{what}: the data: URL is not valid base64") from None

    def _local_file(self, path: str, what: str) -> bytes:
        root = self.limits.allowed_local_media_path
        if root is None:
            # The same loader serves the server and the Python API: name the switch of each.
            raise ValueError(f"{what}: local image files are not allowed (no allowed media folder: `blockdiff serve "
                             "--allowed-local-media-path DIR`, or `LLM(..., media_limits=MediaLimits("
                             "allowed_local_media_path=DIR))` in Python); send a data: URL, a PIL image or bytes")
        real = os.path.realpath(os.path.join(root, os.path.expanduser(path)))
        if os.path.commonpath([real, root]) != root:
            raise ValueError(f"{what}: {path!r} is outside the allowed media folder")
        if not os.path.isfile(real):
            raise ValueError(f"{what}: no image file at {path!r}")
        size = os.path.getsize(real)
        if self.bytes + size > self.limits.max_bytes:
            raise ValueError(f"{what}: the request's images exceed the {self.limits.max_bytes}-byte limit")
        with open(real, "rb") as f:
            return f.read()

    # ------------------------------------------------------------------ decoding
    def _count_pixels(self, what: str, w: int, h: int) -> None:
        self.pixels += w * h
        if self.pixels > self.limits.max_pixels:
            raise ValueError(f"{what}: {w}x{h} pixels; the request's images exceed the limit of "
                             f"{self.limits.max_pixels} pixels")

    def _decode(self, data: bytes, what: str):
        from PIL import Image, ImageOps, UnidentifiedImageError

        self.bytes += len(data)
        if self.bytes > self.limits.max_bytes:
            raise ValueError(f"{what}: the request's images exceed the {self.limits.max_bytes}-byte limit")
        if not data:
            raise ValueError(f"{what}: the image is empty")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ValueError(f"{what}: not a decodable image (supported formats: {', '.join(FORMATS)})") from None
        except Image.DecompressionBombError:
            raise ValueError(f"{what}: the image has too many pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # a known format whose header is cut or corrupt
            raise ValueError(f"{what}: the image could not be decoded ({e})") from None
        fmt = _FORMAT_OF.get(img.format, img.format)
        if fmt not in FORMATS:
            raise ValueError(f"{what}: unsupported image format {img.format} (supported: {', '.join(FORMATS)})")
        self._count_pixels(what, *img.size)
        try:
            img.load()
            img = ImageOps.exif_transpose(img)  # as transformers' load_image: pixels in display orientation
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ValueError(f"{what}: the {fmt} image could not be decoded ({e})") from None
        return _eight_bit(img)


def _file_url_path(url: str) -> str:
    """A file:// URL's path, percent-decoded as URLs write it (``Path.as_uri()``: ``file:///my%20photo.png``);
    ``file://localhost/...`` is this machine too. Any other host is read as a folder under the allowed one."""
    from urllib.parse import unquote

    rest = url[len("file://"):]
    if rest[:10].lower() == "localhost/":
        rest = rest[len("localhost"):]
    return unquote(rest.split("?", 1)[0].split("#", 1)[0])


def _eight_bit(img):
    """A 16-bit grayscale PNG (Pillow's modes I;16 / I) -> 8-bit L (LA where a tRNS value marks transparent
    pixels), keeping each sample's high byte as Pillow does for 16-bit RGB PNGs. Pillow's own conversion to RGB
    clips every sample above 255, so such an image would reach the model nearly all white."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        return img
    import numpy as np
    from PIL import Image

    a = np.asarray(img).astype(np.int64)
    out = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8))
    trns = img.info.get("transparency")
    if isinstance(trns, int):
        out.putalpha(Image.fromarray(np.where(a == trns, 0, 255).astype(np.uint8)))
    return out
