"""``blockdiff bench`` on tiny checkpoints: the report's shape, the oracle side by side, the memory probe.

Only the harness is tested here (1 round, 2 steps); the figures themselves live in docs/benchmarks.md.
"""

import importlib.util
import json
import time

import pytest
import torch

from blockdiff.bench.checkpoints import write_random_checkpoint
from blockdiff.bench.harness import PeakMemory
from blockdiff.bench.systems import load_oracle
from blockdiff.cli import main

HAVE_ORACLE = importlib.util.find_spec("transformers") is not None
FAST = ["--repeats", "1", "--warmup", "0", "--steps", "2", "--prompt-len", "8", "--ar-batches", "1,2"]
METRICS = {"batch", "tokens", "seconds", "tok_per_s", "cpu_seconds", "tok_per_cpu_s", "ms_per_step",
           "tokens_per_forward", "peak_mem_mb", "runs_s"}


def run_bench(args, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *args, *FAST, "--out", str(out)] + ([] if HAVE_ORACLE else ["--no-oracle"])) == 0
    table = capsys.readouterr().out
    return json.loads(out.read_text()), table


def test_bench_writes_a_json_report_with_every_system(tiny_checkpoint, tmp_path, capsys):
    report, table = run_bench([tiny_checkpoint], tmp_path, capsys)
    assert set(report) >= {"checkpoint", "model", "settings", "environment", "results", "ratios", "cpu_time_ratios",
                           "reference_matches_oracle"}
    systems = {"blockdiff-default", "blockdiff-reference", "blockdiff-fast", "ar-b1", "ar-b2"} | (
        {"oracle"} if HAVE_ORACLE else set())
    assert set(report["results"]) == systems
    for name, r in report["results"].items():
        assert METRICS <= set(r), name
        assert r["tok_per_s"] > 0 and r["ms_per_step"] > 0 and len(r["runs_s"]) == 1
    canvas = report["model"]["canvas_length"]
    s = report["settings"]
    assert (s["steps"], s["max_new_tokens"], s["batch"], s["stability_threshold"]) == (2, canvas, 1, 3)
    # Early stopping is off: every canvas takes exactly the fixed step count.
    assert report["results"]["blockdiff-default"]["forwards_per_row"] == 2
    assert report["results"]["blockdiff-default"]["tokens_per_forward"] == canvas / 2
    assert report["results"]["ar-b2"]["tokens"] == 2 * canvas
    # fast mode beside exact: same fixed steps, its agreement with the default mode's tokens reported
    assert report["results"]["blockdiff-fast"]["forwards_per_row"] == 2
    assert "fast_vs_default" in report["ratios"] and 0 <= report["fast_default_token_agreement"] <= 1
    assert "fast mode (approximate)" in table
    assert report["results"]["ar-b1"]["tokens_per_forward"] == 1.0
    for name in report["results"]:
        assert name in table
    if HAVE_ORACLE:
        assert report["results"]["oracle"]["forwards_per_row"] == 2
        assert report["reference_matches_oracle"] is True
        assert set(report["ratios"]) >= {"default_vs_oracle", "reference_vs_oracle", "default_vs_ar_b1"}


@pytest.mark.skipif(not HAVE_ORACLE, reason="the oracle (transformers) is not installed")
def test_random_checkpoint_runs_in_blockdiff_and_the_oracle_alike(tmp_path, capsys):
    report, _ = run_bench(["--random-config", "tiny", "--systems", "blockdiff-reference,oracle"], tmp_path, capsys)
    assert report["checkpoint"] == "random:tiny"
    assert set(report["results"]) == {"blockdiff-reference", "oracle"}
    assert report["reference_matches_oracle"] is True


def test_random_checkpoint_loads_back(tmp_path):
    from blockdiff import LLM

    llm = LLM(write_random_checkpoint(str(tmp_path), "tiny"))
    assert llm.model.canvas_length == 16 and llm.defaults.max_denoising_steps == 48
    assert llm.tokenizer is None


