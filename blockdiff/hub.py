"""A model reference -> files on this machine: a local folder, a local ``.gguf`` file, or a Hugging Face hub id.

- ``org/name``: the checkpoint's config, tokenizer and safetensors through ``huggingface_hub.snapshot_download``
  (its own progress bars; its cache: ``$HF_HOME/hub`` unless ``download_dir`` is given, as vLLM's
  ``--download-dir``), at ``revision`` (a branch, tag or commit; default the repo's main branch).
- ``org/name:file.gguf`` or ``org/name`` with ``gguf_file="file.gguf"``: that one GGUF file through
  ``huggingface_hub.hf_hub_download``; for a part of a split GGUF (``NAME-00001-of-00003.gguf``), every part
  (they load together from the first).

Anything that looks like a path (``./x``, ``/x``, ``~/x``, more than one ``/``) never goes to the network.
"""

from __future__ import annotations

import logging
import os
import re

from .checks import CheckpointError

log = logging.getLogger("blockdiff")

CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
SPLIT_GGUF_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)  # llama-gguf-split: NAME-00001-of-00003.gguf


def split_gguf_parts(name: str) -> list[str]:
    """Every part's name when ``name`` is one part of a split GGUF, else ``[name]``."""
    m = SPLIT_GGUF_NAME.search(name)
    if m is None or int(m.group(2)) < 1:
        return [name]
    return [name[:m.start()] + f"-{i:05d}-of-{m.group(2)}.gguf" for i in range(1, int(m.group(2)) + 1)]


def looks_like_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and all(ref.split("/"))


def split_gguf_ref(ref: str, gguf_file: str | None = None) -> tuple[str, str] | None:
    """``(repo_id, filename)`` when ``ref`` names a GGUF file on the hub, else None (a local path or a folder)."""
    ref = str(ref)
    if gguf_file is not None:
        if not gguf_file.lower().endswith(".gguf"):
            raise ValueError(f"--gguf-file must name a .gguf file, got {gguf_file!r}")
        if not looks_like_hub_id(ref):
            raise ValueError(f"--gguf-file needs a hub id like 'org/name' as the model, got {ref!r}")
        return ref, gguf_file
    if ":" in ref and ref.lower().endswith(".gguf") and not os.path.exists(os.path.expanduser(ref)):
        repo, _, name = ref.partition(":")
        if looks_like_hub_id(repo) and name:
            return repo, name
    return None


def model_ref(ref, name: str = "model", gguf_file=None) -> str:
    """``ref`` (a folder, a ``.gguf`` file or a hub id; a str or an ``os.PathLike``) as a str; anything else (None, a
    number, a model object) is a ``ValueError`` naming the argument, not a ``TypeError`` from ``os.path`` inside
    the load. ``gguf_file``, when given, must be a str too."""
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise ValueError(f"{name} must be a checkpoint folder, a .gguf file or a hub id such as 'org/name' (a str "
                         f"or a path), got {type(ref).__name__}")
    if gguf_file is not None and not isinstance(gguf_file, str):
        raise ValueError(f"gguf_file must be the name of a .gguf file (a str), got {type(gguf_file).__name__}")
    return ref


def is_gguf(ref, gguf_file: str | None = None) -> bool:
    return gguf_file is not None or str(ref).lower().endswith(".gguf")


def no_config_message(path: str) -> str:
    """A folder without config.json: said so, and which .gguf file to pass instead when it holds one (a folder of
    a .gguf and tokenizer files was only "no config.json")."""
    try:
        ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
    except OSError:
        ggufs = []
    if not ggufs:
        return f"{path}: no config.json"
    if len(ggufs) == 1:
        return f"{path}: no config.json; for its GGUF file, pass the file itself: {os.path.join(path, ggufs[0])}"
    shown = ", ".join(ggufs[:3]) + (", ..." if len(ggufs) > 3 else "")
    return f"{path}: no config.json; for a GGUF file, pass the file itself (it holds {len(ggufs)}: {shown})"


def resolve_gguf(ref: str, gguf_file: str | None = None, revision: str | None = None,
                 download_dir: str | None = None) -> str:
    """A local ``.gguf`` path for ``ref`` (downloaded from the hub for ``org/name:file.gguf`` / ``gguf_file``)."""
    hub = split_gguf_ref(ref, gguf_file)
    if hub is None:
        _warn_unused(ref, revision, download_dir)
        return os.path.expanduser(str(ref))
    repo, name = hub
    parts = split_gguf_parts(name)  # a split GGUF loads from all its parts: they land side by side in the cache
    local = {}
    for part in parts:
        log.info("fetching %s from %s on the Hugging Face hub (or its local cache)%s", part, repo,
                 f" (part {parts.index(part) + 1} of {len(parts)})" if len(parts) > 1 else "")
        try:
            from huggingface_hub import hf_hub_download
            local[part] = hf_hub_download(repo, part, revision=revision, cache_dir=download_dir)
        except Exception as e:  # offline, unknown repo or file, gated...
            raise CheckpointError(f"could not fetch {part!r} from {repo!r} on the hub: {_one_line(e)}") from e
    return local[name]


def resolve_path(path_or_id: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """A local folder, or a hub id fetched with huggingface_hub (needs a network; tests never do this)."""
    path_or_id = os.path.expanduser(path_or_id)  # "~/ckpt" is a local path, never a hub id
    if os.path.isdir(path_or_id):
        _warn_unused(path_or_id, revision, download_dir)
        return path_or_id
    if os.path.exists(path_or_id):
        raise CheckpointError(f"{path_or_id} is a file; pass the checkpoint folder")
    if not looks_like_hub_id(path_or_id):
        raise CheckpointError(f"no checkpoint folder at {path_or_id!r} (and it is not a hub id like 'org/name')")
    log.info("fetching %s%s from the Hugging Face hub (or its local cache)", path_or_id,
             f" at revision {revision}" if revision else "")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_id, revision=revision, cache_dir=download_dir,
                                 allow_patterns=CHECKPOINT_FILES)
    except Exception as e:  # offline, unknown repo, gated...
        raise CheckpointError(f"could not fetch {path_or_id!r} from the hub: {_one_line(e)}") from e


def _warn_unused(local: str, revision: str | None, download_dir: str | None) -> None:
    """--revision and --download-dir only mean something for the hub: said when a local path makes them unused
    (--download-dir was ignored without a word)."""
    for flag, value in (("--revision", revision), ("--download-dir", download_dir)):
        if value is not None:
            log.warning("%s %s is ignored for the local %s %s", flag, value,
                        "folder" if os.path.isdir(os.path.expanduser(str(local))) else "file", local)


def _one_line(e: Exception) -> str:
    """huggingface_hub's multi-line explanations on one line (the CLI's errors are one line), bounded."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."
