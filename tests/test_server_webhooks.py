"""Push webhooks from GitHub, Gitea and GitLab over real HTTP: signatures, replays, hostile bodies.

Each delivery is built as the provider builds it (headers and body, signed with the provider's
scheme) and sent to a real server on loopback. The assertion is on the answer and on the loop's
state: a pass requested (with a fetch) or nothing requested at all.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from reconciler.loop.events import Trigger
from reconciler.server import Limits, ServerHandle, WebhookSecrets, serve
from reconciler.server.webhooks import Provider, sign
from tests.support.http import call
from tests.support.loopdouble import LoopDouble

SECRETS = {Provider.GITHUB: b"gh-secret-1234", Provider.GITEA: b"gitea-secret-5678", Provider.GITLAB: b"gl-token-9"}
MAX_BODY = 64 * 1024


@pytest.fixture
def loop() -> LoopDouble:
    return LoopDouble(branch="main")


@pytest.fixture
def server(loop: LoopDouble) -> Iterator[ServerHandle]:
    secrets = WebhookSecrets(
        github=SECRETS[Provider.GITHUB], gitea=SECRETS[Provider.GITEA], gitlab=SECRETS[Provider.GITLAB]
    )
    limits = Limits(max_body=MAX_BODY)
    with serve(loop, listen="127.0.0.1:0", api_token=None, webhooks=secrets, limits=limits) as handle:
        yield handle


def push_body(provider: Provider, ref: str = "refs/heads/main", **extra: object) -> bytes:
    document: dict[str, object] = {"ref": ref, "before": "0" * 40, "after": uuid.uuid4().hex, **extra}
    if provider is Provider.GITLAB:
        document["object_kind"] = "push"
    return json.dumps(document).encode()


def signed_headers(
    provider: Provider, body: bytes, *, secret: bytes | None = None, event: str = "push"
) -> dict[str, str]:
    """The headers the provider sends with `body`, authenticated with `secret`."""
    key = SECRETS[provider] if secret is None else secret
    delivery = str(uuid.uuid4())
    match provider:
        case Provider.GITHUB:
            return {
                "X-GitHub-Event": event,
                "X-GitHub-Delivery": delivery,
                "X-Hub-Signature-256": f"sha256={sign(key, body)}",
                "Content-Type": "application/json",
            }
        case Provider.GITEA:
            return {"X-Gitea-Event": event, "X-Gitea-Delivery": delivery, "X-Gitea-Signature": sign(key, body)}
        case Provider.GITLAB:
            name = {"push": "Push Hook"}.get(event, event)
            return {"X-Gitlab-Event": name, "X-Gitlab-Event-UUID": delivery, "X-Gitlab-Token": key.decode()}


def post(server: ServerHandle, provider: Provider, body: bytes, headers: dict[str, str]) -> int:
    return call(server.address, "POST", f"/hooks/{provider}", body=body, headers=headers).status


PROVIDERS = list(Provider)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_signed_push_to_the_watched_branch_requests_a_pass_with_fetch(
    server: ServerHandle, loop: LoopDouble, provider: Provider
) -> None:
    body = push_body(provider)
    assert post(server, provider, body, signed_headers(provider, body)) == 202
    assert loop.requests == [(Trigger.WEBHOOK, True)]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_wrong_secret_is_401_and_changes_nothing(server: ServerHandle, loop: LoopDouble, provider: Provider) -> None:
    body = push_body(provider)
    assert post(server, provider, body, signed_headers(provider, body, secret=b"not-the-secret")) == 401
    assert loop.requests == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_missing_signature_is_401(server: ServerHandle, loop: LoopDouble, provider: Provider) -> None:
    body = push_body(provider)
    headers = {k: v for k, v in signed_headers(provider, body).items() if "Signature" not in k and "Token" not in k}
    assert post(server, provider, body, headers) == 401
    assert loop.requests == []


@pytest.mark.parametrize("provider", [Provider.GITHUB, Provider.GITEA])
def test_a_signature_over_another_body_is_401(server: ServerHandle, loop: LoopDouble, provider: Provider) -> None:
    signed = push_body(provider, ref="refs/heads/other")
    tampered = push_body(provider)
    assert post(server, provider, tampered, signed_headers(provider, signed)) == 401
    assert loop.requests == []


def test_a_signature_from_another_provider_is_401(server: ServerHandle, loop: LoopDouble) -> None:
    body = push_body(Provider.GITEA)
    # Gitea's signature and secret, sent to the GitHub receiver with GitHub's header name.
    headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(SECRETS[Provider.GITEA], body)}
    assert post(server, Provider.GITHUB, body, headers) == 401
    assert loop.requests == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_replayed_delivery_is_refused(server: ServerHandle, loop: LoopDouble, provider: Provider) -> None:
    body = push_body(provider)
    headers = signed_headers(provider, body)
    assert post(server, provider, body, headers) == 202
    assert post(server, provider, body, headers) == 409  # the very same request again
    fresh_id = signed_headers(provider, body)  # the same body under a new delivery id
    assert post(server, provider, body, fresh_id) == 409
    assert loop.requests == [(Trigger.WEBHOOK, True)]


def test_a_redelivered_id_with_a_new_body_is_refused(server: ServerHandle, loop: LoopDouble) -> None:
    first = push_body(Provider.GITHUB)
    headers = signed_headers(Provider.GITHUB, first)
    assert post(server, Provider.GITHUB, first, headers) == 202
    second = push_body(Provider.GITHUB)
    again = {**signed_headers(Provider.GITHUB, second), "X-GitHub-Delivery": headers["X-GitHub-Delivery"]}
    assert post(server, Provider.GITHUB, second, again) == 409
    assert len(loop.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[1, 2]", b'"main"', b"\xff\xfe", b'{"ref": 7}', b'{"ref": ""}', b"[" * 100_000 + b"]" * 100_000],
    ids=["empty", "truncated", "array", "string", "not-utf8", "ref-number", "ref-empty", "deep"],
)
def test_a_malformed_signed_body_is_400_and_changes_nothing(
    server: ServerHandle, loop: LoopDouble, provider: Provider, body: bytes
) -> None:
    if len(body) > MAX_BODY:
        body = b"[" * (MAX_BODY // 2) + b"]" * (MAX_BODY // 2)
    assert post(server, provider, body, signed_headers(provider, body)) == 400
    assert loop.requests == []


def test_a_gitlab_body_that_is_not_a_push_is_ignored(server: ServerHandle, loop: LoopDouble) -> None:
    body = json.dumps({"object_kind": "tag_push", "ref": "refs/tags/v1"}).encode()
    headers = {**signed_headers(Provider.GITLAB, body), "X-Gitlab-Event": "System Hook"}
    assert post(server, Provider.GITLAB, body, headers) == 200
    assert loop.requests == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_oversized_body_is_400_before_it_is_read(server: ServerHandle, loop: LoopDouble, provider: Provider) -> None:
    headers = {**signed_headers(provider, b"{}"), "Content-Length": str(MAX_BODY + 1)}
    with socket.create_connection(server.address, timeout=30) as sock:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"POST /hooks/{provider} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + b"{" * 1000)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.0 400")
    assert loop.requests == []


def test_a_body_at_the_cap_is_read(server: ServerHandle, loop: LoopDouble) -> None:
    body = push_body(Provider.GITHUB, padding="x" * 10)
    body = body[:-1] + b', "fill": "' + b"y" * (MAX_BODY - len(body) - 12) + b'"}'
    assert len(body) == MAX_BODY
    assert post(server, Provider.GITHUB, body, signed_headers(Provider.GITHUB, body)) == 202


@pytest.mark.parametrize("length", ["", "-1", "1e3", "0x10", "1\xb2", "12, 13", "99999999999999"], ids=repr)
def test_an_invalid_content_length_is_400(server: ServerHandle, loop: LoopDouble, length: str) -> None:
    body = push_body(Provider.GITHUB)
    headers = {**signed_headers(Provider.GITHUB, body), "Content-Length": length}
    answer = call(server.address, "POST", "/hooks/github", body=body, headers=headers, content_length=False)
    assert answer.status == 400
    assert loop.requests == []


def test_two_different_content_lengths_are_400(server: ServerHandle, loop: LoopDouble) -> None:
    body = push_body(Provider.GITHUB)
    headers = signed_headers(Provider.GITHUB, body)
    with socket.create_connection(server.address, timeout=30) as sock:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        lengths = f"Content-Length: {len(body)}\r\nContent-Length: {len(body) - 1}\r\n"
        sock.sendall(f"POST /hooks/github HTTP/1.1\r\n{head}{lengths}\r\n".encode() + body)
        assert sock.recv(4096).startswith(b"HTTP/1.0 400")
    assert loop.requests == []


def test_a_body_without_a_length_or_chunked_is_411(server: ServerHandle, loop: LoopDouble) -> None:
    body = push_body(Provider.GITHUB)
    headers = signed_headers(Provider.GITHUB, body)
    assert call(server.address, "POST", "/hooks/github", body=body, headers=headers, content_length=False).status == 411
    chunked = {**headers, "Transfer-Encoding": "chunked"}
    chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    answer = call(server.address, "POST", "/hooks/github", body=chunk, headers=chunked, content_length=False)
    assert answer.status == 411
    assert loop.requests == []


def test_a_body_shorter_than_its_length_is_400(server: ServerHandle, loop: LoopDouble) -> None:
    body = push_body(Provider.GITHUB)
    headers = signed_headers(Provider.GITHUB, body)
    with socket.create_connection(server.address, timeout=30) as sock:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"POST /hooks/github HTTP/1.1\r\n{head}Content-Length: {len(body) + 10}\r\n\r\n".encode() + body)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4096).startswith(b"HTTP/1.0 400")
    assert loop.requests == []


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("ref", ["refs/heads/other", "refs/heads/main-2", "refs/tags/main", "main", "refs/heads/"])
def test_a_push_elsewhere_is_acknowledged_and_ignored(
    server: ServerHandle, loop: LoopDouble, provider: Provider, ref: str
) -> None:
    body = push_body(provider, ref=ref)
    answer = call(server.address, "POST", f"/hooks/{provider}", body=body, headers=signed_headers(provider, body))
    assert answer.status == 200
    assert "ignored" in answer.json()
    assert loop.requests == []


def test_github_ping_and_other_events_are_answered_without_a_pass(server: ServerHandle, loop: LoopDouble) -> None:
    ping = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    answer = call(
        server.address, "POST", "/hooks/github", body=ping, headers=signed_headers(Provider.GITHUB, ping, event="ping")
    )
    assert answer.status == 200
    assert answer.json() == {"pong": True}
    issue = json.dumps({"action": "opened"}).encode()
    assert post(server, Provider.GITHUB, issue, signed_headers(Provider.GITHUB, issue, event="issues")) == 200
    assert loop.requests == []


def test_an_unsigned_ping_is_still_401(server: ServerHandle) -> None:
    ping = b'{"zen": "x"}'
    assert post(server, Provider.GITHUB, ping, {"X-GitHub-Event": "ping"}) == 401


def test_github_form_encoded_push(server: ServerHandle, loop: LoopDouble) -> None:
    body = urlencode({"payload": push_body(Provider.GITHUB).decode()}).encode()
    headers = {**signed_headers(Provider.GITHUB, body), "Content-Type": "application/x-www-form-urlencoded"}
    assert post(server, Provider.GITHUB, body, headers) == 202
    assert loop.requests == [(Trigger.WEBHOOK, True)]


def test_a_provider_without_a_secret_is_disabled(loop: LoopDouble) -> None:
    with serve(loop, listen="127.0.0.1:0", api_token=None, webhooks=WebhookSecrets(gitea=b"s")) as handle:
        body = push_body(Provider.GITHUB)
        answer = call(handle.address, "POST", "/hooks/github", body=body, headers=signed_headers(Provider.GITHUB, body))
        assert answer.status == 403
        assert "RECONCILER_WEBHOOK_SECRET_GITHUB" in answer.json()["error"]
    assert loop.requests == []


def test_webhook_secrets_from_the_environment_and_files(tmp_path: pytest.TempPathFactory) -> None:
    secret_file = tmp_path / "gitlab"  # type: ignore[operator]
    secret_file.write_bytes(b"from-file\n")
    secrets = WebhookSecrets.from_env(
        {"RECONCILER_WEBHOOK_SECRET_GITHUB": "gh", "RECONCILER_WEBHOOK_SECRET_GITLAB_FILE": str(secret_file)}
    )
    assert (secrets.github, secrets.gitea, secrets.gitlab) == (b"gh", None, b"from-file")
    assert "gh" not in repr(secrets)
    assert "from-file" not in repr(secrets)


def test_webhooks_only_take_post(server: ServerHandle, loop: LoopDouble) -> None:
    assert call(server.address, "GET", "/hooks/github").status == 405
    assert call(server.address, "POST", "/hooks/bitbucket", body=b"{}").status == 404
    assert loop.requests == []
