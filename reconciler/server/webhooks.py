"""Push webhooks from GitHub, Gitea and GitLab: authenticate, then read what was pushed.

Who calls it: the HTTP app (`server.app`) for `POST /hooks/{github,gitea,gitlab}`. The body is
authenticated before a byte of it is parsed, over the exact bytes received, in constant time:

    GitHub   X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>
    Gitea    X-Gitea-Signature: <hex HMAC-SHA256 of the body>   (Forgejo sends it too)
    GitLab   X-Gitlab-Token: <the secret itself>

Replays. Neither signature covers a timestamp, so a captured delivery verifies forever. The
`ReplayGuard` remembers (in a bounded set) the delivery ids (X-GitHub-Delivery, X-Gitea-Delivery,
GitLab's Idempotency-Key / X-Gitlab-Event-UUID) and the digests of recent push bodies, and refuses
a repeat of either. For GitHub and Gitea the body is signed, so an edited delivery id does not
get a replayed body through; GitLab's token is a static secret, so anyone who has seen one request
can forge new ones, and only TLS protects it. A delivery older than the set is accepted again. What
limits the damage in every case: a push only asks for a pass, which fetches the branch and applies
whatever its head is; nothing in the payload (commit ids, files) is trusted or applied.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, assert_never
from urllib.parse import parse_qs

from reconciler.server.settings import read_secret

__all__ = [
    "Delivery",
    "EventKind",
    "MalformedDelivery",
    "Provider",
    "ReplayGuard",
    "WebhookSecrets",
    "authenticate",
    "read_delivery",
    "sign",
]


class Provider(enum.StrEnum):
    GITHUB = "github"
    GITEA = "gitea"
    GITLAB = "gitlab"

    @property
    def secret_variable(self) -> str:
        return f"RECONCILER_WEBHOOK_SECRET_{self.name}"


class EventKind(enum.StrEnum):
    PUSH = "push"
    PING = "ping"  # GitHub's hello when a hook is created
    OTHER = "other"  # any other event: acknowledged, ignored


class Headers(Protocol):
    """Case-insensitive request headers (`http.client.HTTPMessage` is one)."""

    def get(self, name: str, default: None = None) -> str | None: ...


@dataclass(frozen=True, slots=True)
class WebhookSecrets:
    """One secret per provider; None leaves that receiver disabled (it answers 403)."""

    github: bytes | None = field(default=None, repr=False)
    gitea: bytes | None = field(default=None, repr=False)
    gitlab: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebhookSecrets:
        """From RECONCILER_WEBHOOK_SECRET_GITHUB / _GITEA / _GITLAB (or each one's `_FILE`)."""
        return cls(*(read_secret(provider.secret_variable, environ) for provider in Provider))

    def for_provider(self, provider: Provider) -> bytes | None:
        match provider:
            case Provider.GITHUB:
                return self.github
            case Provider.GITEA:
                return self.gitea
            case Provider.GITLAB:
                return self.gitlab
            case unreachable:
                assert_never(unreachable)


class MalformedDelivery(ValueError):
    """An authenticated body that is not the push it claims to be (answered 400)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    provider: Provider
    event: EventKind
    event_name: str  # as the provider's header says it, for logs
    branch: str | None = None  # refs/heads/<branch> of a push; None for a tag or another ref
    delivery_id: str | None = None
    digest: str = ""  # SHA-256 of the body


def sign(secret: bytes, body: bytes) -> str:
    """The hex HMAC-SHA256 GitHub and Gitea send (GitHub prefixes `sha256=`)."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def _latin1(value: str | None) -> bytes:
    # http.client decodes header bytes as latin-1, so this gives back the bytes that were sent.
    return (value or "").encode("latin-1", errors="replace")


def authenticate(provider: Provider, headers: Headers, body: bytes, secret: bytes) -> bool:
    """Whether the request carries `secret`'s signature (or token), compared in constant time."""
    match provider:
        case Provider.GITHUB:
            given, expected = headers.get("X-Hub-Signature-256"), f"sha256={sign(secret, body)}".encode()
        case Provider.GITEA:
            given, expected = headers.get("X-Gitea-Signature"), sign(secret, body).encode()
        case Provider.GITLAB:
            given, expected = headers.get("X-Gitlab-Token"), secret
        case unreachable:
            assert_never(unreachable)
    return given is not None and hmac.compare_digest(_latin1(given.strip()), expected)


def _event(provider: Provider, headers: Headers) -> tuple[EventKind, str]:
    match provider:
        case Provider.GITHUB:
            name = headers.get("X-GitHub-Event") or ""
            kind = {"push": EventKind.PUSH, "ping": EventKind.PING}.get(name, EventKind.OTHER)
        case Provider.GITEA:
            name = headers.get("X-Gitea-Event") or ""
            kind = EventKind.PUSH if name == "push" else EventKind.OTHER
        case Provider.GITLAB:
            # A system hook announces a push as "System Hook" with object_kind "push" in the body.
            name = headers.get("X-Gitlab-Event") or ""
            kind = EventKind.PUSH if name in {"Push Hook", "System Hook"} else EventKind.OTHER
        case unreachable:
            assert_never(unreachable)
    return kind, name[:100]


def _delivery_id(provider: Provider, headers: Headers) -> str | None:
    match provider:
        case Provider.GITHUB:
            value = headers.get("X-GitHub-Delivery")
        case Provider.GITEA:
            value = headers.get("X-Gitea-Delivery")
        case Provider.GITLAB:
            value = headers.get("Idempotency-Key") or headers.get("X-Gitlab-Event-UUID")
        case unreachable:
            assert_never(unreachable)
    return value[:200] if value else None


def _document(provider: Provider, headers: Headers, body: bytes) -> dict[str, Any]:
    """The JSON object in the body (GitHub may send it form-encoded as `payload=`)."""
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    try:
        if provider is Provider.GITHUB and content_type == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode("ascii"), strict_parsing=True, max_num_fields=10)
            body = form["payload"][0].encode()
        document = json.loads(body)
    except (ValueError, KeyError, RecursionError) as exc:
        raise MalformedDelivery("the body is not a JSON object") from exc
    if not isinstance(document, dict):
        raise MalformedDelivery("the body is not a JSON object")
    return document


