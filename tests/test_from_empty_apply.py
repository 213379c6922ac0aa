"""From empty, in one apply: a guest created with its keys and password, provisioned over SSH, then its containers.

The lab is the in-memory Proxmox and Docker (reconciler/fakes); the guest's SSH is the test's own OpenSSH
server (tests/support/sshd.py), whose sessions find stand-in package tools first on PATH
(tests/support/standins.py). Assertions are on what the lab, the stand-ins' log, the files the steps
wrote and the journal then hold: the plan shows each step and why it runs, the second apply runs
nothing, an edited script runs that step alone, and a failing step rolls back the guest it was for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.engine.journal import RunResult
from reconciler.engine.run import ApplyOptions, apply_pass
from reconciler.planning.plan import Action, Backend, Plan
from reconciler.spec.state import DesiredState
from tests.support.labs import Harness, load, write_tree
from tests.support.sshd import Sshd, sshd_fixture  # noqa: F401
from tests.support.standins import make_standins, recorded

PASSWORD = "pw-7c1e-never-shown"


def _spec(sshd: Sshd, script: str, extra: str = "") -> str:
    return f"""{extra}\
kind: Lxc
name: llm
node: pve1
vmid: 955
template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
memory: 4GiB
rootfs: {{storage: local-lvm, size: 8GiB}}
ssh_keys: [{{file: keys/admin.pub}}]
password_env: LLM_ROOT_PASSWORD
ssh: "{sshd.user}@127.0.0.1:{sshd.port}"
docker: {{endpoint: "ssh://root@llm.lan"}}
provision:
  - docker
  - {{script: provision/{script}}}
---
kind: Container
name: router
host: llm
image: ghcr.io/example/router:1
"""


class Lab:
    """A memory lab whose guest `llm` answers SSH at the test's sshd."""

    def __init__(self, tmp: Path, sshd: Sshd) -> None:
        self.folder = tmp / "spec"
        self.sshd = sshd
        self.ran = tmp / "ran.log"
        self.standin_log = tmp / "standins.log"
        make_standins(tmp / "bin")
        sshd.set_env.update(PATH=f"{tmp / 'bin'}:/usr/bin:/bin", STANDIN_LOG=str(self.standin_log))
        sshd.restart()
        # The script prints the guest's root password (a mistake a person makes): it is scrubbed everywhere.
        self.write("setup.sh", f"#!/bin/sh\nset -e\necho setting up {PASSWORD}\necho setup-1 >> {self.ran}\n")
        self.lines: list[tuple[str, str, str]] = []
        self.harness = Harness(tmp, self.load())
        self.env = {**sshd.env, "LLM_ROOT_PASSWORD": PASSWORD}

    def write(self, script_name: str, body: str, *, extra: str = "") -> None:
        write_tree(self.folder, _spec(self.sshd, script_name, extra))
        (self.folder / "keys").mkdir(exist_ok=True)
        (self.folder / "keys" / "admin.pub").write_text(self.sshd.client_key.with_suffix(".pub").read_text())
        (self.folder / "provision").mkdir(exist_ok=True)
        (self.folder / "provision" / script_name).write_text(body)

    def load(self) -> DesiredState:
        return load(self.folder)

    def apply(self) -> tuple[Plan, object]:
        desired = self.load()
        return apply_pass(
            desired,
            self.harness.lab.readers,
            proxmox=self.harness.lab.proxmox,
            docker=self.harness.lab.docker,
            journal=self.harness.journal,
            env=self.env,
            docker_endpoints={"llm": "unix:///memory.sock"},
            options=ApplyOptions(
                **{**self.harness.options.__dict__, "on_output": lambda *line: self.lines.append(line)}
            ),
        )


@pytest.fixture
def lab(tmp_path: Path, sshd: Sshd) -> Lab:
    return Lab(tmp_path, sshd)


@pytest.mark.sshd
def test_from_empty_in_one_apply_then_nothing_then_only_the_edited_step(lab: Lab) -> None:
    plan, report = lab.apply()

    assert [(c.address, c.action) for c in plan.changes] == [
        ("lxc/llm", Action.CREATE),
        ("provision/llm", Action.CREATE),
        ("container/llm/router", Action.CREATE),
    ]
    provision = plan.changes[1]
    assert provision.backend is Backend.SSH and provision.depends_on == ("lxc/llm",)
    assert [(s.step, s.reason) for s in provision.after.steps] == [("docker", "new"), ("setup.sh", "new")]
    assert "docker (builtin:docker): new" in provision.reason
    assert report is not None and report.result is RunResult.APPLIED, report.failure  # type: ignore[attr-defined]

    proxmox = lab.harness.lab.proxmox
    assert proxmox.guests[955].status == "running"
    assert proxmox.authorized_keys[955].strip() == lab.sshd.client_key.with_suffix(".pub").read_text().strip()
    assert "apt-get install -y -q --no-install-recommends docker.io" in recorded(lab.standin_log)
    assert "systemctl enable --now docker" in recorded(lab.standin_log)
    assert lab.ran.read_text() == "setup-1\n"
    assert lab.harness.lab.docker.containers["llm"]["router"].status == "running"
    journal = lab.harness.journal
    assert set(journal.provision_hashes("provision/llm")) == {"docker", "setup.sh"}
    run = journal.run(report.run_id)  # type: ignore[attr-defined]
    assert run is not None and PASSWORD not in json.dumps(run.plan)
    assert PASSWORD not in repr(proxmox.guests[955].config)
    # Output streamed as it came, scrubbed; the journal keeps each step's last lines, scrubbed too.
    shown = [line for address, step, line in lab.lines if (address, step) == ("provision/llm", "setup.sh")]
    assert shown and shown[0].startswith("setting up ") and PASSWORD not in " ".join(shown)
    rows = [tuple(row) for row in journal._rows("SELECT step, tail FROM provision_steps")]
    assert any(step == "setup.sh" and "setting up" in tail for step, tail in rows) and PASSWORD not in repr(rows)
    assert "password" not in proxmox.guests[955].config["rootfs"]

    again, nothing = lab.apply()
    assert again.empty and nothing is None
    assert lab.ran.read_text() == "setup-1\n"

    calls = len(recorded(lab.standin_log))
    lab.write("setup.sh", f"#!/bin/sh\nset -e\necho setup-2 >> {lab.ran}\n")
    edited, report = lab.apply()
    assert [(c.address, c.action) for c in edited.changes] == [("provision/llm", Action.UPDATE)]
    assert [(s.step, s.reason) for s in edited.changes[0].after.steps] == [("setup.sh", "changed")]
    assert report is not None and report.result is RunResult.APPLIED  # type: ignore[attr-defined]
    assert lab.ran.read_text() == "setup-1\nsetup-2\n"
    assert len(recorded(lab.standin_log)) == calls  # the docker step did not run again


