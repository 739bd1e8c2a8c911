"""Admission control through the real gateway in front of simulated pods on 127.0.0.1: fairness for a
light tenant beside a flooding one (and FIFO's failure there), weights, priorities, every limit, the
deadline, a client leaving while queued, a burst of 2,000, late binding, 403s, API-key tenants."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest
from admission_support import SLOW, Answer, assert_openai_error, body_bytes, call, gateway, spawn
from helpers import eventually, free_port

from bench.sim.fleet import SimFleet
from gateway.admission.controller import ADMISSION
from router.policy import RouteRequest

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(500)}" for _ in range(n))


async def test_without_an_admission_section_nothing_is_added(http) -> None:
    async with SimFleet(1, **SLOW) as fleet, gateway(fleet.urls, None) as gw:
        assert ADMISSION not in gw.app
        assert (await call(http, gw, "hi")).status == 200
        async with http.get(gw.url + "/metrics") as resp:
            assert "kvgate_admission" not in await resp.text()


@pytest.mark.parametrize("order", ["fair", "fifo"])
async def test_a_light_tenant_beside_a_flooding_one_waits_about_as_long_as_alone(http, order) -> None:
    """2 pods x 2 slots, requests of ~0.2 s. Fair: the light tenant's requests overtake the flood's
    queue and take about their no-contention time. FIFO (the contrast): they wait behind the flood."""
    admission = {
        "order": order,
        "max_in_flight_per_pod": 2,
        "headroom_per_pod": 0,
        "tenants": [{"name": "heavy"}, {"name": "light"}],
    }
    async with SimFleet(2, **SLOW, max_num_seqs=2) as fleet, gateway(fleet.urls, admission) as gw:
        alone = [
            (await call(http, gw, words(i, 20), tenant="light", max_tokens=20)).elapsed for i in range(3)
        ]
        flood = [spawn(call(http, gw, words(100 + i, 20), tenant="heavy", max_tokens=20)) for i in range(80)]
        await eventually(lambda: gw.queued() >= 60, what="the flood to queue")
        light: list[Answer] = []
        for i in range(3):
            light.append(await call(http, gw, words(10 + i, 20), tenant="light", max_tokens=20))
        queued_after = gw.queued()
        heavy = await asyncio.gather(*flood)
    assert all(a.status == 200 for a in light + heavy)
    base = max(alone)
    worst = max(a.elapsed for a in light)
    if order == "fair":
        assert worst <= base + 0.6, (alone, [a.elapsed for a in light])  # ~one request more, at most
        assert queued_after > 30  # the flood was still queued: the light tenant really overtook it
    else:
        assert worst > base + 1.5, (alone, [a.elapsed for a in light])


async def test_weights_are_honoured_within_10_percent_end_to_end(http) -> None:
    admission = {
        "max_in_flight_per_pod": 2,
        "headroom_per_pod": 0,
        "tenants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}],
    }
    fast = {**SLOW, "itl_ms": 2.0}
    async with SimFleet(2, **fast, max_num_seqs=2) as fleet, gateway(fleet.urls, admission) as gw:
        done: list[str] = []

        async def one(tenant: str, i: int) -> None:
            answer = await call(http, gw, words(i, 10), tenant=tenant, max_tokens=5)
            assert answer.status == 200
            done.append(tenant)

        tasks = [spawn(one(t, i)) for i in range(150) for t in ("a", "b")]
        await asyncio.gather(*tasks)
    first = done[:140]  # while both are backlogged (b runs out after ~200 dispatches at 3:1)
    assert first.count("b") / len(first) == pytest.approx(0.75, rel=0.10), first.count("b")


async def test_a_higher_priority_tenant_goes_before_a_waiting_lower_one(http) -> None:
    admission = {
        "max_in_flight_per_pod": 1,
        "headroom_per_pod": 0,
        "aging_s": 0,
        "tenants": [{"name": "lo", "priority": 0}, {"name": "hi", "priority": 1}],
    }
    async with SimFleet(1, **SLOW, max_num_seqs=1) as fleet, gateway(fleet.urls, admission) as gw:
        order: list[str] = []

        async def one(tenant: str, i: int) -> None:
            assert (await call(http, gw, words(i, 5), tenant=tenant, max_tokens=5)).status == 200
            order.append(tenant)

        low = [spawn(one("lo", i)) for i in range(12)]
        await eventually(lambda: gw.queued() >= 10, what="the low band to queue")
        high = [spawn(one("hi", 100 + i)) for i in range(4)]
        await asyncio.gather(*low, *high)
    first_hi = order.index("hi")
    assert order[first_hi : first_hi + 4] == ["hi"] * 4 and first_hi <= 3, order


async def hold_slots(http, gw, n: int, tenant: str = "blocker") -> list[asyncio.Task[Answer]]:
    """`n` long requests (~3 s) occupying slots, admitted directly."""
    tasks = [spawn(call(http, gw, words(900 + i, 5), tenant=tenant, max_tokens=300)) for i in range(n)]
    await eventually(
        lambda: gw.admission.lanes and sum(lane.admitted for lane in gw.admission.lanes.values()) >= n,
        what="the blockers to be admitted",
    )
    return tasks


@pytest.mark.parametrize(
    "limits, limit_kind",
    [
        ({"tenants": [{"name": "a", "max_queued": 2}, {"name": "blocker"}]}, "tenant requests"),
        ({"max_queued": 2, "tenants": [{"name": "a"}, {"name": "blocker"}]}, "total requests"),
        (
            {
                "tenants": [
                    {"name": "a", "max_queued_bytes": 2 * len(body_bytes("x y z"))},
                    {"name": "blocker"},
                ]
            },
            "tenant bytes",
        ),
        (
            {
                "max_queued_bytes": 2 * len(body_bytes("x y z")),
                "tenants": [{"name": "a"}, {"name": "blocker"}],
            },
            "total bytes",
        ),
    ],
)
async def test_queue_limits_admit_exactly_up_to_the_limit_then_429_with_retry_after(
    http, limits, limit_kind
) -> None:
    admission = {"max_in_flight_per_pod": 1, "headroom_per_pod": 0, **limits}
    async with SimFleet(1, **SLOW, max_num_seqs=1) as fleet, gateway(fleet.urls, admission) as gw:
        blockers = await hold_slots(http, gw, 1)
        queued = [spawn(call(http, gw, "x y z", tenant="a")) for _ in range(2)]
        await eventually(lambda: gw.queued() == 2, what="two requests queued (exactly the limit)")
        over = await call(http, gw, "x y z", tenant="a")
        assert_openai_error(over, 429, "queue_full")
        assert limit_kind in over.body["error"]["message"]
        assert int(over.headers["Retry-After"]) >= 1
        assert (
            gw.sample(
                "kvgate_admission_rejected_total",
                {"tenant": "a", "reason": "queue_bytes" if "bytes" in limit_kind else "queue_full"},
            )
            == 1
        )
        for t in blockers + queued:
            t.cancel()
        await asyncio.gather(*blockers, *queued, return_exceptions=True)


async def test_requests_per_minute_exact_boundary_then_429_with_retry_after(http) -> None:
    admission = {"tenants": [{"name": "a", "requests_per_minute": 3}]}
    async with SimFleet(1, **SLOW) as fleet, gateway(fleet.urls, admission) as gw:
        assert [(await call(http, gw, "hi", tenant="a")).status for _ in range(3)] == [200, 200, 200]
        over = await call(http, gw, "hi", tenant="a")
        assert_openai_error(over, 429, "rate_limit_exceeded")
        assert over.body["error"]["type"] == "requests" and over.headers["Retry-After"] == "20"
        assert (await call(http, gw, "hi", tenant="other")).status == 200  # the default tenant: no limit
        assert gw.sample("kvgate_rejected_requests_total", {"reason": "rate_limited"}) == 1


async def test_tokens_per_minute_counts_prompt_and_expected_output(http) -> None:
    admission = {"tenants": [{"name": "a", "tokens_per_minute": 100}]}
    async with SimFleet(1, **SLOW) as fleet, gateway(fleet.urls, admission) as gw:
        prompt = words(1, 15)
        assert (await call(http, gw, prompt, tenant="a", max_tokens=40)).status == 200
        over = await call(http, gw, prompt, tenant="a", max_tokens=40)
        assert_openai_error(over, 429, "rate_limit_exceeded")
        assert over.body["error"]["type"] == "tokens" and int(over.headers["Retry-After"]) >= 1
        assert (await call(http, gw, "x", tenant="a", max_tokens=1)).status == 200  # a small one still fits


async def test_queue_deadline_from_the_header_answers_503_saying_so(http) -> None:
    admission = {"max_in_flight_per_pod": 1, "headroom_per_pod": 0, "queue_timeout_s": 30}
    async with SimFleet(1, **SLOW, max_num_seqs=1) as fleet, gateway(fleet.urls, admission) as gw:
        blockers = await hold_slots(http, gw, 1)
        late = await call(http, gw, "x", headers={"x-kvgate-queue-timeout": "0.3"})
        assert_openai_error(late, 503, "queue_timeout")
        assert "deadline" in late.body["error"]["message"] and late.headers["Retry-After"] == "1"
        assert 0.3 <= late.elapsed < 2.0
        now = await call(http, gw, "x", headers={"x-kvgate-queue-timeout": "0"})  # no waiting at all
        assert_openai_error(now, 503, "queue_timeout")
        assert now.elapsed < 0.3
        bad = await call(http, gw, "x", headers={"x-kvgate-queue-timeout": "soon"})
        assert_openai_error(bad, 400, "invalid_value")
        assert gw.queued() == 0
        assert (
            gw.sample("kvgate_admission_rejected_total", {"tenant": "default", "reason": "queue_timeout"})
            == 2
        )
        for t in blockers:
            t.cancel()
        await asyncio.gather(*blockers, return_exceptions=True)


async def test_a_tenant_deadline_applies_and_a_zero_deadline_passes_when_capacity_is_free(http) -> None:
    admission = {
        "max_in_flight_per_pod": 1,
        "headroom_per_pod": 0,
        "tenants": [{"name": "impatient", "queue_timeout_s": 0.2}, {"name": "blocker"}],
    }
    async with SimFleet(1, **SLOW, max_num_seqs=1) as fleet, gateway(fleet.urls, admission) as gw:
        free = await call(http, gw, "x", tenant="impatient", headers={"x-kvgate-queue-timeout": "0"})
        assert free.status == 200  # the deadline bounds waiting; nothing waited
        bad = await call(http, gw, "x", tenant="impatient", headers={"x-kvgate-queue-timeout": "-1"})
        assert_openai_error(bad, 400, "invalid_value")  # checked even when nothing would wait
        blockers = await hold_slots(http, gw, 1)
        late = await call(http, gw, "x", tenant="impatient", headers={"x-kvgate-queue-timeout": "60"})
        assert_openai_error(late, 503, "queue_timeout")  # the header can only lower the tenant's 0.2 s
        assert 0.2 <= late.elapsed < 1.5
        for t in blockers:
            t.cancel()
        await asyncio.gather(*blockers, return_exceptions=True)


async def test_a_client_that_disconnects_while_queued_is_removed_at_once(http) -> None:
    admission = {"max_in_flight_per_pod": 1, "headroom_per_pod": 0}
    async with SimFleet(1, **SLOW, max_num_seqs=1) as fleet, gateway(fleet.urls, admission) as gw:
        blockers = await hold_slots(http, gw, 1)
        waiting = spawn(call(http, gw, "leaving", tenant="x"))
        await eventually(lambda: gw.queued() == 1, what="the request to queue")
        waiting.cancel()  # the client closes its connection
        await eventually(lambda: gw.queued() == 0, within=1.0, what="the queue to drop it")
        assert (
            gw.sample("kvgate_admission_rejected_total", {"tenant": "default", "reason": "disconnected"}) == 1
        )
        await asyncio.gather(*blockers)
        after = await call(http, gw, "next")
        assert after.status == 200
        # the pod saw the blocker and the last request only: the one that left never reached it
        served = gw.sample(
            "kvgate_requests_total", {"model": "m", "endpoint": fleet.urls[0], "status": "200"}
        )
        assert (
            served == 2
            and gw.sample("kvgate_admission_admitted_total", {"tenant": "default", "path": "queued"}) == 0
        )


async def test_a_burst_of_2000_requests_loses_none(http) -> None:
    # a deadline long enough that the 900 queued are served even on a loaded machine (>= 900 answered 200)
    admission = {"max_in_flight_per_pod": 8, "headroom_per_pod": 0, "max_queued": 900, "queue_timeout_s": 30}
    fast = {**SLOW, "itl_ms": 1.0}
    async with SimFleet(2, **fast, max_num_seqs=8) as fleet, gateway(fleet.urls, admission) as gw:
        answers = await asyncio.gather(
            *(call(http, gw, f"burst {i}", tenant=f"t{i % 7}", max_tokens=2) for i in range(2000)),
            return_exceptions=True,
        )
        statuses = [a.status if isinstance(a, Answer) else repr(a) for a in answers]
        assert len(statuses) == 2000
        counts = {s: statuses.count(s) for s in set(statuses)}
        assert set(counts) <= {200, 429, 503}, counts
        assert counts.get(200, 0) >= 900, counts
        assert gw.queued() == 0
        assert sum(lane.admitted for lane in gw.admission.lanes.values()) == 0  # every ticket released
        assert sum(ep.in_flight for lane in gw.admission.lanes for ep in lane.endpoints) == 0


async def open_stream(http, gw, prompt: str, max_tokens: int) -> aiohttp.ClientResponse:
    """A streamed request whose headers (x-kvgate-endpoint) arrived; close it to leave."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    resp = await http.post(gw.url + "/v1/completions", json=body)
    assert resp.status == 200
    return resp


