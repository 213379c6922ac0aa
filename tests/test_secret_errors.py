"""Secrets never leave in an error: what a backend echoes, a URL with credentials, a token HTTP cannot carry.

Against real things: fakepve over HTTPS driven by the real proxmoxer (a subclass whose `/version` answers
with an error body echoing the request's Authorization header, as a proxy or a debugging PVE build may),
the real Docker SDK against an endpoint URL carrying a password, and `reconciler plan` run as a person
runs it. Each test looks for the secret in everything the process said: stdout, stderr, the error's text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from reconciler import redact
from reconciler.backends.docker import DockerBackend, DockerHostSettings
from reconciler.backends.proxmox import ENV_TOKEN, ENV_URL, ProxmoxBackend, settings_from
from reconciler.errors import ConfigError, PermanentError, ReconcilerError
from tests.support.fakepve import HOST, PASSWORD, USER, LabPve, Pki, PveServer

ROOT = Path(__file__).resolve().parent.parent

LAB = """\
kind: Lab
name: secrets
nodes: [pve1]
nvml: {enabled: false}
proxmox: {url: "https://pve1.lan:8006"}
---
kind: Lxc
name: box
node: pve1
vmid: 120
template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
cores: 1
memory: 512MiB
rootfs: {storage: local-lvm, size: 4GiB}
"""


# ---- the registry and scrub ------------------------------------------------------------------------------------


def test_scrub_hides_registered_values_their_encodings_and_credentials_it_never_saw() -> None:
    redact.register("s3cr3t/with+plus", "abc")  # "abc" is too short to register: it would mangle text
    assert redact.scrub("token s3cr3t/with+plus here") == "token *** here"
    assert redact.scrub("query ?t=s3cr3t%2Fwith%2Bplus") == "query ?t=***"
    assert redact.scrub("abc stays") == "abc stays"
    assert redact.scrub("at https://root:hunter2@pve1.lan:8006/api2") == "at https://root:***@pve1.lan:8006/api2"
    assert redact.scrub("ssh://root@llm.lan keeps its user") == "ssh://root@llm.lan keeps its user"
    for echoed in (
        "Authorization: PVEAPIToken=ops@pve!ci=0b9d7c4e-never-registered",
        "authorization=Bearer never-registered",
        "Cookie: PVEAuthCookie=PVE:root@pam:65F3A2B1::never-registered",
        '{"CSRFPreventionToken": "65F3A2B1:never-registered"}',
    ):
        assert "never-registered" not in redact.scrub(echoed), echoed
    assert redact.without_userinfo("https://root:pw@pve1.lan:8006") == "https://pve1.lan:8006"


def test_every_project_error_is_scrubbed_when_it_is_made() -> None:
    redact.register("error-secret-6d1f")
    error = PermanentError("PVE said: error-secret-6d1f", resource="x", hint="not error-secret-6d1f")
    assert "error-secret-6d1f" not in str(error) and "error-secret-6d1f" not in repr(error.args)


def test_the_environment_registers_reconciler_secrets_and_endpoint_passwords() -> None:
    redact.register_environment(
        {
            "RECONCILER_PROXMOX_TOKEN": "ops@pve!ci=env-token-secret-91ab",
            "RECONCILER_PROXMOX_PASSWORD": "env-password-2c7e",
            "DOCKER_HOST": "tcp://ops:env-docker-pass-5e0a@docker.lan:2376",
            "RECONCILER_STATE_DIR": "/var/lib/reconciler",  # not a secret: stays readable
        }
    )
    text = redact.scrub("ci=env-token-secret-91ab env-password-2c7e env-docker-pass-5e0a /var/lib/reconciler")
    assert text == "ci=*** *** *** /var/lib/reconciler"


# ---- fakepve echoing the Authorization header ----------------------------------------------------------------

if LabPve is not None:

    class EchoPve(LabPve):  # type: ignore[misc, valid-type]
        """A PVE whose GET /version fails with a body and reason that repeat the request's credentials."""

        async def _version(self, request: Any) -> Any:
            from fakepve.server import error

            header = request.headers.get("Authorization", "")
            ticket = request.cookies.get("PVEAuthCookie", "")
            self.echoed = [value for value in (header, ticket) if value]
            return error(
                400,
                f"bad request (Authorization: {header}; ticket {ticket})",
                {"authorization": header, "cookie": ticket},
            )


