"""Fuzz `reconciler validate` and `reconciler plan` with random mutations of every example (issue 7).

Each case takes an example tree (examples/* and specs/), mutates its YAML (values, keys, types, dropped
fields and documents, hostile strings from the issue's findings, a file name with a newline), writes it
to a folder and runs the CLI in-process (typer's CliRunner). What must hold for every case:

- the exit code is 0, 1 or 2 and nothing escapes as an exception (no traceback);
- `validate` exiting 1 gives diagnostics, each error with a file of the tree and a line in it;
- `plan` of an invalid tree exits 1 with the same positioned diagnostics; of a valid one, it plans
  against fakepve (HTTPS, the real proxmoxer), the real Docker engine and the fake NVML, seeded for the
  unmutated example, and fakepve sees no write;
- no case runs over 5 s (a sanity bound the issue sets; the slowest case is printed).

Bounded in time: a fixed number of derandomised examples per tree.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from reconciler.cli import app
from tests.support.reallab import MakeRealLab

ROOT = Path(__file__).resolve().parent.parent
TREES = [*sorted(p.relative_to(ROOT) for p in (ROOT / "examples").iterdir() if p.is_dir()), Path("specs")]
MAX_SECONDS = 5.0
HOSTILE = [
    "/tank/models,shared=1",
    "vmbr0,rate=1,firewall=1",
    "10.0.0.5/24,gw=10.0.0.66",
    "host\nargs: -device evil",
    "lab.lan\n",  # a valid value with a final newline: a Python `$` matches before it
    "0-7\n",
    "../../etc",
    "local:vztmpl/../../../../etc/shadow",
    "local-lvm:1,import-from=/dev/sda,x",
    "LD_PRELOAD=/tmp/evil.so X",
    "/models/../../../etc",
    "RECONCILER_PROXMOX_PASSWORD",
    "DOCKER_HOST",
    "0B",
    "1B",
    "999999999999999999999999TiB",
    "1.5GiB",
    1.0e20,
    1.0e300,
    0,
    -1,
    "",
    "\x00",
    "a\u2028b",
    "ä€𝄞",
]
_leaf = (
    st.sampled_from(HOSTILE)
    | st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
)
_value = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
slowest: dict[str, tuple[float, str]] = {}
exits: dict[str, list[int]] = {"validate": [], "plan": []}


def _documents(tree: Path) -> dict[str, list[Any]]:
    return {
        str(path.relative_to(ROOT / tree)): [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        for path in sorted((ROOT / tree).rglob("*.yaml"))
    }


EXAMPLES = {str(tree): _documents(tree) for tree in TREES}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _mutate(draw: st.DrawFn, document: Any) -> Any:
    paths = _paths(document)
    if not paths:
        return draw(_value)
    path = draw(st.sampled_from(paths))
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    action = draw(st.sampled_from(["value", "hostile", "append", "type", "drop", "rename"]))
    if action == "value":
        parent[key] = draw(_value)
    elif action == "hostile":
        parent[key] = draw(st.sampled_from(HOSTILE))
    elif action == "append" and isinstance(parent[key], str):
        parent[key] += draw(st.sampled_from([",shared=1", "\nx: 1", "/..", ",", "=", " "]))
    elif action == "type":
        parent[key] = [parent[key]] if draw(st.booleans()) else {"v": parent[key]}
    elif action == "drop":
        del parent[key]
    elif action == "rename" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=10))] = parent.pop(key)
    return document


def _benign(draw: st.DrawFn, document: Any) -> Any:
    """A change that keeps the document valid, so that `plan` also meets trees it plans."""
    if isinstance(document, dict):
        key = draw(st.sampled_from(["description", "cores", "protect", "drift"]))
        if key == "description" or key in document:
            document[key] = draw(
                {
                    "description": st.text(max_size=30),
                    "cores": st.integers(1, 64),
                    "protect": st.booleans(),
                    "drift": st.sampled_from(["correct", "warn", "ignore"]),
                }[key]
            )
    return document


@st.composite
def mutated(draw: st.DrawFn, tree: str) -> dict[str, list[Any]]:
    files = copy.deepcopy(EXAMPLES[tree])
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(files)))
        documents = files[name]
        if not documents:
            continue
        index = draw(st.integers(0, len(documents) - 1))
        what = draw(
            st.sampled_from(
                ["benign", "benign", "mutate", "mutate", "mutate", "drop-document", "duplicate", "rename-file"]
            )
        )
        if what == "benign":
            documents[index] = _benign(draw, documents[index])
        elif what == "drop-document":
            documents.pop(index)
        elif what == "duplicate":
            documents.append(copy.deepcopy(documents[index]))
        elif what == "rename-file":
            files[name.replace(".yaml", "\nforged.yaml: error: x.yaml")] = files.pop(name)
        else:
            documents[index] = _mutate(draw, documents[index])
    return files


def _write(files: dict[str, list[Any]], parent: Path) -> Path:
    folder = Path(tempfile.mkdtemp(dir=parent))
    for name, documents in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(yaml.safe_dump_all(documents, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return folder


def _run(command: str, folder: Path, env: dict[str, str]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = CliRunner().invoke(app, [command, "--json", str(folder)], env={**env, "NO_COLOR": "1"})
    took = time.perf_counter() - start
    if took > slowest.get(command, (0.0, ""))[0]:
        slowest[command] = (took, str(folder))
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{command} raised {result.exception!r}\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    assert result.exit_code in (0, 1, 2), result.output
    exits[command].append(result.exit_code)
    assert took < MAX_SECONDS, f"{command} took {took:.1f} s on {folder}"
    return result, took


def _check_positions(diagnostics: list[dict[str, Any]], folder: Path) -> None:
    errors = [d for d in diagnostics if d["severity"] == "error"]
    assert errors, diagnostics
    for error in errors:
        assert error["file"] is not None and error["line"] is not None, error
        assert Path(error["file"]).is_relative_to(folder), error
        lines = Path(error["file"]).read_bytes().count(b"\n") + 1 if Path(error["file"]).is_file() else 1
        assert 1 <= error["line"] <= lines, error


def _validate(folder: Path) -> list[dict[str, Any]] | None:
    """The diagnostics of an invalid tree, or None for a valid one; checks the `validate` contract."""
    result, _ = _run("validate", folder, {})
    diagnostics: list[dict[str, Any]] = json.loads(result.stdout)
    if result.exit_code == 0:
        assert all(d["severity"] != "error" for d in diagnostics), diagnostics
        return None
    assert result.exit_code == 1, result.output
    _check_positions(diagnostics, folder)
    return diagnostics


@pytest.mark.parametrize("tree", [str(t) for t in TREES])
def test_mutated_examples_validate_with_exit_0_or_1_and_positioned_diagnostics(tree: str, tmp_path: Path) -> None:
    @settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated(tree))
    def case(files: dict[str, list[Any]]) -> None:
        _validate(_write(files, tmp_path))

    case()
    print(f"slowest validate so far: {slowest['validate'][0]:.2f} s")


@pytest.mark.parametrize("tree", [str(t) for t in TREES])
def test_mutated_examples_plan_against_fakepve_without_writing(
    tree: str, real_lab: MakeRealLab, tmp_path: Path
) -> None:
    lab = real_lab(ROOT / tree)
    env = {**lab.env, "RECONCILER_STATE_DIR": str(tmp_path / "state"), "RECONCILER_TEST_SECRET": "x"}

    @settings(max_examples=8, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated(tree))
    def case(files: dict[str, list[Any]]) -> None:
        folder = _write(files, tmp_path)
        invalid = _validate(folder)
        lab.pve.clear_requests()
        result, _ = _run("plan", folder, env)
        assert lab.pve.writes() == [], "plan never writes"
        if invalid is not None:
            assert result.exit_code == 1, result.output
            _check_positions(json.loads(result.stdout)["diagnostics"], folder)
            assert lab.pve.requests == [], "an invalid spec reads nothing"

    case()
    print(
        f"slowest plan so far: {slowest['plan'][0]:.2f} s ({slowest['plan'][1]}), exit codes {sorted(Counter(exits['plan']).items())}"
    )
