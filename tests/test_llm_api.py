"""The offline ``LLM`` API as a researcher calls it (README "Python API"): threads, callbacks, interrupts."""

import io
import re
import threading

import pytest

from blockdiff import LLM, SamplingParams

PARAMS = SamplingParams(max_new_tokens=20, max_denoising_steps=3, seed=3)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype="float32", device="cpu")


def test_generate_from_several_threads_equals_serial_calls(llm):
    # Interleaved engine.step() loops of two calls used to fail each other's requests (InvalidTransition) or raise.
    prompts = [[f"q{i}", f"r{i}"] for i in range(3)]
    got, errors = {}, []

    def call(i):
        try:
            got[i] = [(o.token_ids, o.finish_reason) for o in llm.generate(prompts[i], PARAMS)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(3):
        assert got[i] == [(o.token_ids, o.finish_reason) for o in llm.generate(prompts[i], PARAMS)]
        assert all(reason == "length" for _, reason in got[i])


def test_generate_inside_on_event_fails_that_request_not_a_deadlock(llm):
    inner = []

    def on_event(ev):
        if ev.kind == "block" and ev.request_index == 0 and not inner:
            inner.append(1)
            llm.generate("x", PARAMS)

    outs = llm.generate(["a", "b"], PARAMS, on_event=on_event)
    assert outs[0].finish_reason == "error" and "on_event" in outs[0].error
    assert outs[1].finish_reason == "length" and outs[1].error is None


@pytest.mark.parametrize("kwargs, name", [({"max_new_token": 4}, "max_new_token"), ({"extra": {"seed": 1}}, "extra"),
                                          ({"n": 2}, "n")])
def test_sampling_params_refuses_an_unknown_field_naming_it(kwargs, name):
    # A misspelt field used to be a bare TypeError, and `extra` was a field that accepted anything and did nothing.
    from blockdiff.sampling.fields import ParamError

    with pytest.raises(ParamError, match=repr(name)) as e:
        SamplingParams(**kwargs)
    assert e.value.param == name and isinstance(e.value, ValueError)


def test_prompt_token_ids_from_a_tensor_or_array_work_like_lists(llm):
    # Rows of a torch / NumPy integer array used to be refused as "prompt token ids must be integers".
    import numpy as np
    import torch

    want = llm.generate(prompt_token_ids=[[2, 10, 11]], sampling_params=PARAMS)[0].token_ids
    for ids in (torch.tensor([[2, 10, 11]]), np.array([[2, 10, 11]])):
        out = llm.generate(prompt_token_ids=ids, sampling_params=PARAMS)[0]
        assert out.prompt_token_ids == [2, 10, 11] and out.token_ids == want
    out = llm.generate([{"prompt_token_ids": torch.tensor([2, 10, 11])}], PARAMS)[0]
    assert out.token_ids == want
    with pytest.raises(ValueError, match="integers"):  # floats stay refused
        llm.generate(prompt_token_ids=torch.tensor([[2.0, 10.0]]), sampling_params=PARAMS)
    with pytest.raises(ValueError, match="a list of token-id lists"):  # one flat row (was a TypeError for a tensor)
        llm.generate(prompt_token_ids=torch.tensor([2, 10, 11]), sampling_params=PARAMS)


def test_a_refused_image_path_names_the_python_switch():
    # The Python API's message used to say only "the server was started without --allowed-local-media-path".
    from blockdiff.vision.media import ImageLoader, MediaLimits

    with pytest.raises(ValueError, match=r"MediaLimits\(allowed_local_media_path=DIR\)") as e:
        ImageLoader(MediaLimits()).load("photo.png")
    assert "--allowed-local-media-path" in str(e.value)  # and the server's flag


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_chat_at_a_terminal_ctrl_c_stops_the_reply_not_the_session(tiny_checkpoint, monkeypatch, capsys):
    # Ctrl-C during a reply used to end the whole chat session (exit 130), losing the conversation.
    from blockdiff.cli import main

    seen, original = [], LLM.chat

    def chat(self, messages, *a, **kw):
        seen.append([m["content"] for m in messages])
        if len(seen) == 1:
            kw["on_event"] = _interrupt_at_first_block
        return original(self, messages, *a, **kw)

    monkeypatch.setattr(LLM, "chat", chat)
    monkeypatch.setattr("sys.stdin", _Terminal("first\nsecond\n/exit\n"))
    assert main(["chat", tiny_checkpoint, "--max-new-tokens", "20", "--steps", "3", "--seed", "0"]) == 0
    assert seen == [["first"], ["second"]]  # the interrupted turn left the conversation
    out = capsys.readouterr().out
    assert "(reply interrupted)" in out and "tokens" in out.split("(reply interrupted)")[1]


def _interrupt_at_first_block(ev):
    if ev.kind == "block":
        raise KeyboardInterrupt


@pytest.mark.parametrize("kwargs, match", [({"max_num_seqs": "4"}, "max_num_seqs must be an integer"),
                                           ({"max_num_seqs": 2.5}, "max_num_seqs must be an integer"),
                                           ({"media_limits": {"max_images": 1}}, "media_limits must be a"),
                                           ({"deterministic": "no"}, "deterministic must be True or False"),
                                           ({"quantize_embedding": 0}, "quantize_embedding must be True or")])
def test_llm_refuses_a_bad_argument_naming_it(tiny_checkpoint, kwargs, match):
    # max_num_seqs="4" was a TypeError from a comparison (2.5 was accepted); a dict media_limits was stored and
    # failed with an AttributeError at the first image.
    with pytest.raises(ValueError, match=match):
        LLM(tiny_checkpoint, dtype="float32", device="cpu", **kwargs)


def test_keyboard_interrupt_mid_generate_leaves_the_llm_usable(llm):
    want = [o.token_ids for o in llm.generate(["a", "b"], PARAMS)]
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a", "b", "c"], SamplingParams(max_new_tokens=64, max_denoising_steps=3, seed=1),
                     on_event=_interrupt_at_first_block)
    assert not llm.engine.has_unfinished()  # its requests were aborted, their pages returned
    assert [o.token_ids for o in llm.generate(["a", "b"], PARAMS)] == want


