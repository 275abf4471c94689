"""The package as a user meets it: logging and progress, --device auto, hub ids (revision, download dir, GGUF files
on the hub) resolved offline, the license metadata."""

import io
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from blockdiff import cli, progress
from blockdiff.sudoku import format as fmt
from blockdiff.sudoku.solver import BUNDLED_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUZZLE = [0] * 81
PROMPT_IDS = ",".join(map(str, fmt.encode_prompt(PUZZLE)))


@pytest.fixture(autouse=True)
def _reset_output():
    """configure() and set_console() are process-wide: every test here starts and ends with the defaults."""
    yield
    progress.set_console(None)
    progress.configure("warning")
    logging.getLogger("blockdiff").setLevel(logging.NOTSET)


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------- logging, progress
def test_every_command_takes_log_level_and_quiet():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert {"run", "chat", "serve", "bench", "train", "sudoku", "demo", "quantize"} <= set(sub.choices)
    for name, p in sub.choices.items():
        opts = {o for a in p._actions for o in a.option_strings}
        assert {"--log-level", "--quiet"} <= opts, name


def test_bad_log_level_from_the_environment_is_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("BLOCKDIFF_LOG_LEVEL", "loud")
    rc, _, err = _run(["demo", "--seed", "1"], capsys)
    assert rc == 2 and "$BLOCKDIFF_LOG_LEVEL must be one of" in err and "'loud'" in err


@pytest.mark.parametrize("argv, env, shows", [([], None, True), (["--log-level", "warning"], None, False),
                                              ([], "warning", False), (["--quiet"], None, False),
                                              (["--quiet", "--log-level", "info"], None, True),
                                              (["--quiet"], "debug", False)])  # the flag wins over the env