def test_bench_needs_a_checkpoint_or_a_random_config(capsys):
    assert main(["bench", *FAST]) == 2
    assert "random-config" in capsys.readouterr().err


def test_missing_oracle_is_a_clear_error(monkeypatch, tiny_checkpoint):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match="--no-oracle"):
        load_oracle(tiny_checkpoint, torch.float32, "cpu")


@pytest.mark.parametrize("probe", ["malloc", "rss"])
def test_peak_memory_sees_a_temporary_allocation(probe, monkeypatch):
    """glibc's malloc statistics, or (without glibc) the resident set through psutil."""
    from blockdiff.bench import harness
    if probe == "rss":
        monkeypatch.setattr(harness, "_MALLINFO2", None)
    with PeakMemory(torch.device("cpu")) as mem:
        assert mem._probe is (harness._rss_bytes if probe == "rss" else harness._malloc_in_use)
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
        time.sleep(0.05)
        del x
    assert mem.peak_bytes >= 48 * 2 ** 20


def test_profile_breaks_a_step_down_and_restores_every_patch(tiny_checkpoint, capsys):
    from blockdiff.engine import engine as engine_mod
    from blockdiff.model import layers

    before = (engine_mod.default_step, layers.Experts.forward, __import__("torch").softmax)
    args = ["bench", tiny_checkpoint, "--profile", "--steps", "2", "--prompt-len", "8"]
    assert main(args + ([] if HAVE_ORACLE else ["--no-oracle"])) == 0
    out = capsys.readouterr().out
    assert "blockdiff-default:" in out and "ms per denoising step" in out
    for part in ("model forward", "experts", "attention", "sampler: default_step", "aten::"):
        assert part in out
    if HAVE_ORACLE:
        assert "oracle:" in out and "torch.multinomial" in out
    assert (engine_mod.default_step, layers.Experts.forward, __import__("torch").softmax) == before


def test_timed_runs_have_no_memory_poller_and_memory_comes_from_a_separate_run(tiny_checkpoint, monkeypatch):
    from blockdiff.bench import harness

    active, calls = [False], []

    class Watched(harness.PeakMemory):
        def __enter__(self):
            active[0] = True
            return super().__enter__()

        def __exit__(self, *exc):
            active[0] = False
            return super().__exit__(*exc)

    real = harness.blockdiff_system

    def recording_system(*a, **k):
        fn = real(*a, **k)

        def run(seed):
            calls.append(active[0])
            return fn(seed)
        return run
    monkeypatch.setattr(harness, "PeakMemory", Watched)
    monkeypatch.setattr(harness, "blockdiff_system", recording_system)
    o = harness.BenchOptions(steps=2, repeats=3, warmup=1, prompt_len=4, oracle=False, ar_batches=(),
                             systems=["blockdiff-default"])
    report = harness.run_benchmark(tiny_checkpoint, o, log=lambda m: None)
    assert calls == [False] * 4 + [True]  # warm-up + 3 timed rounds unwatched, then one memory run
    r = report["results"]["blockdiff-default"]
    assert r["min_seconds"] <= r["seconds"] and len(r["runs_s"]) == 3
    assert r["min_ms_per_step"] <= r["ms_per_step"]
    assert "separate untimed run" in report["settings"]["peak_memory"]


def test_tick_memory_reports_the_logits_buffer_and_what_lies_beyond(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["bench", tiny_checkpoint, "--tick-memory", "--batch", "3", "--no-oracle", "--systems",
                 "blockdiff-default", "--repeats", "1", "--warmup", "0", "--steps", "2", "--prompt-len", "4",
                 "--no-memory-run", "--out", str(out)]) == 0
    t = json.loads(out.read_text())["tick_memory"]
    assert t["batch"] == 3 and t["logits_mb"] == round(3 * t["canvas_length"] * t["vocab_size"] * 4 / 2 ** 20, 1)
    assert t["temporaries_over_logits"] >= 0 and "one denoising tick" in capsys.readouterr().out


