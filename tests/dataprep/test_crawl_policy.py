"""Retry policy: what is retried, and the back-off schedule."""

from __future__ import annotations

import email.utils

from dataprep.crawl.policy import RetryPolicy, parse_retry_after


def test_retries_transient_statuses_and_errors_only_within_budget() -> None:
    policy = RetryPolicy(max_retries=2)
    for status in (429, 500, 502, 503, 504):
        assert policy.should_retry(0, status=status)
    for status in (200, 301, 404, 403, 501):
        assert not policy.should_retry(0, status=status)
    for kind in ("connect", "timeout", "connection"):
        assert policy.should_retry(1, error=kind)
    for kind in ("dns", "blocked-address", "tls", "bad-response"):
        assert not policy.should_retry(0, error=kind)
    assert not policy.should_retry(2, status=503)  # attempts 0, 1, 2: two retries spent


def test_backoff_doubles_and_is_capped() -> None:
    policy = RetryPolicy(max_retries=10, backoff_s=0.5, max_backoff_s=3.0)
    assert [policy.delay(a) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_retry_after_raises_the_wait_but_not_past_the_cap() -> None:
    policy = RetryPolicy(backoff_s=1.0, max_backoff_s=30.0)
    assert policy.delay(0, retry_after=7.0) == 7.0
    assert policy.delay(2, retry_after=1.0) == 4.0
    assert policy.delay(0, retry_after=3600.0) == 30.0


def test_parse_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("120") == 120.0
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 90, usegmt=True), now=now) == 90.0
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
