"""Text <-> token ids for a checkpoint folder: ``tokenizer.json`` via ``tokenizers``, chat template via jinja2.

Contract:

- ``Tokenizer.from_dir(path)`` reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (special-token
  names, optional ``chat_template``), ``chat_template.jinja`` (preferred over the config's template) and, when
  present, ``generation_config.json`` (its EOS ids join ``eos_token_ids``).
- ``encode(text)`` never adds special tokens unless asked; special tokens written in the text (``<bos>``,
  ``<|turn>``...) always map to their own ids. ``decode`` drops special tokens unless asked to keep them.
- ``apply_chat_template(messages)`` renders the checkpoint's template in a sandbox, the way transformers does
  (``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``bos_token``/``eos_token``); messages are validated
  first (``ValueError``: the HTTP layer turns it into a 400). ``encode_chat`` tokenizes the rendered text as-is:
  the template already wrote ``<bos>``, so no second BOS is added.

The engine knows only token ids; this module is the only place that knows text.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .checks import CheckpointError, read_json


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes of a byte-level BPE alphabet, in byte order."""
    out, extra = [], 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_steps(tok: _HFTokenizer) -> list[dict]:
    """The tokenizer's decoder as a flat list of its steps' JSON (a Sequence unrolled; [] without a decoder)."""
    if tok.decoder is None:
        return []
    steps, todo = [], [json.loads(tok.decoder.__getstate__())]
    while todo:
        d = todo.pop(0)
        if d.get("type") == "Sequence":
            todo[:0] = d.get("decoders", [])
        else:
            steps.append(d)
    return steps


