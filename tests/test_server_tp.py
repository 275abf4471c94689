"""The server over a model split in two (``blockdiff serve --tensor-parallel-size 2``): a subset of
tests/test_server.py, run unchanged against an ``LLM`` whose model spans 2 gloo ranks.

The same tests, fixtures and helpers: only the ``llm`` fixture differs (TP=2). Covered: health/models, completion =
offline generate, chat usage, streaming = non-streaming, 16 concurrent seeded requests = their solo runs
(deterministic mode), dropped streams, metrics, the prefix cache on a second chat turn (page copies on both ranks),
logprobs.
"""

from __future__ import annotations

import os

import pytest
import torch

from blockdiff import LLM
from fixtures import make_checkpoint
from test_server import (main, test_chat_completion_has_message_usage_and_finish_reason,  # noqa: F401
                         test_completion_equals_offline_generate, test_dropped_stream_aborts_the_request_and_frees_it,
                         test_health_and_models, test_logprobs_through_the_openai_client,
                         test_metrics_exposes_counters, test_prefix_cache_serves_a_second_chat_turn_exactly,
                         test_sixteen_concurrent_seeded_requests_equal_their_solo_runs,
                         test_streaming_equals_non_streaming_for_same_seed)

os.environ.setdefault("BLOCKDIFF_DIST_TIMEOUT", "120")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = make_checkpoint(tmp_path_factory.mktemp("serve_ckpt_tp"),
                           generation_config={"max_denoising_steps": 4, "max_new_tokens": 32})
    llm = LLM(path, dtype=torch.float32, max_num_seqs=16, deterministic=True, tensor_parallel_size=2)
    assert llm.model.group is not None  # really split
    yield llm
    llm.close()
    torch.set_num_threads(threads)
