"""Image content parts of chat messages -> ``{"type": "image"}`` parts for the chat template, plus the list of
image sources (URLs, PIL images, bytes) in the order the template meets them.

Accepted parts: OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}`` (or a bare URL string), and the
transformers style ``{"type": "image", "image": <PIL image | bytes | URL>}`` (also ``"url"`` / ``"path"``).
"""

from __future__ import annotations


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