def test_loader_info_messages_show_by_level(argv, env, shows, monkeypatch, capsys):
    """The hub fetch and the device line are the loader's info messages: shown at info (the default), hidden
    at warning, by --log-level, $BLOCKDIFF_LOG_LEVEL or --quiet."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: BUNDLED_MODEL)
    if env:
        monkeypatch.setenv("BLOCKDIFF_LOG_LEVEL", env)
    else:
        monkeypatch.delenv("BLOCKDIFF_LOG_LEVEL", raising=False)
    rc, out, err = _run(["run", "someone/sudoku", "--prompt-ids", PROMPT_IDS, "--steps", "1", "--device", "cpu"]
                        + argv, capsys)
    assert rc == 0 and "tokens" in out
    assert ("fetching someone/sudoku from the Hugging Face hub" in err) == shows, err
    assert ("device: cpu" in err) == shows, err


def _terminal():
    from rich.console import Console
    buf = io.StringIO()
    progress.set_console(Console(file=buf, force_terminal=True, width=120))
    return buf


@pytest.mark.parametrize("quiet", [False, True])
def test_loading_shows_a_progress_bar_on_a_terminal_unless_quiet(quiet):
    from blockdiff import load_model
    buf = _terminal()
    progress.configure("warning", quiet=quiet)
    load_model(BUNDLED_MODEL, quantization="int8")
    assert ("loading sudoku, quantizing to int8" in buf.getvalue()) != quiet


def test_no_progress_bar_off_a_terminal(capsys):
    from blockdiff import load_model
    progress.set_console(None)
    progress.configure("warning")
    load_model(BUNDLED_MODEL)
    assert capsys.readouterr().err == ""


def test_solving_and_training_show_progress_bars(tmp_path):
    from blockdiff.engine.llm import LLM
    from blockdiff.sudoku.solver import solve_diffusion
    from blockdiff.train.loop import TrainOptions, Trainer
    from blockdiff.train.recipes import RECIPES, model_config
    from blockdiff.train.tasks import CopyTask

    buf = _terminal()
    progress.configure("warning")
    solve_diffusion(LLM(BUNDLED_MODEL), [PUZZLE], max_denoising_steps=1)
    task = CopyTask(vocab_size=32, canvas_length=8)
    Trainer(task, TrainOptions(out_dir=str(tmp_path), max_steps=2, batch_size=4, save_every=0, log_every=1000),
            config=model_config(32, 8, **RECIPES["tiny"]), log=lambda s: None).run()
    text = buf.getvalue()
    assert "solving 1 puzzles" in text and "training" in text
    buf.seek(0)
    buf.truncate(0)
    solve_diffusion(LLM(BUNDLED_MODEL), [PUZZLE], max_denoising_steps=1, on_event=lambda ev: None)
    assert "solving" not in buf.getvalue()  # the caller draws its own live view (the demo's grid): no bar over it


# ---------------------------------------------------------------------------------------------- devices
def test_device_auto_is_cuda_when_present_else_cpu(monkeypatch):
    from blockdiff.placement import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and cli.check_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"


def test_device_defaults_to_auto_everywhere():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for name in ("run", "chat", "serve", "bench", "train", "sudoku", "demo"):
        dev = next(a for a in sub.choices[name]._actions if a.dest == "device")
        assert dev.default == "auto", name


# ---------------------------------------------------------------------------------------------- hub ids
def test_revision_and_download_dir_reach_huggingface_hub(monkeypatch, tmp_path, capsys):
    import huggingface_hub
    calls = []

    def fake_snapshot(repo, **kw):
        calls.append((repo, kw))
        return BUNDLED_MODEL

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    rc, _, err = _run(["run", "someone/sudoku", "--prompt-ids", PROMPT_IDS, "--steps", "1", "--revision", "v2",
                       "--download-dir", str(tmp_path)], capsys)
    assert rc == 0
    (repo, kw), = calls
    assert repo == "someone/sudoku" and kw["revision"] == "v2" and kw["cache_dir"] == str(tmp_path)
    assert "at revision v2" in err


def test_hub_flags_on_a_local_path_are_said_to_be_ignored(tmp_path, caplog):
    """--revision was said to be ignored for a local folder, --download-dir was ignored without a word, and both
    without a word for a local .gguf file."""
    import logging

    from blockdiff.hub import resolve_gguf, resolve_path

    local = tmp_path / "model.gguf"
    local.write_bytes(b"GGUF")
    with caplog.at_level(logging.WARNING, logger="blockdiff"):
        assert resolve_path(str(tmp_path), download_dir="/somewhere") == str(tmp_path)
        assert resolve_gguf(str(local), revision="v2", download_dir="/elsewhere") == str(local)
        assert resolve_path(str(tmp_path)) == str(tmp_path) and resolve_gguf(str(local)) == str(local)
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"--download-dir /somewhere is ignored for the local folder {tmp_path}",
                    f"--revision v2 is ignored for the local file {local}",
                    f"--download-dir /elsewhere is ignored for the local file {local}"], said


@pytest.fixture(scope="module")
def gguf_file(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("gguf")
    from gguf_fixtures import write_gguf
    return write_gguf(tiny_checkpoint, str(tmp_path_factory.mktemp("hubgguf") / "tiny-f32.gguf"))


@pytest.mark.parametrize("how", ["colon", "flag"])
def test_gguf_file_from_the_hub(how, gguf_file, monkeypatch, tmp_path):
    """``org/name:file.gguf`` and ``org/name`` + ``gguf_file=`` fetch that one file with hf_hub_download."""
    import huggingface_hub

    from blockdiff.engine.llm import LLM
    calls = []

    def fake_download(repo, filename, **kw):
        calls.append((repo, filename, kw))
        return gguf_file

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("no snapshot for a GGUF"))
    if how == "colon":
        llm = LLM("org/tiny-GGUF:tiny-f32.gguf", revision="r1", download_dir=str(tmp_path))
    else:
        llm = LLM("org/tiny-GGUF", gguf_file="tiny-f32.gguf", revision="r1", download_dir=str(tmp_path))
    assert calls == [("org/tiny-GGUF", "tiny-f32.gguf", {"revision": "r1", "cache_dir": str(tmp_path)})]
    assert llm.model_path == gguf_file and llm.tokenizer is not None


def test_a_split_gguf_from_the_hub_fetches_every_part(tiny_checkpoint, monkeypatch, tmp_path):
    """Naming any part of a split GGUF on the hub fetches all of them (they load together from the first part;
    only the named one was fetched, then "missing beside it: ...")."""
    import gguf
    import huggingface_hub

    from blockdiff.engine.llm import LLM
    from gguf_fixtures import write_gguf
    real = gguf.GGUFWriter.__init__
    monkeypatch.setattr(gguf.GGUFWriter, "__init__",
                        lambda self, path, arch, **kw: real(self, path, arch, split_max_tensors=40, **kw))
    hub = tmp_path / "hub"
    hub.mkdir()
    write_gguf(tiny_checkpoint, str(hub / "tiny.gguf"))
    monkeypatch.setattr(gguf.GGUFWriter, "__init__", real)
    parts = sorted(p.name for p in hub.iterdir())
    assert len(parts) >= 3
    snapshot, calls = tmp_path / "snapshot", []
    snapshot.mkdir()

    def fake_download(repo, filename, **kw):  # as the hub's cache does: each file into the same snapshot folder
        calls.append(filename)
        shutil.copy(hub / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    llm = LLM(f"org/tiny-GGUF:{parts[0]}")
    assert calls == parts and llm.model_path == str(snapshot / parts[0])
    from blockdiff import SamplingParams
    sp = SamplingParams(max_new_tokens=8, seed=1)
    assert llm.generate({"prompt_token_ids": [2, 3]}, sp)[0].token_ids == \
        LLM(str(hub / parts[0])).generate({"prompt_token_ids": [2, 3]}, sp)[0].token_ids
    calls.clear()
    with pytest.raises(Exception, match=f"pass the first part, {parts[0]}"):
        LLM("org/tiny-GGUF", gguf_file=parts[1])
    assert calls == parts  # all fetched, so the error is about which part to name, not about missing ones


def test_gguf_file_flag_is_checked_before_any_download(capsys):
    rc, _, err = _run(["run", "org/x", "hi", "--gguf-file", "weights.bin"], capsys)
    assert rc == 2 and "--gguf-file must name a .gguf file" in err
    rc, _, err = _run(["run", "./local/folder", "hi", "--gguf-file", "m.gguf"], capsys)
    assert rc == 2 and "--gguf-file needs a hub id" in err


def _hub_cache(root, repo: str, commit: str, ref: str = "main") -> None:
    """A huggingface_hub cache holding ``repo`` at ``commit`` (the layout it writes: refs/ and snapshots/)."""
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", ref), "w") as f:
        f.write(commit)
    shutil.copytree(BUNDLED_MODEL, os.path.join(base, "snapshots", commit))


def test_hf_home_and_download_dir_with_the_real_huggingface_hub_offline(tmp_path):
    """No fake: huggingface_hub itself (offline mode; it reads HF_HOME when imported, hence a fresh interpreter)
    finds the checkpoint in $HF_HOME/hub, or in --download-dir when given, at the revision asked for."""
    home, other = tmp_path / "home", tmp_path / "dl"
    _hub_cache(home / "hub", "someone/sudoku", "a" * 40)
    _hub_cache(other, "someone/sudoku", "b" * 40, ref="v2")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    script = f"""
