"""A damaged checkpoint or a bad command-line value fails with one line naming the file (or tensor, or flag)
and the problem, before any work: no traceback, exit status 2."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockdiff.cli import main


def run_fails(capsys, argv) -> str:
    """``blockdiff argv`` exits 2 with exactly one line on stderr; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("blockdiff: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint to damage."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_checkpoint, path)
    return path


def edit_json(path, fn):
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


WEIGHTS = "model.safetensors"


@pytest.mark.parametrize("damage,words", [
    (lambda b: b"", "is empty"),
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b"\x00garbage" * 100, "not a readable safetensors file"),
    (lambda b: b[:8] + b"{not json" + b[17:], "not a readable safetensors file"),
], ids=["empty", "truncated", "garbage", "bad-header"])
def test_damaged_safetensors_is_one_line_naming_the_file(ckpt, capsys, damage, words):
    f = os.path.join(ckpt, WEIGHTS)
    with open(f, "rb") as fh:
        data = fh.read()
    with open(f, "wb") as fh:
        fh.write(damage(data))
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert f in err and words in err, err


@pytest.mark.parametrize("content,words", [
    ("{not json", "is not a valid tokenizer.json: key must be a string"),
    ('{"version": "1.0", "model": 5}', "is not a valid tokenizer.json"),
], ids=["syntax", "structure"])
def test_corrupt_tokenizer_json_names_the_file(ckpt, capsys, content, words):
    with open(os.path.join(ckpt, "tokenizer.json"), "w") as f:
        f.write(content)
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert "tokenizer.json" in err and words in err, err


@pytest.mark.parametrize("content,words", [
    ("{\"weight_map\": ", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"metadata": {}}', "has no 'weight_map'"),
    ('{"weight_map": {"a": "../model.safetensors"}}', "shard '../model.safetensors' is not a file name in the "
                                                       "checkpoint's folder"),
    ('{"weight_map": {"a": "/etc/passwd"}}', "shard '/etc/passwd' is not a file name"),
], ids=["syntax", "array", "no-map", "parent", "absolute"])
def test_corrupt_index_json_names_the_file(ckpt, capsys, content, words):
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        f.write(content)
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert "model.safetensors.index.json" in err and words in err, err


@pytest.mark.parametrize("file", ["config.json", "generation_config.json"])
def test_broken_config_json_names_the_file(ckpt, capsys, file):
    with open(os.path.join(ckpt, file), "w") as f:
        f.write('{"text_config": {')
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert os.path.join(ckpt, file) in err and "not valid JSON" in err and "line 1" in err, err