def test_denoise_refuses_self_conditioning_of_the_wrong_shape(tiny_model):
    # It failed deep inside with "mat1 and mat2 shapes cannot be multiplied".
    import torch

    cache = tiny_model.new_cache(batch_size=1)
    tiny_model.encode(torch.tensor([[2, 10, 11]]), cache)
    canvas = torch.zeros(1, tiny_model.canvas_length, dtype=torch.long)
    with pytest.raises(ValueError, match="self_conditioning_logits must be"):
        tiny_model.denoise(canvas, cache, self_conditioning_logits=torch.zeros(1, tiny_model.canvas_length, 7))
    with pytest.raises(ValueError, match="self_conditioning_embeds must be"):
        tiny_model.denoise(canvas, cache, self_conditioning_embeds=torch.zeros(2, tiny_model.canvas_length, 3))
    logits = tiny_model.denoise(canvas, cache)
    assert tiny_model.denoise(canvas, cache, self_conditioning_logits=logits).shape == logits.shape


def test_run_shows_control_characters_escaped_on_a_terminal_and_as_they_are_in_a_pipe(monkeypatch):
    """A model's text may hold terminal escape sequences (ESC [ 2 J clears the screen, OSC retitles the window):
    on a terminal they are shown escaped; piped output is the text itself."""
    import sys

    from blockdiff.cli import shown_answer

    class Plain:  # a tokenizer without the Sudoku model's grid display
        pass

    llm = type("L", (), {"tokenizer": Plain()})()
    text = "a\x1b[2Jb\tc\nd\x07\x7f\x9b\r"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert shown_answer(llm, text) == "a\\x1b[2Jb\tc\nd\\x07\\x7f\\x9b\\r"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert shown_answer(llm, text) == text


@pytest.mark.parametrize("model", [None, 5, ["ckpt"]])
def test_llm_and_load_model_refuse_a_model_that_is_no_path_naming_the_argument(model):
    # LLM(None) was a TypeError from os.path ("expected str, bytes or os.PathLike object, not NoneType").
    from blockdiff import load_model

    with pytest.raises(ValueError, match="model must be a checkpoint folder, a .gguf file or a hub id"):
        LLM(model, device="cpu")
    with pytest.raises(ValueError, match="path_or_id must be a checkpoint folder"):
        load_model(model, device="cpu")


def test_llm_takes_a_pathlib_path(tiny_checkpoint):
    import pathlib

    llm = LLM(pathlib.Path(tiny_checkpoint), dtype="float32", device="cpu")
    assert llm.model_path == tiny_checkpoint