@pytest.mark.sshd
def test_a_failing_step_destroys_the_guest_this_apply_created_and_reports_its_last_lines(lab: Lab) -> None:
    lab.write("setup.sh", "#!/bin/sh\necho fetching\necho 'E: Unable to locate package nope' >&2\nexit 100\n")

    _plan, report = lab.apply()

    assert report is not None and report.result is RunResult.ROLLED_BACK  # type: ignore[attr-defined]
    failure = report.failure or ""  # type: ignore[attr-defined]
    assert "setup.sh" in failure and "exit 100" in failure and "E: Unable to locate package nope" in failure
    assert 955 not in lab.harness.lab.proxmox.guests  # the guest it created is destroyed again
    assert lab.harness.journal.provision_hashes("provision/llm") == {}
    assert lab.harness.lab.docker.containers.get("llm", {}) == {}


@pytest.mark.sshd
def test_an_unset_password_variable_fails_before_the_guest_exists(lab: Lab) -> None:
    del lab.env["LLM_ROOT_PASSWORD"]
    _plan, report = lab.apply()
    assert report is not None and report.result is RunResult.ROLLED_BACK  # type: ignore[attr-defined]
    assert "LLM_ROOT_PASSWORD is not set" in (report.failure or "")  # type: ignore[attr-defined]
    assert 955 not in lab.harness.lab.proxmox.guests


def test_a_guest_kept_stopped_is_not_provisioned_until_it_runs(tmp_path: Path) -> None:
    spec = """\
kind: Lxc
name: llm
node: pve1
vmid: 955
template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
rootfs: {storage: local-lvm, size: 8GiB}
state: stopped
docker: {endpoint: "ssh://root@llm.lan"}
provision: [docker]
"""
    desired = load(write_tree(tmp_path / "spec", spec))
    harness = Harness(tmp_path, desired)
    stopped = harness.plan(desired)
    assert [c.address for c in stopped.changes] == ["lxc/llm"] and not stopped.warnings
    running = load(write_tree(tmp_path / "spec", spec.replace("state: stopped\n", "")))
    assert [c.address for c in harness.plan(running).changes] == ["lxc/llm", "provision/llm"]


@pytest.mark.sshd
def test_a_recreated_guest_runs_every_step_again_and_its_new_host_key_is_trusted(lab: Lab) -> None:
    _plan, report = lab.apply()
    assert report is not None and report.result is RunResult.APPLIED  # type: ignore[attr-defined]
    known_hosts = lab.harness.journal.path.parent / "known_hosts"
    first_key = known_hosts.read_text()
    assert f"[127.0.0.1]:{lab.sshd.port} ssh-ed25519 " in first_key

    del lab.harness.lab.proxmox.guests[955]  # the guest is gone (destroyed by hand), and made again below
    lab.sshd.restart(new_host_key=True)  # a new guest has a new host key
    plan, report = lab.apply()

    assert [c.address for c in plan.changes][:2] == ["lxc/llm", "provision/llm"]
    assert plan.changes[1].after.fresh is True  # type: ignore[union-attr]
    assert [s.reason for s in plan.changes[1].after.steps] == ["new", "new"]  # type: ignore[union-attr]
    assert report is not None and report.result is RunResult.APPLIED, report.failure  # type: ignore[attr-defined]
    assert lab.ran.read_text() == "setup-1\nsetup-1\n"
    lines = known_hosts.read_text().splitlines()
    assert len(lines) == 1 and lines[0] + "\n" != first_key  # the old line dropped, the new key recorded


@pytest.mark.sshd
def test_a_replaced_guest_is_provisioned_after_it_is_made_again(lab: Lab) -> None:
    _plan, report = lab.apply()
    assert report is not None and report.result is RunResult.APPLIED  # type: ignore[attr-defined]
    body = (lab.folder / "provision" / "setup.sh").read_text()
    lab.write("setup.sh", body, extra="")
    spec = (lab.folder / "spec.yaml").read_text().replace("memory: 4GiB\n", "memory: 4GiB\nunprivileged: false\n")
    (lab.folder / "spec.yaml").write_text(spec)

    plan, report = lab.apply()

    assert [(c.address, c.action) for c in plan.changes][:2] == [
        ("lxc/llm", Action.REPLACE),
        ("provision/llm", Action.CREATE),
    ]
    assert report is not None and report.result is RunResult.APPLIED, report.failure  # type: ignore[attr-defined]
    ran = [s.address for s in report.steps if s.phase == "apply"]  # type: ignore[attr-defined]
    assert ran.index("provision/llm") > ran.index("lxc/llm")  # the replace runs last, then its provisioning
    assert lab.ran.read_text() == "setup-1\nsetup-1\n"