@pytest.mark.skipif(not HAVE_ORACLE, reason="the oracle (transformers) is not installed")
def test_a_reference_mismatch_is_explained_in_one_line_not_a_bare_false(tmp_path, capsys):
    from blockdiff.bench.harness import format_table

    report, _ = run_bench(["--random-config", "tiny", "--systems", "blockdiff-reference,oracle"], tmp_path, capsys)
    assert report["reference_matches_oracle"] is not None
    for matches in (True, False):  # whichever this run gave, both renderings
        r = dict(report, reference_matches_oracle=matches)
        lines = format_table(r).splitlines()
        i = next(k for k, ln in enumerate(lines) if ln.startswith("reference mode == oracle tokens"))
        if matches:
            assert i == len(lines) - 1
        else:
            assert len(lines) == i + 2 and "random weights" in lines[i + 1] and "near-uniform" in lines[i + 1]
    r = dict(report, reference_matches_oracle=False, checkpoint="/some/trained/ckpt")
    assert "report it" in format_table(r).splitlines()[-1]


def test_bench_on_the_bundled_sudoku_model_uses_a_puzzle_and_skips_what_it_refuses(tmp_path, capsys):
    """The Sudoku model reads only puzzles: bench prompts it with one, and leaves out the system whose requests it
    refuses (rng="reference" has no canvas template), saying why, unless that system was asked for by name."""
    from blockdiff.sudoku.solver import BUNDLED_MODEL
    out = tmp_path / "bench.json"
    assert main(["bench", BUNDLED_MODEL, *FAST, "--no-oracle", "--out", str(out)]) == 0
    report, table = json.loads(out.read_text()), capsys.readouterr().out
    assert report["settings"]["prompt_len"] == 83  # <bos>, 81 cells, the separator: the puzzle prompt
    assert {"blockdiff-default", "blockdiff-fast", "ar-b1"} <= set(report["results"])
    assert "blockdiff-reference" not in report["results"]
    assert "canvas_template" in report["skipped"]["blockdiff-reference"]
    assert "blockdiff-reference: skipped" in table
    assert main(["bench", BUNDLED_MODEL, *FAST, "--no-oracle", "--systems", "blockdiff-reference"]) == 2
    assert "canvas_template" in capsys.readouterr().err
    # the untimed tick-memory run and the profile prompt it with a puzzle too
    assert main(["bench", BUNDLED_MODEL, *FAST, "--no-oracle", "--systems", "blockdiff-default", "--tick-memory",
                 "--batch", "2"]) == 0
    assert "one denoising tick at batch 2" in capsys.readouterr().out
    assert main(["bench", BUNDLED_MODEL, *FAST, "--no-oracle", "--profile"]) == 0


def test_only_a_systems_first_request_can_be_a_refusal(tiny_checkpoint, monkeypatch):
    """A ValueError after a system's request went through once is a failure of the run, not a refusal to skip."""
    from blockdiff.bench import harness

    real = harness.blockdiff_system

    def flaky(*a, **k):
        fn, calls = real(*a, **k), []

        def run(seed):
            calls.append(seed)
            if len(calls) > 1:
                raise ValueError("went wrong on the second request")
            return fn(seed)
        return run
    monkeypatch.setattr(harness, "blockdiff_system", flaky)
    o = harness.BenchOptions(steps=2, repeats=1, warmup=1, prompt_len=4, oracle=False, ar_batches=(),
                             memory_run=False)
    with pytest.raises(ValueError, match="second request"):
        harness.run_benchmark(tiny_checkpoint, o, log=lambda m: None)


