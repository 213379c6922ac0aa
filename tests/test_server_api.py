"""The HTTP server over real HTTP: /healthz, /status, /metrics, the bearer-token API and the limits.

A real server on a loopback ephemeral port serves an in-memory LoopControl (tests/support/loopdouble);
requests go through http.client, and every assertion is on what the server answered or on the
loop's state (passes requested, suspended), never on calls.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.errors import ConfigError
from reconciler.loop.events import DriftReport, GpuStatus, Outcome, ResourceStatus, Trigger
from reconciler.server import Limits, ServerHandle, WebhookSecrets, api_token_from_env, serve
from tests.support.http import call
from tests.support.loopdouble import LoopDouble, record

TOKEN = "t0ken-" + "x" * 32
GPUS = (
    GpuStatus("big", "GPU-1111", memory_used=3 * 2**30, memory_total=16 * 2**30, utilization=42.0, temperature=61.0),
    GpuStatus("small", None, memory_used=None, memory_total=8 * 2**30, power=35.5),
)


@pytest.fixture
def loop() -> LoopDouble:
    return LoopDouble(gpus=GPUS)


@pytest.fixture
def server(loop: LoopDouble) -> Iterator[ServerHandle]:
    with serve(loop, listen="127.0.0.1:0", api_token=TOKEN, webhooks=WebhookSecrets()) as handle:
        yield handle


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_healthz_answers_ok_and_503_when_the_loop_does_not(server: ServerHandle, loop: LoopDouble) -> None:
    assert call(server.address, "GET", "/healthz").json()["status"] == "ok"
    loop.fail_status = True
    answer = call(server.address, "GET", "/healthz")
    assert answer.status == 503


def test_status_reports_revisions_result_drift_resources_gpus_and_suspension(
    server: ServerHandle, loop: LoopDouble
) -> None:
    assert call(server.address, "GET", "/status").json()["result"] is None  # before any pass
    drift = (DriftReport("lxc/llm", ("memory",), "correct", corrected=True),)
    loop.finish_pass(record(1, revision="1" * 40))
    loop.finish_pass(
        record(2, outcome=Outcome.ROLLED_BACK, revision="2" * 40, drift=drift, message="health check failed"),
        resources=(ResourceStatus("lxc/llm", "in-sync"), ResourceStatus("container/llm/vllm", "failed", "unhealthy")),
    )
    answer = call(server.address, "GET", "/status")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    status = answer.json()
    assert status["applied_revision"] == "1" * 40
    assert status["attempted_revision"] == "2" * 40
    assert status["result"] == "rolled-back"
    assert status["drift"] == [{"address": "lxc/llm", "fields": ["memory"], "policy": "correct", "corrected": True}]
    assert status["last_pass"]["message"] == "health check failed"
    assert {r["address"]: r["state"] for r in status["resources"]} == {
        "lxc/llm": "in-sync",
        "container/llm/vllm": "failed",
    }
    assert [g["name"] for g in status["gpus"]] == ["big", "small"]
    assert status["gpus"][0]["memory_used"] == 3 * 2**30
    assert status["suspended"] is False
    assert status["source"]["branch"] == "main"


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_passes_and_render_revision_drift_and_gpus(server: ServerHandle, loop: LoopDouble) -> None:
    drift = (
        DriftReport("lxc/llm", ("memory",), "correct", corrected=True),
        DriftReport("lxc/test", ("cores",), "warn", corrected=False),
    )
    loop.finish_pass(record(1, revision="1" * 40, duration=0.3))
    loop.finish_pass(record(2, outcome=Outcome.NO_CHANGES, revision="1" * 40, duration=4.0, drift=drift))
    answer = call(server.address, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = metric_samples(answer.body.decode())

    assert samples[("reconciler_passes_total", (("outcome", "applied"),))] == 1
    assert samples[("reconciler_passes_total", (("outcome", "no-changes"),))] == 1
    assert samples[("reconciler_passes_total", (("outcome", "rolled-back"),))] == 0  # every outcome from 0
    assert samples[("reconciler_pass_duration_seconds_count", ())] == 2
    assert samples[("reconciler_pass_duration_seconds_sum", ())] == pytest.approx(4.3)
    assert samples[("reconciler_pass_duration_seconds_bucket", (("le", "0.5"),))] == 1
    assert samples[("reconciler_drifted_resources", (("corrected", "true"),))] == 1
    assert samples[("reconciler_drifted_resources", (("corrected", "false"),))] == 1
    info = (("applied", "1" * 40), ("attempted", "1" * 40), ("branch", "main"), ("head", "1" * 40))
    assert samples[("reconciler_revision_info", info)] == 1
    assert samples[("reconciler_suspended", ())] == 0

    big = (("gpu", "big"), ("uuid", "GPU-1111"))
    small = (("gpu", "small"), ("uuid", ""))
    assert samples[("reconciler_gpu_memory_used_bytes", big)] == 3 * 2**30
    assert samples[("reconciler_gpu_memory_total_bytes", big)] == 16 * 2**30
    assert samples[("reconciler_gpu_utilization_ratio", big)] == pytest.approx(0.42)
    assert samples[("reconciler_gpu_temperature_celsius", big)] == 61.0
    assert samples[("reconciler_gpu_power_watts", small)] == 35.5
    assert ("reconciler_gpu_memory_used_bytes", small) not in samples  # unknown readings are absent
    assert ("reconciler_gpu_power_watts", big) not in samples


def test_metrics_of_two_servers_are_their_own(loop: LoopDouble) -> None:
    other = LoopDouble(lab="other")
    with (
        serve(loop, listen="127.0.0.1:0", api_token=None, webhooks=WebhookSecrets()) as one,
        serve(other, listen="127.0.0.1:0", api_token=None, webhooks=WebhookSecrets()) as two,
    ):
        loop.finish_pass(record(1))
        first = metric_samples(call(one.address, "GET", "/metrics").body.decode())
        second = metric_samples(call(two.address, "GET", "/metrics").body.decode())
    assert first[("reconciler_passes_total", (("outcome", "applied"),))] == 1
    assert second[("reconciler_passes_total", (("outcome", "applied"),))] == 0


def test_metrics_still_served_when_status_fails(server: ServerHandle, loop: LoopDouble) -> None:
    loop.finish_pass(record(1))
    loop.fail_status = True
    samples = metric_samples(call(server.address, "GET", "/metrics").body.decode())
    assert samples[("reconciler_passes_total", (("outcome", "applied"),))] == 1
    assert ("reconciler_suspended", ()) not in samples


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(TOKEN + "x"),
        bearer(TOKEN[:-1]),
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer \xe9\xe9"},
    ],
    ids=["missing", "wrong", "longer", "shorter", "no-scheme", "basic", "empty", "latin1"],
)
def test_mutating_endpoints_refuse_without_the_right_token(
    server: ServerHandle, loop: LoopDouble, headers: dict[str, str]
) -> None:
    for path in ("/api/v1/reconcile", "/api/v1/suspend", "/api/v1/resume"):
        answer = call(server.address, "POST", path, headers=headers)
        assert answer.status == 401, path
        assert answer.headers["www-authenticate"].startswith("Bearer")
    assert loop.requests == []
    assert loop.status().suspended is False


def test_reconcile_suspend_and_resume_with_the_token(server: ServerHandle, loop: LoopDouble) -> None:
    answer = call(server.address, "POST", "/api/v1/reconcile", headers=bearer(TOKEN))
    assert answer.status == 202
    assert loop.requests == [(Trigger.MANUAL, True)]

    assert call(server.address, "POST", "/api/v1/suspend", headers=bearer(TOKEN)).json() == {"suspended": True}
    assert loop.status().suspended is True
    assert call(server.address, "GET", "/status").json()["suspended"] is True
    assert call(server.address, "POST", "/api/v1/resume", headers={"authorization": f"bearer {TOKEN}"}).status == 200
    assert loop.status().suspended is False


def test_without_a_token_the_mutating_endpoints_are_disabled(loop: LoopDouble) -> None:
    with serve(loop, listen="127.0.0.1:0", api_token=None, webhooks=WebhookSecrets()) as handle:
        answer = call(handle.address, "POST", "/api/v1/reconcile", headers=bearer("anything"))
        assert answer.status == 403
        assert "RECONCILER_API_TOKEN" in answer.json()["error"]
        assert call(handle.address, "GET", "/status").status == 200  # reading still works
    assert loop.requests == []


def test_api_token_comes_from_the_environment_or_a_file(tmp_path: pytest.TempPathFactory) -> None:
    assert api_token_from_env({}) is None
    assert api_token_from_env({"RECONCILER_API_TOKEN": ""}) is None
    assert api_token_from_env({"RECONCILER_API_TOKEN": "abc"}) == "abc"
    secret_file = tmp_path / "token"  # type: ignore[operator]
    secret_file.write_text("from-file\n")
    assert api_token_from_env({"RECONCILER_API_TOKEN_FILE": str(secret_file)}) == "from-file"
    with pytest.raises(ConfigError) as caught:
        api_token_from_env({"RECONCILER_API_TOKEN_FILE": str(tmp_path / "absent")})  # type: ignore[operator]
    assert "RECONCILER_API_TOKEN_FILE" in str(caught.value)


def test_unknown_paths_and_wrong_methods(server: ServerHandle, loop: LoopDouble) -> None:
    assert call(server.address, "GET", "/nope").status == 404
    assert call(server.address, "GET", "/status/../api/v1/reconcile").status == 404
    wrong = call(server.address, "GET", "/api/v1/reconcile", headers=bearer(TOKEN))
    assert wrong.status == 405
    assert wrong.headers["allow"] == "POST"
    assert call(server.address, "DELETE", "/status").status == 405
    assert call(server.address, "GET", "/status?x=1").status == 200
    assert loop.requests == []


def test_a_malformed_request_line_gets_400(server: ServerHandle) -> None:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.0 400")


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_a_slow_client_is_cut_off_while_others_are_served(loop: LoopDouble) -> None:
    limits = Limits(request_deadline=0.5, idle_timeout=30)
    with (
        serve(loop, listen="127.0.0.1:0", api_token=None, webhooks=WebhookSecrets(), limits=limits) as handle,
        socket.create_connection(handle.address, timeout=30) as slow,
    ):
        slow.sendall(b"GET /status HTTP/1.0\r\nX-Slow: ")  # and never finishes its headers
        assert call(handle.address, "GET", "/healthz").status == 200
        assert read_until_closed(slow) == b""  # the server shut it, long before the client's own timeout


def test_connections_beyond_the_cap_get_503_and_slots_come_back(loop: LoopDouble) -> None:
    limits = Limits(max_connections=2, request_deadline=30, idle_timeout=30)
    with serve(loop, listen="127.0.0.1:0", api_token=None, webhooks=WebhookSecrets(), limits=limits) as handle:
        idle = [socket.create_connection(handle.address, timeout=30) for _ in range(2)]
        with socket.create_connection(handle.address, timeout=30) as third:
            assert read_until_closed(third).startswith(b"HTTP/1.0 503")
        for sock in idle:
            sock.close()
        for _ in range(200):  # the idle connections' threads notice the close and free their slots
            try:
                if call(handle.address, "GET", "/healthz").status == 200:
                    break
            except (ConnectionError, OSError):
                pass
            time.sleep(0.05)
        else:
            pytest.fail("the server never served again after the idle connections closed")


@pytest.mark.parametrize("listen", ["localhost:9450", "127.0.0.1", "127.0.0.1:99999", "[::1", ":9450", "1.2.3.4.5:1"])
def test_a_malformed_listen_address_is_a_config_error(loop: LoopDouble, listen: str) -> None:
    with pytest.raises(ConfigError):
        serve(loop, listen=listen, api_token=None, webhooks=WebhookSecrets())


def test_an_address_in_use_is_a_config_error(server: ServerHandle, loop: LoopDouble) -> None:
    host, port = server.address
    with pytest.raises(ConfigError) as caught:
        serve(loop, listen=f"{host}:{port}", api_token=None, webhooks=WebhookSecrets())
    assert str(port) in str(caught.value)


def test_close_is_idempotent_and_frees_the_port(loop: LoopDouble) -> None:
    handle = serve(loop, listen="127.0.0.1:0", api_token=None, webhooks=WebhookSecrets())
    address = handle.address
    handle.close()
    handle.close()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(address, timeout=5):
        pass


def test_no_token_or_secret_reaches_the_log(loop: LoopDouble, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="reconciler")
    secrets = WebhookSecrets(github=b"hook-secret-abc", gitlab=b"gitlab-secret-xyz")
    with serve(loop, listen="127.0.0.1:0", api_token=TOKEN, webhooks=secrets) as handle:
        call(handle.address, "POST", "/api/v1/reconcile", headers=bearer(TOKEN))
        call(handle.address, "POST", "/api/v1/suspend", headers=bearer(TOKEN + "-guess"))
        body = b'{"ref": "refs/heads/main", "object_kind": "push"}'
        call(
            handle.address,
            "POST",
            "/hooks/gitlab",
            body=body,
            headers={"X-Gitlab-Token": "gitlab-secret-xyz", "X-Gitlab-Event": "Push Hook"},
        )
        call(handle.address, "POST", "/hooks/gitlab", body=body, headers={"X-Gitlab-Token": "gitlab-secret-xy"})
        call(handle.address, "POST", "/hooks/github", body=body, headers={"X-Hub-Signature-256": "sha256=00"})
    assert loop.requests == [(Trigger.MANUAL, True), (Trigger.WEBHOOK, True)]
    logged = caplog.text + "".join(repr(getattr(r, "fields", "")) for r in caplog.records)
    assert "http request" in caplog.text
    for secret in (TOKEN, "hook-secret-abc", "gitlab-secret-xy", "sha256=00"):
        assert secret not in logged


def test_an_ipv6_loopback_address_is_served(loop: LoopDouble) -> None:
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    try:
        handle = serve(loop, listen="[::1]:0", api_token=None, webhooks=WebhookSecrets())
    except ConfigError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with handle:
        assert handle.url.startswith("http://[::1]:")
        assert call(handle.address, "GET", "/healthz").status == 200


def test_a_failing_loop_is_a_500_without_details(server: ServerHandle, loop: LoopDouble) -> None:
    loop.fail_status = True
    answer = call(server.address, "GET", "/status")
    assert answer.status == 500
    assert answer.json() == {"error": "internal error; see the daemon's log", "status": 500}
    assert call(server.address, "GET", "/healthz").status == 503
