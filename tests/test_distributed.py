"""A model split over ranks (blockdiff.distributed, gloo on CPU) computes what one process computes.

One group of spawned ranks per world size (TP=2 / EP=2 share the 2-rank group, TP=4 has its own), each loading
several tiny checkpoints in turn: heads, KV heads, experts, intermediate sizes and the vocabulary that do not
divide evenly, sliding and full layers, int8 and int4 weights, an image prompt. Logits of encode, denoise (with
self-conditioning from raw logits, i.e. the cross-rank softmax) and after commits are within 1e-5 of one
process (relative to the largest logit, as tests/test_batched_core.py); ``rng="reference"`` generation is token-equal; the prefix cache (page copies on every rank) reuses
prompts; the weights each rank holds are ~1/N.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from blockdiff import LLM, SamplingParams, load_model
from blockdiff.distributed import Group, split, weight_bytes
from blockdiff.distributed.shard import local_kv_heads
from fixtures import TINY_VISION_CONFIGS, make_checkpoint

# A test that fails inside a collective leaves the other ranks waiting: let them give up after 2 minutes.
os.environ.setdefault("BLOCKDIFF_DIST_TIMEOUT", "120")

REL_TOL = 1e-5  # as tests/test_batched_core.py: max |split - one| <= 1e-5 * the largest |logit| of the tensor

# Every dimension the split touches, uneven: 12 query heads over 3 KV heads (sliding layers: a rank's heads straddle
# GQA groups unevenly at TP=2 and TP=4, so KV heads are duplicated per query head), 1 KV head on full layers
# (replicated on every rank), 5 experts, intermediate 100, expert intermediate 36, vocabulary 509; attention biases
# (the encode pass's own ones cut like the projections) and the exact GeLU (kept by the split experts).
UNEVEN = dict(vocab_size=509, hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=12,
              num_key_value_heads=3, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, num_experts=5,
              top_k_experts=2, moe_intermediate_size=36, sliding_window=8, attention_bias=True,
              hidden_activation="gelu")
# Dimensions int4 can cut on its group boundaries (expert intermediate 128 = 2 groups of 64).
INT4 = dict(moe_intermediate_size=128)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    mk = tmp_path_factory.mktemp
    return {"uneven": make_checkpoint(mk("uneven"), text_overrides=UNEVEN, seed=3),
            "tiny": make_checkpoint(mk("tiny"), seed=4),
            "int4": make_checkpoint(mk("int4"), text_overrides=INT4, seed=5),
            "vision": make_checkpoint(mk("vision"), vision=TINY_VISION_CONFIGS["patch8_pool2_clipped"], seed=6)}


@pytest.fixture(scope="module")
def group2():
    g = Group.spawn(2)
    yield g
    g.close()


@pytest.fixture(scope="module")
def group4(group2):
    group2.close()  # one process group per process: the 2-rank tests ran first (module order)
    g = Group.spawn(4)
    yield g
    g.close()


# ---------------------------------------------------------------------------------------------- pure geometry
def test_split_covers_everything_once_with_aligned_boundaries():
    for n, world, align in [(509, 4, 1), (36, 4, 1), (5, 2, 1), (704, 8, 64), (128, 2, 64), (12, 4, 1)]:
        ranges = [split(n, world, r, align) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % align == 0 for lo, _ in ranges)


def test_kv_heads_are_replicated_whole_or_duplicated_per_query_head():
    # The released model's full layers: 16 query heads over 2 KV heads. TP=4/8: each rank keeps the one KV head
    # its query heads read (replicated on 2 / 4 ranks), with the GQA factor of its heads.
    assert [local_kv_heads(16, 2, *split(16, 4, r)) for r in range(4)] == [[0], [0], [1], [1]]
    assert [local_kv_heads(16, 2, *split(16, 8, r)) for r in range(8)] == [[0]] * 4 + [[1]] * 4
    assert local_kv_heads(16, 8, *split(16, 2, 1)) == [4, 5, 6, 7]  # sliding layers divide evenly
    # Heads 0..5 of 12 over 3 KV heads (4 per group): groups 0,0,0,0,1,1 -> one KV head per query head.
    assert local_kv_heads(12, 3, 0, 6) == [0, 0, 0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------- logits
def _run(model, seed: int, sc: torch.Tensor | None = None, image: dict | None = None, prompt=None):
    """Encode two prompts of different lengths (logits of every position), denoise, denoise with self-conditioning
    logits, commit a canvas, denoise again. Returns every logits tensor."""
    g = torch.Generator().manual_seed(seed)
    V, C = model.vocab_size, model.canvas_length
    out = []
    with torch.no_grad():
        if image is not None:
            cache = model.new_cache(1)
            out.append(model.encode(torch.tensor([prompt]), cache, logits="all", **image))
            B = 1
        else:
            B = 2
            cache = model.new_cache(B)
            ids = torch.randint(5, V, (B, 13), generator=g)
            out.append(model.encode(ids, cache, lengths=[13, 6], logits="all")[:, :6])
        canvas = torch.randint(0, V, (B, C), generator=g)
        d = model.denoise(canvas, cache)
        out += [d, model.denoise(canvas, cache, self_conditioning_logits=d * 3)]
        model.encode(canvas, cache)  # commit: the next canvas sees it
        out.append(model.denoise(torch.randint(0, V, (B, C), generator=g), cache))
    return out


def _assert_same(split_out, one_out):
    assert len(split_out) == len(one_out)
    for a, b in zip(split_out, one_out):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= REL_TOL * b.abs().max()


# int8 is compared on its continuous path (dequantized weights): the CPU kernels also quantize every activation row
# dynamically, a discontinuous rounding that a 1e-7 difference upstream can flip (see
# test_tp2_quant_kernels_equal_one_process_given_the_same_inputs for that path). "int4" quantizes the experts to int4
# (bf16 activations, continuous) and every other linear to int8.
CASES = [  # (checkpoint, expert_parallel, load_model kwargs)
    ("uneven", False, {}),
    ("uneven", True, {}),
    ("tiny", False, {"quantization": "int8"}),
    ("tiny", True, {"quantization": "int8"}),
    ("int4", False, {"quantization": "int4"}),
]


@pytest.mark.parametrize("name,ep,load", CASES, ids=["uneven", "uneven-ep", "int8", "int8-ep", "int4"])
def test_tp2_logits_equal_one_process(group2, paths, name, ep, load):
    one = load_model(paths[name], dtype=torch.float32, prepare_quantized=False, **load)
    split_model = group2.load(paths[name], expert_parallel=ep, quant_kernels=False, dtype=torch.float32, **load)
    _assert_same(_run(split_model, 1), _run(one, 1))


def test_tp2_quant_kernels_equal_one_process_given_the_same_inputs(group2, paths):
    """On the int8 kernel path each split module (the MLP's row-parallel down projection with the all-reduced
    activation scale, tensor-parallel experts) gives, from the same input, what the one-process module gives."""
    one = load_model(paths["tiny"], dtype=torch.float32, quantization="int8")
    split_model = group2.load(paths["tiny"], dtype=torch.float32, quantization="int8")
    inputs = {}
    def keep(i):
        def hook(mod, inp, out):
            inputs.setdefault(i, (inp, out))  # returns None: the output stays
        return hook
    hooks = [m.register_forward_hook(keep(i)) for i, m in enumerate(_int8_modules(split_model.shard))]
    _run(split_model, 3)
    for h in hooks:
        h.remove()
    assert inputs
    for i, m in enumerate(_int8_modules(one)):
        inp, out = inputs[i]
        want = m(*inp)
        assert (out - want).abs().max() <= REL_TOL * want.abs().max()


def _int8_modules(model):
    """Per layer the dense MLP (its down projection row-parallel) and the experts (tensor-parallel): modules whose
    inputs are whole on every rank, so the split module and the one-process module can take the same input."""
    out = []
    for layer in model.layers:
        out += [layer.mlp, layer.experts]
    return out


def _image_inputs(llm, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "RGB")
    _, ids, im = llm._prompt({"prompt": "<bos>Look: <|image|> what?", "multi_modal_data": {"image": img}}, 0)
    image_id = llm.model.config.image_token_id
    return ids, {"pixel_values": im.pixel_values, "image_position_ids": im.image_position_ids,
                 "mm_token_type_ids": im.mm_token_type_ids(ids, image_id)}, img


def test_tp2_image_prompt_logits_and_generation_equal_one_process(group2, paths):
    one = LLM(paths["vision"], dtype="float32")
    ids, image, img = _image_inputs(one)
    split_model = group2.load(paths["vision"], dtype=torch.float32)
    _assert_same(_run(split_model, 2, image=image, prompt=ids), _run(one.model, 2, image=image, prompt=ids))
    two = LLM.from_model(split_model, one.tokenizer, one.defaults)
    two.images = one.images
    params = SamplingParams(max_new_tokens=16, seed=5, rng="reference", max_denoising_steps=8)
    req = {"prompt": "<bos>Look: <|image|> what?", "multi_modal_data": {"image": img}}
    assert two.generate(req, params)[0].token_ids == one.generate(req, params)[0].token_ids


def _generate_pair(one: LLM, two: LLM, seeds=(1, 2)):
    prompts = [[2, 10, 20, 30, 40], [2, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
    params = [SamplingParams(max_new_tokens=24, seed=s, rng="reference", max_denoising_steps=10) for s in seeds]
    a = one.generate(prompt_token_ids=prompts, sampling_params=params)
    b = two.generate(prompt_token_ids=prompts, sampling_params=params)
    return [x.token_ids for x in a], [x.token_ids for x in b]


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "ep2"])
def test_tp2_reference_generation_token_equal(group2, paths, ep):
    one = LLM(paths["uneven"], dtype="float32")
    two = LLM.from_model(group2.load(paths["uneven"], expert_parallel=ep, dtype=torch.float32), None, one.defaults)
    a, b = _generate_pair(one, two)
    assert a == b and all(len(x) > 0 for x in a)


def test_tp2_fast_requests_run_exact_instead_of_stalling_the_ranks(group2, paths):
    """Fast mode runs the model's pieces one by one, which a split model cannot follow: its requests run exact
    (the same tokens as exact mode), not a tick that leaves the followers waiting."""
    two = LLM.from_model(group2.load(paths["tiny"], dtype=torch.float32), None, LLM(paths["tiny"], dtype="float32").defaults)
    assert not two.engine.fast_capable
    out = {}
    for fast in (False, True):
        params = SamplingParams(max_new_tokens=16, seed=5, max_denoising_steps=6, fast=fast)
        out[fast] = two.generate(prompt_token_ids=[[2, 10, 20, 30]], sampling_params=params)[0].token_ids
    assert out[True] == out[False] and len(out[True]) > 0


def test_tp2_prefix_cache_reuses_prompts_with_page_copies_on_every_rank(group2, paths):
    from blockdiff.distributed import ParallelPrefixCache

    one = LLM(paths["tiny"], dtype="float32", prefix_cache_bytes=1 << 20)
    model = group2.load(paths["tiny"], dtype=torch.float32)
    two = LLM.from_model(model, None, one.defaults)
    two.engine.prefix_cache = ParallelPrefixCache(model, 1 << 20)
    shared = list(range(5, 45))  # 40 tokens: two whole 16-token blocks, sliding layers (window 8) copied
    params = SamplingParams(max_new_tokens=16, seed=3, rng="reference", max_denoising_steps=8)
    for tail in ([7, 8], [9, 10, 11]):
        a = one.generate(prompt_token_ids=[shared + tail], sampling_params=params)[0]
        b = two.generate(prompt_token_ids=[shared + tail], sampling_params=params)[0]
        assert a.token_ids == b.token_ids
        assert a.metrics.cached_tokens == b.metrics.cached_tokens
    assert b.metrics.cached_tokens == 32


def test_tp2_weights_per_rank_are_about_half(group2, paths):
    one = load_model(paths["uneven"], dtype=torch.float32)
    stats = group2.load(paths["uneven"], dtype=torch.float32).rank_stats()
    full = weight_bytes(one, text_only=True)  # the (tiny) vision tower is replicated; here it would dominate
    assert [s["rank"] for s in stats] == [0, 1]
    for s in stats:  # replicated: norms, router, RoPE tables, KV heads of the full layers
        assert 0.45 * full < s["text_weight_bytes"] < 0.56 * full


# ---------------------------------------------------------------------------------------------- TP = 4
@pytest.mark.parametrize("name,load", [("uneven", {}), ("tiny", {"quantization": "int8"})], ids=["uneven", "int8"])
def test_tp4_logits_equal_one_process(group4, paths, name, load):
    one = load_model(paths[name], dtype=torch.float32, prepare_quantized=False, **load)
    split_model = group4.load(paths[name], quant_kernels=False, dtype=torch.float32, **load)
    out = _run(split_model, 7)
    assert all(torch.isfinite(x).all() for x in out)  # the garbage/NaN at TP=4 other engines reported
    _assert_same(out, _run(one, 7))


def test_tp4_reference_generation_token_equal_and_weights_quartered(group4, paths):
    one = LLM(paths["uneven"], dtype="float32")
    model = group4.load(paths["uneven"], dtype=torch.float32)
    a, b = _generate_pair(one, LLM.from_model(model, None, one.defaults))
    assert a == b
    full = weight_bytes(one.model, text_only=True)
    assert all(s["text_weight_bytes"] < 0.32 * full for s in model.rank_stats())


# ---------------------------------------------------------------------------------------------- arguments, torchrun
def test_parallel_arguments_are_refused_clearly(paths):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM("unused", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="expert_parallel needs tensor_parallel_size"):
        LLM("unused", expert_parallel=True)
    from blockdiff.distributed.shard import shard_attention, shard_experts
    one = load_model(paths["tiny"], dtype=torch.float32)
    with pytest.raises(ValueError, match="exceeds the 4 attention heads"):
        shard_attention(one.layers[0].self_attn, 8, 0)
    with pytest.raises(ValueError, match="at least 8 experts"):
        shard_experts(one.layers[0], 8, 0, expert_parallel=True)


TORCHRUN_SCRIPT = """
import sys, torch
from blockdiff import LLM, SamplingParams
torch.set_num_threads(1)
llm = LLM(sys.argv[1], dtype="float32", tensor_parallel_size=2)  # ranks > 0 follow here, then exit
out = llm.generate(prompt_token_ids=[[2, 10, 20, 30]],
                   sampling_params=SamplingParams(max_new_tokens=16, seed=4, rng="reference", max_denoising_steps=6))
