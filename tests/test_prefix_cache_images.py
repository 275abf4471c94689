"""Prefix caching for prompts with images: image tokens key by their image's content, so the same images after
the same text reuse the encoded keys/values (and skip the vision tower) with the cold run's tokens, other images
never do, text before the first image is shared with text-only prompts, and a reuse never ends inside an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blockdiff import LLM, SamplingParams
from blockdiff.engine.engine import Engine
from blockdiff.kv_cache import KVPool
from fixtures import IMAGE_ID, TINY_VISION_CONFIGS, make_checkpoint

PAGE = 4


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("pcimg"), vision=TINY_VISION_CONFIGS["patch8_pool2_clipped"],
                           seed=21, text_overrides={"sliding_window": 8})
    out = LLM(path, dtype="float32")
    out.model._kv_pool = KVPool(out.model.text.layers, page_size=PAGE)  # many blocks in a short prompt
    return out


class Counting:
    """Counts the images the vision tower reads."""

    def __init__(self, model):
        self.seen, self.orig, self.model = 0, model.vision.image_features, model

    def __enter__(self):
        def wrapped(pixel_values, image_position_ids, *rest):
            self.seen += pixel_values.shape[0]
            return self.orig(pixel_values, image_position_ids, *rest)
        self.model.vision.image_features = wrapped
        return self

    def __exit__(self, *exc):
        self.model.vision.image_features = self.orig


def run(engine, llm, text: str, images, seed=3, salt=None):
    ids, im = llm._with_images(llm._encode_text(text), images)
    s = engine.add_request(ids, SamplingParams(seed=seed, max_new_tokens=12, ignore_eos=True, cache_salt=salt),
                           images=im)
    while engine.has_unfinished():
        engine.step()
    assert s.finish_reason == "length", s.finish_reason
    return s, ids


def engines(llm):
    return (Engine(llm.model, llm.defaults, llm.tokenizer),
            Engine(llm.model, llm.defaults, llm.tokenizer, prefix_cache_bytes=1 << 24))


def test_same_images_reuse_the_prefix_with_the_cold_tokens_and_skip_the_vision_tower(llm):
    cold, warm = engines(llm)
    a, b = picture(120, 90, 0), picture(50, 160, 1)
    first = "<bos>Look: <|image|> and <|image|> - which one is brighter, and why?"
    second = "<bos>Look: <|image|> and <|image|> - which one has more red?"
    run(warm, llm, first, [a, b])
    with Counting(llm.model) as c:
        s_warm, ids = run(warm, llm, second, [a, b])
    last_image = max(i for i, t in enumerate(ids) if t == IMAGE_ID)
    assert s_warm.metrics.cached_tokens > last_image  # both images came from the cache ...
    assert c.seen == 0  # ... and the vision tower read neither
    s_cold, _ = run(cold, llm, second, [a, b])
    assert s_cold.metrics.cached_tokens == 0
    assert s_warm.output_ids == s_cold.output_ids and len(s_cold.output_ids) == 12


def test_other_images_reuse_only_the_text_before_them(llm):
    cold, warm = engines(llm)
    text = "<bos>Describe this picture in a few words please: <|image|> thanks"
    run(warm, llm, text, [picture(120, 90, 0)])
    with Counting(llm.model) as c:
        s_warm, ids = run(warm, llm, text, [picture(120, 90, 5)])  # same size, other pixels
    start = ids.index(IMAGE_ID)
    assert 0 < s_warm.metrics.cached_tokens <= start  # the text before the image, whole blocks of it
    assert s_warm.metrics.cached_tokens == (start // PAGE) * PAGE
    assert c.seen == 1
    s_cold, _ = run(cold, llm, text, [picture(120, 90, 5)])
    assert s_warm.output_ids == s_cold.output_ids


def test_text_before_an_image_is_shared_with_a_text_prompt(llm):
    _, warm = engines(llm)
    head = "<bos>Describe this picture in a few words please:"
    run(warm, llm, head + " nothing here, just text", None)
    s, ids = run(warm, llm, head + " <|image|>", [picture(64, 64, 2)])
    assert s.metrics.cached_tokens >= PAGE and s.metrics.cached_tokens <= ids.index(IMAGE_ID)


def test_a_reuse_never_ends_inside_an_image(llm):
    """A cache budget of a few blocks keeps the chain of the first prompt up to a point inside its image: the
    second request (same text and image) would match into the image, and reuses only up to the image's start."""
    cold = Engine(llm.model, llm.defaults, llm.tokenizer)
    probe = Engine(llm.model, llm.defaults, llm.tokenizer, prefix_cache_bytes=1 << 24).prefix_cache
    blocks = 5
    warm = Engine(llm.model, llm.defaults, llm.tokenizer, prefix_cache_bytes=blocks * probe.block_bytes)
    img, text = picture(120, 90, 0), "<bos>Q: <|image|> a question about it"
    run(warm, llm, text, [img])
    ids, im = llm._with_images(llm._encode_text(text), [img])
    start, end = ids.index(IMAGE_ID), max(i for i, t in enumerate(ids) if t == IMAGE_ID) + 1
    raw = len(warm.prefix_cache.match(im.cache_keys(ids, IMAGE_ID))) * PAGE
    assert start < raw == blocks * PAGE < end  # the cached chain ends inside the image
    with Counting(llm.model) as c:
        s_warm, _ = run(warm, llm, text, [img])
    assert s_warm.metrics.cached_tokens == start // PAGE * PAGE
    assert c.seen == 1
    s_cold, _ = run(cold, llm, text, [img])
    assert s_warm.output_ids == s_cold.output_ids


