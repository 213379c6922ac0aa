"""The daemon's HTTP server: health, status, Prometheus metrics, push webhooks and a small control API.

Who calls it: `reconciler run`, once, with the running loop's `LoopControl`::

    handle = serve(loop, listen="127.0.0.1:9450", api_token=api_token_from_env(),
                   webhooks=WebhookSecrets.from_env())
    ...
    handle.close()

It runs in background threads and never blocks the loop: every endpoint only reads the loop's
status snapshot or asks it for something (a pass, suspend, resume). Layering: above `loop`, below
`cli`. Modules: `app` (routes), `transport` (the stdlib threading server and its limits),
`webhooks` (provider signatures, push parsing, replays), `metrics` (prometheus_client lives there
only), `settings` (secrets from the environment or a file).
"""

from __future__ import annotations

import ipaddress
import logging
import threading

from reconciler.errors import ConfigError
from reconciler.logs import fields
from reconciler.loop.events import LoopControl
from reconciler.server.app import Api
from reconciler.server.metrics import LoopMetrics
from reconciler.server.settings import api_token_from_env
from reconciler.server.transport import Limits, Transport
from reconciler.server.webhooks import Provider, WebhookSecrets

__all__ = [
    "DEFAULT_LISTEN",
    "Limits",
    "Provider",
    "ServerHandle",
    "WebhookSecrets",
    "api_token_from_env",
    "parse_listen",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9450"


class ServerHandle:
    """A running server: where it listens, and how to stop it (idempotent)."""

    def __init__(self, transport: Transport, thread: threading.Thread) -> None:
        self._transport = transport
        self._thread = thread
        self._closed = False
        host, port = transport.server_address[:2]
        self.address: tuple[str, int] = (str(host), int(port))

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport.shutdown()
        self._transport.server_close()
        self._thread.join(5)
        log.info("http server stopped", extra=fields(address=self.url))

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`) into its parts; ConfigError when it is not one."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
        ipaddress.ip_address(host)
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise ConfigError(f"--listen {listen!r} is not an IP address and port", hint="e.g. 127.0.0.1:9450")
    return host, number


def serve(
    control: LoopControl,
    *,
    listen: str = DEFAULT_LISTEN,
    api_token: str | None,
    webhooks: WebhookSecrets,
    limits: Limits | None = None,
) -> ServerHandle:
    """Start serving `control` on `listen` (port 0 picks a free one) in background threads.

    Raises ConfigError when the address is malformed or cannot be bound (in use, not local).
    """
    host, port = parse_listen(listen)
    metrics = LoopMetrics(control)
    api = Api(control, metrics=metrics, api_token=api_token, webhooks=webhooks)
    try:
        transport = Transport((host, port), api, limits or Limits())
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {listen}: {exc.strerror or type(exc).__name__}", hint="choose another --listen address"
        ) from None
    control.subscribe(metrics.observe)
    thread = threading.Thread(target=transport.serve_forever, args=(0.2,), name="http server", daemon=True)
    thread.start()
    handle = ServerHandle(transport, thread)
    hooks = [str(p) for p in Provider if webhooks.for_provider(p) is not None]
    log.info("http server listening", extra=fields(address=handle.url, api=api_token is not None, webhooks=hooks))
    if not ipaddress.ip_address(host).is_loopback:
        log.warning("http server reachable beyond this machine", extra=fields(address=handle.url))
    return handle
