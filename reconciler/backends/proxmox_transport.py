"""The Proxmox API transport: the only module that imports proxmoxer and talks HTTP to PVE.

Who calls it: `ProxmoxBackend` (backends/proxmox.py) builds one `ProxmoxTransport` and its reads
(`proxmox_reads`) and writes (`proxmox_writes`, `proxmox_power`) call through it. It owns the
session (login, connection pool), one call with its errors translated, the retry of a read or of a
whole write, and the wait for a PVE task.

- proxmoxer's errors are translated here, by HTTP status and exception type,
  never by message text: 400 -> PermanentError (with PVE's per-field errors),
  401 -> ConfigError (the credentials are wrong), 403 -> PermissionDenied,
  404/501 -> NotFoundError, 429 -> TemporaryError, 5xx -> TemporaryError (PVE
  reports lock timeouts, a lost quorum and a missing config file alike as 500),
  a dropped connection or a timeout -> TemporaryError, a TLS verification
  failure -> ConfigError. A 429 or 503 with `Retry-After` (seconds) sets the
  error's `delay`, which every retry (here and the loop's backoff) honours.
- Retries read `retryable` and `delay` from the error and nothing else. Not
  retried here: a stale digest (ConfigChanged: the caller re-plans), a task
  still running after its timeout (TaskStillRunning): a new pass decides.
- Every call that starts a task waits for its UPID; `OK` and `WARNINGS: N`
  are success, anything else is `TaskFailed` naming the guest.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException

from reconciler import redact
from reconciler.backends.proxmox_settings import ENV_CA, ENV_PASSWORD, ENV_TOKEN, ENV_URL, ProxmoxSettings
from reconciler.backends.ratelimit import RATE_LIMITED, retry_after
from reconciler.errors import (
    ConfigError,
    NotFoundError,
    PermanentError,
    PermissionDenied,
    ReconcilerError,
    TaskFailed,
    TemporaryError,
)
from reconciler.spec.models import ProxmoxAuth

__all__ = ["MAX_RETRY_DELAY", "ConfigChanged", "ProxmoxTransport", "TaskStillRunning", "retry_delay"]

MAX_RETRY_DELAY: Final = 30.0
"""The longest one retry here waits, whatever `Retry-After` asks: a longer wait is the loop's to make."""

_log = logging.getLogger("reconciler.backends.proxmox")
_T = TypeVar("_T")


class ConfigChanged(TemporaryError):
    """PVE refused a config update because the guest's config changed since it was read (stale digest).

    Retryable: the next pass reads the new config and plans again.
    """


class TaskStillRunning(TemporaryError):
    """A task outlived the time allowed for it; starting the operation again would not help."""


