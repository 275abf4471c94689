"""Image content parts of chat messages -> ``{"type": "image"}`` parts for the chat template, plus the list of
image sources (URLs, PIL images, bytes) in the order the template meets them.

Accepted parts: OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}`` (or a bare URL string), and the
transformers style ``{"type": "image", "image": <PIL image | bytes | URL>}`` (also ``"url"`` / ``"path"``).
"""

from __future__ import annotations

from ..sampling.fields import ParamError


def image_source(part: dict, where: str):
    """The image a content part points to; ValueError naming ``where`` when the part is malformed."""
    kind = part.get("type")
    if kind == "image_url":
        v = part.get("image_url")
        url = v.get("url") if isinstance(v, dict) else v
        if not isinstance(url, str) or not url:
            raise ValueError(f"{where}: an image_url part needs {{\"image_url\": {{\"url\": \"data:image/...\"}}}}")
        return url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    raise ValueError(f"{where}: an image part needs 'image', 'url' or 'path'")


def is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image_url", "image")


def extract_images(messages) -> tuple[list, list, list]:
    """(messages with image parts replaced by {"type": "image"}, image sources in order, where each was:
    "'messages[i].content[j]'")."""
    if not isinstance(messages, (list, tuple)):
        return messages, [], []
    out, sources, wheres = [], [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list) or not any(is_image_part(p) for p in content):
            out.append(m)
            continue
        parts = []
        for j, p in enumerate(content):
            if is_image_part(p):
                sources.append(image_source(p, f"'messages[{i}].content[{j}]'"))
                wheres.append(f"'messages[{i}].content[{j}]'")
                parts.append({"type": "image"})
            else:
                parts.append(p)
        out.append({**m, "content": parts})
    return out, sources, wheres


def refuse_image_token_text(messages, token: str) -> None:
    """A message's text may not hold the image token's text (``<|image|>``): the tokenizer would read it as an
    image placeholder, which either takes the place of a real image part or stands for no image at all.
    ``ParamError`` naming the part; images go in image parts, for which the chat template writes the token."""
    if not token or not isinstance(messages, (list, tuple)):
        return
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            texts = [(f"messages[{i}].content", content)]
        elif isinstance(content, list):
            texts = [(f"messages[{i}].content[{j}]", p.get("text")) for j, p in enumerate(content)
                     if isinstance(p, dict) and p.get("type") == "text"]
        else:
            continue
        for where, text in texts:
            if isinstance(text, str) and token in text:
                raise ParamError(f"'{where}' holds {token!r}, the model's image token: put each image in an "
                                 "image_url part (the chat template writes its token), not its token in the text",
                                 where)