@pytest.mark.parametrize("messages, words", [
    ("hi", "got a str"),
    ([], "got an empty list"),
    (["hi"], "messages[0] is a str"),
    ([[{"role": "user", "content": "hi"}], "hi"], "messages[1] is a str"),
    ([[{"role": "user", "content": "hi"}], []], "messages[1] is an empty list"),
])
def test_chat_refuses_messages_of_the_wrong_shape_saying_what_it_takes(llm, messages, words):
    # ["hi"] was "dictionary update sequence element #0 has length 1; 2 is required" from deep in the renderer.
    before = llm.engine.stats["denoise_steps"]
    with pytest.raises(ValueError) as e:
        llm.chat(messages, PARAMS)
    assert "messages must be a list of {'role': ..., 'content': ...} dicts" in str(e.value) and words in str(e.value)
    assert llm.engine.stats["denoise_steps"] == before


@pytest.mark.parametrize("kwargs, words", [
    (5, "chat_template_kwargs must be an object"),
    ({1: 2}, "chat_template_kwargs keys must be strings"),
    ({"add_generation_prompt": "no"}, "chat_template_kwargs.add_generation_prompt must be a boolean"),
    ({"messages": []}, "chat_template_kwargs must not set 'messages'"),
    ({"tools": []}, "chat_template_kwargs must not set 'tools'"),
])
def test_chat_refuses_bad_chat_template_kwargs_naming_them(llm, kwargs, words):
    # These were an AttributeError ('int' object has no attribute 'get') or a TypeError from encode_chat
    # ("got multiple values for argument 'messages'").
    with pytest.raises(ValueError, match=re.escape(words)):
        llm.chat([{"role": "user", "content": "hi"}], PARAMS, chat_template_kwargs=kwargs)


def test_chat_honours_add_generation_prompt_in_chat_template_kwargs_as_the_server_does(llm):
    # {"add_generation_prompt": False} was a TypeError (the keyword given twice); the server honours it.
    messages = [{"role": "user", "content": "hi"}]
    want = llm.tokenizer.encode_chat(messages, add_generation_prompt=False)
    out = llm.chat(messages, PARAMS, chat_template_kwargs={"add_generation_prompt": False})[0]
    assert out.prompt_token_ids == want
    assert want != llm.chat(messages, PARAMS)[0].prompt_token_ids


def test_sampling_params_take_numpy_and_torch_numbers_as_the_plain_values_they_hold(llm):
    # seed=np.int64(3) was refused as "'seed' must be an integer, got int64", allowed_token_ids=np.arange(...) as
    # "must be an array, got ndarray" (while prompt_token_ids take rows of an array).
    import numpy as np
    import torch

    plain = dict(seed=3, max_new_tokens=20, max_denoising_steps=3, entropy_bound=0.5, stop_token_ids=[7],
                 allowed_token_ids=list(range(10, 60)), logit_bias={12: 1.5}, ignore_eos=True)
    arrays = dict(seed=np.int64(3), max_new_tokens=torch.tensor(20), max_denoising_steps=np.int32(3),
                  entropy_bound=np.float64(0.5), stop_token_ids=[np.int64(7)],
                  allowed_token_ids=np.arange(10, 60), logit_bias={np.int64(12): np.float32(1.5)},
                  ignore_eos=np.bool_(True))
    p = SamplingParams(**arrays)
    assert p == SamplingParams(**plain)
    for name in plain:
        v = getattr(p, name)
        assert type(v) is type(plain[name]), (name, type(v))
        if isinstance(v, list):
            assert all(type(x) is int for x in v), name
    assert SamplingParams(allowed_token_ids=torch.arange(10, 60)).allowed_token_ids == list(range(10, 60))
    assert llm.generate("hi", p)[0].token_ids == llm.generate("hi", SamplingParams(**plain))[0].token_ids
    # what is not an integer stays refused, in the words a plain value gets
    with pytest.raises(ValueError, match="'max_new_tokens' must be an integer, got a number"):
        SamplingParams(max_new_tokens=np.float64(1.5))
    with pytest.raises(ValueError, match=r"'allowed_token_ids\[0\]' must be an integer, got a number"):
        SamplingParams(allowed_token_ids=torch.tensor([1.0]))