from blockdiff.hub import resolve_path
from blockdiff.checks import CheckpointError
print(resolve_path("someone/sudoku"))
print(resolve_path("someone/sudoku", revision="v2", download_dir={str(other)!r}))
try:
    resolve_path("someone/sudoku", revision="v2")
except CheckpointError as e:
    print("refused:", e)
"""
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    default, custom, refused = r.stdout.strip().splitlines()
    assert default == str(home / "hub" / "models--someone--sudoku" / "snapshots" / ("a" * 40))
    assert custom == str(other / "models--someone--sudoku" / "snapshots" / ("b" * 40))
    assert refused.startswith("refused: could not fetch 'someone/sudoku'")  # v2 is only in the download dir
    assert os.path.exists(os.path.join(default, "model.safetensors"))


def test_quantize_takes_a_hub_id_at_a_revision_from_a_download_dir(tmp_path):
    """`blockdiff quantize ORG/NAME DST --revision R --download-dir D` (huggingface_hub offline, a fresh
    interpreter): the revision is looked up in that folder, as run/serve do."""
    other = tmp_path / "dl"
    _hub_cache(other, "someone/sudoku", "c" * 40, ref="v3")
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    dst = tmp_path / "q8"
    argv = [sys.executable, "-m", "blockdiff", "quantize", "someone/sudoku", str(dst), "--method", "int8",
            "--download-dir", str(other), "--quiet"]
    r = subprocess.run(argv + ["--revision", "v3"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(dst / "config.json") and "quantization_config" in (dst / "config.json").read_text()
    r = subprocess.run(argv + ["--revision", "v9"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "could not fetch 'someone/sudoku'" in r.stderr


# ---------------------------------------------------------------------------------------------- metadata
def test_license_metadata_and_file():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert not any("==" in d for d in meta["dependencies"])  # exact pins only in the test extra
