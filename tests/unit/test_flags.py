"""Both processes' flags: each names its environment variable (named after the flag) and its default in --help,
the variable sets the default, and a renamed variable still works under its old name with a warning."""

from __future__ import annotations

import argparse
import logging

import pytest

from common.flags import env_name
from gateway.config import build_parser as gateway_parser
from gateway.config import parse_args as gateway_args
from service.config import build_parser as service_parser
from service.config import parse_args as service_args


@pytest.mark.parametrize("parser", [service_parser, gateway_parser], ids=["service", "gateway"])
def test_every_flag_names_its_variable_after_itself_and_shows_its_default(parser):
    p = parser()
    for action in p._actions:
        if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        if action.dest == "sglang_args":  # repeatable: flags only
            continue
        assert f"[{env_name(action.option_strings[0])}]" in action.help, action.option_strings
        if action.default not in (None, False, [], ""):
            assert "(default:" in p.formatter_class(p.prog)._get_help_string(action), action.option_strings
    text = p.format_help()
    assert "CHATSERVE_SHUTDOWN_GRACE]" in text and "(default: 30.0)" in text


def test_variables_set_the_defaults(monkeypatch):
    monkeypatch.setenv("CHATSERVE_GRPC_PORT", "6000")
    monkeypatch.setenv("CHATSERVE_THREADS", "3")
    monkeypatch.setenv("CHATSERVE_LOG_JSON", "true")
    config = service_args([])
    assert (config.port, config.threads, config.log_json) == (6000, 3, True)
    assert service_args(["--port", "7000"]).port == 7000  # a flag beats its variable; --port is --grpc-port
    monkeypatch.setenv("API_KEYS", "sk-flags-" + "f" * 20)
    monkeypatch.setenv("CHATSERVE_REQUEST_TIMEOUT", "12")
    assert gateway_args([]).request_timeout_s == 12


@pytest.mark.parametrize(
    ("old", "new", "read"),
    [
        ("CHATSERVE_SHUTDOWN_GRACE_S", "CHATSERVE_SHUTDOWN_GRACE", lambda: service_args([]).shutdown_grace_s),
        ("CHATSERVE_SYNTHETIC_TTFT_S", "CHATSERVE_SYNTHETIC_TTFT", lambda: service_args([]).synthetic_ttft_s),
        ("CHATSERVE_REQUEST_TIMEOUT_S", "CHATSERVE_REQUEST_TIMEOUT", lambda: gateway_args([]).request_timeout_s),
    ],
)
def test_old_variable_names_still_work_with_a_warning(monkeypatch, caplog, old, new, read):
    monkeypatch.setenv("API_KEYS", "sk-flags-" + "f" * 20)
    monkeypatch.setenv(old, "7")
    with caplog.at_level(logging.WARNING):
        assert read() == 7
    assert f"{old} is deprecated" in caplog.text and new in caplog.text
    monkeypatch.setenv(new, "9")
    assert read() == 9  # the new name wins


@pytest.mark.parametrize("raw, expected", [("false", False), ("0", False), ("TRUE", True), ("on", True)])
def test_an_on_off_flag_reads_its_variable_as_a_boolean(monkeypatch, raw, expected):
    from gateway.config import parse_args as parse_gateway_args

    monkeypatch.setenv("API_KEYS", "sk-flags-" + "f" * 20)
    monkeypatch.setenv("CHATSERVE_PLAYGROUND", raw)
    assert parse_gateway_args([]).playground is expected
    assert parse_gateway_args(["--no-playground"]).playground is False
    assert parse_gateway_args(["--playground"]).playground is True
