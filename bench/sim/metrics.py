"""vLLM 0.32's Prometheus metrics for one simulated pod, in the pod's own CollectorRegistry.

Family names, HELP texts, label sets (`model_name`, `engine`, plus the per-family extra label) and
buckets are those of a real vLLM 0.32 /metrics (tests/fixtures/vllm/metrics.txt; vLLM source:
vllm/v1/metrics/loggers.py and buckets.py). Families a simulated pod has no use for (multi-modal,
external caches, sleep mode, MFU estimates) are exported at their idle values so scrapers see the
same set. Not exported: the FastAPI `http_*` and the `process_*`/`python_*` families.

One family is the simulator's own, not vLLM's (vLLM 0.32 has no eviction counter; its sampled
`--kv-cache-metrics` histograms are not modelled): `kvgate_sim:kv_cache_evicted_blocks`, the cached
blocks the pool gave out again to new work (a prefix cache reset does not count).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTIONS_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
LABELS = ("model_name", "engine")


def token_buckets(max_model_len: int) -> list[float]:
    """vLLM's build_1_2_5_buckets(max_model_len): 1, 2, 5, 10, 20, 50, ... not above max_model_len."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return out
            out.append(float(value))
        exponent += 1


class SimMetrics:
    """The metrics a pod exposes at GET /metrics. The engine updates them; `render()` serves them."""

    def __init__(
        self, model: str, *, engine: str = "0", max_model_len: int, cache_info: Mapping[str, str]
    ) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        lv = (model, engine)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=r).labels(*lv)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=r).labels(*lv)

        def by(kind: type, name: str, doc: str, label: str, values: tuple[str, ...]) -> dict:
            family = kind(name, doc, [*LABELS, label], registry=r)
            return {v: family.labels(*lv, v) for v in values}

        def histogram(name: str, doc: str, buckets: tuple | list) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=r).labels(*lv)

        for name, what in (("flops", "floating point operations"), ("read_bytes", "bytes read from memory"),
                           ("write_bytes", "bytes written to memory")):
            counter(f"vllm:estimated_{name}_per_gpu",
                    f"Estimated number of {what} per GPU (for Model Flops Utilization calculations).")
        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.waiting_by_reason = by(
            Gauge, "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling "
            "capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked "
            "status). Sum of all reasons equals vllm:num_requests_waiting.",
            "reason", ("capacity", "deferred"),
        )
        sleep = by(
            Gauge, "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            "sleep_state", ("awake", "weights_offloaded", "discard_all"),
        )
        sleep["awake"].set(1)
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.external_queries = counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in terms of "
            "number of queried tokens.",
        )
        self.external_hits = counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in terms of "
            "number of cached tokens.",
        )
        counter("vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.")
        counter("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.")
        self.evicted_blocks = counter(
            "kvgate_sim:kv_cache_evicted_blocks",
            "Simulator only, not a vLLM metric: cached KV blocks evicted to make room for new blocks.",
        )
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.prompt_by_source = by(
            Counter, "vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", "source",
            ("local_compute", "local_cache_hit", "external_kv_transfer"),
        )
        self.prompt_tokens_cached = counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external)."
        )
        self.cached_by_source = by(
            Counter, "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host "
            "(offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
            "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
            "vllm:external_prefix_cache_hits.",
            "source", ("device", "host", "p2p", "disk", "external_unspecified"),
        )
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.success = by(Counter, "vllm:request_success", "Count of successfully processed requests.",
                          "finished_reason", FINISH_REASONS)
        rejections = Counter(
            "vllm:admission_rejections", "Number of admission attempts rejected by a queue limit, by reason.",
            ["model_name", "reason"], registry=r,
        )
        for reason in ("max_num_queued_reqs", "max_num_queued_tokens"):
            rejections.labels(model, reason)
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", tokens
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        )
        self.max_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.", tokens,
        )
        self.params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                                  PARAMS_N_BUCKETS)
        self.params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", tokens
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS,
        )
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS,
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS,
        )
        self.request_preemptions = histogram(
            "vllm:request_num_preemptions", "Histogram of the number of times a request was preempted.",
            PREEMPTIONS_BUCKETS,
        )
        self.prefill_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).", tokens,
        )
        info = Gauge(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
            [*cache_info, "engine"], registry=r,
        )
        info.labels(**cache_info, engine=engine).set(1)

    def set_gauges(self, running: int, waiting: int, deferred: int, kv_usage: float) -> None:
        """`waiting` counts all waiting requests; `deferred` those of them blocked on a KV transfer."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.waiting_by_reason["capacity"].set(waiting - deferred)
        self.waiting_by_reason["deferred"].set(deferred)
        self.kv_usage.set(kv_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