async def test_late_binding_routes_to_the_pod_that_gained_the_prefix_while_the_request_waited(http) -> None:
    """Both pods full (2 admission slots each); a request with prefix P waits. Meanwhile pod 1 computes
    P (a request sent to it directly, as another gateway would; the precise index learns it from its KV
    events). A slot frees on pod 0, and the waiting request is routed with the state of that moment:
    to pod 1, where P is cached, not to the pod that freed."""
    port = free_port()
    options = {
        **SLOW,
        "prefill_tps": 2000.0,
        "max_num_seqs": 4,
        "kv_events_endpoint": f"tcp://127.0.0.1:{port}",
        "kv_events_replay_endpoint": "tcp://127.0.0.1:*",
    }
    admission = {"max_in_flight_per_pod": 2, "headroom_per_pod": 0}
    prefix = words(7, 320)
    async with SimFleet(2, **options) as fleet:
        eps = [
            {"url": p.url, "kv_events": f"tcp://*:{port}", "kv_events_replay": p.publisher.replay_endpoint}
            for p in fleet.pods
        ]
        extra = {
            "pools": {
                "m": {
                    "endpoints": eps,
                    "policy": {
                        "name": "cache_aware",
                        "params": {"index": "precise", "pending_blocks": 0, "max_num_seqs": 4, "seed": 1},
                    },
                }
            }
        }
        async with gateway(fleet.urls, admission, **extra) as gw:
            assert (await call(http, gw, "warm up")).status == 200  # the pods connect to the event socket
            pool = next(iter(gw.admission.lanes))
            cache = pool.prefix_cache
            controller = gw.admission
            lane = controller.lanes[pool]
            streams: list[aiohttp.ClientResponse] = []
            while controller.saturation.free_slots(pool, lane.admitted) > 0:  # fill both pods
                streams.append(await open_stream(http, gw, words(50 + len(streams), 5), 400))
                assert len(streams) <= 6
            on = {ep: [r for r in streams if r.headers["x-kvgate-endpoint"] == ep.url]
                  for ep in pool.endpoints}
            # the pod that will gain P has room in its batch (4 at the sim); the other frees a slot
            pod1 = min(pool.endpoints, key=lambda ep: len(on[ep]))
            (pod0,) = [ep for ep in pool.endpoints if ep is not pod1]
            assert len(on[pod1]) < 4 and len(on[pod0]) >= 2
            waiting = spawn(call(http, gw, prefix + " question", max_tokens=2))
            await eventually(lambda: gw.queued() == 1, what="the request to queue")
            # pod 1 gains P while the request waits
            async with http.post(
                pod1.url + "/v1/completions",
                json={"model": "m", "prompt": prefix + " other", "max_tokens": 1},
            ) as resp:
                assert resp.status == 200

            keys = cache.keys_for(
                RouteRequest("probe", "m", "/v1/completions", {"model": "m", "prompt": prefix}, {})
            )
            await eventually(
                lambda: cache.match(keys, [pod1]).get(pod1, 0) >= len(keys) - 1,
                what="the index to learn P on pod 1",
            )
            assert gw.queued() == 1
            for r in on[pod0][: len(on[pod0]) - 1]:
                r.close()  # a slot frees on pod 0
            answer = await waiting
            assert answer.status == 200
            assert answer.headers["x-kvgate-endpoint"] == pod1.url
            assert int(answer.headers["x-kvgate-cached-tokens"]) >= 300
            assert answer.body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 300
            assert gw.sample("kvgate_admission_admitted_total", {"tenant": "default", "path": "queued"}) == 1
            for r in streams:
                r.close()


