"""Secrets the server needs (the API token, webhook secrets), read from the environment or a file.

Who calls it: the daemon's `run` command, before `serve()`. A variable `NAME` may instead be given as
`NAME_FILE`, a path to a file holding the value (a systemd credential, a Docker secret); a trailing
newline is dropped. Values are never logged, and errors name the variable and path, never the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from reconciler.errors import ConfigError

__all__ = ["ENV_API_TOKEN", "MAX_SECRET_BYTES", "api_token_from_env", "read_secret"]

ENV_API_TOKEN = "RECONCILER_API_TOKEN"
MAX_SECRET_BYTES = 64 * 1024


def read_secret(name: str, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The secret in `$NAME`, else in the file `$NAME_FILE`, else None. Empty counts as unset."""
    env = os.environ if environ is None else environ
    if value := env.get(name):
        return value.encode()
    path = env.get(f"{name}_FILE")
    if not path:
        return None
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"cannot read {name}_FILE ({path}): {exc.strerror or type(exc).__name__}",
            hint="point it at a readable file holding only the secret",
        ) from None
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(f"{name}_FILE ({path}) is larger than {MAX_SECRET_BYTES} bytes", hint="is it the right file?")
    return data.rstrip(b"\r\n") or None


def api_token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token for the mutating endpoints; None disables them."""
    token = read_secret(ENV_API_TOKEN, environ)
    if token is None:
        return None
    try:
        return token.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{ENV_API_TOKEN} must be ASCII (it travels in an HTTP header)") from None