class ProxmoxTransport:
    """One PVE login and its connection pool. Thread-safe; no I/O until the first call; `close()` it.

    `read_attempts` and `write_attempts` bound the retries of reads and of whole writes, `backoff`
    (seconds, doubled per attempt, with jitter) spaces them, `task_timeout` bounds a task's run.
    """

    def __init__(
        self,
        settings: ProxmoxSettings,
        *,
        pool_size: int,
        read_attempts: int,
        write_attempts: int,
        backoff: float,
        task_timeout: float,
        poll_interval: float,
    ) -> None:
        self.settings = settings
        self.task_timeout = task_timeout
        self.poll_interval = poll_interval
        self._pool_size = max(1, pool_size)
        self._read_attempts = max(1, read_attempts)
        self._write_attempts = max(1, write_attempts)
        self._backoff = backoff
        self._api: Any = None
        self._lock = threading.Lock()
        self._last = threading.local()  # this thread's last answer's Retry-After: requests runs hooks in the caller

    def close(self) -> None:
        """Close the HTTP connections. The transport logs in again if used again."""
        with self._lock:
            api, self._api = self._api, None
        if api is not None:
            session = _session_of(api)
            if session is not None:
                session.close()

    def _client(self) -> Any:
        with self._lock:
            if self._api is None:
                self._api = self._connect()
            return self._api

    def _connect(self) -> Any:
        s = self.settings
        try:
            api = ProxmoxAPI(**_login_options(s))
        except AuthenticationError as exc:
            raise ConfigError(
                f"Proxmox refused the login of {s.user}", resource=s.url, hint="check the password"
            ) from exc
        except requests.RequestException as exc:
            raise _transport_error(exc, url=s.url, resource=None, method="POST", path="access/ticket") from exc
        except UnicodeError:
            raise _unsendable(s.user) from None
        redact.register(*api.get_tokens())  # a password login's ticket and CSRF token are secrets too
        session = _session_of(api)
        if session is not None:
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=self._pool_size)
            session.mount("https://", adapter)
            session.hooks["response"].append(self._note_retry_after)
        return api

    def _note_retry_after(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._last.retry_after = retry_after(response.status_code, response.headers)

    def call(self, method: str, path: str, *, resource: str, params: Mapping[str, Any] | None = None) -> Any:
        """One API call, not retried, errors translated. `path` is relative to /api2/json, without a leading slash."""
        api = self._client()
        endpoint = api(path)
        values = dict(params or {})
        self._last.retry_after = None
        try:
            if method == "GET":
                return endpoint.get(**values)
            if method == "POST":
                return endpoint.post(**values)
            if method == "PUT":
                return endpoint.put(**values)
            if method == "DELETE":
                return endpoint.delete(**values)
        except ResourceException as exc:
            redact.register(*api.get_tokens())  # a ticket renewed since login may be what the error echoes
            delay = getattr(self._last, "retry_after", None)
            raise _translate(exc, method=method, path=path, resource=resource, delay=delay) from exc
        except AuthenticationError as exc:
            raise ConfigError(f"Proxmox refused to renew the login of {self.settings.user}", resource=resource) from exc
        except requests.RequestException as exc:
            raise _transport_error(exc, url=self.settings.url, resource=resource, method=method, path=path) from exc
        except UnicodeError:  # a header (the token) or the URL cannot be encoded; the text would show the secret
            raise _unsendable(self.settings.user, resource=resource) from None
        raise ValueError(f"unsupported method {method}")

    def get(self, path: str, *, resource: str, params: Mapping[str, Any] | None = None) -> Any:
        """A read, retried on a retryable error with exponential backoff and jitter."""
        return self._retried(
            lambda attempt: self.call("GET", path, resource=resource, params=params),
            attempts=self._read_attempts,
            what="read",
            context={"path": path, "resource": resource},
        )

    def write(self, operation: Callable[[int], _T], *, resource: str, action: str) -> _T:
        """Run a whole write (state check, call, task) again on a retryable error, with backoff and jitter.

        `operation` gets the attempt number (0 first). What is not worth repeating is raised at once: a stale
        digest, a task still running after its timeout; TaskFailed and permanent errors are not retryable.
        """
        return self._retried(
            operation, attempts=self._write_attempts, what="write", context={"action": action, "resource": resource}
        )

    def _retried(self, operation: Callable[[int], _T], *, attempts: int, what: str, context: Mapping[str, Any]) -> _T:
        for attempt in range(attempts):
            try:
                return operation(attempt)
            except (ConfigChanged, TaskStillRunning):
                raise  # retryable by a new pass, which reads and plans again, never by repeating this call
            except ReconcilerError as exc:
                if not exc.retryable or attempt + 1 >= attempts:
                    raise
                delay = retry_delay(exc, attempt=attempt, backoff=self._backoff)
                extra = {**context, "attempt": attempt + 1, "delay": delay, "error": str(exc)}
                _log.info(f"proxmox {what} retried", extra=extra)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def wait(self, upid: Any, *, resource: str, timeout: float | None = None) -> None:
        """Wait for a task to stop; raise TaskFailed unless it ended OK or with warnings."""
        if not isinstance(upid, str):
            raise PermanentError(f"PVE returned no task id ({upid!r})", resource=resource)
        node = _upid_node(upid)
        limit = self.task_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        interval = self.poll_interval
        while True:
            status = self.get(f"nodes/{node}/tasks/{upid}/status", resource=resource)
            if isinstance(status, Mapping) and status.get("status") == "stopped":
                exitstatus = str(status.get("exitstatus") or "unknown")
                if exitstatus == "OK" or exitstatus.startswith("WARNINGS"):
                    _log.info("proxmox task done", extra={"upid": upid, "resource": resource, "exit": exitstatus})
                    return
                task = status.get("type", "task")
                raise TaskFailed(f"{task} task failed: {exitstatus}", resource=resource, upid=upid)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TaskStillRunning(f"task {upid} still running after {limit:g}s", resource=resource)
            time.sleep(min(interval, remaining))
            interval = min(interval * 1.5, 2.0)


def retry_delay(error: ReconcilerError, *, attempt: int, backoff: float) -> float:
    """Seconds before retry `attempt + 1`: exponential with jitter, never under the error's own `delay` (capped)."""
    delay = min(MAX_RETRY_DELAY, backoff * 2.0**attempt) * random.uniform(0.5, 1.0)
    if error.delay is not None and error.delay > 0:
        delay = max(delay, min(error.delay, MAX_RETRY_DELAY))
    return delay


def _login_options(s: ProxmoxSettings) -> dict[str, Any]:
    """proxmoxer's keyword arguments for a login with `s`."""
    parts = urlsplit(s.url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    options: dict[str, Any] = {
        "host": f"{host}:{parts.port or 8006}",
        "verify_ssl": s.verify,
        "timeout": s.timeout,
        "service": "PVE",
        "user": s.user,
    }
    if parts.path.strip("/"):
        options["path_prefix"] = parts.path.strip("/")
    if s.auth is ProxmoxAuth.TOKEN:
        options.update(token_name=s.token_id, token_value=s.secret)
    else:
        options["password"] = s.secret
    return options


def _field_errors(errors: Any) -> str:
    if isinstance(errors, Mapping):
        return "; ".join(f"{name}: {str(text).strip()}" for name, text in sorted(errors.items()))
    return str(errors).strip() if errors else ""


def _translate(exc: Any, *, method: str, path: str, resource: str, delay: float | None) -> ReconcilerError:
    """The project's error for a proxmoxer ResourceException, chosen by HTTP status only.

    `delay` is what the answer's `Retry-After` asked for (proxmoxer's exception does not keep the headers).
    """
    status = int(getattr(exc, "status_code", 0) or 0)
    # PVE's own words may echo what it was sent (an Authorization header): scrubbed before anything else.
    reason = redact.scrub(str(getattr(exc, "content", "") or getattr(exc, "status_message", "") or "").strip())
    details = redact.scrub(_field_errors(getattr(exc, "errors", None)))
    message = f"{method} /{path} failed: HTTP {status} {reason}".rstrip()
    if details:
        message += f" ({details})"
    if status == 400:
        return PermanentError(message, resource=resource)
    if status == 401:
        return ConfigError(message, resource=resource, hint="check the Proxmox token or password")
    if status == 403:
        return PermissionDenied(message, resource=resource)
    if status in (404, 501):
        return NotFoundError(message, resource=resource)
    if status == 429 or status >= 500:
        return TemporaryError(message, resource=resource, delay=delay if status in RATE_LIMITED else None)
    return PermanentError(message, resource=resource)


def _upid_node(upid: str) -> str:
    parts = upid.split(":")
    if len(parts) < 3 or parts[0] != "UPID" or not parts[1]:
        raise PermanentError(f"not a PVE task id: {upid!r}")
    return parts[1]


def _session_of(api: Any) -> requests.Session | None:
    store = getattr(api, "_store", None)
    session = store.get("session") if isinstance(store, dict) else None
    return session if isinstance(session, requests.Session) else None


def _transport_error(
    exc: requests.RequestException, *, url: str, resource: str | None, method: str, path: str
) -> ReconcilerError:
    """The project's error for a request that got no answer: it names the API address and the socket's reason."""
    if isinstance(exc, requests.exceptions.SSLError):
        return ConfigError(
            f"TLS verification of the Proxmox API at {url} failed ({type(exc).__name__})",
            resource=resource,
            hint=f"set {ENV_CA} to the CA bundle that signed its certificate",
        )
    if isinstance(exc, requests.Timeout):
        return TemporaryError(f"the Proxmox API at {url} did not answer {method} /{path} in time", resource=resource)
    return TemporaryError(
        f"cannot reach the Proxmox API at {url}: {method} /{path} failed ({_socket_reason(exc)})",
        resource=resource,
        hint=f"check {ENV_URL} or the Lab's proxmox.url, and that the node is up",
    )


def _unsendable(user: str, *, resource: str | None = None) -> ConfigError:
    """A request whose credentials or address cannot be encoded (the codec's error would quote them)."""
    return ConfigError(
        f"a request as {user} cannot be sent: its credentials or address hold a character HTTP cannot carry",
        resource=resource,
        hint=f"check {ENV_TOKEN} / {ENV_PASSWORD} and {ENV_URL} for a mistyped character",
    )


def _socket_reason(exc: BaseException) -> str:
    """The operating system's words for the deepest socket error under `exc` (never its text: it holds URLs)."""
    reason = type(exc).__name__
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, requests.RequestException) and current.strerror:
            reason = current.strerror
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = current.__cause__ or current.__context__ or nested
    return reason