def check_unicode(text: str, what: str = "the text") -> None:
    """A ValueError for a string that is no Unicode text: a lone surrogate, which is how Python hands over a byte
    that was not UTF-8 (a Latin-1 ``é`` in a command-line argument or piped input becomes ``'\\udce9'``). The
    tokenizer said "TypeError: TextInputSequence must be str", a traceback."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:
            raise ValueError(f"{what} is not UTF-8 text: the byte 0x{code - 0xDC00:02x} at character {e.start} is "
                             "not UTF-8") from None
        raise ValueError(f"{what} is not valid Unicode text: a lone surrogate U+{code:04X} at character "
                         f"{e.start}") from None


class _PieceBytes:
    """A vocabulary piece -> the raw bytes it stands for, read off the decoder's steps: byte-level BPE maps each
    character to one byte (GPT-2's alphabet); sentencepiece-style vocabularies spell a space as the metaspace
    (``Replace``/``Metaspace`` steps) and a byte with no piece of its own as ``<0xNN>`` (``ByteFallback``)."""

    def __init__(self, tok: _HFTokenizer):
        steps = _decoder_steps(tok)
        kinds = {d.get("type") for d in steps}
        self.byte_level = {c: b for b, c in enumerate(byte_symbols())} if "ByteLevel" in kinds else None
        self.byte_fallback = "ByteFallback" in kinds
        self.replace: list[tuple[str, str]] = []
        for d in steps:
            if d.get("type") == "Replace" and isinstance(d.get("pattern", {}).get("String"), str):
                self.replace.append((d["pattern"]["String"], d.get("content", "")))
            elif d.get("type") == "Metaspace":
                self.replace.append((d.get("replacement", "\u2581"), " "))

    def __call__(self, piece: str) -> bytes:
        if self.byte_level is not None:
            if all(c in self.byte_level for c in piece):
                return bytes(self.byte_level[c] for c in piece)
            return piece.encode("utf-8")  # not byte-level text (an added token written as-is)
        if self.byte_fallback and (m := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        for old, new in self.replace:
            piece = piece.replace(old, new)
        return piece.encode("utf-8")


def _token_name(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    # Chat templates render tool schemas with |tojson and expect plain (not HTML-escaped) JSON.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _compile_template(template: str, where: str):
    """The chat template compiled at load: a syntax error fails the checkpoint in one line naming the file, not
    every chat request later."""
    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"{where} is not a valid jinja template: {e.message} (line {e.lineno})") from None
    except jinja2.exceptions.TemplateError as e:
        raise CheckpointError(f"{where} is not a valid jinja template: {e}") from None


def _message_text(content, index: int, image_placeholder: str | None = None):
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts
        texts, images = [], 0
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":  # see blockdiff.vision.chat
                images += 1
                texts.append(None)
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"message {index}: only text and image content parts are supported, got {kind!r}")
            texts.append(part["text"])
        if not images:
            return "\n".join(texts)
        if image_placeholder is None:  # the parts, for a template that renders image items itself
            return [{"type": "image"} if t is None else {"type": "text", "text": t} for t in texts]
        return "".join(image_placeholder if t is None else t for t in texts)
    raise ValueError(f"message {index}: content must be a string or a list of text parts, "
                     f"got {type(content).__name__}")


def normalize_messages(messages, image_placeholder: str | None = None) -> list[dict[str, Any]]:
    """Validate chat messages and turn content-part lists into plain strings (other keys pass through). A list
    with image parts stays a list of text/image parts, or with ``image_placeholder`` becomes a string with the
    placeholder where each image was."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"message {i} has no 'role' (a non-empty string)")
        if "content" not in m:
            raise ValueError(f"message {i} ({m['role']}) has no 'content'")
        if m["content"] is None and m.get("tool_calls"):  # an assistant message with only tool calls
            out.append(dict(m))
            continue
        out.append({**m, "content": _message_text(m["content"], i, image_placeholder)})
    return out


class Tokenizer:
    # A one-line reason when this checkpoint cannot take structured output (the engine refuses with it).
    structured_output_refusal: str | None = None

    def example_prompt(self, length: int, seed: int) -> list[int] | None:
        """A prompt of about ``length`` tokens for benchmarks (``blockdiff bench``); None: any ids make a prompt,
        so the benchmark draws random ones. A checkpoint that reads only one kind of prompt (Sudoku) gives one."""
        return None

    def task_params(self, prompt_ids: list[int], params):
        """The checkpoint's own sampling settings for a prompt (the Sudoku model fixes its givens); as-is here."""
        return params

    def display(self, text: str) -> str:
        """A reply as the terminal shows it."""
        return text

    def __init__(self, tokenizer: _HFTokenizer, config: dict | None = None, chat_template: str | None = None,
                 extra_eos_ids: list[int] | None = None):
        self._tok = tokenizer
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.bos_token = _token_name(self.config.get("bos_token"))
        self.eos_token = _token_name(self.config.get("eos_token"))
        self.pad_token = _token_name(self.config.get("pad_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        # The image placeholder a chat template writes for an image part (Gemma 4: <|image|>).
        self.image_token = _token_name(self.config.get("image_token")) or "<|image|>"
        self.pad_token_id = self.token_to_id(self.pad_token)
        eos = [self.token_to_id(self.eos_token)] + list(extra_eos_ids or [])
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in eos if i is not None))
        self._template = None
        self._piece_bytes: _PieceBytes | None = None
        self._specials: frozenset[int] | None = None

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        path = os.path.expanduser(str(path))
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        config = {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            config = read_json(cfg_path, "the tokenizer config")
        template = None
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_path):
            template_where = jinja_path
            try:
                with open(jinja_path, encoding="utf-8") as f:
                    template = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"cannot read {jinja_path}: {e}") from None
        else:
            template_where = f"{cfg_path} ('chat_template')"
            template = config.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if template is not None and not isinstance(template, str):
                raise CheckpointError(f"{template_where} must be a string (a jinja template)")
        compiled = _compile_template(template, template_where) if template else None
        extra_eos = []
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            e = read_json(gen_path, "the generation config").get("eos_token_id")
            extra_eos = [e] if isinstance(e, int) else [x for x in e if isinstance(x, int)] if isinstance(e, list) else []
        try:
            tok = _HFTokenizer.from_file(tj)
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{tj} is not a valid tokenizer.json: {msg}") from None
        if cls is Tokenizer:
            from .sudoku.talk import SudokuTokenizer, is_sudoku_vocabulary
            if is_sudoku_vocabulary(tok):  # puzzles in, solutions out (see blockdiff/sudoku/talk.py)
                cls = SudokuTokenizer
        out = cls(tok, config, template, extra_eos)
        out._template = compiled
        return out

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (grammar engines build their token tables from it)."""
        return self._tok.to_str()

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for, as the decoder would write them (not a lossy decode of the token
        alone): a byte-fallback token ``<0xE2>`` is the one byte 0xE2, a byte-level piece its bytes, the metaspace
        a space, an added token its text. Joined over a token sequence they are the decoded text's UTF-8 (special
        tokens aside: decode drops them). b"" for an id outside the vocabulary."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            return b""
        if int(token_id) in self._added():
            return piece.encode("utf-8")
        if self._piece_bytes is None:
            self._piece_bytes = _PieceBytes(self._tok)
        return self._piece_bytes(piece)

    def is_special(self, token_id: int) -> bool:
        """A special token (BOS, ``<|turn>``...): ``decode`` leaves it out of the text."""
        self._added()
        return int(token_id) in self._specials

    def _added(self) -> frozenset[int]:
        """Ids of added tokens (read once: the vocabulary does not change after load); fills ``_specials``."""
        if self._specials is None:
            decoder = self._tok.get_added_tokens_decoder()
            self._added_ids = frozenset(decoder)
            self._specials = frozenset(i for i, t in decoder.items() if t.special)
        return self._added_ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        check_unicode(text)
        if len(text) > 4096:  # encode_batch releases the GIL (encode does not): other threads run meanwhile
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> "DecodeStream":
        """Incremental detokenizing (tokenizers' ``DecodeStream``): ``step(ids)`` returns the text those ids
        complete, or None while they end inside a multi-byte character; a step costs O(len(ids)), not a decode of
        everything so far."""
        return DecodeStream(self._tok, skip_special_tokens)


    # ------------------------------------------------------------------ chat
    def set_chat_template(self, template: str) -> None:
        """Use ``template`` instead of the checkpoint's; ``ValueError`` when it is not valid Jinja."""
        try:
            compiled = _environment().from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"not a valid Jinja template (line {e.lineno}: {e.message})") from None
        self.chat_template, self._template = template, compiled

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **template_kwargs) -> str:
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template (chat_template.jinja or "
                             "tokenizer_config.json['chat_template']); send a plain prompt instead")
        n_images = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                       for p in m["content"] if isinstance(p, dict) and p.get("type") == "image")
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)

        def render(msgs):
            context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                       "pad_token": self.pad_token or "", **template_kwargs,
                       "messages": msgs, "add_generation_prompt": add_generation_prompt}
            try:
                return self._template.render(**context)
            except jinja2.exceptions.TemplateError as e:
                raise ValueError(f"chat template rejected the messages: {e}") from e

        if n_images:
            # A template that renders image items (as Gemma 4's does) writes one placeholder per image; one that
            # only knows string content gets the placeholders inline in the text instead.
            try:
                text = render(normalize_messages(messages))
                if text.count(self.image_token) == n_images:
                    return text
            except (ValueError, TypeError):
                pass
            return render(normalize_messages(messages, image_placeholder=self.image_token))
        return render(normalize_messages(messages))

    def encode_chat(self, messages, add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        """Token ids of the rendered conversation; the template's own ``<bos>`` is the only BOS."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **template_kwargs),
                           add_special_tokens=False)


# A UTF-8 character is at most 4 bytes and a text id holds at least one byte: a canvas that ends inside a character
# started it within its last 3 ids, so those go one at a time (DecodeStream.step). (Skipped special ids hold none:
# a character split around them may wait one canvas longer; no text is ever lost.)
TAIL = 3


class DecodeStream:
    """One request's incremental detokenizer over the shared ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer: _HFTokenizer, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream as _Stream
        self._tok, self._stream = tokenizer, _Stream(skip_special_tokens=skip_special_tokens)
        self._lists = True

    def step(self, token_ids: list[int]) -> str | None:
        """The text these ids (one canvas' worth) complete, or None. The ids before the last ``TAIL`` go in one call
        into Rust where tokenizers takes a list; the last ones one at a time, so a canvas that ends inside a
        multi-byte character still hands out everything before that character (a list step returns None for all
        of its ids when the last one ends mid-character). On tokenizers without list steps every id goes alone."""
        ids = [int(i) for i in token_ids]
        pieces, head, tail = [], ids[:-TAIL], ids[-TAIL:]
        if head and self._lists:
            try:
                pieces.append(self._stream.step(self._tok, head))
            except TypeError:  # tokenizers without list steps
                self._lists = False
        if head and not self._lists:
            pieces += [self._stream.step(self._tok, i) for i in head]
        pieces += [self._stream.step(self._tok, i) for i in tail]
        return "".join(p for p in pieces if p) or None
