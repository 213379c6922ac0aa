"""`reconciler forget lxc/llm` drops the guest's provisioning records and its recorded host key too.

Against the real journal (SQLite in a state directory) and a real known_hosts file, through the CLI as a
user runs it: the guest's inventory entry, its `provision/llm` step records and the `known_hosts` line of
the SSH target its journaled provisioning change connected to are gone; other guests' are kept.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from reconciler.engine.journal import Journal
from reconciler.engine.provision_apply import KNOWN_HOSTS
from reconciler.planning.plan import Action, Backend, Change
from reconciler.planning.provision_intent import ProvisionIntent

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHqW4d0QSpJgq1k7CwMpIBkJH0kQ0o2oHq0Yl7YbN3yN"


def _provisioned(journal: Journal, run_id: int, name: str, ssh: str, seq: int) -> None:
    change = Change(
        f"provision/{name}",
        Action.CREATE,
        f"Lxc/{name}",
        Backend.SSH,
        before=None,
        after=ProvisionIntent(f"Lxc/{name}", ssh, ()),
    )
    journal.begin_step(
        run_id, seq=seq, phase="apply", address=change.address, action="create", intent=change.to_json(), before=None
    )
    journal.record_owned(f"lxc/{name}", resource=f"Lxc/{name}", backend="proxmox", spec_hash=None, protected=False,
                         run_id=run_id, vmid=900 + seq)  # fmt: skip
    journal.record_provision_step(f"provision/{name}", "docker", step_hash="h1", outcome="ok", run_id=run_id)


def _forget(state: Path, *addresses: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "forget", *addresses, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_forgetting_a_guest_drops_its_provisioning_and_its_host_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = Journal(state / "journal.sqlite")
    run_id = journal.start_run(revision=None, plan={})
    _provisioned(journal, run_id, "llm", "root@10.0.110.5:2222", 1)
    _provisioned(journal, run_id, "infer", "root@10.0.110.6", 2)
    journal.close()
    known_hosts = state / KNOWN_HOSTS
    known_hosts.write_text(f"[10.0.110.5]:2222 {KEY}\n10.0.110.6 {KEY}\n10.0.110.5 {KEY}\n", encoding="ascii")

    forgot = _forget(state, "lxc/llm")

    assert forgot.returncode == 0, forgot.stderr
    assert forgot.stdout.splitlines() == [
        "forgot lxc/llm",
        "forgot provision/llm",
        "forgot the host key of 10.0.110.5:2222 in known_hosts",
    ]
    journal = Journal(state / "journal.sqlite")
    try:
        assert journal.provision_hashes("provision/llm") == {}
        assert journal.provision_hashes("provision/infer") == {"docker": "h1"}
        assert "lxc/llm" not in journal.inventory().owned
    finally:
        journal.close()
    # Port 22 on the same address is another host key (another sshd): kept, as is the other guest's.
    assert known_hosts.read_text(encoding="ascii") == f"10.0.110.6 {KEY}\n10.0.110.5 {KEY}\n"

    again = _forget(state, "lxc/llm")
    assert again.returncode == 1 and "nothing in the inventory" in again.stderr


def test_forgetting_provisioning_alone_and_hostile_addresses(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = Journal(state / "journal.sqlite")
    run_id = journal.start_run(revision=None, plan={})
    _provisioned(journal, run_id, "infer", "root@10.0.110.6", 1)
    journal.close()
    (state / KNOWN_HOSTS).write_text(f"10.0.110.6 {KEY}\n", encoding="ascii")

    hostile = _forget(state, "provision/", "lx", "../../etc", "provision/%' OR 1=1 --", "qemu/")
    assert hostile.returncode == 1 and "Traceback" not in hostile.stderr

    forgot = _forget(state, "provision/infer")
    assert forgot.stdout.splitlines() == ["forgot provision/infer", "forgot the host key of 10.0.110.6 in known_hosts"]
    assert (state / KNOWN_HOSTS).read_text(encoding="ascii") == ""
    journal = Journal(state / "journal.sqlite")
    try:
        assert journal.provision_hashes("provision/infer") == {}
        assert "lxc/infer" in journal.inventory().owned  # only what was named
    finally:
        journal.close()