print("TOKENS", out[0].token_ids, flush=True)
llm.close()
"""


def test_under_torchrun_rank0_generates_what_one_process_generates(paths, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "tp.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), str(script), paths["tiny"]],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith("TOKENS")]
    assert len(lines) == 1  # printed on rank 0 only: rank 1 left the constructor with SystemExit(0)
    one = LLM(paths["tiny"], dtype="float32")
    want = one.generate(prompt_token_ids=[[2, 10, 20, 30]],
                        sampling_params=SamplingParams(max_new_tokens=16, seed=4, rng="reference",
                                                       max_denoising_steps=6))[0].token_ids
    assert lines[0] == f"TOKENS {want}"


DEAD_FOLLOWER_SCRIPT = """
import torch.distributed as dist
from blockdiff.distributed.launch import Group
if __name__ == "__main__":
    g = Group.spawn(2)
    g.procs[0].kill()
    g.procs[0].join()
    g.close()  # must not raise: the follower is gone, the rest is still released
    print("CLOSED", dist.is_initialized(), g.closed, flush=True)
"""


def test_closing_a_group_whose_follower_died_releases_it_without_raising(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "dead.py"
    script.write_text(DEAD_FOLLOWER_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CLOSED False True" in out.stdout
    assert "could not tell every rank to stop" in out.stderr  # said, not raised


# A rank that cannot load the checkpoint (rank 0 alone, e.g. out of memory on its device; a follower alone; or rank 0
# interrupted mid-load): every rank must learn it and leave in step, with one error naming the rank that failed. Rank
# 0 failing alone left the followers waiting inside the load for the collective timeout, then dying with a gloo
# traceback; a follower failing alone printed its traceback and rank 0 raised gloo's "Connection closed by peer".
LOAD_FAILS_SCRIPT = """
import multiprocessing, os, sys
from blockdiff import LLM
from blockdiff.checks import CheckpointError
from blockdiff.distributed import launch