def test_an_unknown_system_is_named_with_the_systems_there_are(tiny_checkpoint, capsys):
    assert main(["bench", tiny_checkpoint, *FAST, "--systems", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown systems ['bogus']" in err and "'oracle'" in err and "blockdiff-fast" in err
    assert "--no-oracle" not in err  # the system's name, not the flag that turns it off


def test_an_unknown_system_is_refused_before_the_random_checkpoint_is_built(capsys, monkeypatch):
    from blockdiff.bench import checkpoints
    monkeypatch.setattr(checkpoints, "write_random_checkpoint",
                        lambda *a, **k: pytest.fail("the checkpoint was built before --systems was checked"))
    assert main(["bench", "--random-config", "mid", "--systems", "blockdiff-default,bogus"]) == 2
    assert "unknown systems ['bogus']" in capsys.readouterr().err


def test_the_oracle_is_skipped_on_a_blockdiff_quantized_checkpoint_it_cannot_read(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch, capsys):
    """transformers loaded a `blockdiff quantize` checkpoint with its weights missing (random): 0% agreement,
    blamed on fp32 rounding. Now the oracle is skipped with a line why; asked for by name, it is refused."""
    from blockdiff.bench import harness
    from blockdiff.quant.cli import quantize_checkpoint
    q = quantize_checkpoint(tiny_checkpoint, str(tmp_path / "q8"), "int8", log=lambda s: None)
    monkeypatch.setattr(harness, "load_oracle", lambda *a: pytest.fail("the oracle was loaded"))
    lines = []
    o = harness.BenchOptions(steps=2, repeats=1, warmup=0, prompt_len=4, max_new_tokens=4, ar_batches=(),
                             memory_run=False)
    report = harness.run_benchmark(q, o, log=lines.append)
    assert "oracle" not in report["results"] and "blockdiff-default" in report["results"]
    assert any(s.startswith("no oracle: the transformers reference cannot read") for s in lines), lines
    capsys.readouterr()
    # refused before the load (it was refused once the model, minutes of it for the real one, had loaded)
    import blockdiff.engine.llm as llm_module
    monkeypatch.setattr(llm_module, "LLM", lambda *a, **k: pytest.fail("loaded a model whose oracle it refuses"))
    assert main(["bench", q, "--systems", "oracle", "--steps", "2"]) == 2
    assert "--systems oracle: the transformers reference cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--random-config", "tiny", "--tools"],
     "--tools does not apply to the side-by-side comparison (it applies with --structured)"),
    (["--random-config", "tiny", "--tools-only"],
     "--tools-only does not apply to the side-by-side comparison (it applies with --structured)"),
    (["--random-config", "tiny", "--fast"],
     "--fast does not apply to the side-by-side comparison (it applies with --random-config full / full-smoke)"),
    (["--random-config", "tiny", "--batches", "1,2"], "--batches does not apply to the side-by-side comparison"),
    (["--random-config", "tiny", "--layers", "2"], "--layers does not apply to the side-by-side comparison"),
    (["--random-config", "mid-v262k", "--structured", "--quantization", "int8"],
     "--quantization does not apply to --structured"),
    (["--random-config", "mid-v262k", "--structured", "--profile"], "--profile does not apply to --structured"),
    (["--random-config", "tiny", "--profile", "--out", "OUT"], "--out does not apply to --profile"),
    (["--random-config", "full-smoke", "--quantization", "int8"],
     "--quantization does not apply to --random-config full-smoke"),
    (["--random-config", "full-smoke", "--structured"], "--structured does not apply to --random-config full-smoke"),
    (["--random-config", "full", "--quantization", "int4", "--batches", "1,2"],
     "--batches does not apply to --random-config full --quantization"),
])
def test_a_flag_the_chosen_benchmark_never_reads_is_refused_before_any_work(flags, message, tmp_path, capsys):
    """They were accepted and ignored: `--tools` without --structured ran the whole comparison with no tool rows,
    `--structured --quantization int8` timed the full-precision model, `--profile --out f` wrote no file,
    `--random-config full-smoke --quantization int8` ran unquantized."""
    flags = [str(tmp_path / "r.json") if f == "OUT" else f for f in flags]
    assert main(["bench", *flags, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blockdiff: error: {message}") and err.count("\n") == 1, err
    assert "building" not in err and not (tmp_path / "r.json").exists()