def test_the_split_rule(llm):
    ids, im = llm._with_images(llm._encode_text("<bos>a <|image|> b <|image|> c"), [picture(64, 64, 0),
                                                                                   picture(40, 80, 1)])
    runs = [i for i, t in enumerate(ids) if t == IMAGE_ID]
    s0, e1 = runs[0], runs[-1] + 1
    assert im.splits_at(ids, IMAGE_ID, s0) and not im.splits_at(ids, IMAGE_ID, s0 + 1)
    assert im.splits_at(ids, IMAGE_ID, e1) and im.after(ids, IMAGE_ID, e1) is None
    assert im.after(ids, IMAGE_ID, 0) is im
    mid = s0 + im.num_soft_tokens[0] + 1  # just past the first image's run
    assert im.splits_at(ids, IMAGE_ID, mid) and im.after(ids, IMAGE_ID, mid).num_soft_tokens == im.num_soft_tokens[1:]
    keys = im.cache_keys(ids, IMAGE_ID)
    assert keys[:s0] == ids[:s0] and keys[s0] == ("image", im.digests()[0]) and keys[e1 - 1] == ("image",
                                                                                               im.digests()[1])
    _, other = llm._with_images(ids, [picture(64, 64, 9), picture(40, 80, 1)])
    assert other.digests()[0] != im.digests()[0] and other.digests()[1] == im.digests()[1]


