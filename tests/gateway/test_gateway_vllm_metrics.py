"""Parsing of vLLM's /metrics page: the real page recorded from vLLM 0.32 (tests/fixtures/vllm), and
edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.vllm_metrics import PodLoad, parse_pod_load

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm"


def test_recorded_vllm_page():
    text = (FIXTURES / "metrics.txt").read_text()
    load = parse_pod_load(text)
    # recorded idle, with --block-size 32 and a 128-block cache (see meta.json)
    assert load == PodLoad(waiting=0, running=0, kv_usage=0.0, block_size=32, num_gpu_blocks=128)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", PodLoad()),
        (
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
            'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.75',
            PodLoad(waiting=1, running=3, kv_usage=0.75),
        ),
        (  # two data-parallel engines behind one URL: queues add up, usage is the fuller engine's
            "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 5.0\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6\n',
            PodLoad(running=7, kv_usage=0.6),
        ),
        (  # block_size must not be read from a label that merely ends in block_size
            'vllm:cache_config_info{effective_attention_block_size="64",block_size="16",'
            'num_gpu_blocks_override="None",num_gpu_blocks="900"} 1.0\n',
            PodLoad(block_size=16, num_gpu_blocks=900),
        ),
    ],
)
def test_edge_cases(text, expected):
    assert parse_pod_load(text) == expected
