"""Shared pytest fixtures: a session-wide tiny checkpoint (built once with the oracle) and its blockdiff model."""

import os
import sys

import pytest
import torch

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _TESTS)  # `from fixtures import ...` in every test file
sys.path.insert(1, os.path.dirname(_TESTS))  # `import blockdiff` without an install

from fixtures import make_checkpoint  # noqa: E402

# Tiny models: one thread. With several threads on 2 shared, busy cores every small matmul waits on the
# others (measured: a tiny encode+denoise took 700 ms with 2 threads under load, 15 ms with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """Folder of the default tiny checkpoint (TINY_TEXT_CONFIG, canvas 16, released generation config, tokenizer).
    Treat it as read-only: tests that damage a checkpoint build their own."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The default tiny checkpoint loaded by blockdiff in fp32 on CPU."""
    from blockdiff import load_model

    return load_model(tiny_checkpoint, dtype=torch.float32, device="cpu")
