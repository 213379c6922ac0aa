"""Provisioning steps: hashed and chosen by planning/provision.py, run over SSH by engine/provision.py.

The pure part checks which steps a plan runs. The rest runs steps for real against the test's own
OpenSSH server (tests/support/sshd.py) and asserts on what the steps did (files they wrote, what
the stand-in package tools were asked) and on what the journal recorded. Built-in steps run against
stand-in `apt-get`/`systemctl`/`curl`/... placed first on the session's PATH by sshd's SetEnv; the
`nvidia-userspace` step gets the driver version the fake NVML library reports.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from reconciler.backends.ssh import SshSession, connect, credentials_from
from reconciler.engine.journal import Journal
from reconciler.engine.provision import ProvisionReport, StepStatus, provision_guest
from reconciler.planning.provision import (
    DRIVER_VERSION_INPUT,
    PlannedStep,
    RunReason,
    StepInputMissing,
    plan_provisioning,
    plan_steps,
    steps_to_run,
)
from reconciler.provision import builtin_scripts
from reconciler.spec.access import ProvisionStep
from tests.support.nvml import FakeNvml
from tests.support.sshd import Sshd, sshd_fixture  # noqa: F401
from tests.support.standins import make_standins, recorded

ADDRESS = "lxc/955"


def _steps(*specs: object) -> tuple[ProvisionStep, ...]:
    return tuple(ProvisionStep.model_validate(spec) for spec in specs)


def _plan(
    steps: tuple[ProvisionStep, ...], files: Mapping[str, bytes], observed: Mapping[str, str] | None = None
) -> tuple[PlannedStep, ...]:
    return plan_steps(steps, files=files, builtins=builtin_scripts(), observed=observed or {})


# ---- which steps run (pure) ---------------------------------------------------------------------


def test_a_changed_script_runs_that_step_again_and_only_that_step() -> None:
    steps = _steps({"script": "a.sh"}, {"script": "b.sh"}, "docker")
    first = _plan(steps, {"a.sh": b"echo a\n", "b.sh": b"echo b\n"})
    assert [(s.key, r) for s, r in steps_to_run(first, {})] == [
        ("a.sh", RunReason.NEW),
        ("b.sh", RunReason.NEW),
        ("docker", RunReason.NEW),
    ]
    done = {step.key: step.hash for step in first}
    assert steps_to_run(first, done) == ()
    edited = _plan(steps, {"a.sh": b"echo a\n", "b.sh": b"echo b, edited\n"})
    assert [(s.key, r) for s, r in steps_to_run(edited, done)] == [("b.sh", RunReason.CHANGED)]


def test_a_steps_hash_covers_its_check_and_its_inputs() -> None:
    plain = _plan(_steps({"script": "a.sh"}), {"a.sh": b"x"})[0]
    checked = _plan(_steps({"script": "a.sh", "creates": "/etc/done"}), {"a.sh": b"x"})[0]
    assert plain.hash != checked.hash
    userspace = _steps("nvidia-userspace")
    old = _plan(userspace, {}, {DRIVER_VERSION_INPUT: "570.86.16"})[0]
    new = _plan(userspace, {}, {DRIVER_VERSION_INPUT: "580.105.08"})[0]
    assert old.hash != new.hash and new.inputs == {DRIVER_VERSION_INPUT: "580.105.08"}
    assert [s.key for s, _ in steps_to_run((new,), {old.key: old.hash})] == ["nvidia-userspace"]


def test_nvidia_userspace_without_a_driver_version_cannot_be_planned() -> None:
    with pytest.raises(StepInputMissing, match="NVIDIA_DRIVER_VERSION"):
        _plan(_steps("nvidia-userspace"), {})
    with pytest.raises(StepInputMissing, match="not one"):
        _plan(_steps("nvidia-userspace"), {}, {DRIVER_VERSION_INPUT: "580; reboot"})
    with pytest.raises(StepInputMissing, match="not one"):  # a newline the host reports never reaches a shell
        _plan(_steps("nvidia-userspace"), {}, {DRIVER_VERSION_INPUT: "580.105.08\n"})


def test_a_guests_provisioning_change_lists_due_steps_with_their_reasons_and_no_script_text() -> None:
    from reconciler.spec.models import Lxc

    lxc = Lxc.model_validate(
        {
            "name": "llm", "node": "pve1", "vmid": 955, "template": "local:vztmpl/debian.tar.zst",
            "rootfs": {"storage": "local-lvm", "size": "8GiB"}, "docker": {"endpoint": "ssh://root@llm.lan"},
            "provision": ["docker", {"script": "gpu.sh"}],
        }
    )  # fmt: skip
    files = {"gpu.sh": b"echo secret-looking-script-text\n"}
    options = {"files": files, "builtins": builtin_scripts(), "observed": {}}
    change = plan_provisioning(lxc, recorded={}, **options)  # type: ignore[arg-type]
    assert change is not None and str(change.target) == "root@llm.lan:22"
    described = change.describe()
    assert [s["step"] for s in described["steps"]] == ["docker", "gpu.sh"]  # type: ignore[index, union-attr]
    assert "secret-looking-script-text" not in repr(described)
    done = {step.key: step.hash for step, _ in change.due}
    assert plan_provisioning(lxc, recorded=done, **options) is None  # type: ignore[arg-type]


# ---- against a real sshd ------------------------------------------------------------------------


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / "state" / "journal.sqlite")
    yield opened
    opened.close()


def _session(sshd: Sshd) -> SshSession:
    return connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts)


def _apply(
    sshd: Sshd, journal: Journal, planned: tuple[PlannedStep, ...], lines: list[tuple[str, str]] | None = None
) -> ProvisionReport:
    """What the applier does: run the steps the journal says are due."""
    due = [step for step, _ in steps_to_run(planned, journal.provision_hashes(ADDRESS))]
    with _session(sshd) as session:
        return provision_guest(
            ADDRESS,
            due,
            session=session,
            journal=journal,
            on_line=(lambda key, line: lines.append((key, line))) if lines is not None else None,
        )


def _script(log: Path, name: str, extra: str = "") -> bytes:
    return f"#!/bin/sh\nset -e\necho running {name}\necho {name} >> {log}\n{extra}".encode()


@pytest.mark.sshd
def test_script_steps_run_for_real_in_order_and_a_second_apply_runs_nothing(
    sshd: Sshd, journal: Journal, tmp_path: Path
) -> None:
    log = tmp_path / "ran.log"
    files = {"a.sh": _script(log, "a"), "b.sh": b"echo b >> " + str(log).encode() + b"\necho input=$RECONCILER_STEP\n"}
    planned = _plan(_steps({"script": "a.sh"}, {"script": "b.sh"}), files)
    lines: list[tuple[str, str]] = []
    report = _apply(sshd, journal, planned, lines)
    assert report.ok and [r.status for r in report.results] == [StepStatus.OK, StepStatus.OK]
    assert log.read_text() == "a\nb\n"
    assert lines == [("a.sh", "running a"), ("b.sh", "input=b.sh")]
    assert journal.provision_hashes(ADDRESS) == {s.key: s.hash for s in planned}
    again = _apply(sshd, journal, planned)
    assert again.results == () and log.read_text() == "a\nb\n"


@pytest.mark.sshd
def test_a_changed_script_runs_again_alone_against_the_guest(sshd: Sshd, journal: Journal, tmp_path: Path) -> None:
    log = tmp_path / "ran.log"
    steps = _steps({"script": "a.sh"}, {"script": "b.sh"})
    _apply(sshd, journal, _plan(steps, {"a.sh": _script(log, "a"), "b.sh": _script(log, "b")}))
    edited = _plan(steps, {"a.sh": _script(log, "a"), "b.sh": _script(log, "b2")})
    report = _apply(sshd, journal, edited)
    assert [r.key for r in report.results] == ["b.sh"]
    assert log.read_text() == "a\nb\nb2\n"


@pytest.mark.sshd
def test_creates_and_unless_skip_a_step_and_its_hash_is_kept(sshd: Sshd, journal: Journal, tmp_path: Path) -> None:
    log, marker = tmp_path / "ran.log", tmp_path / "marker"
    marker.write_text("")
    steps = _steps(
        {"script": "a.sh", "creates": str(marker)},
        {"script": "b.sh", "unless": f"grep -q ready {marker} || test -d {tmp_path}"},
        {"script": "c.sh", "creates": str(tmp_path / "absent")},
    )
    files = {name: _script(log, name) for name in ("a.sh", "b.sh", "c.sh")}
    report = _apply(sshd, journal, _plan(steps, files))
    assert [(r.key, r.status) for r in report.results] == [
        ("a.sh", StepStatus.SKIPPED),
        ("b.sh", StepStatus.SKIPPED),
        ("c.sh", StepStatus.OK),
    ]
    assert report.results[0].reason == f"{marker} exists"
    assert log.read_text() == "c.sh\n"
    assert set(journal.provision_hashes(ADDRESS)) == {"a.sh", "b.sh", "c.sh"}


@pytest.mark.sshd
def test_a_failing_step_stops_the_run_with_its_exit_code_and_last_lines(
    sshd: Sshd, journal: Journal, tmp_path: Path
) -> None:
    log = tmp_path / "ran.log"
    failing = _script(
        log, "bad", "for i in 1 2 3; do echo progress $i; done\necho 'E: Unable to locate package nope' >&2\nexit 100\n"
    )
    files = {"ok.sh": _script(log, "ok"), "bad.sh": failing, "after.sh": _script(log, "after")}
    planned = _plan(_steps({"script": "ok.sh"}, {"script": "bad.sh"}, {"script": "after.sh"}), files)
    report = _apply(sshd, journal, planned)
    failed = report.failed
    assert failed is not None and failed.key == "bad.sh" and failed.exit_code == 100
    assert failed.tail[-2:] == ("progress 3", "E: Unable to locate package nope")
    assert log.read_text() == "ok\nbad\n"  # after.sh never ran
    assert set(journal.provision_hashes(ADDRESS)) == {"ok.sh"}  # the failed step is not done
    # The next apply runs the failed step (and what follows it), not the one that succeeded.
    assert [s.key for s, _ in steps_to_run(planned, journal.provision_hashes(ADDRESS))] == ["bad.sh", "after.sh"]


@pytest.mark.sshd
def test_a_step_past_its_timeout_fails_and_is_stopped(sshd: Sshd, journal: Journal, tmp_path: Path) -> None:
    marker = f"sleep 59.{os.getpid()}{time.monotonic_ns() % 100000}"  # a command line no other process has
    files = {"slow.sh": f"echo starting\n{marker}\ntouch {tmp_path}/finished\n".encode()}
    report = _apply(sshd, journal, _plan(_steps({"script": "slow.sh", "timeout": "1s"}), files))
    failed = report.failed
    assert failed is not None and failed.reason == "timed out after 1s" and failed.exit_code == 124
    assert failed.tail == ("starting",)
    assert journal.provision_hashes(ADDRESS) == {}
    # The guest's timeout killed the step: nothing of it runs on, and it never finished.
    running = subprocess.run(["pgrep", "-f", marker], capture_output=True, check=False)
    assert running.returncode == 1, running.stdout
    assert not (tmp_path / "finished").exists()


@pytest.mark.sshd
def test_a_check_that_hangs_fails_its_step(sshd: Sshd, journal: Journal, tmp_path: Path) -> None:
    log = tmp_path / "ran.log"
    planned = _plan(
        _steps({"script": "a.sh", "unless": "echo checking; sleep 30", "timeout": "1s"}), {"a.sh": _script(log, "a")}
    )
    report = _apply(sshd, journal, planned)
    assert report.failed is not None and report.failed.reason == "its check timed out"
    assert report.failed.tail == ("checking",)
    assert not log.exists()


@pytest.mark.sshd
def test_forgetting_a_guest_runs_every_step_again(sshd: Sshd, journal: Journal, tmp_path: Path) -> None:
    log = tmp_path / "ran.log"
    planned = _plan(_steps({"script": "a.sh"}), {"a.sh": _script(log, "a")})
    _apply(sshd, journal, planned)
    journal.forget_provisioning(ADDRESS)
    _apply(sshd, journal, planned)
    assert log.read_text() == "a\na\n"


# ---- built-in steps against stand-in package tools -----------------------------------------------


@pytest.fixture
def standin_sshd(sshd: Sshd, tmp_path: Path) -> tuple[Sshd, Path]:
    """The sshd, restarted so that every session finds the stand-ins first on PATH."""
    log = tmp_path / "standins.log"
    folder = make_standins(tmp_path / "standins")
    sshd.set_env = {
        "PATH": f"{folder}:/usr/local/bin:/usr/bin:/bin",
        "STANDIN_LOG": str(log),
        "RECONCILER_GUEST_ROOT": str(tmp_path / "guest-root"),
    }
    sshd.restart()
    return sshd, log


@pytest.mark.sshd
def test_the_docker_step_installs_the_distributions_engine_and_starts_it(
    standin_sshd: tuple[Sshd, Path], journal: Journal
) -> None:
    sshd, log = standin_sshd
    report = _apply(sshd, journal, _plan(_steps("docker"), {}))
    assert report.ok, report
    assert recorded(log) == [
        "apt-get update -q",
        "apt-get install -y -q --no-install-recommends docker.io",
        "systemctl enable --now docker",
    ]


@pytest.mark.sshd
def test_the_container_toolkit_step_adds_nvidias_repository_and_configures_docker(
    standin_sshd: tuple[Sshd, Path], journal: Journal, tmp_path: Path
) -> None:
    sshd, log = standin_sshd
    report = _apply(sshd, journal, _plan(_steps("nvidia-container-toolkit"), {}))
    assert report.ok, report
    calls = recorded(log)
    assert "apt-get install -y -q nvidia-container-toolkit" in calls
    assert calls[-2:] == ["nvidia-ctk runtime configure --runtime=docker", "systemctl restart docker"]
    sources = tmp_path / "guest-root" / "etc/apt/sources.list.d/nvidia-container-toolkit.list"
    assert "signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg" in sources.read_text()


@pytest.mark.sshd
@pytest.mark.nvml
def test_nvidia_userspace_installs_exactly_the_hosts_driver_version_without_the_kernel_module(
    standin_sshd: tuple[Sshd, Path], journal: Journal, fake_nvml: FakeNvml
) -> None:
    sshd, log = standin_sshd
    fake_nvml.set(driver_version="575.64.05")
    version = fake_nvml.backend().observe().driver_version
    assert version == "575.64.05"
    planned = _plan(_steps("nvidia-userspace"), {}, {DRIVER_VERSION_INPUT: version})
    report = _apply(sshd, journal, planned)
    assert report.ok, report
    calls = recorded(log)
    assert any(c.startswith("curl ") and c.endswith("/575.64.05/NVIDIA-Linux-x86_64-575.64.05.run") for c in calls)
    assert (
        calls[-1] == "installer NVIDIA-Linux-x86_64-575.64.05.run --no-kernel-module --silent --no-questions --ui=none"
    )
    # The host's driver moves on: the step is due again, with the new version.
    fake_nvml.set(driver_version="580.105.08")
    newer = _plan(
        _steps("nvidia-userspace"), {}, {DRIVER_VERSION_INPUT: fake_nvml.backend().observe().driver_version or ""}
    )
    assert [s.inputs[DRIVER_VERSION_INPUT] for s, _ in steps_to_run(newer, journal.provision_hashes(ADDRESS))] == [
        "580.105.08"
    ]
