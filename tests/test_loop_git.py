"""The reconcile loop against real git repositories and the in-memory lab (the demo's): what each pass applies.

Repositories are real (git in tmp_path): a local one, watched for commits, and a bare one used as a
remote through a file:// URL. The lab is the in-memory Proxmox and Docker seeded from specs/ (the loop
against fakepve and a real Docker engine is in test_loop_real.py). Assertions are on what the lab, the
journal and git (notes) hold after each pass.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reconciler.engine.apply import HealthPolicy
from reconciler.engine.journal import Journal
from reconciler.engine.run import ApplyOptions
from reconciler.errors import ConfigError, PermanentError, TemporaryError
from reconciler.fakes.lab import MemoryLab, memory_lab
from reconciler.loop.backoff import Backoff
from reconciler.loop.controller import Controller
from reconciler.loop.events import Outcome, PassRecord, SourceInfo, Trigger
from reconciler.loop.passes import LoopOptions, PassRunner
from reconciler.sources.git import GitSource
from reconciler.sources.watch import RefWatcher
from reconciler.spec.validate import load_and_validate
from tests.support.components import missing
from tests.support.gitrepo import GitRepo, make_repo

pytestmark = pytest.mark.git

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
LLM = 955  # the demo lab's LLM container (specs/guests.yaml)


@dataclass
class Loop:
    """A controller over a git source and the in-memory lab, with every PassRecord it produced."""

    controller: Controller
    runner: PassRunner
    lab: MemoryLab
    journal: Journal
    source: GitSource
    records: list[PassRecord] = field(default_factory=list)

    def once(self, trigger: Trigger = Trigger.MANUAL) -> PassRecord:
        record = self.controller.run_once(trigger)
        assert record is not None
        return record

    def wait_for(self, predicate: Callable[[PassRecord], bool], *, deadline: float = 30.0) -> PassRecord:
        """The first pass (from now on) that satisfies `predicate`; fails after `deadline` seconds."""
        start = len(self.records)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            for record in self.records[start:]:
                if predicate(record):
                    return record
            time.sleep(0.02)
        raise AssertionError(f"no such pass within {deadline}s; passes: {self.records[start:]}")


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Callable[..., Loop]]:
    made: list[Loop] = []

    def make(repository: str, *, branch: str = "main", interval: float = 3600.0, **options: object) -> Loop:
        desired = load_and_validate(SPECS).state
        lab = memory_lab(desired, work_dir=tmp_path / f"lab-{len(made)}")
        state = tmp_path / f"state-{len(made)}"
        journal = Journal(state / "journal.sqlite")
        source = GitSource(repository, branch=branch, path="specs", cache=state)
        apply = ApplyOptions(
            health=HealthPolicy(max_timeout=1.0, interval=0.02), prober=lab.probe, ssh_connect=lab.ssh_connect
        )
        runner = PassRunner(source, lab.connector(), journal, LoopOptions(interval=interval, apply=apply, **options))  # type: ignore[arg-type]
        runner.restore()
        controller = Controller(
            runner,
            source=SourceInfo(source.shown, branch, "specs"),
            interval=interval,
            suspend_file=state / "suspended",
        )
        loop = Loop(controller, runner, lab, journal, source)
        controller.subscribe(loop.records.append)
        made.append(loop)
        return loop

    yield make
    for loop in made:
        loop.journal.close()


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return make_repo(tmp_path / "lab", SPECS)


def llm_memory(lab: MemoryLab) -> str:
    return str(lab.proxmox.guests[LLM].config["memory"])


# ---- a commit, and exactly that commit ---------------------------------------------------------------------


def test_a_commit_is_applied_exactly_and_noted_in_git(repo: GitRepo, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(str(repo.path))
    first = repo.head()
    record = loop.once(Trigger.START)
    assert (record.outcome, record.revision, record.reconciled_revision) == (Outcome.APPLIED, first, first)
    assert "create lxc/llm" in record.changes
    # A later commit in the working copy that is not committed is not applied: specs come from the tree.
    repo.edit("guests.yaml", "memory: 32GiB", "memory: 30GiB")
    assert loop.once().outcome is Outcome.NO_CHANGES
    assert llm_memory(loop.lab) == str(32 * 1024)
    second = repo.commit("llm: 30 GiB")
    record = loop.once(Trigger.COMMIT)
    assert (record.outcome, record.revision, record.changes) == (Outcome.APPLIED, second, ("update lxc/llm",))
    assert llm_memory(loop.lab) == str(30 * 1024)
    last = loop.journal.last_run(applied=True)
    assert last is not None and last.revision == second
    notes = repo.git("log", "--notes=reconciler", "--format=%H %N")
    assert f"{second} reconciler: applied" in notes
    assert f"{first} reconciler: applied" in notes
    assert loop.controller.status().applied_revision == second


def test_a_commit_starts_a_pass_through_the_ref_watcher(repo: GitRepo, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(str(repo.path))
    watcher = RefWatcher(loop.source.git_dir(), lambda: loop.controller.request_pass(Trigger.COMMIT))
    thread = threading.Thread(target=loop.controller.serve)
    thread.start()
    try:
        loop.wait_for(lambda r: r.trigger is Trigger.START)
        repo.edit("workloads.yaml", "max_num_seqs: 32", "max_num_seqs: 16")
        sha = repo.commit("qwen: 16 sequences")
        record = loop.wait_for(lambda r: r.revision == sha)
        assert (record.trigger, record.outcome) == (Trigger.COMMIT, Outcome.APPLIED)
        assert record.changes == ("replace container/llm/qwen-7b",)
        # Writing the note moves refs/notes, which the watcher ignores: no pass follows by itself.
        passes = len(loop.records)
        time.sleep(0.5)
        assert len(loop.records) == passes
    finally:
        loop.controller.stop()
        thread.join(10)
        watcher.close()
    assert not thread.is_alive()


def test_triggers_during_a_pass_coalesce_into_one_next_pass(repo: GitRepo, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(str(repo.path))
    gate, entered = threading.Event(), threading.Event()

    def slow(record: PassRecord) -> None:  # listeners run on the loop's thread, inside its turn
        if record.number == 1:
            entered.set()
            gate.wait(10)

    loop.controller.subscribe(slow)
    thread = threading.Thread(target=loop.controller.serve)
    thread.start()
    try:
        assert entered.wait(10)
        for trigger in (Trigger.WEBHOOK, Trigger.MANUAL, Trigger.COMMIT, Trigger.MANUAL):
            loop.controller.request_pass(trigger)
        gate.set()
        second = loop.wait_for(lambda r: r.number == 2)
        assert second.trigger is Trigger.COMMIT  # the most telling of the four
        time.sleep(0.3)
        assert len(loop.records) == 2
    finally:
        loop.controller.stop()
        thread.join(10)


# ---- a remote: a bare repository through file:// --------------------------------------------------------------


def test_a_remote_is_mirrored_fetched_and_follows_a_force_push(
    repo: GitRepo, tmp_path: Path, make_loop: Callable[..., Loop]
) -> None:
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    repo.git("remote", "add", "origin", bare.as_uri())
    repo.git("push", "-q", "origin", "main")
    loop = make_loop(bare.as_uri())
    base = repo.head()
    assert loop.once(Trigger.START).revision == base

    repo.edit("guests.yaml", "memory: 32GiB", "memory: 28GiB")
    pushed = repo.commit("llm: 28 GiB")
    repo.git("push", "-q", "origin", "main")
    record = loop.once(Trigger.WEBHOOK)
    assert (record.revision, record.outcome) == (pushed, Outcome.APPLIED)
    assert llm_memory(loop.lab) == str(28 * 1024)

    # Someone rewrites the branch: the pushed commit is gone, another takes its place.
    repo.git("reset", "-q", "--hard", base)
    repo.edit("guests.yaml", "memory: 32GiB", "memory: 24GiB")
    rewritten = repo.commit("llm: 24 GiB instead")
    repo.git("push", "-q", "--force", "origin", "main")
    record = loop.once(Trigger.WEBHOOK)
    assert (record.revision, record.outcome) == (rewritten, Outcome.APPLIED)
    assert llm_memory(loop.lab) == str(24 * 1024)
    mirror = loop.source.location()
    assert mirror.is_relative_to(tmp_path) and (mirror / "HEAD").exists()
    # Notes are for local repositories; a mirror is never written to.
    assert (
        subprocess.run(
            ["git", "-C", str(bare), "notes", "--ref=reconciler", "list"], check=False, capture_output=True, text=True
        ).stdout
        == ""
    )


def test_an_unreachable_remote_is_a_temporary_error_and_backs_off(
    tmp_path: Path, make_loop: Callable[..., Loop]
) -> None:
    loop = make_loop((tmp_path / "nowhere.git").as_uri())
    record = loop.once(Trigger.START)
    assert record.outcome is Outcome.ERROR
    assert "cannot fetch" in record.message
    assert loop.runner.last_error is not None and loop.runner.last_error.retryable
    assert loop.controller.backoff.attempts == 1
    # The next pass is the backoff's retry (about a second), not the interval's (an hour).
    assert 0.5 <= loop.controller.status().extra["next_pass_in"] <= 1.25
    loop.once(Trigger.MANUAL)
    assert 1.0 <= loop.controller.status().extra["next_pass_in"] <= 2.5


# ---- invalid, failed, unsigned -------------------------------------------------------------------------------


def test_an_invalid_commit_is_reported_and_the_last_good_one_stays_in_force(
    repo: GitRepo, make_loop: Callable[..., Loop]
) -> None:
    loop = make_loop(str(repo.path))
    good = repo.head()
    loop.once(Trigger.START)
    repo.edit("guests.yaml", "memory: 32GiB", "memory: lots")
    bad = repo.commit("llm: lots of memory")
    record = loop.once(Trigger.COMMIT)
    assert (record.outcome, record.revision) == (Outcome.INVALID, bad)
    assert record.diagnostics and record.diagnostics[0].startswith("specs/guests.yaml:9:")
    assert "memory" in record.diagnostics[0]
    assert "reconciler: invalid" in repo.git("notes", "--ref=reconciler", "show", bad)
    assert llm_memory(loop.lab) == str(32 * 1024)
    status = loop.controller.status()
    assert (status.head_revision, status.applied_revision) == (bad, good)

    # Drift is still corrected, against the last good revision.
    loop.lab.proxmox.guests[LLM].config["memory"] = "1024"
    record = loop.once(Trigger.INTERVAL)
    assert (record.outcome, record.revision, record.reconciled_revision) == (Outcome.APPLIED, bad, good)
    assert [(d.address, d.fields, d.corrected) for d in record.drift] == [("lxc/llm", ("memory",), True)]
    assert f"revision {bad[:12]} is invalid" in record.message
    assert llm_memory(loop.lab) == str(32 * 1024)

    # A fix is applied as soon as it is committed.
    repo.edit("guests.yaml", "memory: lots", "memory: 16GiB")
    fixed = repo.commit("llm: 16 GiB")
    record = loop.once(Trigger.COMMIT)
    assert (record.outcome, record.revision) == (Outcome.APPLIED, fixed)
    assert llm_memory(loop.lab) == str(16 * 1024)


def test_a_restarted_loop_holds_the_lab_to_the_last_applied_revision(
    repo: GitRepo, make_loop: Callable[..., Loop], tmp_path: Path
) -> None:
    loop = make_loop(str(repo.path))
    good = repo.head()
    loop.once(Trigger.START)
    repo.write("broken.yaml", "kind: Gpu\nname: [unclosed\n")
    repo.commit("broken")
    # The journal remembers what was applied: a new process (a new runner on the same journal) restores it.
    runner = PassRunner(loop.source, loop.lab.connector(), loop.journal, loop.runner.options)
    runner.restore()
    assert runner.last_good is not None and runner.last_good.revision == good


def test_a_rolled_back_revision_waits_for_a_new_commit(repo: GitRepo, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(str(repo.path))
    good = repo.head()
    loop.once(Trigger.START)
    # The new port is published, but the probe asks another one: the health check fails.
    repo.edit("workloads.yaml", "port: 8000", "port: 8001\nprobe: {tcp: '127.0.0.1:9', timeout: 1s}")
    broken = repo.commit("qwen on 8001, probed on 9")
    record = loop.once(Trigger.COMMIT)
    assert (record.outcome, record.revision) == (Outcome.ROLLED_BACK, broken)
    assert "health check failed" in record.message
    assert loop.journal.failed_revision(broken) is not None
    container = loop.lab.docker.containers["llm"]["qwen-7b"]
    assert [p.host for p in container.ports] == [8000]

    record = loop.once(Trigger.INTERVAL)  # not retried: the lab stays at the last good revision
    assert (record.outcome, record.reconciled_revision, record.changes) == (Outcome.NO_CHANGES, good, ())
    assert "failed before" in record.message
    repo.edit("workloads.yaml", "probe: {tcp: '127.0.0.1:9', timeout: 1s}", "")
    fixed = repo.commit("qwen on 8001, probed where it listens")
    record = loop.once(Trigger.COMMIT)
    assert (record.outcome, record.revision) == (Outcome.APPLIED, fixed)


@pytest.fixture
def ssh_signing(tmp_path: Path) -> tuple[Path, Path]:
    """An ed25519 key made by ssh-keygen, and an allowed-signers file that trusts it."""
    if shutil.which("ssh-keygen") is None:
        missing("ssh-keygen", "openssh is not installed")
    key = tmp_path / "signing-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin", "-f", str(key)], check=True)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"admin@lab.test {key.with_suffix('.pub').read_text()}")
    return key, allowed


def test_an_unsigned_head_is_refused_under_verify_signatures(
    repo: GitRepo, make_loop: Callable[..., Loop], ssh_signing: tuple[Path, Path]
) -> None:
    key, allowed = ssh_signing
    signing = ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}")
    repo.edit("guests.yaml", "memory: 32GiB", "memory: 30GiB")
    repo.git("add", "-A")
    repo.git(*signing, "commit", "-q", "-S", "-m", "signed")
    signed = repo.head()
    loop = make_loop(str(repo.path), keyring=allowed)
    assert loop.once(Trigger.START).outcome is Outcome.APPLIED

    repo.edit("guests.yaml", "memory: 30GiB", "memory: 8GiB")
    unsigned = repo.commit("unsigned")
    record = loop.once(Trigger.COMMIT)
    assert (record.outcome, record.revision) == (Outcome.REFUSED, unsigned)
    assert "is not signed" in record.message and "nothing is applied" in record.message
    assert llm_memory(loop.lab) == str(30 * 1024)

    # Signed, but by a key the keyring does not hold.
    stranger = key.parent / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    repo.edit("guests.yaml", "memory: 8GiB", "memory: 4GiB")
    repo.git("add", "-A")
    repo.git("-c", "gpg.format=ssh", "-c", f"user.signingkey={stranger}", "commit", "-q", "-S", "-m", "stranger")
    record = loop.once(Trigger.COMMIT)
    assert record.outcome is Outcome.REFUSED
    assert "not signed by a trusted key" in record.message
    assert llm_memory(loop.lab) == str(30 * 1024)
    assert loop.controller.status().applied_revision == signed


def test_gpg_signatures_are_checked_against_a_gnupg_home(
    repo: GitRepo, make_loop: Callable[..., Loop], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if shutil.which("gpg") is None:
        missing("gpg", "gnupg is not installed")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    env = {"GNUPGHOME": str(home)}
    # gpg starts an agent for the home; it must not outlive the test.
    if shutil.which("gpgconf") is not None:
        request.addfinalizer(lambda: subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False))
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            "Lab Admin <admin@lab.test>",
            "ed25519",
            "sign",
            "never",
        ],
        check=True,
        capture_output=True,
        env={**env, "PATH": "/usr/bin:/bin"},
    )
    repo.edit("guests.yaml", "memory: 32GiB", "memory: 30GiB")
    repo.git("add", "-A")
    repo.git("-c", "user.signingkey=admin@lab.test", "commit", "-q", "-S", "-m", "gpg-signed", env=env)
    loop = make_loop(str(repo.path), keyring=home)
    assert loop.once(Trigger.START).outcome is Outcome.APPLIED
    repo.edit("guests.yaml", "memory: 30GiB", "memory: 8GiB")
    repo.commit("unsigned")
    assert loop.once(Trigger.COMMIT).outcome is Outcome.REFUSED
    assert llm_memory(loop.lab) == str(30 * 1024)


# ---- suspend, drift policy, status --------------------------------------------------------------------------


def test_a_suspended_loop_observes_and_reports_but_writes_nothing(
    repo: GitRepo, make_loop: Callable[..., Loop]
) -> None:
    loop = make_loop(str(repo.path))
    loop.once(Trigger.START)
    loop.controller.suspend()
    loop.lab.proxmox.guests[LLM].config["memory"] = "1024"
    repo.edit("guests.yaml", "cores: 8", "cores: 4")
    sha = repo.commit("llm: 4 cores")
    record = loop.once(Trigger.COMMIT)
    assert (record.outcome, record.revision) == (Outcome.SUSPENDED, sha)
    assert record.changes == ("update lxc/llm",)
    assert loop.lab.proxmox.guests[LLM].config["memory"] == "1024"
    assert str(loop.lab.proxmox.guests[LLM].config["cores"]) == "8"
    assert loop.controller.status().suspended
    # Suspension survives a restart: it is a file in the state directory.
    assert loop.controller.suspend_file is not None and loop.controller.suspend_file.exists()
    loop.controller.resume()
    assert not loop.controller.suspend_file.exists()
    record = loop.once(Trigger.MANUAL)
    assert record.outcome is Outcome.APPLIED
    assert (loop.lab.proxmox.guests[LLM].config["memory"], str(loop.lab.proxmox.guests[LLM].config["cores"])) == (
        str(32 * 1024),
        "4",
    )


def test_warn_reports_drift_without_correcting_and_ignore_says_nothing(
    repo: GitRepo, make_loop: Callable[..., Loop]
) -> None:
    repo.edit("guests.yaml", "tags: [llm]", "tags: [llm]\ndrift: warn")
    repo.edit("guests.yaml", "tags: [image]", "tags: [image]\ndrift: ignore")
    repo.commit("policies")
    loop = make_loop(str(repo.path))
    loop.once(Trigger.START)
    loop.lab.proxmox.guests[LLM].config["memory"] = "1024"
    loop.lab.proxmox.guests[956].config["memory"] = "2048"
    record = loop.once(Trigger.INTERVAL)
    assert record.outcome is Outcome.NO_CHANGES
    assert [(d.address, d.fields, d.policy, d.corrected) for d in record.drift] == [
        ("lxc/llm", ("memory",), "warn", False)
    ]
    assert loop.lab.proxmox.guests[LLM].config["memory"] == "1024"
    assert loop.lab.proxmox.guests[956].config["memory"] == "2048"
    states = {r.address: r.state for r in loop.controller.status().resources}
    assert states["lxc/llm"] == "drifted" and states["lxc/image"] == "in-sync"


def test_status_snapshot(repo: GitRepo, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(str(repo.path))
    loop.once(Trigger.START)
    status = loop.controller.status()
    assert status.lab == "phoenix" and not status.busy and status.passes == 1
    assert status.source.branch == "main" and status.source.path == "specs"
    assert status.last_pass is not None and status.last_pass.outcome is Outcome.APPLIED
    assert {r.address for r in status.resources} >= {"lxc/llm", "container/llm/qwen-7b"}
    assert len(status.gpus) == 2 and all(g.memory_total for g in status.gpus)
    assert status.to_json()["last_pass"]["outcome"] == "applied"


def test_a_missing_branch_is_an_error_not_a_crash(repo: GitRepo, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(str(repo.path), branch="nope")
    record = loop.once(Trigger.START)
    assert record.outcome is Outcome.ERROR
    assert "branch 'nope' does not exist" in record.message


# ---- backoff ---------------------------------------------------------------------------------------------------


def test_backoff_grows_with_jitter_honours_the_errors_delay_and_skips_permanent_errors() -> None:
    backoff = Backoff(base=1.0, factor=2.0, cap=30.0, jitter=0.25)
    delays = [backoff.delay_after(TemporaryError("down")) for _ in range(7)]
    for attempt, delay in enumerate(delays):
        expected = min(30.0, 2.0**attempt)
        assert delay is not None and expected * 0.75 <= delay <= expected * 1.25
    assert backoff.delay_after(PermanentError("no")) is None
    assert backoff.delay_after(ConfigError("no")) is None
    backoff.reset()
    hinted = backoff.delay_after(TemporaryError("locked", delay=10.0))
    assert hinted is not None and hinted >= 7.5
    huge = Backoff(cap=5.0, jitter=0.0).delay_after(TemporaryError("rate limited", delay=1e9))
    assert huge == 5.0


# ---- hostile sources ------------------------------------------------------------------------------------------


def test_a_url_that_would_run_commands_is_refused_for_good(tmp_path: Path, make_loop: Callable[..., Loop]) -> None:
    marker = tmp_path / "pwned"
    loop = make_loop(f"ext::sh -c touch% {marker}://x")
    record = loop.once(Trigger.START)
    assert record.outcome is Outcome.ERROR
    assert "uses a transport git runs commands for" in record.message
    assert loop.controller.backoff.attempts == 0  # permanent: not retried with backoff
    assert not marker.exists()


def test_credentials_in_a_url_never_show(tmp_path: Path, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop("https://admin:hunter2-token@127.0.0.1:9/lab.git")
    record = loop.once(Trigger.START)
    assert record.outcome is Outcome.ERROR
    status = loop.controller.status()
    assert "hunter2" not in record.message and "hunter2" not in str(status.to_json())
    assert status.source.repository == "https://127.0.0.1:9/lab.git"


@pytest.mark.parametrize(
    "url",
    ["https://127.0.0.1:9/lab.git?access_token=hunter2-token", "https://127.0.0.1:9/lab.git#hunter2-token"],
)
def test_a_token_in_a_urls_query_or_fragment_never_shows(
    tmp_path: Path, make_loop: Callable[..., Loop], url: str
) -> None:
    loop = make_loop(url)
    record = loop.once(Trigger.START)
    assert record.outcome is Outcome.ERROR
    status = loop.controller.status()
    assert "hunter2" not in record.message and "hunter2" not in str(status.to_json())
    assert status.source.repository == "https://127.0.0.1:9/lab.git"


@pytest.mark.parametrize("branch", ["--output=/tmp/reconciler-pwned", "main..other", "main^{tree}", "a b"])
def test_hostile_branch_names_are_errors(repo: GitRepo, make_loop: Callable[..., Loop], branch: str) -> None:
    loop = make_loop(str(repo.path), branch=branch)
    record = loop.once(Trigger.START)
    assert record.outcome is Outcome.ERROR
    assert "does not exist" in record.message
    assert not Path("/tmp/reconciler-pwned").exists()
    assert loop.lab.proxmox.guests == {}


def test_a_failing_listener_does_not_stop_the_loop_and_suspension_survives_a_restart(
    repo: GitRepo, make_loop: Callable[..., Loop]
) -> None:
    loop = make_loop(str(repo.path))

    def broken(_record: PassRecord) -> None:
        raise RuntimeError("a notifier's bug")

    got: list[PassRecord] = []
    loop.controller.subscribe(broken)
    loop.controller.subscribe(got.append)
    assert loop.once(Trigger.START).outcome is Outcome.APPLIED
    assert loop.once(Trigger.MANUAL).outcome is Outcome.NO_CHANGES
    assert [r.number for r in got] == [1, 2]
    loop.controller.suspend()
    again = Controller(
        loop.runner, source=loop.controller.source, interval=60.0, suspend_file=loop.controller.suspend_file
    )
    assert again.status().suspended


def test_an_unexpected_error_holding_a_secret_is_reported_scrubbed(
    repo: GitRepo, make_loop: Callable[..., Loop], monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler import redact

    secret = "unexpected-secret-5f3a9c"
    redact.register(secret)
    loop = make_loop(str(repo.path))

    def fails(*args: object, **kwargs: object) -> PassRecord:
        raise RuntimeError(f"an SDK said: token={secret}")  # a bug's exception, not a ReconcilerError

    monkeypatch.setattr(loop.runner, "run", fails)
    record = loop.once(Trigger.START)
    assert record.outcome is Outcome.ERROR and "internal error" in record.message
    assert secret not in record.message and secret not in str(loop.controller.status().to_json())
