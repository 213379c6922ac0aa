"""The HTTP API: routes a request to the loop's control seam and answers in JSON (or Prometheus text).

Who calls it: the transport, once per request, on the request's own thread. What it serves:

    GET  /healthz              200 while the loop answers for its status, else 503
    GET  /status               the loop's status (LoopStatus) as JSON
    GET  /metrics              Prometheus exposition (server.metrics)
    POST /hooks/github|gitea|gitlab   push webhooks (server.webhooks): 202 queued, 200 ignored,
                               401 unauthenticated, 400 malformed/oversized, 409 replayed,
                               403 when that provider's secret is not configured
    POST /api/v1/reconcile|suspend|resume   need `Authorization: Bearer <RECONCILER_API_TOKEN>`;
                               401 without the right token, 403 when no token is configured

Nothing in a request body or header is logged except what the logs name (method, path, status,
client, provider, event, branch); secrets and signatures never are.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from typing import Any, assert_never

from reconciler.logs import fields
from reconciler.loop.events import LoopControl, Trigger
from reconciler.server.metrics import CONTENT_TYPE, LoopMetrics
from reconciler.server.settings import ENV_API_TOKEN
from reconciler.server.transport import HttpError, Request, Response
from reconciler.server.webhooks import (
    EventKind,
    MalformedDelivery,
    Provider,
    ReplayGuard,
    WebhookSecrets,
    authenticate,
    read_delivery,
)

__all__ = ["Api"]

log = logging.getLogger(__name__)

_HOOKS = {f"/hooks/{provider.value}": provider for provider in Provider}


def _json(status: int, document: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(document, default=str, ensure_ascii=False).encode()
    return Response(status, body, headers=headers or {})


class Api:
    """The request router; one per server."""

    def __init__(
        self, control: LoopControl, *, metrics: LoopMetrics, api_token: str | None, webhooks: WebhookSecrets
    ) -> None:
        self._control = control
        self._metrics = metrics
        self._token = api_token.encode() if api_token else None
        self._webhooks = webhooks
        self._replays = ReplayGuard()
        self._routes: dict[str, tuple[str, Callable[[Request], Response]]] = {
            "/healthz": ("GET", self._healthz),
            "/status": ("GET", self._status),
            "/metrics": ("GET", self._metrics_page),
            "/api/v1/reconcile": ("POST", self._reconcile),
            "/api/v1/suspend": ("POST", self._suspend),
            "/api/v1/resume": ("POST", self._resume),
        }

    def __call__(self, request: Request) -> Response:
        if request.path in _HOOKS:
            route: tuple[str, Callable[[Request], Response]] | None = ("POST", self._hook)
        else:
            route = self._routes.get(request.path)
        if route is None:
            raise HttpError(404, "no such endpoint")
        method, handler = route
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            raise HttpError(405, f"use {method}", {"Allow": method})
        return handler(request)

    # ---- reading ------------------------------------------------------------------------

    def _healthz(self, request: Request) -> Response:
        try:
            status = self._control.status()
        except Exception as exc:  # noqa: BLE001 - any failure to answer is "unhealthy"
            log.warning("status unavailable", extra=fields(error=type(exc).__name__))
            return _json(503, {"status": "unavailable"})
        return _json(200, {"status": "ok", "suspended": status.suspended, "busy": status.busy})

    def _status(self, request: Request) -> Response:
        status = self._control.status()
        document = status.to_json()
        last = status.last_pass
        document["result"] = None if last is None else str(last.outcome)
        document["drift"] = [] if last is None else document["last_pass"]["drift"]
        return _json(200, document)

    def _metrics_page(self, request: Request) -> Response:
        return Response(200, self._metrics.render(), content_type=CONTENT_TYPE)

    # ---- mutating: bearer token -----------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            raise HttpError(403, f"mutating endpoints are disabled: start the daemon with {ENV_API_TOKEN} set")
        scheme, _, given = (request.headers.get("Authorization") or "").strip().partition(" ")
        presented = given.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self._token):
            log.warning("api request refused", extra=fields(path=request.path, client=request.client))
            raise HttpError(401, "a valid bearer token is required", {"WWW-Authenticate": 'Bearer realm="reconciler"'})
        request.read_body(False)  # bounded and discarded: these endpoints take no body

    def _reconcile(self, request: Request) -> Response:
        self._authorize(request)
        self._control.request_pass(Trigger.MANUAL, fetch=True)
        log.info("pass requested", extra=fields(trigger=str(Trigger.MANUAL), client=request.client))
        return _json(202, {"queued": True})

    def _suspend(self, request: Request) -> Response:
        self._authorize(request)
        self._control.suspend()
        log.info("loop suspended", extra=fields(client=request.client))
        return _json(200, {"suspended": self._control.status().suspended})

    def _resume(self, request: Request) -> Response:
        self._authorize(request)
        self._control.resume()
        log.info("loop resumed", extra=fields(client=request.client))
        return _json(200, {"suspended": self._control.status().suspended})

    # ---- webhooks ---------------------------------------------------------------------------

    def _hook(self, request: Request) -> Response:
        provider = _HOOKS[request.path]
        secret = self._webhooks.for_provider(provider)
        if secret is None:
            raise HttpError(403, f"the {provider} webhook is disabled: set {provider.secret_variable}")
        body = request.read_body(True)
        where = {"provider": str(provider), "client": request.client}
        if not authenticate(provider, request.headers, body, secret):
            log.warning("webhook refused", extra=fields(**where, reason="bad or missing signature"))
            raise HttpError(401, "bad or missing signature")
        try:
            delivery = read_delivery(provider, request.headers, body)
        except MalformedDelivery as exc:
            log.warning("webhook refused", extra=fields(**where, reason=str(exc)))
            raise HttpError(400, str(exc)) from None
        where["event"] = delivery.event_name
        match delivery.event:
            case EventKind.PING:
                return _json(200, {"pong": True})
            case EventKind.OTHER:
                log.info("webhook ignored", extra=fields(**where, reason="not a push"))
                return _json(200, {"ignored": "not a push event"})
            case EventKind.PUSH:
                return self._push(delivery.branch, self._replays.seen_before(delivery), where)
            case unreachable:
                assert_never(unreachable)

    def _push(self, branch: str | None, replayed: bool, where: dict[str, Any]) -> Response:
        if replayed:
            log.warning("webhook refused", extra=fields(**where, reason="replayed delivery"))
            raise HttpError(409, "this delivery was received before")
        watched = self._control.status().source.branch
        if branch != watched:
            log.info("webhook ignored", extra=fields(**where, branch=branch, watched=watched))
            return _json(200, {"ignored": f"not a push to {watched}"})
        self._control.request_pass(Trigger.WEBHOOK, fetch=True)
        log.info("pass requested", extra=fields(**where, trigger=str(Trigger.WEBHOOK), branch=branch))
        return _json(202, {"queued": True})