real = launch._load_shard


def load(path, world, rank, *a, **k):  # the spawned followers run this module's top level too
    if rank == int(sys.argv[2]):
        raise {"value": CheckpointError, "memory": MemoryError, "interrupt": KeyboardInterrupt}[sys.argv[3]]("no luck")
    return real(path, world, rank, *a, **k)


launch._load_shard = load
if __name__ == "__main__":
    for attempt in range(2):  # the second one starts cleanly: the first left no rank nor process group behind
        try:
            LLM(sys.argv[1], dtype="float32", tensor_parallel_size=2)
        except BaseException as e:
            print("RAISED", type(e).__name__, e, flush=True)
        print("CHILDREN", len(multiprocessing.active_children()), flush=True)
"""


@pytest.mark.parametrize("rank,how,want", [
    (0, "value", "CheckpointError no luck"),
    (1, "memory", f"RuntimeError rank 1 of the split model could not load {{path}}: MemoryError: no luck"),
    (0, "interrupt", "KeyboardInterrupt no luck")], ids=["rank0", "rank1-oom", "rank0-interrupted"])
def test_a_rank_that_cannot_load_fails_the_load_on_every_rank_with_one_error(paths, tmp_path, rank, how, want):
    import subprocess
    import sys

    script = tmp_path / "fails.py"
    script.write_text(LOAD_FAILS_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", BLOCKDIFF_DIST_TIMEOUT="30",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(script), paths["tiny"], str(rank), how], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [f"RAISED {want.format(path=paths['tiny'])}", "CHILDREN 0"] * 2, \
        out.stdout + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


BAD_GENERATION_CONFIG_SCRIPT = """
import multiprocessing, sys
from blockdiff import LLM
if __name__ == "__main__":
    for attempt in range(2):
        try:
            LLM(sys.argv[1], dtype="float32", tensor_parallel_size=2)
        except ValueError as e:
            print("RAISED", type(e).__name__, flush=True)
        print("CHILDREN", len(multiprocessing.active_children()), flush=True)