def read_delivery(provider: Provider, headers: Headers, body: bytes) -> Delivery:
    """What an authenticated request announces. Raises MalformedDelivery for a push without a ref."""
    kind, name = _event(provider, headers)
    digest = hashlib.sha256(body).hexdigest()
    delivery_id = _delivery_id(provider, headers)
    if kind is not EventKind.PUSH:
        return Delivery(provider, kind, name, delivery_id=delivery_id, digest=digest)
    document = _document(provider, headers, body)
    if provider is Provider.GITLAB and document.get("object_kind") != "push":
        if name == "Push Hook":
            raise MalformedDelivery("a push hook whose object_kind is not 'push'")
        return Delivery(provider, EventKind.OTHER, name, delivery_id=delivery_id, digest=digest)
    ref = document.get("ref")
    if not isinstance(ref, str) or not ref or len(ref) > 1024:
        raise MalformedDelivery("a push without a 'ref'")
    branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
    return Delivery(provider, kind, name, branch=branch, delivery_id=delivery_id, digest=digest)


class ReplayGuard:
    """Refuses a delivery id or push body seen among the last `capacity` deliveries. Thread-safe."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def seen_before(self, delivery: Delivery) -> bool:
        """Whether this delivery repeats a recent one; remembers it either way."""
        keys = [(f"{delivery.provider}:body", delivery.digest)]
        if delivery.delivery_id:
            keys.append((f"{delivery.provider}:id", delivery.delivery_id))
        with self._lock:
            repeated = any(key in self._seen for key in keys)
            for key in keys:
                self._seen[key] = None
                self._seen.move_to_end(key)
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
        return repeated
