import json
import os
import shutil

import pytest

from blockdiff.tokenizer import Tokenizer
from fixtures import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, TURN_END_ID, TURN_START_ID, write_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint)


@pytest.mark.parametrize("text", ["Hello, world!", "  leading and trailing  ", "ünïcödé ✓ 中文 🙂\n\ttabs",
                                  "", "the the the thing", "\x00\x01 bytes \xff"])
def test_any_text_round_trips_through_encode_and_decode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_every_id_decodes(tok):
    assert isinstance(tok.decode(range(tok.vocab_size), skip_special_tokens=False), str)


def test_vocab_size_matches_the_model_config(tok, tiny_checkpoint):
    with open(os.path.join(tiny_checkpoint, "config.json")) as f:
        assert tok.vocab_size == json.load(f)["text_config"]["vocab_size"]


def test_special_tokens_in_text_map_to_their_gemma_ids(tok):
    for token_id, token in SPECIAL_TOKENS.items():
        assert tok.encode(token) == [token_id]
        assert tok.token_to_id(token) == token_id
    ids = tok.encode("<bos><|turn>user\nhi<turn|>\n")
    assert ids[:2] == [BOS_ID, TURN_START_ID] and TURN_END_ID in ids


def test_special_ids_and_eos_set_come_from_the_checkpoint(tok):
    assert tok.bos_token_id == BOS_ID and tok.pad_token_id == PAD_ID
    # tokenizer_config's <eos> first, then generation_config's [1, 106, 50] without repeats.
    assert tok.eos_token_ids == [EOS_ID, TURN_END_ID, 50]


def test_encode_adds_bos_only_when_asked(tok):
    assert tok.encode("hi")[0] != BOS_ID
    assert tok.encode("hi", add_special_tokens=True) == [BOS_ID] + tok.encode("hi")


def test_decode_skips_special_tokens_unless_asked(tok):
    ids = [BOS_ID] + tok.encode("hi") + [TURN_END_ID]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<turn|>"


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
EXPECTED_CHAT = ("<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n"
                 "<|turn>model\n4<turn|>\n<|turn>user\nAnd 3+3?<turn|>\n<|turn>model\n")


def test_chat_template_renders_gemma_turns(tok):
    assert tok.apply_chat_template(CONVERSATION) == EXPECTED_CHAT
    no_prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert no_prompt == EXPECTED_CHAT[:-len("<|turn>model\n")]


def test_openai_content_parts_are_joined(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]}]
    assert tok.apply_chat_template(parts) == "<bos><|turn>user\nWhat is\n2+2?<turn|>\n<|turn>model\n"


@pytest.mark.parametrize("role", ["system", "user", "model"])
def test_turn_header_is_three_tokens_like_gemma(tok, role):
    assert tok.encode(f"<|turn>{role}\n") == [TURN_START_ID, tok.token_to_id(role), tok.token_to_id("Ċ")]


def test_encode_chat_has_exactly_one_bos_and_specials_as_ids(tok):
    ids = tok.encode_chat(CONVERSATION)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert ids.count(TURN_START_ID) == 5 and ids.count(TURN_END_ID) == 4
    prompt = [TURN_START_ID] + tok.encode("model\n")
    assert ids[-len(prompt):] == prompt
    assert tok.decode(ids, skip_special_tokens=False) == EXPECTED_CHAT