"""


def test_a_checkpoint_refused_after_its_ranks_started_ends_them(tmp_path):
    """generation_config.json is read after the split model loaded: its refusal must end the ranks (they were left
    running, and the process group with them: the next LLM(tensor_parallel_size=2) of the process was refused)."""
    import subprocess
    import sys

    path = make_checkpoint(tmp_path / "ckpt", generation_config={"max_length": 100})
    script = tmp_path / "bad.py"
    script.write_text(BAD_GENERATION_CONFIG_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(script), path], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["RAISED CheckpointError", "CHILDREN 0"] * 2, out.stdout + out.stderr[-3000:]


RANK0_DIES_SCRIPT = """
import multiprocessing, os, signal
from blockdiff.distributed import launch
if __name__ == "__main__":
    def die(*args, **kwargs):  # rank 0 killed after spawning its follower, before it hosts the rendezvous
        print("FOLLOWERS", *[p.pid for p in multiprocessing.active_children()], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    launch.dist.init_process_group = die  # here only: the spawned follower imports its own
    launch.Group.spawn(2)
"""


def test_a_follower_ends_when_rank0_is_killed_before_the_ranks_meet(tmp_path):
    """The follower retried the rendezvous for BLOCKDIFF_DIST_TIMEOUT (600 s by default): an orphan process."""
    import subprocess
    import sys

    from test_server import wait_until

    script = tmp_path / "die.py"
    script.write_text(RANK0_DIES_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", BLOCKDIFF_DIST_TIMEOUT="600",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "out.txt"  # a file, not a pipe: a follower left behind would hold a pipe open
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(script)], stdout=f, stderr=subprocess.STDOUT, timeout=120,
                            env=env).returncode
    text = log.read_text()
    followers = [int(x) for x in text.split("FOLLOWERS", 1)[1].split()]
    assert rc == -9 and len(followers) == 1, text[-3000:]

    def gone(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
    try:
        assert wait_until(lambda: gone(followers[0]), timeout=60)
    finally:
        if not gone(followers[0]):
            os.kill(followers[0], 9)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_world_larger_than_the_heads_is_refused_before_any_rank_starts(paths, monkeypatch):
    from blockdiff.distributed import launch

    def spawn(*a, **k):  # 99 processes each loading the checkpoint only to refuse it took minutes on 2 cores
        raise AssertionError("ranks were started for a world size the checkpoint cannot take")
    monkeypatch.setattr(launch.Group, "spawn", spawn)
    with pytest.raises(ValueError, match="tensor_parallel_size 100 exceeds the 4 attention heads"):
        LLM(paths["tiny"], dtype="float32", tensor_parallel_size=100)
    with pytest.raises(ValueError, match="at least 6 experts, the model has 5"):  # 12 heads, 5 experts
        LLM(paths["uneven"], dtype="float32", tensor_parallel_size=6, expert_parallel=True)
    # int4 cuts only on group boundaries: the tiny model's expert intermediate (32) is one group of 32
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 cannot split layers.0.experts.down_proj in int4: "
                                         r"its 32 inputs are stored in groups of 32 \(1 group\), .*expert parallel"):
        LLM(paths["tiny"], dtype="float32", tensor_parallel_size=2, quantization="int4")
    # 128 = 2 groups of 64: TP 2 takes it; TP 4 would need groups of 32
    with pytest.raises(ValueError, match=r"split layers.0.experts.down_proj in int4: its 128 inputs are stored in "
                                         r"groups of 64 \(2 groups\).*int4 with groups of 32 \(int4-g32\)"):
        LLM(paths["int4"], dtype="float32", tensor_parallel_size=4, quantization="int4")


# A server on a split model whose follower dies (killed, OOM) or whose collective breaks mid-call: the ranks can no
# longer move in step. The server must say so (/health 503, 503 engine_stopped) instead of answering "ok" and
# failing every later request (or hanging it on followers still waiting inside the broken call).
BROKEN_GROUP_SCRIPT = """
import sys, time
from fastapi.testclient import TestClient
from blockdiff import LLM, SamplingParams
from blockdiff.distributed import runtime
from blockdiff.server import build_app
if __name__ == "__main__":
    how = sys.argv[2]
    llm = LLM(sys.argv[1], dtype="float32", tensor_parallel_size=2)
    body = {"model": "t", "prompt": "hello", "max_tokens": 16, "seed": 1, "max_denoising_steps": 4}
    with TestClient(build_app(llm, "t")) as c:
        print("FIRST", c.post("/v1/completions", json=body).status_code, flush=True)
        if how == "kill":
            llm.model.group.procs[0].kill()
            llm.model.group.procs[0].join()
        else:  # a collective that raises on rank 0 after the call's message went out
            def broken(self, local):
                raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.1.2.3]:29517")
            runtime.Channel.gather_vocab = broken
            print("BROKEN", c.post("/v1/completions", json=body).status_code, flush=True)
        print("HEALTH", c.get("/health").status_code, flush=True)
        r = c.post("/v1/completions", json=body)
        print("AFTER", r.status_code, r.json()["error"]["code"], flush=True)
        print("MESSAGE", r.json()["error"]["message"], flush=True)
    t0 = time.monotonic()
    llm.close()
    print("CLOSED", time.monotonic() - t0 < 20, flush=True)
