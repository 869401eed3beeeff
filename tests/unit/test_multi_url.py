"""SAGMQ_AMQP_URL with several brokers: connection parameters for each, and credentials kept out of logs."""

from __future__ import annotations

from sagmq.amqp.connection import parameters, safe_url
from sagmq.wire.settings import load_settings


def test_one_set_of_parameters_per_url_in_order() -> None:
    s = load_settings({"SAGMQ_AMQP_URL": "amqp://u:p@rabbit-1:5672/%2F,amqp://u:p@rabbit-2:5673/%2F"})
    many = parameters(s, "t")
    assert [(p.host, p.port) for p in many] == [("rabbit-1", 5672), ("rabbit-2", 5673)]
    assert all(p.client_properties == {"connection_name": "sagmq-t"} for p in many)
    one = parameters(load_settings({}), "t")
    assert (one.host, one.port) == ("localhost", 5672)  # a single URL: one object, as before


def test_no_password_of_any_url_in_logs() -> None:
    url = "amqp://alice:s3cret@rabbit-1:5672/v, amqp://alice:0ther@rabbit-2/v"
    shown = safe_url(url)
    assert "s3cret" not in shown and "0ther" not in shown
    assert shown == "amqp://***@rabbit-1:5672/v,amqp://***@rabbit-2/v"
