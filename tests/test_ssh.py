"""The SSH backend against a real OpenSSH server (tests/support/sshd.py): host keys, commands, errors.

What is asserted is what the server did (files it wrote, the exit codes it returned) and what the
state directory's known_hosts holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from reconciler.backends.ssh import (
    MAX_LINE,
    CommandTimedOut,
    HostKeyChanged,
    SshAuthFailed,
    SshCredentials,
    SshUnreachable,
    connect,
    credentials_from,
)
from reconciler.errors import ConfigError
from reconciler.spec.access import SshTarget
from tests.support.sshd import Sshd, sshd_fixture, write_keypair  # noqa: F401

pytestmark = pytest.mark.sshd


def _connect(sshd: Sshd, **options: object) -> object:
    return connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts, **options)  # type: ignore[arg-type]


def test_the_first_host_key_is_recorded_and_then_required(sshd: Sshd) -> None:
    assert not sshd.known_hosts.exists()
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        assert session.run("true", timeout=30).ok
    host_public = (sshd.directory / "host_ed25519.pub").read_text().split()[:2]
    assert sshd.known_hosts.read_text().split() == [f"[127.0.0.1]:{sshd.port}", *host_public]
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        assert session.run("true", timeout=30).ok
    assert len(sshd.known_hosts.read_text().splitlines()) == 1  # known: not recorded twice


def test_a_changed_host_key_is_refused_and_says_what_to_do(sshd: Sshd) -> None:
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts):
        pass
    recorded = sshd.known_hosts.read_text()
    sshd.restart(new_host_key=True)
    with pytest.raises(HostKeyChanged) as caught:
        connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts)
    assert not caught.value.retryable
    assert str(sshd.known_hosts) in str(caught.value) and f"[127.0.0.1]:{sshd.port}" in str(caught.value)
    assert sshd.known_hosts.read_text() == recorded  # the impostor's key is not trusted


def test_a_damaged_known_hosts_file_is_a_config_error_or_its_bad_lines_are_ignored(sshd: Sshd) -> None:
    sshd.known_hosts.parent.mkdir(parents=True)
    sshd.known_hosts.write_text("garbage\n# a comment\n[10.0.0.9]:22 ssh-ed25519\n")
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        assert session.run("true", timeout=30).ok
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519 " in sshd.known_hosts.read_text()
    sshd.known_hosts.write_bytes(b"\xff\xfe not text\n")
    with pytest.raises(ConfigError, match="known_hosts"):
        connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts)


def test_output_streams_line_by_line_and_the_tail_keeps_the_last_lines(sshd: Sshd, tmp_path: Path) -> None:
    seen: list[str] = []
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        result = session.run(
            f"for i in $(seq 1 30); do echo line $i; done; echo err >&2; touch {tmp_path}/ran; exit 3",
            timeout=30,
            on_line=seen.append,
            tail=5,
        )
    assert seen == [f"line {i}" for i in range(1, 31)] + ["err"]
    assert result.exit_code == 3 and not result.ok
    assert result.tail == ("line 27", "line 28", "line 29", "line 30", "err")
    assert (tmp_path / "ran").exists()


def test_a_secret_the_process_holds_never_leaves_in_the_output(sshd: Sshd) -> None:
    from reconciler import redact

    secret = "s3cret-provisioning-token-4821"
    redact.register(secret)
    seen: list[str] = []
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        result = session.run(f"echo token={secret}; echo {secret} >&2; exit 1", timeout=30, on_line=seen.append)
    assert seen and all(secret not in line for line in seen)
    assert all(secret not in line for line in result.tail)


@pytest.mark.parametrize("offset", [MAX_LINE - 20, MAX_LINE - 5, MAX_LINE + 7, 3 * MAX_LINE + 1])
def test_a_secret_where_a_long_line_is_cut_leaves_no_piece_of_itself(sshd: Sshd, offset: int) -> None:
    from reconciler import redact

    secret = "s3cret-cut-token-90210-qwerty"
    redact.register(secret)
    command = f"head -c {offset} /dev/zero | tr '\\0' x; printf '{secret}'; head -c 20000 /dev/zero | tr '\\0' y; echo"
    seen: list[str] = []
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        result = session.run(command + "; echo end", timeout=30, on_line=seen.append)
    assert result.ok and seen[-1] == "end"
    pieces = {secret[i : i + 4] for i in range(len(secret) - 3)}  # any 4 characters of it in a row
    for line in [*seen, *result.tail]:
        assert not any(piece in line for piece in pieces), line[max(0, offset - 40) : offset + 40]


def test_stdin_and_env_reach_the_command_and_a_hostile_value_stays_a_value(sshd: Sshd, tmp_path: Path) -> None:
    hostile = f"'; touch {tmp_path}/pwned; echo '"
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        result = session.run(
            f'cat > {tmp_path}/in.txt; printf %s "$VALUE" > {tmp_path}/env.txt',
            timeout=30,
            stdin=b"from stdin\n",
            env={"VALUE": hostile},
        )
        with pytest.raises(ValueError, match="not an environment variable name"):
            session.run("true", timeout=30, env={"A;B": "x"})
    assert result.ok
    assert (tmp_path / "in.txt").read_text() == "from stdin\n"
    assert (tmp_path / "env.txt").read_text() == hostile
    assert not (tmp_path / "pwned").exists()


def test_a_command_past_its_timeout_is_closed_with_its_last_lines(sshd: Sshd, tmp_path: Path) -> None:
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        with pytest.raises(CommandTimedOut) as caught:
            session.run(f"echo started; sleep 60; touch {tmp_path}/finished", timeout=1)
        assert caught.value.tail == ("started",) and caught.value.retryable
        assert session.run("true", timeout=30).ok  # the connection is still usable
    assert not (tmp_path / "finished").exists()


def test_a_very_long_line_is_cut(sshd: Sshd) -> None:
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        result = session.run("head -c 100000 /dev/zero | tr '\\0' x; echo; echo end", timeout=30)
    assert result.ok and result.tail[-1] == "end"
    assert all(len(line) <= 8192 for line in result.tail)


def test_a_key_the_guest_does_not_know_is_a_retryable_auth_failure(sshd: Sshd, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    write_keypair(stranger)
    with pytest.raises(SshAuthFailed) as caught:
        connect(sshd.target, credentials=SshCredentials(stranger, use_agent=False), known_hosts=sshd.known_hosts)
    assert caught.value.retryable and "authorized keys" in str(caught.value)


def test_a_port_nobody_listens_on_is_unreachable_and_retryable(sshd: Sshd) -> None:
    sshd.stop()
    with pytest.raises(SshUnreachable) as caught:
        connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts, timeout=5)
    assert caught.value.retryable and "refused" in str(caught.value)


def test_credentials_come_from_the_environment_or_an_agent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RECONCILER_SSH_KEY"):
        credentials_from({})
    assert credentials_from({"SSH_AUTH_SOCK": "/run/agent"}).key_file is None
    encrypted = tmp_path / "encrypted"
    key = ed25519.Ed25519PrivateKey.generate()
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.BestAvailableEncryption(b"passphrase-123"),
        )
    )
    target = SshTarget(host="127.0.0.1", port=9)
    with pytest.raises(ConfigError, match="encrypted") as caught:
        connect(
            target, credentials=credentials_from({"RECONCILER_SSH_KEY": str(encrypted)}), known_hosts=tmp_path / "kh"
        )
    assert "passphrase-123" not in str(caught.value)
    with pytest.raises(ConfigError, match="cannot use the SSH key"):
        connect(
            target,
            credentials=credentials_from({"RECONCILER_SSH_KEY": str(tmp_path / "none")}),
            known_hosts=tmp_path / "kh",
        )
    secret = credentials_from({"RECONCILER_SSH_KEY": str(encrypted), "RECONCILER_SSH_KEY_PASSPHRASE": "pp-secret"})
    assert "pp-secret" not in repr(secret)
