"""``[upstream] urls``: several brokers tried in order, a protocol per connection, and errors
that name the bad key."""

from __future__ import annotations

import pytest

from edgeml.config import parse_config
from edgeml.errors import ConfigError


def cfg(upstream: dict, **top):
    return parse_config({"device_id": "watch-01", "upstream": upstream, **top})


def test_urls_in_order_share_the_other_keys() -> None:
    c = cfg({"urls": ["mqtt://127.0.0.1:1001", {"url": "mqtt://127.0.0.1:1002",
                                                 "protocol": "5"}],
             "protocol": "3.1.1", "username": "dev", "failover_after_s": 2.5})
    assert [u.url for u in c.upstreams] == ["mqtt://127.0.0.1:1001", "mqtt://127.0.0.1:1002"]
    assert [u.protocol for u in c.upstreams] == ["3.1.1", "5"]
    assert {u.client_id for u in c.upstreams} == {"edgeml-watch-01-uplink"}
    assert {u.username for u in c.upstreams} == {"dev"}
    assert c.upstream == c.upstreams[0]
    assert c.upstream_failover_after_s == 2.5


def test_one_url_still_works() -> None:
    c = cfg({"url": "mqtt://127.0.0.1:1001"})
    assert c.upstreams == (c.upstream,) and c.upstream.url == "mqtt://127.0.0.1:1001"
    assert c.upstream_failover_after_s == 10.0
    assert parse_config({"device_id": "d"}).upstreams == ()


@pytest.mark.parametrize(("upstream", "key", "words"), [
    ({"urls": ["mqtt://127.0.0.1:1", "nats://127.0.0.1:4222"]}, "upstream.urls[1]",
     "scheme must be mqtt://"),
    ({"urls": ["mqtt://127.0.0.1:1", "mqtt://:99"]}, "upstream.urls[1]", "no host"),
    ({"urls": [{"url": "mqtt://127.0.0.1:1", "protocol": "3"}]}, "upstream.urls[0].protocol",
     "3.1.1"),
    ({"urls": [{"url": "mqtt://127.0.0.1:1", "qos": 1}]}, "upstream.urls[0].qos",
     "unknown key"),
    ({"urls": [{"protocol": "5"}]}, "upstream.urls[0].url", "missing"),
    ({"urls": [1883]}, "upstream.urls[0]", "URL string or a table"),
    ({"urls": []}, "upstream.urls", "at least one"),
    ({"urls": "mqtt://127.0.0.1:1"}, "upstream.urls", "array"),
    ({"url": "mqtt://127.0.0.1:1", "urls": ["mqtt://127.0.0.1:2"]}, "upstream.urls",
     "not both"),
    ({"url": "mqtt://127.0.0.1:1", "failover_after_s": 0}, "upstream.failover_after_s", ""),
])
def test_bad_upstreams_name_the_key(upstream, key, words) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(upstream)
    assert e.value.key == key, str(e.value)
    assert words in str(e.value)


def test_the_device_broker_takes_one_url() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"device_id": "d", "broker": {"urls": ["mqtt://127.0.0.1:1"]}})
    assert e.value.key == "broker.urls" and "unknown key" in str(e.value)
