"""cache_aware: send each request to the pod where its first token is predicted to come soonest.

    predicted_ttft(pod) = slot_wait + overhead + (queued + uncached) / rate + running * interference

all in seconds, per pod (router/ttft): `uncached` is the prompt minus the prefix the index says the pod
holds, `queued` the prefill work this gateway sent there that has not produced its first token yet
(plus other gateways' queued requests seen by the slow scrape), `running` the requests decoding there,
`slot_wait` the wait for a batch slot when the pod's batch is full. `rate`, `overhead` and
`interference` are learned online per pod from every streamed answer's first byte, starting from a
configured prior, so pods of different sizes get their own rates without config.

The pod with the lowest prediction wins. Predictions within `tie_fraction` of the best are near-ties:
among those the pod that adds the least prefill work to the fleet (fewest uncached tokens) wins, then
the least loaded, then one at random, never list order. There is no weight to tune and no balance
threshold: a hot prefix spreads by itself, since once its holder's queue makes it slower than a cold
prefill elsewhere the next request goes elsewhere, and that pod learns the prefix too.

Decision reasons: "prefix_hit" (the chosen pod holds part of the prompt), "spread" (a pod holding more of
the prompt was predicted slower), "tie" (random among equals), "load" (no pod holds any of it).

YAML:
    policy: {name: cache_aware, params: {index: precise, tie_fraction: 0.05,
             prior: {prefill_tokens_per_s: 16000, overhead_s: 0.01, interference_s: 0.0002},
             max_num_seqs: 256}}
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.endpoint import Endpoint
from router.policies.common import rng_for
from router.policy import Decision, Policy, PolicyContext, RouteRequest
from router.prefix_cache import PrefixCache
from router.ttft.estimator import RatePrior
from router.ttft.ledger import Attempt, Clock, PodLedger, new_ledger

_PARAMS = {"tie_fraction", "prior", "max_num_seqs", "decay", "seed"}
_GENERATION = ("/v1/completions", "/v1/chat/completions")
# |predicted - observed| / observed
ERROR_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)


class TTFTMetrics:
    """kvgate_ttft_model_*: the learned rates per pod and how far predictions are from what was seen."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "endpoint"]
        self.rate = Gauge(
            "kvgate_ttft_model_prefill_tokens_per_second",
            "Learned prefill rate of each pod (uncached prompt tokens per second).",
            labels, registry=registry,
        )  # fmt: skip
        self.overhead = Gauge(
            "kvgate_ttft_model_overhead_seconds",
            "Learned fixed part of each pod's TTFT (network, scheduling, one engine step).",
            labels, registry=registry,
        )  # fmt: skip
        self.interference = Gauge(
            "kvgate_ttft_model_interference_seconds",
            "Learned TTFT added per request decoding on the pod.",
            labels, registry=registry,
        )  # fmt: skip
        self.error = Histogram(
            "kvgate_ttft_prediction_error_ratio",
            "|predicted - observed| / observed TTFT of streamed answers (observed: sent to first byte).",
            ["model"], buckets=ERROR_BUCKETS, registry=registry,
        )  # fmt: skip
        self.samples = Counter(
            "kvgate_ttft_model_samples",
            "First bytes the TTFT model learned from, per pod.",
            labels, registry=registry,
        )  # fmt: skip


def _registry_metrics(registry: CollectorRegistry) -> TTFTMetrics:
    """One TTFTMetrics per registry (pools share the registry's metric families)."""
    existing = getattr(registry, "_kvgate_ttft_metrics", None)
    if existing is None:
        existing = TTFTMetrics(registry)
        registry._kvgate_ttft_metrics = existing  # type: ignore[attr-defined]
    return existing