def test_template_kwargs_reach_the_template(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    (tmp_path / "ck" / "chat_template.jinja").write_text(
        "{{ bos_token }}{% if enable_thinking %}THINK{% endif %}{{ messages[0]['content'] }}")
    t = Tokenizer.from_dir(tmp_path / "ck")
    msgs = [{"role": "user", "content": "x"}]
    assert t.apply_chat_template(msgs, enable_thinking=True) == "<bos>THINKx"
    assert t.apply_chat_template(msgs) == "<bos>x"


def test_template_from_tokenizer_config_when_no_jinja_file(tmp_path):
    write_tokenizer(tmp_path, 512, chat_template=None)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(tmp_path)
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"content": "hi"}], "no 'role'"),
    ([{"role": "user"}], "no 'content'"),
    ([{"role": "user", "content": 42}], "content must be a string"),
    ([{"role": "user", "content": None}], "content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text"),
    (["hi"], "must be a dict"),
    ([{"role": "robot", "content": "hi"}], "unknown role robot"),  # the template's raise_exception
])
def test_malformed_messages_raise_value_error(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_checkpoint_without_template_raises_value_error(tmp_path):
    write_tokenizer(tmp_path, 512, chat_template=None)
    t = Tokenizer.from_dir(tmp_path)
    assert t.encode("hi")  # plain text still works
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_sandbox_blocks_attribute_escapes(tmp_path):
    write_tokenizer(tmp_path, 512, chat_template="{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(ValueError):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_folder_without_tokenizer_json_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------- streaming text
def _sentencepiece_tokenizer() -> Tokenizer:
    """SentencePiece-style BPE with byte fallback and Gemma's decoder (Replace, ByteFallback, Fuse): multi-byte
    characters outside the vocabulary arrive as one <0xNN> token per byte."""
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as HF
    from tokenizers.models import BPE

    pieces = ["<pad>", "<eos>", "<bos>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["\u2581", "h", "e", "l", "o", "\u2581h", "he", "ll", "\u2581he", "\u2581hell", "lo", "\u2581hello", "é", "中"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("\u2581", "h"), ("h", "e"), ("l", "l"), ("\u2581h", "e"), ("\u2581he", "ll"), ("l", "o"),
              ("\u2581hell", "o")]
    hf = HF(BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<eos>", "<bos>")])
    return Tokenizer(hf, {"eos_token": "<eos>", "bos_token": "<bos>"})


STREAM_TEXTS = ["hello héllo 中文 🙂👍🏽 naïve", "🙂🙂🙂", " leading space and ünïcödé ✓", "a\tb\nc 𝔘𝔫𝔦",
                "Привет, мир! 👨‍👩‍👧 end"]


def _stream(tok, ids, chunk, stops=None, eos=frozenset()):
    from blockdiff.server.text import TextStream
    ts = TextStream(tok, stops, eos)
    deltas = [ts.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas + [ts.finish()]


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_streamed_text_equals_one_decode_across_multibyte_splits(kind, chunk, tok):
    """DecodeStream deltas, however the ids are cut into canvases (emoji and CJK split across tokens and
    chunks), add up to exactly tokenizer.decode(ids), and no delta ever holds half a character."""
    t = tok if kind == "byte-level" else _sentencepiece_tokenizer()
    for text in STREAM_TEXTS:
        ids = t.encode(text, add_special_tokens=False)
        deltas = _stream(t, ids, chunk)
        assert "".join(deltas) == t.decode(ids), text
        assert not any("\ufffd" in d for d in deltas), deltas


class _WholeDecodeStream:
    """The streaming text as blockdiff computed it before DecodeStream: the whole output decoded on every push."""

    def __init__(self, tok, stops, eos_ids):
        self.tok, self.stops, self.eos_ids, self.ids, self.sent, self.stopped = tok, list(stops or []), eos_ids, [], \
            0, False

    def push(self, ids, final=False):
        if self.stopped:
            return ""
        self.ids.extend(ids)
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.eos_ids else self.ids
        text = self.tok.decode(ids)
        end = len(text)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            end, final = min(hits), True
            self.stopped = True
        if not final:
            stripped = text.rstrip("\ufffd")
            end = len(stripped)
            for s in self.stops:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if stripped.endswith(s[:k]):
                        end = min(end, len(stripped) - k)
                        break
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


def _monotone(t, ids) -> bool:
    """Every prefix's decode (less an incomplete last character) starts the full decode: the case in which a
    stream of deltas can equal the whole text at all (random byte soup may decode differently once more bytes
    come)."""
    full = t.decode(ids)
    return all(full.startswith(t.decode(ids[:k]).rstrip("\ufffd")) for k in range(1, len(ids)))


@pytest.mark.parametrize("seed", range(8))
def test_streamed_text_for_random_ids(seed, tok):
    """Random ids (invalid UTF-8, specials in between, an EOS at the end) never break the stream; whenever the
    prefixes decode consistently, the deltas add up to exactly the full decode, as the former decode-everything
    stream's did (where DecodeStream gives up on byte soup, the stream decodes everything, as before)."""
    import random
    rng = random.Random(seed)
    checked = 0
    for t in (tok, _sentencepiece_tokenizer()):
        eos = t.eos_token_ids[0]
        for _ in range(6):
            ids = [i for i in (rng.randrange(t.vocab_size) for _ in range(rng.randrange(1, 40))) if i != eos]
            for chunk in (1, 4):
                got = "".join(_stream(t, ids + [eos], chunk, eos={eos}))
                old = _WholeDecodeStream(t, None, {eos})
                want = "".join([old.push((ids + [eos])[i:i + chunk]) for i in range(0, len(ids) + 1, chunk)]
                               + [old.push([], final=True)])
                if _monotone(t, ids):
                    assert got == want == t.decode(ids)
                    checked += 1
                else:
                    assert isinstance(got, str)
    assert checked > 0


def test_per_id_steps_give_the_same_text_as_list_steps(tok, monkeypatch):
    """tokenizers versions whose DecodeStream.step takes one id at a time: the same text."""
    from blockdiff import tokenizer as tk
    ids = tok.encode(STREAM_TEXTS[0], add_special_tokens=False)
    want = _stream(tok, ids, 3)
    original = tk.DecodeStream.__init__

    def per_id(self, *a, **k):
        original(self, *a, **k)
        self._lists = False
    monkeypatch.setattr(tk.DecodeStream, "__init__", per_id)
    got = _stream(tok, ids, 3)  # a delta may come one canvas later or earlier: the text is the same
    assert "".join(got) == "".join(want) == tok.decode(ids) and not any("\ufffd" in d for d in got)


@pytest.mark.parametrize("per_id", [False, True])
@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_a_canvas_ending_mid_character_holds_back_only_that_character(kind, per_id, tok, monkeypatch):
    """Cut the ids inside each multi-byte character: the first push hands out all the text of its complete ids
    (only the trailing partial character waits), and the pushes still add up to the one decode. Before, a list
    step that ended mid-character returned nothing for the whole canvas."""
    from blockdiff import tokenizer as tk
    from blockdiff.server.text import TextStream
    t = tok if kind == "byte-level" else _sentencepiece_tokenizer()
    if per_id:  # tokenizers versions whose DecodeStream.step takes one id at a time
        original = tk.DecodeStream.__init__

        def one_at_a_time(self, *a, **k):
            original(self, *a, **k)
            self._lists = False
        monkeypatch.setattr(tk.DecodeStream, "__init__", one_at_a_time)
    cuts = 0
    for text in STREAM_TEXTS:
        ids = t.encode(text, add_special_tokens=False)
        for k in range(2, len(ids)):
            if not t.decode(ids[:k]).endswith("\ufffd"):
                continue  # ids[:k] ends on a character boundary
            j = max(i for i in range(k) if not t.decode(ids[:i]).endswith("\ufffd"))  # the complete ids
            ts = TextStream(t)
            first = ts.push(ids[:k])
            assert first == t.decode(ids[:j]) and len(first) > 0 or j == 0, (text, k, first)
            assert first + ts.push(ids[k:]) + ts.finish() == t.decode(ids)
            cuts += 1
    assert cuts > 10  # the texts do get cut inside characters


@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_stops_before_a_stop_string_split_across_chunks(chunk, tok):
    text = "naïve 🙂 words STOP🙂 after"
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, ids, chunk, stops=["STOP🙂"])
    assert "".join(deltas) == "naïve 🙂 words "


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_token_bytes_are_each_tokens_raw_bytes(kind, tok):
    """Joined over any encoding (characters split over byte tokens included) the tokens' bytes are the text's
    UTF-8; a token that decodes alone to whole text has exactly those bytes; a special token its name."""
    t = tok if kind == "byte-level" else _sentencepiece_tokenizer()
    for text in STREAM_TEXTS:
        ids = t.encode(text, add_special_tokens=False)
        assert b"".join(t.token_bytes(i) for i in ids) == text.encode(), text
    split = 0
    for i in range(t.vocab_size):
        alone = t.decode([i], skip_special_tokens=False)
        if "\ufffd" not in alone:
            assert t.token_bytes(i) == alone.encode(), (i, t.id_to_token(i))
        else:
            split += 1
            assert len(t.token_bytes(i)) >= 1
    assert split >= 64  # the lone bytes 0x80-0xFF (and more): what decoding alone cannot give
    assert t.is_special(t.token_to_id("<eos>")) and t.token_bytes(t.token_to_id("<eos>")) == b"<eos>"
    if kind == "sentencepiece":
        assert t.token_bytes(t.token_to_id("<0xE2>")) == b"\xe2"
        assert t.token_bytes(t.token_to_id("\u2581hello")) == b" hello"


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_completion_logprobs_tokens_join_to_the_text_across_blocks(kind, chunk, tok):
    """Completions logprobs built canvas by canvas: the tokens join to the decoded text (a split character is
    "" then the whole character), each offset is where its token's text starts, and top_logprobs keys of
    different tokens never collide (a partial character is named bytes:\\xNN)."""
    from blockdiff.server.logprobs import CompletionLogprobs, completion_logprobs
    t = tok if kind == "byte-level" else _sentencepiece_tokenizer()
    text = "héllo 中文 🙂 naïve"
    ids = t.encode(text, add_special_tokens=False) + [t.token_to_id("<eos>")]
    lone_bytes = [t.token_to_id(p) for p in ("<0xE2>", "<0xE4>", "<0xF0>")] if kind == "sentencepiece" else \
        [t.token_to_id(p) for p in ("Ã", "Â", "ð")]
    entries = [(-0.5, [(i, -0.5)] + [(j, -1.0) for j in lone_bytes]) for i in ids]
    whole = completion_logprobs(t, ids, entries)
    built = CompletionLogprobs(t)
    parts = [built.block(ids[k:k + chunk], entries[k:k + chunk]) for k in range(0, len(ids), chunk)]
    assert [x for p in parts for x in p["tokens"]] == whole["tokens"]
    assert [x for p in parts for x in p["text_offset"]] == whole["text_offset"]
    assert whole["tokens"][-1] == "<eos>" and whole["text_offset"][-1] == len(text)
    assert "".join(whole["tokens"][:-1]) == text and "" in whole["tokens"]
    toks = whole["tokens"][:-1]
    assert whole["text_offset"][:-1] == [len("".join(toks[:k])) for k in range(len(toks))]
    assert all(len(d) == 4 for d in whole["top_logprobs"])
    assert any(k.startswith("bytes:\\x") for k in whole["top_logprobs"][0])


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streamed_completion_logprobs_equal_the_whole_when_the_output_ends_inside_a_character(kind, chunk, tok):
    """An output cut inside a character (max_tokens, a budget): its text ends in U+FFFD, which the whole output's
    last token carries. Streamed block by block, the tokens of a character a block leaves incomplete wait for the
    next block or the end (``flush``), so the streamed entries equal the whole's."""
    from blockdiff.server.logprobs import CompletionLogprobs, completion_logprobs
    t = tok if kind == "byte-level" else _sentencepiece_tokenizer()
    ids = t.encode("ab 中文 🙂", add_special_tokens=False)
    lead = max(k for k, i in enumerate(ids) if t.token_bytes(i)[:1] == b"\xf0")  # the emoji's first byte
    ids = ids[:lead + 2]  # 2 of its 4 bytes
    entries = [(-0.5, [(i, -0.5)]) for i in ids]
    whole = completion_logprobs(t, ids, entries)
    assert whole["tokens"][-1].endswith("\ufffd")
    built = CompletionLogprobs(t)
    parts = [built.block(ids[k:k + chunk], entries[k:k + chunk]) for k in range(0, len(ids), chunk)]
    parts.append(built.flush())
    for key in whole:
        assert [x for p in parts for x in p[key]] == whole[key]
    assert built.flush() is None  # nothing held back any more


def test_a_long_stop_string_costs_a_stream_no_work_per_character_of_it(tok):
    """The held-back tail of a stream is computed on the event loop every stream shares, once per canvas: a stop
    string of many characters is not matched at every length against the text's tail (its square per canvas:
    seconds for 16 stops of 20k characters), and the stream still stops exactly before it, whatever the canvases."""
    from blockdiff.server.text import TextStream

    slices = []

    class Stop(str):
        def __getitem__(self, i):
            slices.append(i)
            return str.__getitem__(self, i)
    long_stop = Stop("x" + "y z " * 300)
    ts = TextStream(tok, [long_stop, Stop("END")])
    ids = tok.encode("x y z " * 400, add_special_tokens=False)
    for i in range(0, len(ids), 16):
        slices.clear()
        ts.push(ids[i:i + 16])
        assert len([s for s in slices if not isinstance(s, int)]) <= 100  # not one per character
    for text, stop in [("hello x" + "y z " * 300 + " after", str(long_stop)),
                       ("a" * 500 + "b" * 70 + "a" * 200, "a" * 150 + "c"),
                       ("naïve " * 40 + "STOP" + "🙂" * 120 + " tail", "STOP" + "🙂" * 120)]:
        assert len(stop) > 100
        ids = tok.encode(text, add_special_tokens=False)
        want = text[:text.find(stop)] if stop in text else text
        for chunk in (1, 5, 16):
            assert "".join(_stream(tok, ids, chunk, stops=[stop])) == want, (stop[:10], chunk)
