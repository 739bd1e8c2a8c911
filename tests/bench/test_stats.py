"""Metrics math: percentiles, run summaries, and pod /metrics deltas."""

from __future__ import annotations

import numpy as np
import pytest

from bench.loadgen.client import RequestResult
from bench.loadgen.podmetrics import delta, parse_metrics
from bench.loadgen.stats import Dist, percentile, summarize


@pytest.mark.parametrize("q", [0, 1, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = [0.3, 0.1, 5.0, 2.0, 2.0, 0.7, 9.1]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert Dist.of([]).p90 is None


def _r(ttft, out=10, ok=True, endpoint="a", cached=5, itl=(0.01, 0.02)):
    return RequestResult("t", 0.0, ttft=ttft, e2e=ttft + 0.1, itl=list(itl), prompt_tokens=100,
                         output_tokens=out, cached_tokens=cached, status=200 if ok else 500,
                         error=None if ok else "500 boom", endpoint=endpoint)


def test_summary_counts_only_successes_in_latency_and_throughput():
    results = [_r(0.1), _r(0.3, endpoint="b"), _r(0.2), _r(9.0, ok=False)]
    s = summarize(results, duration_s=2.0)
    assert (s.requests, s.ok, s.errors) == (4, 3, 1)
    assert s.ttft.p50 == pytest.approx(0.2) and s.ttft.max == pytest.approx(0.3)
    assert s.output_tps == pytest.approx(15.0) and s.request_rate == pytest.approx(1.5)
    assert s.itl.n == 6 and s.itl.mean == pytest.approx(0.015)
    assert s.cached_tokens == 15 and s.cached_fraction == pytest.approx(0.05)
    assert s.by_endpoint == {"a": 2, "b": 1}
    assert s.error_samples == ["500 boom"]
    assert summarize([_r(0.1, cached=None)], 1.0).cached_fraction is None


POD = """# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {q}
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {h}
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{{engine="0",le="0.1",model_name="m"}} {b1}
vllm:request_queue_time_seconds_bucket{{engine="0",le="1.0",model_name="m"}} {b2}
vllm:request_queue_time_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {b2}
vllm:request_queue_time_seconds_count{{engine="0",model_name="m"}} {b2}
vllm:request_queue_time_seconds_sum{{engine="0",model_name="m"}} {s}
"""


def test_pod_metrics_delta_gives_fleet_hit_rate_and_queue_time():
    before = [parse_metrics(POD.format(q=100, h=50, b1=1, b2=1, s=0.05)),
              parse_metrics(POD.format(q=0, h=0, b1=0, b2=0, s=0))]
    after = [parse_metrics(POD.format(q=300, h=200, b1=2, b2=6, s=2.55)),
             parse_metrics(POD.format(q=200, h=0, b1=5, b2=5, s=0.25))]
    d = delta(before, after)
    assert (d.prefix_queries, d.prefix_hits) == (400, 150)
    assert d.hit_rate == pytest.approx(150 / 400)
    assert d.per_pod_hit_rate == [pytest.approx(0.75), 0.0]
    assert d.queue_mean_s == pytest.approx(2.75 / 10)
    assert d.queue_p90_s == 1.0  # 6 of 10 within 0.1 s, all within 1 s


def test_pod_metrics_delta_counts_the_simulators_evicted_blocks_and_none_without_them():
    sim = POD + '# TYPE kvgate_sim:kv_cache_evicted_blocks counter\n' \
        'kvgate_sim:kv_cache_evicted_blocks_total{{engine="0",model_name="m"}} {e}\n'
    before = [parse_metrics(sim.format(q=0, h=0, b1=0, b2=0, s=0, e=3))]
    after = [parse_metrics(sim.format(q=10, h=5, b1=1, b2=1, s=0.1, e=10))]
    assert delta(before, after).evicted_blocks == 7
    plain = [parse_metrics(POD.format(q=0, h=0, b1=0, b2=0, s=0))]
    assert delta(plain, plain).evicted_blocks is None  # a real vLLM pod exports no such counter