@pytest.fixture
def echo_server(pve_pki: Pki) -> Iterator[PveServer]:
    if LabPve is None:
        pytest.skip("fakepve is not installed")  # pve_pki already failed under CI
    pve = EchoPve(user=USER, password=PASSWORD, host=HOST, port=0)
    pve.time_scale = 0
    server = PveServer(pve, pve_pki)
    try:
        yield server
    finally:
        server.stop()


def cli(*args: str, env: Mapping[str, str], state: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m reconciler ARGS` with only these RECONCILER_* variables (plain text, no colour)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RECONCILER_", "DOCKER_HOST"))}
    base.update(env, RECONCILER_STATE_DIR=str(state), NO_COLOR="1", TERM="dumb", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spec(tmp_path: Path) -> Path:
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "lab.yaml").write_text(LAB)
    return folder


@pytest.mark.fakepve
@pytest.mark.parametrize("auth", ["token", "password"])
def test_an_error_body_echoing_the_credentials_is_scrubbed(echo_server: PveServer, tmp_path: Path, auth: str) -> None:
    """The token (a token login) or the ticket PVE issued (a password login) comes back in the error body."""
    secret = echo_server.token_secret if auth == "token" else echo_server.password
    backend = ProxmoxBackend(settings_from(None, echo_server.env(auth)), read_attempts=1)
    with pytest.raises(PermanentError) as caught:
        backend.observe()
    backend.close()
    echoed = echo_server.pve.echoed
    assert echoed and "HTTP 400 bad request" in str(caught.value)
    assert all(value not in str(caught.value) for value in [secret, *echoed]), str(caught.value)

    result = cli("plan", str(spec(tmp_path)), env=echo_server.env(auth), state=tmp_path / "state")
    said = result.stdout + result.stderr
    echoed = echo_server.pve.echoed  # this process's own credentials (a new ticket)
    assert result.returncode == 1, said
    assert "error: " in result.stderr and "HTTP 400 bad request" in result.stderr, said
    assert all(value not in said for value in [secret, *echoed]), said
    assert "Traceback" not in said, said


@pytest.mark.fakepve
def test_a_url_with_credentials_is_refused_without_repeating_them(pve_server: PveServer, tmp_path: Path) -> None:
    env = pve_server.env("token")
    env[ENV_URL] = f"https://root:url-pass-8c1d@{pve_server.host}:{pve_server.port}"
    with pytest.raises(ConfigError, match="carries credentials") as caught:
        settings_from(None, env)
    assert "url-pass-8c1d" not in str(caught.value)
    assert f"https://{pve_server.host}:{pve_server.port}" in str(caught.value)

    result = cli("plan", str(spec(tmp_path)), env=env, state=tmp_path / "state")
    said = result.stdout + result.stderr
    assert result.returncode == 1 and "carries credentials" in result.stderr, said
    assert "url-pass-8c1d" not in said and "Traceback" not in said, said
    assert pve_server.requests == []  # refused before anything was sent


@pytest.mark.fakepve
@pytest.mark.parametrize(
    ("secret", "said_why"),
    [
        ("sécret€-a1b2c3", "cannot carry"),
        ("ascii-then-€-d4e5f6", "cannot carry"),
        # White space makes it no `user!id=secret` token at all (a bare secret, whose token id is unknown).
        ("line\nbreak-q9w8e7", "no token id is known"),
    ],
)
def test_a_token_http_cannot_carry_is_a_clear_error(
    pve_server: PveServer, tmp_path: Path, secret: str, said_why: str
) -> None:
    env = pve_server.env("token")
    env[ENV_TOKEN] = f"{USER}!{pve_server.token_id}={secret}"
    with pytest.raises(ConfigError, match=said_why) as caught:
        settings_from(None, env)
    assert secret not in str(caught.value)

    result = cli("plan", str(spec(tmp_path)), env=env, state=tmp_path / "state")
    said = result.stdout + result.stderr
    assert result.returncode == 1 and said_why in result.stderr, said
    assert "Traceback" not in said and "UnicodeEncodeError" not in said, said
    assert secret not in said and secret.rsplit("-", 1)[1] not in said, said
    assert pve_server.requests == []


# ---- Docker endpoints with credentials ---------------------------------------------------------------------------


@pytest.mark.docker
def test_a_docker_endpoint_password_never_shows(tmp_path: Path) -> None:
    """The real docker SDK against a TCP endpoint with credentials that nothing answers."""
    endpoint = "tcp://ops:docker-pass-3f9b@127.0.0.1:9"
    backend = DockerBackend({"box": DockerHostSettings("box", endpoint, timeout=5)})
    with pytest.raises(ReconcilerError) as caught:
        backend.container_state("box", "anything")
    backend.close()
    assert "docker host 'box'" in str(caught.value)
    assert "docker-pass-3f9b" not in str(caught.value)


def test_an_unexpected_error_in_the_cli_prints_a_scrubbed_traceback(tmp_path: Path) -> None:
    """A bug's traceback is shown (it is a bug), but scrubbed of what the environment holds (main registers it)."""
    script = (
        "import sys, os\n"
        "from reconciler import cli\n"
        "@cli.app.command('boom')\n"
        "def boom() -> None:\n"
        "    raise RuntimeError('leaked ' + os.environ['RECONCILER_PROXMOX_PASSWORD'])\n"
        "sys.argv = ['reconciler', 'boom']\n"
        "cli.main()\n"
    )
    env = {**os.environ, "RECONCILER_PROXMOX_PASSWORD": "bug-secret-77aa"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "RuntimeError: leaked ***" in result.stderr, result.stderr
    assert "bug-secret-77aa" not in result.stdout + result.stderr


def _fifo(path: Path) -> str:
    os.mkfifo(path)  # nobody writes to it: reading it would wait for ever
    return str(path)


def _binary(path: Path) -> str:
    path.write_bytes(b"\xff\xfe\x00binary")
    return str(path)


@pytest.mark.fakepve
@pytest.mark.parametrize(
    ("key", "make", "said"),
    [
        ("secret_file", lambda _: "/dev/zero", "is not a regular file"),
        ("secret_file", _fifo, "is not a regular file"),
        ("secret_file", _binary, "is not UTF-8 text"),
        ("ca_file", lambda _: "/dev/zero", "is not a regular file"),
        ("ca_file", _fifo, "is not a regular file"),
    ],
    ids=["secret-device", "secret-fifo", "secret-binary", "ca-device", "ca-fifo"],
)
def test_a_secret_or_ca_file_that_is_no_file_is_a_clear_error_not_a_hang(
    pve_server: PveServer, tmp_path: Path, key: str, make: Any, said: str
) -> None:
    named = make(tmp_path / "named")
    files = {"ca_file": pve_server.ca_file, key: named}
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "lab.yaml").write_text(
        f"kind: Lab\nname: lab\nnodes: [pve1]\nnvml: {{enabled: false}}\n"
        f'proxmox: {{url: "{pve_server.url}", auth: password, user: root@pam, secret_env: NO_SUCH_PASSWORD, '
        f"ca_file: {files['ca_file']}"
        + (f", secret_file: {files['secret_file']}" if "secret_file" in files else "")
        + "}\n"
    )
    env = {} if key == "secret_file" else {"NO_SUCH_PASSWORD": pve_server.password}
    result = cli("plan", str(folder), env=env, state=tmp_path / "state", timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and named in result.stderr and said in result.stderr, output
    assert "Traceback" not in output, output
