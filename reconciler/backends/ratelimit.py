"""`Retry-After`: how long a rate-limited or unavailable HTTP server asks to be left alone.

Who calls it: the Proxmox transport and the Docker backend, when they translate an HTTP 429 or 503
into a TemporaryError, so that its `delay` carries the server's wish to whoever retries (the
backend's own retry, the loop's backoff). No SDK here: both backends may import it.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

__all__ = ["RATE_LIMITED", "retry_after"]

RATE_LIMITED: Final = frozenset({429, 503})
"""Statuses whose `Retry-After` header says how long to wait (RFC 9110 10.2.3)."""


def retry_after(status: int, headers: Mapping[str, str]) -> float | None:
    """Seconds the answer's `Retry-After` asks for (delta-seconds or an HTTP date), on a 429 or 503; else None.

    The header is the server's, so hostile: anything unparsable, negative or absurdly large is ignored.
    """
    raw = headers.get("Retry-After") if status in RATE_LIMITED else None
    if not isinstance(raw, str) or not raw.strip() or len(raw) > 64:
        return None
    raw = raw.strip()
    if raw.isascii() and raw.isdigit():
        return float(min(int(raw), 86400))
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), 86400.0)
