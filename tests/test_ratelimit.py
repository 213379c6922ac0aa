"""`Retry-After` as the backends read it from a 429 or 503: a server's header, so hostile input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from requests.structures import CaseInsensitiveDict

from reconciler.backends.ratelimit import retry_after


@pytest.mark.parametrize(
    ("status", "value", "expected"),
    [
        (429, "0", 0.0),
        (429, "120", 120.0),
        (503, " 5 ", 5.0),
        (429, "99999999", 86400.0),  # a day at most, whatever the server says
        (500, "5", None),  # only a 429 or a 503 means it
        (200, "5", None),
        (429, "-1", None),
        (429, "1.5", None),
        (429, "٣", None),  # a non-ASCII digit
        (429, "5" * 100, None),
        (429, "", None),
        (429, "Wed, 99 Foo 2015 07:28:00 GMT", None),
        (429, "Wed, 21 Oct 2015 07:28:00", None),  # no zone: not an HTTP date
        (429, "Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: retry now
    ],
)
def test_retry_after_values(status: int, value: str, expected: float | None) -> None:
    assert retry_after(status, {"Retry-After": value}) == expected


def test_an_http_date_counts_from_now_and_the_name_is_case_insensitive() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=600), usegmt=True)
    seconds = retry_after(503, CaseInsensitiveDict({"retry-after": later}))
    assert seconds is not None and 500 < seconds <= 600


def test_no_header_is_no_delay() -> None:
    assert retry_after(429, {}) is None