async def test_a_tenant_may_use_only_its_models_and_prompt_lengths_else_403_before_queueing(http) -> None:
    admission = {
        "max_in_flight_per_pod": 1,
        "headroom_per_pod": 0,
        "tenants": [
            {"name": "a", "models": [{"name": "m", "max_prompt_tokens": 20}]},
            {"name": "b", "models": [{"name": "m2"}]},
        ],
    }
    async with SimFleet(1, **SLOW, max_num_seqs=1) as fleet:
        pools = {"m": {"endpoints": [{"url": fleet.urls[0]}]}, "m2": {"endpoints": [{"url": fleet.urls[0]}]}}
        async with gateway(fleet.urls, admission, pools=pools) as gw:
            assert (await call(http, gw, words(1, 20), tenant="a")).status == 200  # exactly the limit
            long = await call(http, gw, words(1, 21), tenant="a")
            assert_openai_error(long, 403, "model_not_allowed")
            assert "at most 20 prompt tokens" in long.body["error"]["message"]
            other = await call(http, gw, "hi", tenant="a", model="m2")
            assert_openai_error(other, 403, "model_not_allowed")
            assert_openai_error(await call(http, gw, "hi", tenant="b"), 403, "model_not_allowed")
            # refused before queueing: even while the pool is saturated, at once
            blockers = await hold_slots(http, gw, 1)
            refused = await call(http, gw, words(1, 21), tenant="a")
            assert refused.status == 403 and refused.elapsed < 0.5 and gw.queued() == 0
            assert gw.sample("kvgate_admission_rejected_total", {"tenant": "a", "reason": "forbidden"}) == 3
            assert gw.sample("kvgate_rejected_requests_total", {"reason": "tenant_forbidden"}) == 4
            for t in blockers:
                t.cancel()
            await asyncio.gather(*blockers, return_exceptions=True)


