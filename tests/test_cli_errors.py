"""User mistakes on the command line end in one line naming what is wrong, exit status 2 (130 for Ctrl-C), no
traceback, checked before any slow work, and nothing half-written left behind: output files that cannot be
written, run folders that cannot be made, a Ctrl-C while torch is still importing."""

import os
import stat
import subprocess
import sys

import pytest

import blockdiff.cli
from blockdiff.cli import main
from blockdiff.files import write_output

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_refuses_an_out_it_cannot_write_before_building_anything(tmp_path, capsys):
    out = tmp_path / "missing" / "bench.json"
    assert main(["bench", "--random-config", "tiny", "--out", str(out), "--no-oracle", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blockdiff: error: --out {out}: the folder") and "does not exist" in err, err
    assert "building" not in err and err.count("\n") == 1  # refused before the checkpoint build, in one line


def test_sudoku_out_on_a_full_device_names_out_and_leaves_the_device_alone(tmp_path, monkeypatch, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    (tmp_path / "in.txt").write_text(PUZZLE + "\n")
    assert main(["sudoku", "--puzzles", str(tmp_path / "in.txt"), "--out", "/dev/full", "--threads", "1"]) == 2
    assert capsys.readouterr().err == "blockdiff: error: --out /dev/full: cannot write it: No space left on device\n"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # written in place, never renamed over


def test_write_output_through_a_link_keeps_the_link_and_leaves_no_temporary(tmp_path):
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("old")
    link.symlink_to(target)
    write_output(str(link), "new")
    assert link.is_symlink() and target.read_text() == "new"
    write_output(str(tmp_path / "plain.txt"), "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "plain.txt", "target.txt"]


def test_train_data_that_cannot_be_read_names_data(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "run"), "--task", "jsonl", "--data", str(tmp_path / "none.jsonl"),
            "--vocab-size", "16", "--canvas-length", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"blockdiff: error: --data {tmp_path / 'none.jsonl'}: cannot read it: No such file or directory\n"
    assert not (tmp_path / "run").exists()


def test_train_out_that_is_a_file_or_under_one_names_out(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", "--out", str(f), "--task", "copy", "--max-steps", "1"]) == 2
    assert capsys.readouterr().err == f"blockdiff: error: --out {f} is a file; name a folder for the run\n"
    assert main(["train", "--out", str(f / "run"), "--task", "copy", "--max-steps", "1"]) == 2
    assert capsys.readouterr().err == (f"blockdiff: error: --out {f / 'run'}: cannot create the run folder: "
                                       "Not a directory\n")
    assert f.read_text() == "x"


def test_train_with_a_bad_init_from_leaves_no_empty_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--init-from", str(tmp_path / "none"), "--task", "copy"]) == 2
    assert "no checkpoint folder at" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # a folder the user made is theirs: kept
    assert main(["train", "--out", str(out), "--init-from", str(tmp_path / "none"), "--task", "copy"]) == 2
    assert out.is_dir()


def test_train_refuses_a_recipe_beside_init_from_instead_of_ignoring_it(tmp_path, capsys):
    """--init-from trains the checkpoint's model: a --recipe beside it (a user asking for another size) was dropped
    without a word, and the run trained the checkpoint's model as if the recipe had been honoured."""
    src = tmp_path / "src"
    assert main(["train", "--out", str(src), "--task", "copy", "--recipe", "tiny", "--max-steps", "1",
                 "--batch-size", "1", "--save-every", "0"]) == 0
    capsys.readouterr()
    out = tmp_path / "ft"
    assert main(["train", "--out", str(out), "--task", "copy", "--init-from", str(src), "--recipe", "sudoku-large",
                 "--max-steps", "1", "--batch-size", "1"]) == 2
    assert capsys.readouterr().err == (f"blockdiff: error: --recipe sudoku-large builds a new model, --init-from "
                                       f"{src} starts from that checkpoint's: pass one of them\n")
    assert not out.exists()
    assert main(["train", "--out", str(out), "--task", "copy", "--init-from", str(src), "--max-steps", "1",
                 "--batch-size", "1"]) == 0


def test_chat_on_a_model_without_a_tokenizer_points_to_a_command_that_runs_it(tmp_path, capsys):
    """A trained model without tokenizer.json (`train --task copy`) sent chat users to `blockdiff run --raw`,
    which fails on it too ("has no tokenizer.json: pass the prompt as --prompt-ids")."""
    out = tmp_path / "copy"
    assert main(["train", "--out", str(out), "--task", "copy", "--recipe", "tiny", "--max-steps", "1",
                 "--batch-size", "1", "--save-every", "0"]) == 0
    capsys.readouterr()
    assert main(["chat", str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blockdiff: error: {out} has no chat template") and err.endswith(
        "use `blockdiff run --prompt-ids`\n"), err
    assert main(["run", str(out), "--prompt-ids", "2,9,10", "--max-new-tokens", "4", "--steps", "2",
                 "--device", "cpu", "--quiet"]) == 0


def test_the_command_line_module_imports_without_torch():
    # so that a Ctrl-C in the seconds torch takes to import lands inside main(), which says "interrupted"
    code = "import sys, blockdiff.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.stdout.strip() == "False", r.stderr


def test_ctrl_c_while_the_subcommands_import_is_one_line_and_130(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(blockdiff.cli, "build_parser", interrupted)
    assert main(["run", "x", "hi"]) == 130
    assert capsys.readouterr().err == "blockdiff: interrupted\n"


def test_ctrl_c_during_a_subcommand_import_waits_for_the_import_then_is_130(monkeypatch, capsys):
    """Ctrl-C cut torch's / numpy's import halfway (`python -m blockdiff quantize ...` pressed within its first
    second): a RecursionError or ImportError traceback, an abort, or the subcommand dropped as unimportable while
    the command ran to its end with status 0. The signal now waits for the imports, then stops the command."""
    import signal

    real_import = blockdiff.cli.importlib.import_module
    finished, ran = [], []

    def import_interrupted_midway(name, *a, **k):
        if name in blockdiff.cli.SUBCOMMAND_MODULES and not finished:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands inside the import ...
            for _ in range(1000):  # ... while it is still running bytecode
                pass
        module = real_import(name, *a, **k)
        if name in blockdiff.cli.SUBCOMMAND_MODULES:
            finished.append(name)
        return module

    monkeypatch.setattr(blockdiff.cli.importlib, "import_module", import_interrupted_midway)
    monkeypatch.setattr(blockdiff.cli, "cmd_run", lambda args: ran.append(args) or 0)
    assert main(["run", "x", "hi"]) == 130
    assert capsys.readouterr().err == "blockdiff: interrupted\n"
    assert finished == list(blockdiff.cli.SUBCOMMAND_MODULES) and not ran
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_serve_api_key_file_that_cannot_be_read_is_one_plain_line(tmp_path, capsys):
    missing, binary = tmp_path / "keys", tmp_path / "keys.bin"
    binary.write_bytes(b"\xff\xfe\x00key")
    assert main(["serve", str(tmp_path), "--api-key-file", str(missing)]) == 2
    assert capsys.readouterr().err == (f"blockdiff: error: --api-key-file {missing}: cannot read it: "
                                       "No such file or directory\n")
    assert main(["serve", str(tmp_path), "--api-key-file", str(binary)]) == 2
    assert capsys.readouterr().err == f"blockdiff: error: --api-key-file {binary}: not UTF-8 text\n"


@pytest.mark.parametrize("command", [["run", "x", "hi"], ["sudoku", "--puzzles", "-", "--out", "-"],
                                     ["bench", "--random-config", "tiny"]])
def test_threads_past_any_cpu_is_refused_not_a_crash(command, capsys):
    # torch.set_num_threads(100000) ends the process with a segfault
    assert main(command + ["--threads", "100000"]) == 2
    assert capsys.readouterr().err == "blockdiff: error: --threads must be <= 1024, got 100000\n"


def test_nan_is_not_at_least_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), "--task", "copy", "--time-limit", "nan"])
    assert "argument --time-limit: must be >= 0.0, got nan" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_run_prompt_ids_outside_the_vocabulary_name_the_flag(tiny_checkpoint, capsys):
    assert main(["run", tiny_checkpoint, "--prompt-ids", "2,99999", "--threads", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blockdiff: error: --prompt-ids must be token ids in [0, ") and err.endswith("got 99999\n")


@pytest.mark.parametrize("flags", [["--tensor-parallel-size", "2"], ["--expert-parallel"]], ids=["tp", "ep"])
def test_serve_replicas_with_a_split_model_is_refused_before_ray_starts(tiny_checkpoint, capsys, monkeypatch, flags):
    """--expert-parallel with --replicas was dropped without a word (the replicas load one whole model each)."""
    import socket
    import types

    def never(*a, **k):
        raise AssertionError("the replicas were started")
    monkeypatch.setitem(sys.modules, "blockdiff.ray", types.SimpleNamespace(serve_replicas=never))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", tiny_checkpoint, "--replicas", "2", "--port", str(port), *flags]) == 2
    assert capsys.readouterr().err == ("blockdiff: error: --replicas and --tensor-parallel-size / --expert-parallel "
                                       "together are not supported yet: pick one\n")