@pytest.mark.parametrize("file,edit,words", [
    ("config.json", lambda d: d["text_config"].update(hidden_size="64"), "text_config.hidden_size must be an integer"),
    ("config.json", lambda d: d["text_config"].update(num_experts=4.5), "text_config.num_experts must be an integer"),
    ("config.json", lambda d: d["text_config"].update(layer_types="full"), "text_config.layer_types must be"),
    ("config.json", lambda d: d.update(text_config=[]), "text_config must be an object"),
    ("config.json", lambda d: d.update(canvas_length="16"), "canvas_length must be a positive integer"),
    # 0, null and false ran as a canvas of 256 (the reference divides by 0 and fails on null)
    ("config.json", lambda d: d.update(canvas_length=0), "canvas_length must be a positive integer, got 0"),
    ("config.json", lambda d: d.update(canvas_length=None), "canvas_length must be a positive integer, got None"),
    ("config.json", lambda d: d.update(canvas_length=False), "canvas_length must be a positive integer, got False"),
    ("generation_config.json", lambda d: d.update(max_denoising_steps="48"), "max_denoising_steps must be an integer"),
    ("generation_config.json", lambda d: d.update(t_min=[0.4]), "t_min must be a number"),
    ("generation_config.json", lambda d: d.update(eos_token_id="<eos>"), "eos_token_id must be an integer"),
    ("generation_config.json", lambda d: d.update(sampler_config={"entropy_bound": "x"}),
     "sampler_config.entropy_bound must be a number"),
    # in range too: the bounds a request's own values meet
    ("generation_config.json", lambda d: d.update(max_denoising_steps=-4), "'max_denoising_steps' must be >= 1"),
    ("generation_config.json", lambda d: d.update(max_new_tokens=-3), "'max_new_tokens' must be >= 1"),
    ("generation_config.json", lambda d: d.update(sampler_config={"entropy_bound": 0}), "'entropy_bound' must be > 0"),
    ("generation_config.json", lambda d: d.update(t_min=0.5, t_max=0.1), "t_max must be greater than t_min"),
    # values the reference runs and blockdiff does not: refused, never run differently
    ("generation_config.json", lambda d: d.update(max_length=40), "max_length=40 is not supported"),
    # the reference's static and quantized caches give other tokens than its default dynamic cache
    # (test_generation.py::test_a_static_cache_changes_the_oracles_tokens_so_blockdiff_refuses_it)
    ("generation_config.json", lambda d: d.update(cache_implementation="static"),
     "cache_implementation='static' is not supported (the reference's static cache"),
    ("generation_config.json", lambda d: d.update(cache_implementation="hybrid"),
     "cache_implementation='hybrid' is not supported (the reference's static cache"),
    ("generation_config.json", lambda d: d.update(cache_implementation="quantized"),
     "cache_implementation='quantized' is not supported (the reference's quantized cache"),
    ("generation_config.json", lambda d: d.update(cache_implementation="paged"),
     "cache_implementation='paged' is not supported (the reference does not know it"),
    # keys the reference's generation config does not take (it refuses the file; they were ignored here)
    ("generation_config.json", lambda d: d.update(temperature=0.7), "temperature=0.7 is not a key of the reference"),
    ("generation_config.json", lambda d: d.update(do_sample=True), "do_sample=True is not a key of the reference"),
    ("generation_config.json", lambda d: d["sampler_config"].update(top_k=5),
     "sampler_config.top_k=5 is not supported"),
    ("generation_config.json", lambda d: d["sampler_config"].update(_cls_name="TopKSamplerConfig"),
     "sampler_config._cls_name='TopKSamplerConfig' is not supported"),
    ("config.json", lambda d: d["text_config"].update(hidden_activation="gelu_fast"),
     "unsupported hidden_activation 'gelu_fast'"),
    ("config.json", lambda d: d["text_config"]["rope_parameters"]["sliding_attention"].update(rope_type="longrope"),
     "rope_parameters['sliding_attention']: unsupported rope_type 'longrope'"),
    ("config.json", lambda d: d["text_config"]["rope_parameters"]["full_attention"].update(rope_type="linear"),
     "rope_parameters['full_attention'] (rope_type 'linear') needs 'factor'"),
    ("config.json", lambda d: d["text_config"]["per_layer_config"]["3"].update(sliding_window=4),
     "per_layer_config[3]: sliding_window per layer is not supported"),
    # sizes the model divides by or indexes with, and values the reference cannot run either (its top-k, RoPE
    # tables and sliding-window mask fail; a soft-cap of 0 divides its logits by 0): refused at load, naming the key
    # (were ZeroDivisionError / IndexError / RuntimeError tracebacks, or a failure at the first request)
    ("config.json", lambda d: d["text_config"].update(num_key_value_heads=0),
     "num_key_value_heads must be a positive integer, got 0"),
    ("config.json", lambda d: d["text_config"].update(num_hidden_layers=0, layer_types=[]),
     "num_hidden_layers must be a positive integer, got 0"),
    ("config.json", lambda d: d["text_config"]["per_layer_config"]["3"].update(num_key_value_heads=0),
     "layer 3: num_key_value_heads must be a positive integer, got 0"),
    ("config.json", lambda d: d["text_config"]["per_layer_config"]["3"].update(head_dim="32"),
     "per_layer_config[3].head_dim must be an integer, got '32'"),
    ("config.json", lambda d: d["text_config"]["per_layer_config"].update(last={"head_dim": 32}),
     "per_layer_config: keys are layer indices, got 'last'"),
    ("config.json", lambda d: d["text_config"].update(top_k_experts=5),
     "top_k_experts 5 is more than the 4 experts (num_experts)"),
    ("config.json", lambda d: d["text_config"].update(sliding_window=1), "sliding_window must be at least 2, got 1"),
    ("config.json", lambda d: d["text_config"].update(final_logit_softcapping=0),
     "final_logit_softcapping 0 divides the logits by 0"),
    ("config.json", lambda d: d["text_config"]["rope_parameters"]["full_attention"].update(partial_rotary_factor=2),
     "rope_parameters['full_attention']: partial_rotary_factor must be in (0, 1], got 2.0"),
    ("config.json", lambda d: d["text_config"]["rope_parameters"]["sliding_attention"].update(rope_theta=0),
     "rope_parameters['sliding_attention']: rope_theta must be positive, got 0.0"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_config_value_of_the_wrong_type_names_file_and_key(ckpt, capsys, file, edit, words):
    edit_json(os.path.join(ckpt, file), edit)
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert file in err and words in err, err


@pytest.mark.parametrize("make,words", [
    (lambda t: torch.full_like(t, float("nan")), "holds NaN values"),
    (lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("inf")), "holds infinite values"),
    (lambda t: t.to(torch.int32), "has dtype int32"),
    (lambda t: t > 0, "has dtype bool"),
], ids=["nan", "inf", "int", "bool"])
def test_impossible_weights_are_refused_naming_the_tensor(ckpt, capsys, make, words):
    f = os.path.join(ckpt, WEIGHTS)
    tensors = load_file(f)
    name = next(n for n in tensors if n.endswith("layers.1.self_attn.q_proj.weight"))
    tensors[name] = make(tensors[name])
    save_file(tensors, f, metadata={"format": "pt"})
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert name in err and words in err, err


def test_a_float8_weight_without_a_scale_loads_cast_and_its_nan_is_named(ckpt, capsys):
    """A float8 tensor in a plain checkpoint is cast to the model's dtype like bf16 / fp16 ones (as the reference
    casts it); its check for NaN used to be a NotImplementedError traceback ("isfinite" has no float8 kernel)."""
    from blockdiff import load_model

    f = os.path.join(ckpt, WEIGHTS)
    tensors = load_file(f)
    name = next(n for n in tensors if n.endswith("layers.1.self_attn.q_proj.weight"))
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, f, metadata={"format": "pt"})
    model = load_model(ckpt, dtype=torch.float32, device="cpu")
    assert torch.equal(model.layers[1].self_attn.q_proj.weight, tensors[name].float())
    tensors[name] = tensors[name].clone().view(torch.uint8).index_fill_(0, torch.tensor([0]), 0x7F) \
        .view(torch.float8_e4m3fn)  # 0x7f: e4m3fn's NaN
    save_file(tensors, f, metadata={"format": "pt"})
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert name in err and "holds NaN values" in err, err


def test_a_tensor_stored_in_two_shards_is_refused_naming_both(ckpt, capsys):
    """Which copy loaded depended on the shards' order: the later shard's silently won."""
    tensors = load_file(os.path.join(ckpt, WEIGHTS))
    names = sorted(tensors)
    a, b = ({n: tensors[n] for n in part} for part in (names[: len(names) // 2], names[len(names) // 2:]))
    name = names[0]
    b[name] = torch.zeros_like(tensors[name])
    save_file(a, os.path.join(ckpt, "model-00001-of-00002.safetensors"))
    save_file(b, os.path.join(ckpt, "model-00002-of-00002.safetensors"))
    os.remove(os.path.join(ckpt, WEIGHTS))
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {**{n: "model-00001-of-00002.safetensors" for n in a},
                                  **{n: "model-00002-of-00002.safetensors" for n in b}}}, f)
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert f"tensor {name} is stored twice, in model-00001-of-00002.safetensors and model-00002-of-00002" in err, err


@pytest.mark.parametrize("argv,words", [
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--device", "mps"], "MPS is not available"),
    (["--device", "quantum"], "bad --device"),
])
def test_bad_threads_or_device_is_one_line(tiny_checkpoint, capsys, argv, words):
    if "mps" in argv and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    err = run_fails(capsys, ["run", tiny_checkpoint, "hi", *argv])
    assert words in err, err


def test_sudoku_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import blockdiff.sudoku.cli as sudoku_cli

    puzzles = tmp_path / "in.txt"
    puzzles.write_text("." * 81 + "\n")

    def no_load(args):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(sudoku_cli, "_load", no_load)
    err = run_fails(capsys, ["sudoku", "--puzzles", str(puzzles), "--out", "/nonexistent/x"])
    assert "/nonexistent" in err and "does not exist" in err, err
    err = run_fails(capsys, ["sudoku", "--puzzles", str(puzzles), "--out", str(tmp_path)])
    assert "is a folder" in err


# ---------------------------------------------------------------- checkpoints that would start, then fail every request
def test_chat_template_with_a_syntax_error_fails_at_load_naming_the_file(ckpt, capsys):
    with open(os.path.join(ckpt, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['content'] }")  # unclosed tag and loop
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert os.path.join(ckpt, "chat_template.jinja") in err and "is not a valid jinja template" in err, err


def test_chat_template_in_tokenizer_config_with_a_syntax_error_names_the_file(ckpt, capsys):
    os.remove(os.path.join(ckpt, "chat_template.jinja"))
    edit_json(os.path.join(ckpt, "tokenizer_config.json"), lambda d: d.update(chat_template="{% if %}"))
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert "tokenizer_config.json ('chat_template') is not a valid jinja template" in err, err


def test_tokenizer_with_more_entries_than_the_vocabulary_fails_at_load(ckpt, capsys):
    from fixtures import write_tokenizer

    write_tokenizer(ckpt, 600)  # the model has 512 embeddings
    err = run_fails(capsys, ["run", ckpt, "hi"])
    assert os.path.join(ckpt, "tokenizer.json") in err and "has 600 entries" in err and "512" in err, err


@pytest.mark.parametrize("content,words", [
    ("{not json", "is not valid JSON"),
    ('{"image_processor": {"patch_size": "big"}}', "invalid image processor settings"),
], ids=["syntax", "value"])
def test_invalid_processor_config_names_the_file(tmp_path, capsys, content, words):
    from fixtures import TINY_VISION_CONFIG, make_checkpoint

    path = make_checkpoint(tmp_path / "mm", vision=dict(TINY_VISION_CONFIG, patch_size=8, pooling_kernel_size=2,
                                                        position_embedding_size=160))
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        f.write(content)
    err = run_fails(capsys, ["run", path, "hi"])
    assert os.path.join(path, "processor_config.json") in err and words in err, err


def test_server_start_leaves_no_unretrieved_future(caplog, monkeypatch):
    """The structured-output warm-up runs in the background at start-up; with a tokenizer the grammar engine cannot
    read (the bundled model's, once its own up-front refusal is lifted) its failure is logged once as a warning,
    never asyncio's "Future exception was never retrieved"; structured requests then get a one-line 400 saying
    why."""
    import gc
    import logging

    import httpx

    from blockdiff import LLM
    from blockdiff.server import build_app
    from test_server import LiveServer

    from blockdiff.sudoku.talk import SudokuTokenizer

    PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
    monkeypatch.setattr(SudokuTokenizer, "structured_output_refusal", None)  # so the warm-up runs, and fails
    llm = LLM(os.path.join(os.path.dirname(__file__), "..", "blockdiff", "models", "sudoku"), dtype="float32")
    caplog.set_level(logging.WARNING)
    app = build_app(llm, "sudoku")
    srv = LiveServer(app)
    try:
        fut = None
        for _ in range(500):
            fut = getattr(app.state, "grammar_warmup", None)
            if fut is not None and fut.done():
                break
            import time
            time.sleep(0.01)
        assert fut is not None and fut.done()
        r = httpx.post(srv.url + "/v1/completions", json={"model": "sudoku", "prompt": PUZZLE, "max_tokens": 8,
                                                           "structured_outputs": {"regex": "[0-9]+"}}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "structured_outputs"
        assert "not available with this checkpoint" in r.json()["error"]["message"]
    finally:
        srv.close()
    del fut
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert any("structured outputs are unavailable" in r.getMessage() for r in caplog.records)


def test_saved_weights_take_the_umask_or_the_replaced_files_mode(tiny_checkpoint, tmp_path):
    """safetensors writes 0600; a checkpoint saved by blockdiff (train, quantize) must be readable as the umask
    says (another account may serve it), and a rewrite keeps the mode the owner gave the file."""
    from blockdiff import load_model
    from blockdiff.loader import save_model

    umask = os.umask(0o022)
    os.umask(umask)

    model = load_model(tiny_checkpoint, dtype=torch.float32)
    out = tmp_path / "saved"
    save_model(model, str(out))
    weights = out / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(weights, 0o640)
    save_model(model, str(out))
    assert weights.stat().st_mode & 0o777 == 0o640
    assert load_model(str(out), dtype=torch.float32) is not None
