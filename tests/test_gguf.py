"""GGUF files of the llama.cpp ``diffusion-gemma`` layout: written here with the gguf writer from the tiny oracle
checkpoint (tests/gguf_fixtures.py spells the converter's names out independently of blockdiff's table)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from blockdiff.cli import main as cli_main
from blockdiff.loader import load_model
from blockdiff.quant import QuantizationError
from gguf_fixtures import converter_tensors, write_gguf
from gguf_fixtures import denoise_logits as _logits

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def f32_gguf(tiny_checkpoint, tmp_path_factory):
    return write_gguf(tiny_checkpoint, str(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"))


def test_f32_gguf_gives_the_safetensors_logits_exactly(tiny_checkpoint, tiny_model, f32_gguf):
    assert torch.equal(_logits(load_model(f32_gguf)), _logits(tiny_model))


def test_gguf_tokenizer_config_and_defaults_come_from_the_file(tiny_checkpoint, tiny_model, f32_gguf):
    from blockdiff.engine.llm import LLM
    from blockdiff.tokenizer import Tokenizer

    llm = LLM(f32_gguf)
    ref = Tokenizer.from_dir(tiny_checkpoint)
    text = "the model said hello to the user"
    assert llm.tokenizer.encode(text) == ref.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert llm.tokenizer.encode_chat(msgs) == ref.encode_chat(msgs)
    assert llm.model.canvas_length == tiny_model.canvas_length
    assert llm.model.text.layer_types == tiny_model.text.layer_types
    assert 1 in llm.defaults.eos_token_ids and 106 in llm.defaults.eos_token_ids


# Non-default sampler values and a canvas that is neither 256 nor the tiny default: a loader that reads the wrong
# keys falls back to 256 / the reference defaults and fails here.
_GEN = {"max_denoising_steps": 5, "t_min": 0.3, "t_max": 0.9, "sampler_config": {"entropy_bound": 0.7},
        "stability_threshold": 2, "confidence_threshold": 0.02, "max_new_tokens": 40}


@pytest.fixture(scope="module")
def canvas24(tmp_path_factory):
    from fixtures import make_checkpoint
    ckpt = make_checkpoint(tmp_path_factory.mktemp("c24"), canvas_length=24, generation_config=_GEN)
    return ckpt, write_gguf(ckpt, str(tmp_path_factory.mktemp("g24") / "c24-f32.gguf"))


def test_gguf_reads_canvas_and_sampler_defaults_from_the_converters_keys(canvas24):
    from blockdiff.engine.llm import LLM

    ckpt, path = canvas24
    keys = set(gguf.GGUFReader(path).fields)
    assert "diffusion.canvas_length" in keys and "diffusion.eb_max_steps" in keys  # the converter's spelling
    assert not any(k.startswith("diffusion-gemma.diffusion.") for k in keys)
    a, b = LLM(path), LLM(ckpt)
    assert a.model.canvas_length == 24
    for k in ("max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
              "confidence_threshold"):
        assert getattr(a.defaults, k) == getattr(b.defaults, k) != getattr(type(b.defaults)(), k), k


def test_generation_from_the_f32_gguf_equals_the_safetensors_it_came_from(canvas24):
    from blockdiff.engine.llm import LLM
    from blockdiff.sampling.params import SamplingParams

    ckpt, path = canvas24
    p = SamplingParams(seed=3, rng="reference", max_new_tokens=48, ignore_eos=True)  # sampler values: the files'
    a = LLM(path).generate(prompt_token_ids=[[2, 7, 9, 11]], sampling_params=p)[0]
    b = LLM(ckpt).generate(prompt_token_ids=[[2, 7, 9, 11]], sampling_params=p)[0]
    assert a.token_ids == b.token_ids and len(b.token_ids) == 48
    assert a.metrics.denoise_steps == b.metrics.denoise_steps <= 2 * 5  # the file's max_denoising_steps


def test_prefixed_diffusion_keys_of_older_files_are_still_read(tiny_checkpoint, tmp_path):
    from blockdiff.quant.gguf import _diffusion_key, generation_from_gguf

    path = str(tmp_path / "old.gguf")
    w = gguf.GGUFWriter(path, "diffusion-gemma")
    w.add_uint32("diffusion-gemma.diffusion.canvas_length", 40)
    w.add_uint32("diffusion-gemma.diffusion.max_denoising_steps", 9)
    w.add_float32("diffusion-gemma.diffusion.entropy_bound", 0.25)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    gen = generation_from_gguf(reader)
    assert gen["max_denoising_steps"] == 9 and gen["sampler_config"] == {"entropy_bound": 0.25}
    assert _diffusion_key(reader, "canvas_length")[1] == 40


@pytest.mark.parametrize("types", [
    {"": "Q8_0"},
    {"exps": "Q4_0", "attn": "Q5_0", "": "Q8_0"},
    {"ffn_gate_up": "Q4_1", "ffn_down": "Q5_1", "attn_q": "F16", "attn_k": "BF16", "": "Q8_0"},
])
def test_quantized_gguf_weights_are_the_files_dequantized_values(tiny_checkpoint, tiny_model, tmp_path, types):
    from gguf import quants

    path = write_gguf(tiny_checkpoint, str(tmp_path / "q.gguf"), types={k: v for k, v in types.items() if k},
                      default_type=types[""])
    m = load_model(path, quantization="none")  # keep the dequantized values
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_up_exps.weight")
    want = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).reshape(m.layers[0].experts.gate_up_proj.shape))
    assert torch.equal(m.layers[0].experts.gate_up_proj, want)
    assert (_logits(m) - _logits(tiny_model)).norm() / _logits(tiny_model).norm() < 0.6
    # With no flag a quantized file is re-quantized to blockdiff's int8/int4 while loading.
    from blockdiff.quant.modules import QuantExperts
    assert isinstance(load_model(path).layers[0].experts, QuantExperts)


def _kquant_bytes(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random K-quant blocks with finite fp16 scales (the gguf package cannot quantize K-quants in Python)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

    block, size = GGML_QUANT_SIZES[T[kind]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if kind in ("Q4_K", "Q5_K"):  # d, dmin first
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    elif kind == "Q2_K":  # d, dmin last
        raw[..., -4:-2] = scale
        raw[..., -2:] = scale
    else:  # Q3_K, Q6_K: d last
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def test_k_quant_and_unsupported_types(tmp_path):
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as T

    from blockdiff.quant.gguf import _tensor

    path = str(tmp_path / "k.gguf")
    w = gguf.GGUFWriter(path, "diffusion-gemma")
    kinds = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    for i, k in enumerate(kinds):
        w.add_tensor(k, _kquant_bytes(k, 4, 512, i), raw_dtype=T[k])
    w.add_tensor("Q8_1", np.zeros((4, 40 * 2), dtype=np.uint8), raw_dtype=T.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        if t.name == "Q8_1":
            with pytest.raises(QuantizationError, match="Q8_1, which blockdiff cannot read"):
                _tensor(t)
            continue
        got = _tensor(t)
        assert got.shape == (4, 512) and torch.isfinite(got).all()
        assert torch.equal(got, torch.from_numpy(quants.dequantize(t.data, t.tensor_type)))


def test_gguf_missing_self_conditioning_is_refused_naming_them(tiny_checkpoint, tmp_path, capsys):
    path = write_gguf(tiny_checkpoint, str(tmp_path / "noself.gguf"), drop=("self_cond_",))
    with pytest.raises(QuantizationError) as e:
        load_model(path)
    msg = str(e.value)
    for name in ("self_cond_pre_norm.weight", "self_cond_gate.weight", "self_cond_up.weight",
                 "self_cond_down.weight"):
        assert name in msg
    rc = cli_main(["run", path, "--prompt-ids", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "lacks tensors" in err[0]


def test_gguf_of_another_architecture_is_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    path = write_gguf(tiny_checkpoint, str(tmp_path / "llama.gguf"), arch="llama")
    rc = cli_main(["run", path, "--prompt-ids", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'llama' is not supported" in err[0]
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(QuantizationError, match="not a readable GGUF file"):
        load_model(str(tmp_path / "junk.gguf"))


@pytest.mark.parametrize("key, change, message", [
    ("embedding_length", "a string", r"'diffusion-gemma.embedding_length' must be an integer >= 1, got 'sixty-four'"),
    ("attention.sliding_window_pattern", lambda v: v[:2],
     r"'diffusion-gemma.attention.sliding_window_pattern' has 2 entries for 4 layers"),
    ("attention.head_count_kv", lambda v: v[:3], r"'diffusion-gemma.attention.head_count_kv' has 3 entries for 4"),
    ("block_count", lambda v: v + 1, r"'\S+' has 4 entries for 5 layers \('diffusion-gemma.block_count'\)"),
    ("diffusion.canvas_length", lambda v: 0, r"'diffusion.canvas_length' must be an integer >= 1, got 0"),
])
def test_bad_gguf_metadata_is_refused_naming_the_file_and_key(tiny_checkpoint, tmp_path, monkeypatch, key, change,
                                                              message, capsys):
    """A string count was "invalid literal for int()" naming nothing, a per-layer array of the wrong length a
    shape error about some tensor (or "layer_types has 2 entries" naming no file), a zero canvas length 256."""
    real_array, real_u32 = gguf.GGUFWriter.add_array, gguf.GGUFWriter.add_uint32

    def add_array(self, k, v):
        return real_array(self, k, change(v) if k.endswith(key) else v)

    def add_uint32(self, k, v):
        if k.endswith(key):
            return self.add_string(k, "sixty-four") if change == "a string" else real_u32(self, k, change(v))
        return real_u32(self, k, v)

    monkeypatch.setattr(gguf.GGUFWriter, "add_array", add_array)
    monkeypatch.setattr(gguf.GGUFWriter, "add_uint32", add_uint32)
    path = write_gguf(tiny_checkpoint, str(tmp_path / "bad.gguf"))
    with pytest.raises(QuantizationError, match="bad.gguf: GGUF metadata " + message):
        load_model(path)
    rc = cli_main(["run", path, "--prompt-ids", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err


def test_blockdiff_run_accepts_a_gguf_path(f32_gguf, capsys):
    rc = cli_main(["run", f32_gguf, "hello", "--raw", "--max-new-tokens", "4", "--seed", "0", "--steps", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "denoising steps" in out


def test_converter_names_cover_every_model_tensor(tiny_checkpoint, tiny_model):
    from blockdiff.quant.gguf import gguf_to_model_name

    mapped = {gguf_to_model_name(n) for n in converter_tensors(tiny_checkpoint)}
    want = {n for n, _ in list(tiny_model.named_parameters()) + list(tiny_model.named_buffers())
            if not n.startswith(("inv_freq_", "vision."))}  # GGUF files are read text-only
    assert mapped == want


def test_gguf_module_never_imports_the_loader():
    """loader.py imports quant/gguf.py; the reverse would make the two a cycle (shared parts live in placement.py)."""
    import ast
    import blockdiff.quant.gguf as g

    tree = ast.parse(open(g.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m == "loader" or m.endswith(".loader") for m in imported), imported


def test_a_weight_of_a_type_blockdiff_cannot_read_is_one_line_naming_type_and_tensor(tiny_checkpoint, tmp_path,
                                                                                   capsys):
    """A quantized weight (a quantize-while-loading target) of a type the gguf package cannot dequantize ended the
    load in a NotImplementedError traceback, exit status 1."""
    n, k = converter_tensors(tiny_checkpoint)["blk.0.attn_q.weight"].shape
    name = "blk.0.attn_q.weight"
    path = write_gguf(tiny_checkpoint, str(tmp_path / "q8_1.gguf"), types={name: "Q8_1"},
                      raw={name: np.zeros((n, k // 32 * 40), dtype=np.uint8)})  # Q8_1: 40 bytes per 32 values
    with pytest.raises(QuantizationError, match=f"types blockdiff cannot read: Q8_1 \\({name}\\)"):
        load_model(path)
    rc = cli_main(["run", path, "--prompt-ids", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Q8_1" in err[0] and name in err[0], err


@pytest.mark.parametrize("key, value, message", [
    ("diffusion.eb_max_steps", "five", r"'diffusion.eb_max_steps' must be an integer >= 1, got 'five'"),
    ("diffusion.eb_max_steps", 0, r"'diffusion.eb_max_steps' must be an integer >= 1, got 0"),
    ("diffusion.eb_max_steps", 5.5, r"'diffusion.eb_max_steps' must be an integer >= 1, got 5.5"),
    ("diffusion.eb_t_min", "low", r"'diffusion.eb_t_min' must be a number, got 'low'"),
    ("diffusion-gemma.attention.layer_norm_rms_epsilon", "tiny",
     r"'diffusion-gemma.attention.layer_norm_rms_epsilon' must be a number, got 'tiny'"),
    ("diffusion-gemma.rope.freq_base", "x", r"'diffusion-gemma.rope.freq_base' must be a number, got 'x'"),
])
def test_gguf_metadata_of_the_wrong_type_names_the_file_and_key(key, value, message, tmp_path, monkeypatch,
                                                                capsys):
    """Sampler defaults and float keys of the wrong type: "invalid literal for int()" / "could not convert string to
    float" naming neither file nor key, a float step count cut to an integer, zero steps a NaN at generation."""
    from fixtures import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", generation_config=_GEN)
    real = {m: getattr(gguf.GGUFWriter, m) for m in ("add_uint32", "add_float32")}

    def wrap(m):
        def add(self, k, v):
            if k != key:
                return real[m](self, k, v)
            if isinstance(value, str):
                return self.add_string(k, value)
            return real["add_float32" if isinstance(value, float) else "add_uint32"](self, k, value)
        return add

    for m in real:
        monkeypatch.setattr(gguf.GGUFWriter, m, wrap(m))
    path = write_gguf(ckpt, str(tmp_path / "bad.gguf"))
    monkeypatch.undo()
    assert key in gguf.GGUFReader(path).fields
    rc = cli_main(["run", path, "--prompt-ids", "2,3", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.search("bad.gguf: GGUF metadata " + message, err[0]), err


def test_a_split_gguf_loads_from_its_first_part(tiny_checkpoint, tiny_model, tmp_path, monkeypatch, capsys):
    """llama-gguf-split's parts (NAME-00001-of-0000N.gguf; the first holds the metadata, every part some tensors)
    load from the first part, as llama.cpp loads them. The first part alone was "lacks tensors ...", a later part
    "GGUF architecture None is not supported"."""
    real = gguf.GGUFWriter.__init__
    monkeypatch.setattr(gguf.GGUFWriter, "__init__",
                        lambda self, path, arch, **kw: real(self, path, arch, split_max_tensors=40, **kw))
    write_gguf(tiny_checkpoint, str(tmp_path / "tiny.gguf"))
    monkeypatch.undo()
    parts = sorted(p.name for p in tmp_path.iterdir())
    assert len(parts) >= 3 and parts[0] == f"tiny-00001-of-{len(parts):05d}.gguf", parts
    assert torch.equal(_logits(load_model(str(tmp_path / parts[0]))), _logits(tiny_model))
    rc = cli_main(["run", str(tmp_path / parts[1]), "--prompt-ids", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"pass the first part, {parts[0]}" in err[0], err
    (tmp_path / parts[-1]).unlink()
    rc = cli_main(["run", str(tmp_path / parts[0]), "--prompt-ids", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"missing beside it: {parts[-1]}" in err[0], err


def test_a_folder_of_a_gguf_and_tokenizer_files_names_the_file_to_pass(f32_gguf, tiny_checkpoint, tmp_path, capsys):
    """A folder holding model.gguf plus tokenizer files (as downloaded) was only "FOLDER: no config.json"."""
    import shutil

    shutil.copy(f32_gguf, tmp_path / "model.gguf")
    shutil.copy(f"{tiny_checkpoint}/tokenizer.json", tmp_path / "tokenizer.json")
    rc = cli_main(["run", str(tmp_path), "hello"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no config.json" in err[0] and str(tmp_path / "model.gguf") in err[0], err
    rc = cli_main(["run", err[0].rsplit(" ", 1)[-1], "hello", "--max-new-tokens", "4", "--steps", "2"])
    assert rc == 0  # the path the line names runs


def test_quantize_given_a_gguf_says_it_needs_no_copy(f32_gguf, tmp_path, capsys):
    """Was "FILE is a file; pass the checkpoint folder": advice a GGUF user cannot follow."""
    rc = cli_main(["quantize", f32_gguf, str(tmp_path / "out"), "--method", "int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "a .gguf file needs none" in err[0], err
    assert not (tmp_path / "out").exists()


def test_gguf_t_min_above_t_max_names_the_keys_at_load(tmp_path, monkeypatch, capsys):
    """eb_t_min >= eb_t_max in the file was found at the first request, as "--t-max must be greater than --t-min":
    flags nobody typed. It is refused at load, naming the file and both keys."""
    from blockdiff import LLM
    from fixtures import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", generation_config=_GEN)
    real = gguf.GGUFWriter.add_float32

    def add(self, k, v):
        return real(self, k, 0.95 if k == "diffusion.eb_t_min" else v)

    monkeypatch.setattr(gguf.GGUFWriter, "add_float32", add)
    path = write_gguf(ckpt, str(tmp_path / "hot.gguf"))
    monkeypatch.undo()
    with pytest.raises(QuantizationError, match=r"hot.gguf: GGUF metadata diffusion.eb_t_max = [0-9.]+ must be greater "
                                                r"than diffusion.eb_t_min = 0.95"):
        LLM(path)
    rc = cli_main(["run", path, "--prompt-ids", "2,3", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "diffusion.eb_t_min" in err[0] and "--t-" not in err[0], err


@pytest.mark.parametrize("name, kind, quantization", [
    ("output_norm.weight", "F32", None),  # a tensor kept in full precision
    ("blk.1.attn_q.weight", "Q8_0", None),  # converted to int8 a few rows at a time
    ("blk.0.attn_k.weight", "Q4_0", "int4-all-g32"),  # repacked as it is
    ("blk.0.ffn_gate_up_exps.weight", "F16", "int8"),  # a float weight quantized while loading
], ids=["plain", "converted", "repacked", "quantized"])
def test_gguf_with_non_finite_weights_is_refused_naming_the_tensor(tiny_checkpoint, tmp_path, monkeypatch, name,
                                                                   kind, quantization):
    """The safetensors loader refuses NaN weights; a GGUF file was not checked at all: one with a NaN loaded, then
    every request failed with non-finite logits."""
    import gguf_fixtures

    real = gguf_fixtures.converter_tensors

    def with_nan(ckpt):
        tensors = real(ckpt)
        tensors[name].reshape(-1)[3] = np.nan
        return tensors

    monkeypatch.setattr(gguf_fixtures, "converter_tensors", with_nan)
    path = gguf_fixtures.write_gguf(tiny_checkpoint, str(tmp_path / "nan.gguf"), types={name: kind})
    with pytest.raises(ValueError, match=f"nan.gguf: tensor {re.escape(name)} holds NaN"):
        load_model(path, quantization=quantization)


@pytest.mark.parametrize("keep", [0.9, 0.3, 100])
def test_a_truncated_gguf_says_it_is_truncated(f32_gguf, tmp_path, keep, capsys):
    """A GGUF cut short (an interrupted download) was "not a readable GGUF file: cannot reshape array of size 8448
    into shape (128,68)" (or "index 0 is out of bounds for axis 0 with size 0"): nothing said the file was cut."""
    import os

    data = open(f32_gguf, "rb").read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    rc = cli_main(["run", str(path), "--prompt-ids", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cut.gguf is a GGUF file that cannot be read" in err[0], err
    assert f"({os.path.getsize(path)} bytes): it is truncated or corrupt" in err[0], err
    path.write_bytes(b"not a gguf file at all")  # another kind of file: no word about truncation
    rc = cli_main(["run", str(path), "--prompt-ids", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[0].endswith("cut.gguf is not a readable GGUF file: GGUF magic invalid"), err


@pytest.mark.parametrize("name, kind", [("blk.0.attn_q.weight", "Q8_0"), ("blk.0.attn_norm.weight", "F32"),
                                        ("blk.1.ffn_gate_up_exps.weight", "F16")])
def test_a_gguf_tensor_of_another_shape_names_the_file_and_the_metadata(tiny_checkpoint, tmp_path, monkeypatch, name,
                                                                        kind, capsys):
    """A tensor whose shape does not fit the file's own metadata was "tensor X has shape ..., the config implies
    ...": no file named, and a config.json the user does not have."""
    import gguf_fixtures

    real = gguf_fixtures.converter_tensors

    def cut(ckpt):
        tensors = real(ckpt)
        tensors[name] = np.ascontiguousarray(tensors[name][..., :32])
        return tensors

    monkeypatch.setattr(gguf_fixtures, "converter_tensors", cut)
    path = gguf_fixtures.write_gguf(tiny_checkpoint, str(tmp_path / "cut.gguf"), types={name: kind})
    want = real(tiny_checkpoint)[name].shape
    rc = cli_main(["run", path, "--prompt-ids", "2,3"])
    err = [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line]
    assert rc == 2 and len(err) == 1, err
    assert err[0].endswith(f"cut.gguf: tensor {name} has shape {want[:-1] + (32,)}, the GGUF metadata implies "
                           f"{want}"), err
