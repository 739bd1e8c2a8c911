"""Endpoint addresses as Envoy's override-host policy needs them (IP:port), without a pick waiting on DNS."""

from __future__ import annotations

from gateway.epp.picker import Addresses
from router.endpoint import Endpoint


def ep(url: str) -> Endpoint:
    return Endpoint(url=url, model="m")


def test_an_ip_url_is_its_address_and_ipv6_is_bracketed() -> None:
    addresses = Addresses()
    assert addresses.of(ep("http://10.0.0.5:8000")) == "10.0.0.5:8000"
    assert addresses.of(ep("http://[fd00::5]:8000")) == "[fd00::5]:8000"
    assert addresses.of(ep("http://10.0.0.5:8000")) == "10.0.0.5:8000"  # cached: the same answer


async def test_a_host_name_has_no_address_until_resolved_in_the_background() -> None:
    addresses = Addresses()
    named = ep("http://localhost:8123")
    assert addresses.of(named) is None  # never resolved on the pick path
    await addresses.resolve([named, ep("http://10.0.0.5:8000"), ep("http://no-such-host.invalid:1")])
    assert addresses.of(named) in ("127.0.0.1:8123", "[::1]:8123")
    assert addresses.of(ep("http://no-such-host.invalid:1")) is None
