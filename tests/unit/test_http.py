"""The REST layer every HTTP provider shares, through httpx's MockTransport (no network)."""

from __future__ import annotations

import httpx
import pytest

from orchestrator.providers._http import RestClient
from orchestrator.providers.errors import AuthError, BadResponse, NotFound, ProviderUnavailable, RateLimited


def _client(transport, waits):
    return RestClient("https://api.example.test/v1", {"Authorization": "Bearer k"}, provider="example",
                      credential_hint="EXAMPLE_API_KEY", transport=transport, sleep=waits.append)


def test_429_waits_for_retry_after_then_succeeds(mock_transport):
    answers = iter([httpx.Response(429, headers={"Retry-After": "3"}, json={"error": "slow down"}),
                    httpx.Response(200, json={"data": []})])
    transport = mock_transport(lambda request: next(answers))
    waits: list[float] = []
    assert _client(transport, waits).json("GET", "/instances") == {"data": []}
    assert waits == [3.0] and len(transport.requests) == 2


def test_a_rate_limit_that_never_lifts_is_an_error_with_its_wait(mock_transport):
    transport = mock_transport(lambda request: httpx.Response(429, headers={"Retry-After": "7"}))
    with pytest.raises(RateLimited) as e:
        _client(transport, []).request("GET", "/x")
    assert e.value.retry_after == 7.0 and len(transport.requests) == 4


def test_5xx_is_retried_for_reads_never_for_a_create(mock_transport):
    transport = mock_transport(lambda request: httpx.Response(503, text="upstream down"))
    waits: list[float] = []
    with pytest.raises(ProviderUnavailable):
        _client(transport, waits).request("GET", "/instances")
    assert len(transport.requests) == 4
    transport = mock_transport(lambda request: httpx.Response(503, text="upstream down"))
    with pytest.raises(ProviderUnavailable):
        _client(transport, waits).request("POST", "/instances", json={"name": "x"})
    assert len(transport.requests) == 1, "a create is never retried blindly"


def test_a_lost_connection_on_create_is_not_retried(mock_transport):
    def handler(request):
        raise httpx.ConnectError("reset")

    transport = mock_transport(handler)
    with pytest.raises(ProviderUnavailable, match="no answer"):
        _client(transport, []).request("POST", "/instances")
    assert len(transport.requests) == 1


def test_refused_credentials_name_the_variable(mock_transport):
    transport = mock_transport(lambda request: httpx.Response(401, json={"error": {"message": "invalid key"}}))
    with pytest.raises(AuthError, match="credentials refused .*invalid key.*check EXAMPLE_API_KEY"):
        _client(transport, []).request("GET", "/instances")


def test_404_is_not_found(mock_transport):
    with pytest.raises(NotFound):
        _client(mock_transport(lambda r: httpx.Response(404, json={"message": "no such instance"})), []).request("GET", "/i/9")


@pytest.mark.parametrize("response", [httpx.Response(200, text="<html>maintenance</html>"),
                                      httpx.Response(200, json="deprecated_endpoint")])
def test_a_list_that_cannot_be_read_is_an_error_never_empty(mock_transport, response):
    transport = mock_transport(lambda request: response)
    with pytest.raises(BadResponse):
        _client(transport, []).json("GET", "/instances", expect=dict)


def test_a_provider_specific_error_body_is_classified(mock_transport):
    from orchestrator.providers.errors import InsufficientCapacity

    def classify(response):
        body = response.json()
        return InsufficientCapacity(body["msg"]) if body.get("code") == "NoStock" else None

    transport = mock_transport(lambda request: httpx.Response(200, json={"code": "NoStock", "msg": "暂无库存"}))
    client = RestClient("https://x.test", {}, provider="autodl-like", credential_hint="T", transport=transport, classify=classify)
    with pytest.raises(InsufficientCapacity, match="暂无库存"):
        client.request("POST", "/create")
