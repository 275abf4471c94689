"""Checks on what a checkpoint folder holds, each failing with one line that names the file (or tensor) and the
problem: broken JSON, config values of the wrong type, unreadable safetensors, weights that cannot be right.

Kept apart from ``loader.py`` so the loader reads as the happy path; every function here raises
``CheckpointError`` (a ``ValueError``: the CLI prints it as one line, exit status 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing

import torch


class CheckpointError(ValueError):
    pass


def read_json(path: str, what: str = "an object") -> dict:
    """``path`` parsed as a JSON object; a missing, unreadable, non-JSON or non-object file fails naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object ({what}), got {json_type(data)}")
    return data


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer with more entries than the model has embeddings would turn prompts into ids the model cannot
    read: every request would fail, so the checkpoint fails at load, naming the file."""
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise CheckpointError(f"{where} has {n} entries but the model's vocabulary (vocab_size in config.json) "
                              f"has {vocab_size}: prompts would hold token ids the model has no embedding for")


def json_type(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


# ---------------------------------------------------------------------------------------------- config types
def _accepts(tp, v) -> bool:
    """Whether JSON value ``v`` fits the annotation ``tp`` (int, float, bool, str, list[...], dict, unions)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, v) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if tp is typing.Any:
        return True
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    if tp is list or origin is list:
        args = typing.get_args(tp)
        return isinstance(v, list) and (not args or all(_accepts(args[0], x) for x in v))
    if tp is dict or origin is dict:
        return isinstance(v, dict)
    return True  # an annotation this checker does not know: let the config's own checks decide


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        args = typing.get_args(tp)
        return f"an array of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "an array"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(tp, getattr(tp, "__name__", str(tp)))


def check_field_types(cls, d: dict, prefix: str = "") -> None:
    """Every key of ``d`` that is a field of dataclass ``cls`` must hold a value of the field's type; the
    message names it as ``prefix + key`` (the caller adds the file)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in d or f.name not in hints:
            continue
        v = d[f.name]
        if not _accepts(hints[f.name], v):
            raise CheckpointError(f"{prefix}{f.name} must be {_describe(hints[f.name])}, got {json_type(v)} "
                                  f"({json.dumps(v)[:40]})")


# ---------------------------------------------------------------------------------------------- weights
def open_safetensors(file: str):
    """``safe_open`` with a one-line error naming the file when it is empty, truncated or not safetensors."""
    from safetensors import safe_open

    try:
        size = os.path.getsize(file)
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"{file} is empty (0 bytes): the download or copy did not finish")
    need = _safetensors_size(file, size)
    if need is not None and need > size:
        raise CheckpointError(f"{file} is truncated: its header describes {need} bytes, the file holds {size} "
                              "(the download or copy did not finish)")
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: header too small / invalid header / file too short
        raise CheckpointError(f"{file} is not a readable safetensors file ({size} bytes): {e}") from None


def _safetensors_size(file: str, size: int) -> int | None:
    """The file size a safetensors header implies (8-byte length, JSON header, data); None when unreadable."""
    import struct

    if size < 8:
        return None
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, 100 << 20):
            return None
        try:
            header = json.loads(f.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError):
            return None
    return 8 + n + max(ends, default=0)


def read_tensor(f, file: str, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:  # the header promises more bytes than the file holds
        raise CheckpointError(f"{file}: tensor {name} cannot be read (is the file truncated?): {e}") from None


def check_weight(name: str, t: torch.Tensor, file: str) -> None:
    """Refuse weights no trained model has: integer or boolean dtypes where floats belong, NaN or infinity."""
    if not t.is_floating_point():
        raise CheckpointError(f"{file}: tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}; "
                              "model weights must be floating point")
    rows = t.reshape(-1)
    step = 1 << 24  # check in slices: isfinite on a multi-GB expert tensor would double its memory
    for i in range(0, rows.numel(), step):
        part = rows[i:i + step]
        if part.element_size() == 1:  # float8 (stored without a scale): torch has no isfinite for it
            part = part.float()
        if not torch.isfinite(part).all():
            bad = int((~torch.isfinite(part)).sum())
            kind = "NaN" if torch.isnan(part).any() else "infinite"
            raise CheckpointError(f"{file}: tensor {name} holds {kind} values ({bad}+ of {rows.numel()}); "
                                  "the checkpoint is corrupt")


def weight_map(index_path: str) -> dict[str, str]:
    """``model.safetensors.index.json``'s ``weight_map`` (tensor -> shard file), checked."""
    data = read_json(index_path)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path} has no 'weight_map' object (tensor name -> shard file)")
    bad = [k for k, v in wm.items() if not isinstance(v, str) or not v]
    if bad:
        raise CheckpointError(f"{index_path}: 'weight_map' entries must name a shard file; {bad[0]!r} does not")
    # A shard is a file beside the index: a path ('../x', '/etc/x') would be read - or, when a checkpoint is saved
    # over this one, removed - outside the checkpoint's folder.
    outside = next((v for v in wm.values() if v != os.path.basename(v) or v in (".", "..") or "\\" in v), None)
    if outside is not None:
        raise CheckpointError(f"{index_path}: shard {outside!r} is not a file name in the checkpoint's folder "
                              "(a shard must lie beside the index)")
    return wm
