"""API keys (masking, files, constant-time check) and per-key token buckets."""

import logging

import pytest

from gateway.auth import KeyStore, key_label, mask
from gateway.errors import Unauthorized
from gateway.limits import KeyLimits, KeyRateLimited, RateLimiter


def test_mask_never_shows_the_middle():
    assert mask("sk-abcdefghijklmnop") == "sk-********mnop"
    assert mask("short") == "*****"
    assert "abc" not in key_label("sk-abcdefghijklmnop")


def test_several_keys_from_env_and_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\nsk-file-one rpm=5\n\nsk-file-two tpm=100\n")
    store = KeyStore(("sk-env",), str(path), KeyLimits(rpm=60))
    assert store.authenticate("Bearer sk-env").limits == KeyLimits(rpm=60)
    assert store.authenticate("Bearer sk-file-one").limits == KeyLimits(rpm=5)
    assert store.authenticate("bearer sk-file-two").limits == KeyLimits(rpm=60, tpm=100)
    with pytest.raises(Unauthorized) as caught:
        store.authenticate("Bearer sk-nope-0123456789")
    assert "sk-nope-0123456789" not in caught.value.message
    for missing in (None, "", "Bearer", "Basic abc"):
        with pytest.raises(Unauthorized):
            store.authenticate(missing)


def test_file_rotation(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-old\n")
    store = KeyStore((), str(path))
    store.authenticate("Bearer sk-old")
    path.write_text("sk-new\n")
    store.reload_if_changed()
    store.authenticate("Bearer sk-new")
    with pytest.raises(Unauthorized):
        store.authenticate("Bearer sk-old")
    path.unlink()
    store.reload()  # a missing file keeps the keys we had
    store.authenticate("Bearer sk-new")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_requests_per_minute_refill():
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = KeyLimits(rpm=2)
    limiter.admit("k", limits)
    headers = limiter.admit("k", limits)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(KeyRateLimited) as caught:
        limiter.admit("k", limits)
    assert caught.value.status == 429 and caught.value.limit == "requests"
    assert caught.value.headers()["Retry-After"] == "30"
    limiter.admit("other", limits)  # keys are independent
    clock.now = 30.0
    limiter.admit("k", limits)


def test_tokens_per_minute_charged_after_use():
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = KeyLimits(tpm=600)
    limiter.admit("k", limits)
    limiter.charge("k", limits, 900)  # may overdraw: the cost is known only afterwards
    with pytest.raises(KeyRateLimited) as caught:
        limiter.admit("k", limits)
    assert caught.value.limit == "tokens"
    clock.now = 31.0  # 10 tokens/s refill: back above zero after 30 s
    limiter.admit("k", limits)


def test_a_malformed_keys_file_line_never_logs_a_key(tmp_path, caplog):
    first, second = "sk-live-" + "a" * 32, "sk-live-" + "b" * 32
    path = tmp_path / "keys"
    path.write_text(f"{first} {second}\n{first[:-1]}c rpm=x tpm==5 {second}=1\n")
    with caplog.at_level(logging.DEBUG):
        store = KeyStore((), str(path))
    assert len(store) == 2
    logged = caplog.text
    assert "ignoring word 2" in logged
    for secret in (first, second, first[:-1] + "c"):
        assert secret not in logged and secret[8:-4] not in logged