"""


@pytest.mark.parametrize("how", ["kill", "collective"])
def test_a_server_whose_split_model_lost_a_rank_reports_unhealthy_and_refuses(paths, tmp_path, how):
    import subprocess
    import sys

    script = tmp_path / "broken.py"
    script.write_text(BROKEN_GROUP_SCRIPT)
    out = subprocess.run([sys.executable, str(script), paths["tiny"], how], capture_output=True, text=True,
                         timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1", BLOCKDIFF_DIST_TIMEOUT="30"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FIRST 200" in out.stdout
    if how == "collective":
        assert "BROKEN 500" in out.stdout  # the requests of the failing tick fail; nothing hangs
    assert "HEALTH 503" in out.stdout, out.stdout
    assert "AFTER 503 engine_stopped" in out.stdout, out.stdout
    message = next(ln for ln in out.stdout.splitlines() if ln.startswith("MESSAGE"))
    assert "split model" in message and ("lost rank 1" in message if how == "kill" else "denoise call" in message)
    # the collective's own text names internal hosts and ports: the server log has it, the client does not
    assert "10.1.2.3" not in message and "29517" not in message, message
    if how == "collective":
        assert "Connection closed by peer [10.1.2.3]:29517" in out.stderr
    assert "CLOSED True" in out.stdout