class PredictedTTFTPolicy(Policy):
    """Lowest predicted time to first token. See the module docstring for the model and the rule."""

    type_name = "cache_aware"
    uses_prefix_cache = True

    def __init__(
        self,
        cache: PrefixCache,
        *,
        model: str = "",
        prior: RatePrior | None = None,
        tie_fraction: float = 0.05,
        max_num_seqs: int | None = None,
        decay: float = 0.995,
        clock: Clock = time.perf_counter,
        registry: CollectorRegistry | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= tie_fraction < 1.0:
            raise ValueError("tie_fraction must be in [0, 1)")
        if max_num_seqs is not None and (not isinstance(max_num_seqs, int) or max_num_seqs <= 0):
            raise ValueError("max_num_seqs must be a positive integer")
        self.cache = cache
        self.model = model
        self.prior = prior or RatePrior()
        self.tie_fraction = float(tie_fraction)
        self.max_num_seqs = max_num_seqs
        self.decay = decay
        self.clock = clock
        self.ledgers: dict[Endpoint, PodLedger] = {}
        self._rng = rng_for(None, seed)
        self._metrics = _registry_metrics(registry) if registry is not None else None

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> PredictedTTFTPolicy:
        """`params` are the policy's own (the pool gave the prefix cache its share, see split_params)."""
        unknown = set(params) - _PARAMS
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)}; known: {sorted(_PARAMS)}")
        if ctx.prefix_cache is None:
            raise ValueError("cache_aware needs the pool's prefix cache")
        prior = params.get("prior")
        if prior is not None and not isinstance(prior, Mapping):
            raise ValueError("prior must map prefill_tokens_per_s / overhead_s / interference_s to numbers")
        return cls(
            ctx.prefix_cache,
            model=ctx.model,
            prior=RatePrior(**prior) if prior else None,
            tie_fraction=params.get("tie_fraction", 0.05),
            max_num_seqs=params.get("max_num_seqs"),
            decay=params.get("decay", 0.995),
            registry=ctx.registry,
            seed=params.get("seed", ctx.seed),
        )

    def ledger(self, ep: Endpoint) -> PodLedger:
        led = self.ledgers.get(ep)
        if led is None:
            led = self.ledgers[ep] = new_ledger(
                self.prior, clock=self.clock, max_num_seqs=self.max_num_seqs, decay=self.decay
            )
        return led

    # ---- the decision -------------------------------------------------------------------------

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        cache = self.cache
        state = request.state
        cache.learn_from(candidates)
        cache.prepare(state, request)
        state.matched = cache.match(state.keys, candidates) if state.keys else {}
        ntok = state.prompt_tokens
        now = self.clock()
        best = float("inf")
        scored: list[tuple[float, int, Endpoint]] = []
        for ep in candidates:
            led = self.ledger(ep)
            if ep.last_scrape != led.reconciled_at:
                led.reconcile_endpoint(ep)
            led.peers = ep.peer_load
            work = ntok - state.cached_tokens(ep)
            t = led.predict(work, now).total
            scored.append((t, work, ep))
            if t < best:
                best = t
        limit = best * (1.0 + self.tie_fraction) + 1e-9
        near = [s for s in scored if s[0] <= limit]
        tie = False
        if len(near) > 1:
            least_work = min(s[1] for s in near)
            near = [s for s in near if s[1] == least_work]
            if len(near) > 1:
                low = min(s[2].in_flight for s in near)
                near = [s for s in near if s[2].in_flight == low]
                tie = len(near) > 1
        chosen = near[0][2] if len(near) == 1 else self._rng.choice(near)[2]

        held = state.matched
        if held.get(chosen, 0) > 0:
            reason = "prefix_hit"
        elif any(n > held.get(chosen, 0) for n in held.values()):
            reason = "spread"
        elif tie:
            reason = "tie"
        else:
            reason = "load"
        return Decision(chosen, reason, cached_tokens=state.cached_tokens(chosen), prompt_tokens=ntok)

    # ---- hooks --------------------------------------------------------------------------------

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        ep = decision.endpoint
        state = request.state
        self.cache.record(state, ep)
        self.cache.count_routed(decision)
        led = self.ledger(ep)
        work = max(0, decision.prompt_tokens - decision.cached_tokens)
        p = led.predict(work, self.clock())
        attempt = Attempt(led, work, p.queued_tokens, p.running, p.slot_wait_s, p.total,
                          _output_tokens(request.body), _streamed_generation(request))
        led.dispatch(attempt)
        state.attempts[ep] = attempt

    def on_first_byte(self, request: RouteRequest, decision: Decision, elapsed_s: float) -> None:
        attempt = request.state.attempts.get(decision.endpoint)
        if not isinstance(attempt, Attempt):
            return
        led = attempt.pod
        if request.state.disaggregated:  # this first byte came after a prefill on another pod
            attempt.learn = False
        ttft = led.first_byte(attempt)
        if ttft is None or not attempt.learn or ttft <= 0:
            return
        m = self._metrics
        if m is not None:
            url = decision.endpoint.url
            m.error.labels(self.model).observe(abs(attempt.predicted_s - ttft) / ttft)
            m.samples.labels(self.model, url).inc()
            est = led.estimator
            m.rate.labels(self.model, url).set(est.prefill_tokens_per_s)
            m.overhead.labels(self.model, url).set(est.overhead_s)
            m.interference.labels(self.model, url).set(est.interference_s)

    def on_finished(self, request: RouteRequest, decision: Decision, ok: bool) -> None:
        state = request.state
        attempt = state.attempts.pop(decision.endpoint, None)
        if isinstance(attempt, Attempt):
            attempt.pod.finish(attempt, ok)
        if not ok and not decision.first_byte_at:  # failed before the pod prefilled it
            self.cache.forget(state, decision.endpoint)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            self.ledgers.pop(ep, None)

    def load_summary(self) -> Iterator[tuple[Endpoint, int, int, int]]:
        """This replica's own work per pod, for the others (router/replicas): (pod, prefilling,
        decoding, prefill_tokens); idle pods left out."""
        for ep, led in self.ledgers.items():
            if led.prefilling or led.decoding:
                yield ep, led.prefilling, len(led.decoding), max(0, led.prefill_tokens)


def _output_tokens(body: Mapping[str, Any]) -> int | None:
    n = body.get("max_completion_tokens", body.get("max_tokens"))
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _streamed_generation(request: RouteRequest) -> bool:
    """A streamed generation answer's first byte is its first token: a TTFT sample. A non-streamed
    answer's first byte comes after the whole decode (and a P/D decode's after a prefill elsewhere:
    on_first_byte checks that, as the P/D flow decides it after on_routed)."""
    return request.body.get("stream") is True and request.path in _GENERATION