def test_the_server_hashes_images_while_preparing_not_in_the_engine_tick(llm, monkeypatch):
    """Digesting an image reads all its pixel values (~10 ms for a full-size image): the server does it on its
    preparing threads, so the engine thread, which ticks every running request, never does. The second request
    still reuses the image (the digest is the same one)."""
    import base64
    import io
    import threading

    from blockdiff.server import build_app
    from blockdiff.vision.prompt import ImageInputs
    from test_server import LiveServer

    threads, digests = set(), ImageInputs.digests

    def recorded(self):
        if self._digests is None:  # it hashes (later calls return the digests it kept)
            threads.add(threading.current_thread().name)
        return digests(self)
    monkeypatch.setattr(ImageInputs, "digests", recorded)
    buf = io.BytesIO()
    picture(120, 90, 0).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    served = LLM.from_model(llm.model, llm.tokenizer, llm.defaults, prefix_cache_bytes=1 << 24)
    served.images = llm.images
    server = LiveServer(build_app(served, "m"))
    try:
        cached = []
        for _ in range(2):
            r = server.client().chat.completions.create(
                model="m", max_tokens=8, extra_body={"max_denoising_steps": 2},
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": "What is this picture? " * 4}]}])
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
    finally:
        server.close()
    assert cached[0] == 0 and cached[1] > 0
    assert threads and "blockdiff-engine" not in threads


class TowerRuns:
    """Counts the vision tower's passes (one per image it computes)."""

    def __init__(self, model):
        self.runs, self.tower = 0, model.vision.tower

    def __enter__(self):
        orig = self.tower.forward

        def counted(*a, **kw):
            self.runs += 1
            return orig(*a, **kw)
        self.tower.forward = counted
        return self

    def __exit__(self, *exc):
        del self.tower.forward


def test_an_image_ending_in_the_last_partial_block_skips_the_tower_when_resent(llm):
    """Text then an image at the end of the message: the image's tokens end in the prompt's last, partial block,
    which the prefix cache does not keep, so the next turn re-encodes them; the feature memo spares the tower."""
    cold, warm = engines(llm)
    img = picture(120, 90, 4)
    turn1 = "<bos>What is in this picture? <|image|>"
    s1, ids1 = run(warm, llm, turn1, [img])
    end = max(i for i, t in enumerate(ids1) if t == IMAGE_ID) + 1
    assert end > len(ids1) // PAGE * PAGE  # the image ends in the partial block: the cache cannot serve it
    turn2 = turn1 + " It looks like noise. And now?"
    with TowerRuns(llm.model) as t:
        s2, ids2 = run(warm, llm, turn2, [img])
    assert s2.metrics.cached_tokens <= ids2.index(IMAGE_ID)  # the image's tokens were encoded again ...
    assert t.runs == 0 and warm.image_memo.hits >= 1  # ... but not through the tower
    c2, _ = run(cold, llm, turn2, [img])
    assert s2.output_ids == c2.output_ids
    assert cold.image_memo is None  # no prefix cache: no memo either


def test_the_same_image_twice_in_one_prompt_runs_the_tower_once(llm):
    cold, warm = engines(llm)
    img = picture(90, 120, 6)
    text = "<bos>Compare <|image|> with <|image|> please"
    with TowerRuns(llm.model) as t:
        s, _ = run(warm, llm, text, [img, img])
    assert t.runs == 1
    with TowerRuns(llm.model) as t:
        c, _ = run(cold, llm, text, [img, img])
    assert t.runs == 2 and s.output_ids == c.output_ids


def test_feature_memo_keeps_the_most_recent_within_its_bytes():
    from blockdiff.model.vision_tower import FeatureMemo
    m = FeatureMemo(3 * 400)  # three [10, 10] fp32 tensors
    ts = {k: torch.full((10, 10), float(k)) for k in range(5)}
    for k in range(3):
        m.put(k, ts[k])
    assert m.get(0) is ts[0]  # 0 is now the most recent
    m.put(3, ts[3])  # evicts 1, the least recently used
    assert m.get(1) is None and m.get(0) is ts[0] and m.get(2) is ts[2] and m.get(3) is ts[3]
    assert m.nbytes == 1200 and (m.hits, m.misses) == (4, 1)
    m.put(4, torch.zeros(20, 20))  # larger than the whole budget: not kept, nothing evicted
    assert m.get(4) is None and len(m.items) == 3


def test_the_feature_memo_is_never_shared_across_cache_salts(llm):
    """The memo keys an image under its request's cache_salt, as the prefix cache keys blocks: a tenant sending an
    image another tenant sent gets no faster first block from it (the tower runs); the same salt still skips it."""
    _, warm = engines(llm)
    img = picture(120, 90, 8)
    turn1 = "<bos>What is in this picture? <|image|>"
    turn2 = turn1 + " It looks like noise. And now?"  # the image ends in turn1's partial block: the memo's case
    run(warm, llm, turn1, [img], salt="tenant-a")
    for salt, runs in (("tenant-b", 1), (None, 1), ("tenant-a", 0)):
        with TowerRuns(llm.model) as t:
            s, ids = run(warm, llm, turn2, [img], salt=salt)
        assert t.runs == runs, salt
    assert s.metrics.cached_tokens <= ids.index(IMAGE_ID)  # tenant-a's skip came from the memo, not the blocks
