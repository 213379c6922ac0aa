"""A secret stays secret in plans, saved plans, apply output and the journal, even once the spec stops saying so.

Against a real Docker engine (tests/support/dockerd.py, through `real_lab`) and `reconciler` run as a
person runs it. The repro of the issue: apply a container with `secret_env: {API_KEY: ...}`, then remove
those lines; the plan used to print the live value in clear. Each test looks for the secret value
everywhere the process wrote: stdout, stderr, the --out file, journal.sqlite and its -wal file.

What each live env value becomes in a plan (`planner._live_env`): a key the container's label lists as
secret is `(sensitive)`; a key the reconciler set from a plain spec value is shown in clear; a value on
a container that says neither (made by hand or by an older reconciler) is a fingerprint.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from reconciler.planning.containers import label_keys
from reconciler.planning.plan import SENSITIVE, Plan, fingerprint
from tests.support.reallab import MakeRealLab, RealLab

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml]

SECRET = "sticky-secret-4b7e9c"
SECRET_VARIABLE = "LAB_TEST_API_KEY"

LAB = """\
kind: Lab
name: secrets
nvml: {enabled: false}
---
kind: DockerHost
name: box
endpoint: unix:///var/run/docker.sock
"""

WITH_SECRET = f"""\
kind: Container
name: client
host: box
image: reconciler-test/client:1
env: {{LOG_LEVEL: info}}
secret_env: {{API_KEY: {SECRET_VARIABLE}}}
"""


def tree(folder: Path, container: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lab.yaml").write_text(LAB)
    (folder / "container.yaml").write_text(textwrap.dedent(container))
    return folder


def without_secret(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("secret_env"))


def said(*results: Any) -> str:
    return "\n".join(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}" for r in results)


def assert_nowhere(lab: RealLab, *texts: str, files: tuple[Path, ...] = ()) -> None:
    """The secret is in none of the texts, files, journal.sqlite or its -wal file."""
    for text in texts:
        assert SECRET not in text, text
    journal = [p for p in lab.state_dir.glob("journal.sqlite*") if p.is_file()]
    assert any(p.name == "journal.sqlite" for p in journal) or not files
    for path in (*files, *journal):
        assert SECRET.encode() not in path.read_bytes(), path


def live_env(docker_client: Any, name: str) -> dict[str, str]:
    entries = docker_client.api.inspect_container(name)["Config"]["Env"] or []
    return dict(entry.partition("=")[::2] for entry in entries)


@pytest.fixture
def lab(real_lab: MakeRealLab, tmp_path: Path) -> RealLab:
    made = real_lab(tree(tmp_path / "spec", WITH_SECRET), stand_in=True)
    made.env[SECRET_VARIABLE] = SECRET
    return made


def test_a_secret_removed_from_the_spec_stays_secret(lab: RealLab, docker_client: Any, tmp_path: Path) -> None:
    applied = lab.cli("apply", str(lab.spec), "--auto-approve", "--health-timeout", "20")
    assert applied.returncode == 0, said(applied)
    assert live_env(docker_client, "client")["API_KEY"] == SECRET  # the secret reached the container
    labels = docker_client.api.inspect_container("client")["Config"]["Labels"]
    assert labels[label_keys("reconciler-secrets")["secret_env_keys"]] == "API_KEY"

    tree(lab.spec, without_secret(WITH_SECRET))
    out = tmp_path / "plan.json"
    text = lab.cli("plan", str(lab.spec))
    as_json = lab.cli("plan", str(lab.spec), "--json", "--out", str(out))
    assert text.returncode == 2 and as_json.returncode == 2, said(text, as_json)
    assert f'~ env.API_KEY: "{SENSITIVE}" -> (none)' in text.stdout, text.stdout
    plan = Plan.from_json(json.loads(as_json.stdout))
    field = next(f for c in plan.changes for f in c.fields if f.path == "env.API_KEY")
    assert (field.before, field.after, field.sensitive) == (SENSITIVE, None, True)
    assert json.loads(out.read_text()) == json.loads(as_json.stdout)

    removed = lab.cli("apply", str(lab.spec), "--auto-approve", "--health-timeout", "20")
    assert removed.returncode == 0, said(removed)
    assert "API_KEY" not in live_env(docker_client, "client")
    assert_nowhere(lab, said(applied, text, as_json, removed), files=(out,))


def test_a_rollback_restores_the_secret_container_without_the_journal_holding_the_secret(
    lab: RealLab, docker_client: Any
) -> None:
    """The old container comes back from Docker itself (kept, renamed): nothing secret is stored to restore it."""
    applied = lab.cli("apply", str(lab.spec), "--auto-approve", "--health-timeout", "20")
    assert applied.returncode == 0, said(applied)
    failing = without_secret(WITH_SECRET) + 'probe: {tcp: "127.0.0.1:9", timeout: 1s, interval: 100ms}\n'
    tree(lab.spec, failing)
    rolled = lab.cli("apply", str(lab.spec), "--auto-approve", "--health-timeout", "2")
    assert rolled.returncode == 1 and "Rolled back" in rolled.stdout, said(rolled)
    assert live_env(docker_client, "client")["API_KEY"] == SECRET  # the old container, secret and all
    history = lab.cli("history")
    assert_nowhere(lab, said(applied, rolled, history))


def test_values_the_spec_does_not_declare_are_fingerprints_and_plain_ones_stay_readable(
    lab: RealLab, docker_client: Any
) -> None:
    """A container from an older reconciler (no secret label) shows fingerprints; a plain spec edit reads clearly."""
    applied = lab.cli("apply", str(lab.spec), "--auto-approve", "--health-timeout", "20")
    assert applied.returncode == 0, said(applied)

    # A plain value the reconciler set from the spec is no secret: a spec edit shows it as it was.
    tree(lab.spec, WITH_SECRET.replace("LOG_LEVEL: info", "LOG_LEVEL: debug"))
    edited = lab.cli("plan", str(lab.spec))
    assert '~ env.LOG_LEVEL: "info" -> "debug"' in edited.stdout, said(edited)

    # The same container as an older reconciler made it: it does not say which keys were secret.
    old = docker_client.api.inspect_container("client")
    labels = dict(old["Config"]["Labels"])
    del labels[label_keys("reconciler-secrets")["secret_env_keys"]]
    docker_client.api.remove_container("client", force=True)
    docker_client.api.create_container(
        old["Config"]["Image"], name="client", environment=old["Config"]["Env"], labels=labels
    )
    tree(lab.spec, without_secret(WITH_SECRET).replace("LOG_LEVEL: info", "LOG_LEVEL: debug"))
    legacy = lab.cli("plan", str(lab.spec), "--json")
    plan = Plan.from_json(json.loads(legacy.stdout))
    fields = {f.path: f for c in plan.changes for f in c.fields}
    salt = "container/box/client"
    assert fields["env.API_KEY"].before == fingerprint(SECRET, salt=f"{salt}/API_KEY")
    assert fields["env.LOG_LEVEL"].before == fingerprint("info", salt=f"{salt}/LOG_LEVEL")
    assert fields["env.API_KEY"].sensitive and fields["env.LOG_LEVEL"].sensitive
    again = lab.cli("plan", str(lab.spec), "--json")
    assert again.stdout == legacy.stdout  # stable: a person sees whether the value changed
    text = lab.cli("plan", str(lab.spec))
    assert "(sensitive, fingerprint " in text.stdout, said(text)
    assert_nowhere(lab, said(applied, edited, legacy, again, text))
