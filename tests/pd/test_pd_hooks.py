"""Policy timing hooks through the P/D flow: the decode attempt's first byte says whether it was split."""

from __future__ import annotations

from pd_harness import MODEL, PDWorld, PodSpec, long_prompt

from gateway.config import PDSpec
from router.policies.least_request import LeastRequestPolicy
from router.policy import Decision, RouteRequest

PD = PDSpec(threshold_tokens=64, prefill_timeout_s=5.0)


class FirstBytes(LeastRequestPolicy):
    def __init__(self) -> None:
        super().__init__(seed=1)
        self.seen: list[tuple[str, str, bool]] = []  # request id, pod, disaggregated at the first byte

    def on_first_byte(self, request: RouteRequest, decision: Decision, elapsed_s: float) -> None:
        assert elapsed_s > 0
        self.seen.append((request.request_id, decision.endpoint.url, request.state.disaggregated))


async def test_first_byte_of_a_split_request_is_marked_disaggregated(pd_world, client):
    world: PDWorld = await pd_world([PodSpec("prefill", "v1"), PodSpec("decode", "v1")], pd=PD)
    policy = FirstBytes()
    world.pool.policy = policy
    for rid, words in (("long", 300), ("short", 10)):  # 10 tokens: below the threshold, prefilled locally
        body = {"model": MODEL, "prompt": long_prompt(words), "max_tokens": 2, "stream": True}
        async with client.post(world.url + "/v1/completions", json=body, headers={"X-Request-Id": rid}) as r:
            assert r.status == 200
            await r.read()
    decode = world.recorders[1].url
    assert policy.seen == [("long", decode, True), ("short", decode, False)]  # no prefill step: no first byte
    assert world.outcomes()["disaggregated"] == 1 and world.outcomes()["local_short"] == 1