async def test_api_keys_name_the_tenant_and_pass_authentication(http) -> None:
    admission = {
        "tenants": [{"name": "alpha", "api_keys": ["key-alpha"]}, {"name": "beta", "api_keys": ["key-b"]}]
    }
    async with SimFleet(1, **SLOW) as fleet, gateway(fleet.urls, admission) as gw:
        ok = await call(http, gw, "hi", headers={"Authorization": "Bearer key-alpha"})
        assert ok.status == 200
        # the header names no tenant when keys are checked
        assert (
            await call(http, gw, "hi", tenant="beta", headers={"Authorization": "Bearer key-alpha"})
        ).status == 200
        assert (await call(http, gw, "hi", headers={"Authorization": "Bearer nope"})).status == 401
        assert gw.sample("kvgate_admission_admitted_total", {"tenant": "alpha", "path": "direct"}) == 2
        assert gw.sample("kvgate_admission_admitted_total", {"tenant": "beta", "path": "direct"}) == 0


async def test_metrics_show_queue_depth_saturation_wait_and_dispatch_share(http) -> None:
    admission = {"max_in_flight_per_pod": 1, "headroom_per_pod": 0, "tenants": [{"name": "a", "priority": 2}]}
    async with SimFleet(1, **SLOW, max_num_seqs=1) as fleet, gateway(fleet.urls, admission) as gw:
        blockers = await hold_slots(http, gw, 1, tenant="a")
        queued = [spawn(call(http, gw, "x", tenant="a")) for _ in range(3)]
        await eventually(lambda: gw.queued() == 3)
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert 'kvgate_admission_queue_depth{model="m",priority="2",tenant="a"} 3.0' in text
        assert 'kvgate_admission_pool_saturated{model="m"} 1.0' in text
        assert (
            gw.sample("kvgate_admission_queue_depth", {"model": "m", "tenant": "unknown", "priority": "0"})
            == 0
        )
        await asyncio.gather(*blockers, *queued)
        assert gw.sample("kvgate_admission_queue_wait_seconds_count", {"tenant": "a", "priority": "2"}) == 4
        assert gw.sample("kvgate_admission_dispatched_cost_tokens_total", {"tenant": "a"}) > 0
        assert gw.sample("kvgate_admission_pool_saturated", {"model": "m"}) == 0


async def test_tokenize_never_waits_behind_generation(http) -> None:
    admission = {"max_in_flight_per_pod": 1, "headroom_per_pod": 0}
    async with SimFleet(1, **SLOW, max_num_seqs=1) as fleet, gateway(fleet.urls, admission) as gw:
        blockers = await hold_slots(http, gw, 1)
        queued = spawn(call(http, gw, "waits"))
        await eventually(lambda: gw.queued() == 1, what="a generation request to queue")
        async with http.post(gw.url + "/tokenize", json={"model": "m", "prompt": "a b c"}) as resp:
            assert resp.status == 200, await resp.text()
        assert gw.queued() == 1 and sum(lane.admitted for lane in gw.admission.lanes.values()) == 1
        for t in (*blockers, queued):
            t.cancel()
        await asyncio.gather(*blockers, queued, return_exceptions=True)


@pytest.mark.parametrize("window", [8, 1])
async def test_a_freed_slot_takes_the_queued_request_whose_prefix_that_pod_holds(http, window) -> None:
    """Both pods full (1 slot each), one holding prefix A, the other B. One tenant queues a B request,
    then an A request. A's pod frees its slot: the A request, though younger, goes first, to its warm
    pod, instead of the B request prefilling B cold there. With `affinity_window: 1` (the contrast) the
    oldest goes first, to the cold pod."""
    admission = {"headroom_per_pod": 0, "affinity_window": window}  # slots: the policy's max_num_seqs
    pa, pb = words(1, 320), words(2, 320)
    params = {"seed": 1, "max_num_seqs": 1}
    async with (
        SimFleet(2, **SLOW, max_num_seqs=4) as fleet,
        gateway(fleet.urls, admission, policy="cache_aware", params=params) as gw,
    ):
        sa = await open_stream(http, gw, pa + " first", 400)
        sb = await open_stream(http, gw, pb + " first", 400)
        pod_a, pod_b = sa.headers["x-kvgate-endpoint"], sb.headers["x-kvgate-endpoint"]
        assert pod_a != pod_b
        rb = spawn(call(http, gw, pb + " second", max_tokens=2))
        await eventually(lambda: gw.queued() == 1, what="the B request to queue")
        ra = spawn(call(http, gw, pa + " second", max_tokens=2))
        await eventually(lambda: gw.queued() == 2, what="the A request to queue")
        sa.close()  # A's pod frees its slot
        first = await asyncio.wait({ra, rb}, return_when=asyncio.FIRST_COMPLETED)
        done = first[0].pop()
        answer: Answer = done.result()
        assert answer.status == 200
        if window > 1:
            assert done is ra and answer.headers["x-kvgate-endpoint"] == pod_a
        else:
            assert done is rb and answer.headers["x-kvgate-endpoint"] == pod_a  # B prefilled cold
        sb.close()
        rest = await (rb if window > 1 else ra)
        assert rest.status == 200
