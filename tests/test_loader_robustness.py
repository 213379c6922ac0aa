"""Bad input never raises: loading and validating only ever return diagnostics, with a file and a line.

A spec tree comes from a git repository anyone with push access can write to, so the loader
must survive hostile YAML (alias bombs, cycles, deep nesting, Python tags), bytes that are
not text, enormous files and odd file systems (symlink loops, FIFOs, device links). The last
test mutates the real examples at random (hypothesis) and checks the same promise. The FIFO,
device and very deep nesting cases run in a subprocess: a regression there would hang, eat
memory or kill the test run.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.spec.diagnostics import Diagnostic, Severity
from reconciler.spec.loader import MAX_FILE_BYTES, LoadResult, SpecFile, load_files
from reconciler.spec.validate import load_and_validate, validate

ROOT = Path(__file__).resolve().parent.parent
LAB = "kind: Lab\nname: lab\nnodes: [pve1]\nproxmox: {url: 'https://pve1.lan:8006', auth: password, user: root@pam}\n"


def _checked(root: Path) -> LoadResult:
    """load_and_validate(root), asserting it returned only well-formed diagnostics."""
    result = load_and_validate(root)
    for diagnostic in result.diagnostics:
        assert isinstance(diagnostic, Diagnostic)
        assert isinstance(diagnostic.severity, Severity) and diagnostic.message
        if diagnostic.position is not None:
            assert diagnostic.position.line >= 1 and diagnostic.position.column >= 1
            assert Path(diagnostic.position.file).is_relative_to(root)
    return result


def _tree(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    return tmp_path


def _errors(result: LoadResult) -> list[str]:
    return [f"{d.position.line if d.position else 0}:{d.message}" for d in result.diagnostics if d.severity == "error"]


# ---- malformed YAML -------------------------------------------------------------------------

MALFORMED = {
    "unclosed-flow": ("kind: Lab\nname: [lab\n", 3),
    "unclosed-quote": ("kind: Lab\nname: 'lab\n", 3),
    "mapping-in-scalar": ("kind: Lab\nname: lab: x\n", 2),
    "tab-indent": ("kind: Lab\n\tname: lab\n", 2),
    "bad-indent": ("kind: Lab\n  name: lab\n nodes: []\n", 2),
    "block-then-flow": ("- a\nb: c\n", 2),
    "undefined-alias": ("kind: Lab\nname: *nowhere\n", 2),
    "bad-escape": ('kind: Lab\nname: "\\ud800"\n', 2),
    "incompatible-version": ("%YAML 9.9\n---\nkind: Lab\n", 1),
    "control-character": ("kind: Lab\nname: lab\x07\n", 2),
    "nul-byte": ("kind: Lab\nname: lab\x00\n", 2),
    "stray-document-end": ("kind: Lab\n...\nname: lab\n---\n]\n", 5),
}


@pytest.mark.parametrize(("text", "line"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_yaml_is_a_syntax_diagnostic(tmp_path: Path, text: str, line: int) -> None:
    result = _checked(_tree(tmp_path, {"lab.yaml": text}))
    assert not result.ok
    (diagnostic,) = [d for d in result.diagnostics if d.position is not None]
    assert diagnostic.position is not None and diagnostic.position.file.endswith("lab.yaml")
    assert diagnostic.position.line <= line


def test_control_character_is_reported_on_its_line(tmp_path: Path) -> None:
    result = _checked(_tree(tmp_path, {"lab.yaml": "kind: Lab\nname: lab\ndescription: bell\x07\n"}))
    (diagnostic,) = result.diagnostics
    assert diagnostic.position is not None and (diagnostic.position.line, diagnostic.position.column) == (3, 18)
    assert "\n" not in diagnostic.message


def test_syntax_error_in_one_file_does_not_hide_problems_in_another(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {"a.yaml": "kind: Lab\nname: [\n", "b.yaml": "kind: Lxc\nname: Bad_Name\n"})
    result = _checked(tree)
    files = sorted({Path(d.position.file).name for d in result.diagnostics if d.position})
    assert files == ["a.yaml", "b.yaml"]


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("kind: Lab\nname: lab\nname: other\n", 3, 1),
        ("kind: Lab\nname: lab\nproxmox:\n  url: https://a\n  auth: token\n  url: https://b\n", 6, 3),
        ("kind: Lab\nname: lab\nimages: {vllm: a, vllm: b}\n", 3, 19),
        ("kind: Lab\nname: lab\n---\nkind: Gpu\nkind: Gpu\n", 5, 1),
    ],
)
def test_duplicate_keys_point_at_the_second_key(tmp_path: Path, text: str, line: int, column: int) -> None:
    result = _checked(_tree(tmp_path, {"lab.yaml": text}))
    (diagnostic,) = [d for d in result.diagnostics if "duplicate key" in d.message]
    assert diagnostic.position is not None
    assert (diagnostic.position.line, diagnostic.position.column) == (line, column)


# ---- YAML that expands or loops ---------------------------------------------------------------


def _billion_laughs(top: str) -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    previous = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
        previous = name
    return top + "\n".join(lines) + "\n"


@pytest.mark.timeout(60)
def test_billion_laughs_is_stopped(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _checked(_tree(tmp_path, {"lab.yaml": _billion_laughs("kind: Lab\nname: lab\n")}))
    assert time.monotonic() - started < 20
    assert any("expands to more than" in d.message for d in result.diagnostics)
    assert not result.ok


@pytest.mark.parametrize(
    "text",
    [
        "kind: Lab\nname: lab\ndescription: &x [*x]\n",
        "&x {kind: Lab, name: lab, description: *x}\n",
        "kind: Lab\nname: lab\nimages: &m {vllm: [{inner: *m}]}\n",
    ],
    ids=["sequence", "mapping", "nested"],
)
def test_self_referencing_alias_is_reported(tmp_path: Path, text: str) -> None:
    result = _checked(_tree(tmp_path, {"lab.yaml": text}))
    assert [d.message for d in result.diagnostics] == ["a YAML alias refers to itself"]


def test_shared_alias_that_is_not_a_cycle_is_fine(tmp_path: Path) -> None:
    text = LAB + "---\nkind: DockerHost\nname: ws\nendpoint: &e unix:///var/run/docker.sock\ndescription: *e\n"
    result = _checked(_tree(tmp_path, {"lab.yaml": text}))
    assert result.diagnostics == ()


@pytest.mark.parametrize("depth", [65, 1000])
@pytest.mark.parametrize("style", ["flow-sequence", "flow-mapping", "block-mapping"])
def test_deep_nesting_is_reported(tmp_path: Path, depth: int, style: str) -> None:
    if style == "flow-sequence":
        text = "kind: Lab\nname: lab\ndescription: " + "[" * depth + "]" * depth + "\n"
    elif style == "flow-mapping":
        text = "kind: Lab\nname: lab\ndescription: " + "{a: " * depth + "1" + "}" * depth + "\n"
    else:
        text = "kind: Lab\nname: lab\n" + "".join("  " * i + "k:\n" for i in range(depth)) + "  " * depth + "1\n"
    result = _checked(_tree(tmp_path, {"lab.yaml": text}))
    assert [d.message for d in result.diagnostics] == ["nested more than 64 levels deep"]


@pytest.mark.timeout(120)
def test_very_deep_nesting_does_not_crash_the_process(tmp_path: Path) -> None:
    depth = 100_000  # 200 KB of brackets, far below the 8 MiB file limit
    _tree(tmp_path, {"lab.yaml": "kind: Lab\nname: lab\ndescription: " + "[" * depth + "]" * depth + "\n"})
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from reconciler.spec.validate import load_and_validate
        result = load_and_validate(Path({str(tmp_path)!r}))
        print("|".join(d.message for d in result.diagnostics))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "nested more than 64 levels deep" in done.stdout


# ---- bytes, sizes, files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "line", "column"),
    [
        (b"kind: Lab\nname: caf\xe9\n", 2, 10),
        ("kind: Lab\nname: lab\n".encode("utf-16"), 1, 1),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1, 1),
        (b"kind: Lab\nname: lab\ndescription: \xff\xfe\n", 3, 14),
    ],
    ids=["latin-1", "utf-16", "png", "stray-bytes"],
)
def test_non_utf8_bytes_are_reported_where_they_are(tmp_path: Path, data: bytes, line: int, column: int) -> None:
    result = _checked(_tree(tmp_path, {"lab.yaml": data}))
    (diagnostic,) = result.diagnostics
    assert diagnostic.message.startswith("not UTF-8 text")
    assert diagnostic.position is not None and (diagnostic.position.line, diagnostic.position.column) == (line, column)


def test_random_bytes_never_raise(tmp_path: Path) -> None:
    generator = random.Random(20261122)
    for index in range(50):
        data = generator.randbytes(generator.randrange(1, 400))
        _checked(_tree(tmp_path / str(index), {"junk.yaml": data}))


def test_utf8_bom_and_crlf_are_fine(tmp_path: Path) -> None:
    text = "\ufeff" + LAB.replace("\n", "\r\n")
    result = _checked(_tree(tmp_path, {"lab.yaml": text.encode("utf-8")}))
    assert result.diagnostics == ()


def test_empty_tree(tmp_path: Path) -> None:
    result = _checked(tmp_path)
    assert [d.message for d in result.diagnostics] == [f"no spec documents found in {tmp_path}"]


@pytest.mark.timeout(120)
def test_fifty_megabyte_file_is_refused(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {"lab.yaml": LAB})
    with (tree / "huge.yaml").open("wb") as handle:
        chunk = b"# " + b"x" * (1024 * 1024 - 3) + b"\n"
        for _ in range(50):
            handle.write(chunk)
    started = time.monotonic()
    result = _checked(tree)
    assert time.monotonic() - started < 10
    (diagnostic,) = result.diagnostics
    assert diagnostic.message.startswith("file is too large")
    assert diagnostic.position is not None and diagnostic.position.file.endswith("huge.yaml")
    assert [r.ref for r in result.state.resources] == ["Lab/lab"], "the other files still load"


def test_large_blob_from_git_is_refused() -> None:
    result = load_files([SpecFile("big.yaml", b"#" * (MAX_FILE_BYTES + 1)), SpecFile("lab.yaml", LAB.encode())])
    assert [d.message.split(" (")[0] for d in result.diagnostics] == ["file is too large"]
    assert len(result.state.resources) == 1


def test_symlink_loop_is_reported_once_and_files_are_read_once(tmp_path: Path) -> None:
    tree = _tree(
        tmp_path / "tree", {"lab.yaml": LAB, "sub/host.yaml": "kind: DockerHost\nname: ws\nendpoint: unix:///x\n"}
    )
    os.symlink(tree, tree / "sub" / "loop")
    os.symlink(tree / "sub", tree / "sub" / "again")
    result = _checked(tree)
    assert sorted(r.ref for r in result.state.resources) == ["DockerHost/ws", "Lab/lab"]
    assert {d.message for d in result.diagnostics} == {"symlink loop: this folder was already read"}


def test_dangling_symlink_and_folder_named_like_a_spec(tmp_path: Path) -> None:
    tree = _tree(
        tmp_path, {"lab.yaml": LAB, "folder.yaml/inner.yaml": "kind: DockerHost\nname: ws\nendpoint: unix:///x\n"}
    )
    os.symlink(tmp_path / "missing.yaml", tree / "dangling.yaml")
    result = _checked(tree)
    assert [d.message for d in result.diagnostics] == ["cannot read file: No such file or directory"]
    assert len(result.state.resources) == 2


def _load_in_subprocess(root: Path, *, memory_bytes: int, timeout: float) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({memory_bytes}, {memory_bytes}))
        from pathlib import Path
        from reconciler.spec.validate import load_and_validate
        result = load_and_validate(Path({str(root)!r}))
        print(len(result.state.resources), "|".join(str(d) for d in result.diagnostics))
        """
    )
    try:
        return subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], -1, "", f"timed out after {timeout}s")


@pytest.mark.timeout(60)
def test_fifo_named_like_a_spec_does_not_hang(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {"lab.yaml": LAB})
    os.mkfifo(tree / "pipe.yaml")
    done = _load_in_subprocess(tree, memory_bytes=2 * 1024**3, timeout=8)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("1 ") and "pipe.yaml:1:1" in done.stdout, "the Lab loads, the FIFO is reported"


@pytest.mark.timeout(60)
def test_symlink_to_a_device_is_not_read_forever(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {"lab.yaml": LAB})
    os.symlink("/dev/zero", tree / "zero.yaml")
    done = _load_in_subprocess(tree, memory_bytes=1024**3, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("1 ") and "zero.yaml:1:1" in done.stdout, "the Lab loads, the device is reported"


# ---- tags, kinds, values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "kind: Lab\nname: !!python/object/apply:os.system ['touch {sentinel}']\n",
        "kind: !!python/object/apply:os.system ['touch {sentinel}']\nname: lab\n",
        "kind: Lab\nname: lab\ndescription: !!python/name:os.system\n",
        "kind: Lab\nname: lab\ndescription: !!python/object/new:os.system ['touch {sentinel}']\n",
        "%TAG !p! tag:yaml.org,2002:python/\n---\nkind: Lab\nname: !p!object/apply:os.system ['touch {sentinel}']\n",
        "kind: Lab\nname: lab\ndescription: !!python/object:subprocess.Popen {{args: ['touch', '{sentinel}']}}\n",
    ],
    ids=["apply-name", "apply-kind", "name-tag", "object-new", "tag-directive", "object-mapping"],
)
def test_python_tags_are_never_constructed(tmp_path: Path, template: str) -> None:
    sentinel = tmp_path / "pwned"
    tree = tmp_path / "tree"
    _tree(tree, {"lab.yaml": template.format(sentinel=sentinel)})
    result = _checked(tree)
    assert not sentinel.exists()
    for resource in result.state.resources:
        assert type(resource).__module__ == "reconciler.spec.models"


def test_python_tag_on_a_mapping_is_reported(tmp_path: Path) -> None:
    text = "kind: Lab\nname: lab\nimages: !!python/object:builtins.dict {vllm: 'vllm/vllm-openai:v0.11.0'}\n"
    result = _checked(_tree(tmp_path, {"lab.yaml": text}))
    assert not result.ok


@pytest.mark.parametrize(
    ("kind", "suggestion"),
    [("Lxx", "Lxc"), ("gpu", "Gpu"), ("Containr", "Container"), ("ExclusiveGrup", "ExclusiveGroup"),
     ("DockerHots", "DockerHost"), ("GPURole", "GpuRole"), ("Modle", "Model")],
)  # fmt: skip
def test_unknown_kind_suggests_the_nearest(tmp_path: Path, kind: str, suggestion: str) -> None:
    result = _checked(_tree(tmp_path, {"lab.yaml": LAB, "x.yaml": f"# a comment\nkind: {kind}\nname: x\n"}))
    (diagnostic,) = result.diagnostics
    assert diagnostic.message == f"unknown kind {kind!r}"
    assert diagnostic.hint == f"did you mean {suggestion!r}?"
    assert diagnostic.position is not None and (diagnostic.position.line, diagnostic.position.column) == (2, 7)


@pytest.mark.parametrize(("kind", "suggestion"), [("VM", "Vm"), ("LXC", "Lxc")])
def test_unknown_kind_in_another_case_suggests_the_kind(tmp_path: Path, kind: str, suggestion: str) -> None:
    result = _checked(_tree(tmp_path, {"lab.yaml": LAB, "x.yaml": f"kind: {kind}\nname: x\n"}))
    (diagnostic,) = result.diagnostics
    assert diagnostic.hint == f"did you mean {suggestion!r}?"


@pytest.mark.parametrize(
    "text",
    [
        "- kind: Lab\n",
        "just a string\n",
        "42\n",
        "kind: 5\nname: x\n",
        "kind: [Lab]\n",
        "kind:\nname: x\n",
        "kind: Lab\nname: 123\n",
        "kind: Lab\nname: 2024-01-01\n",
        "kind: Lab\nname: lab\nmax_deletes: " + "9" * 5000 + "\n",
        "kind: Lab\nname: lab\nmax_deletes: .nan\n",
        "kind: Lab\nname: lab\nmax_deletes: -.inf\n",
        "kind: Lab\nname: lab\n<<: {nodes: [a]}\n",
        "? [a, b]\n: c\nkind: Lab\n",
        "kind: Lab\nname: lab\n1: 2\n~: 3\nyes: 4\n",
        "kind: Lab\nname: !!binary bGFi\n",
        "kind: Lab\nname: lab\nnodes: !!set {a, b}\n",
        "kind: Lab\nname: lab\nnodes: !!omap [a: 1]\n",
        "kind: Gpu\nname: g\nnode: n\npci: '01:00'\nvram: 1e400GiB\n",
        "kind: DockerHost\nname: x\nendpoint: unix:///x\ntimeout: 1e309\n",
        "kind: Lab\nname: " + "x" * 100_000 + "\n",
        "---\n---\n...\n" + LAB,
    ],
)
def test_odd_values_become_diagnostics(tmp_path: Path, text: str) -> None:
    _checked(_tree(tmp_path, {"lab.yaml": text}))


def test_invalid_probe_regex_is_a_diagnostic(tmp_path: Path) -> None:
    text = LAB + "---\nkind: DockerHost\nname: ws\nendpoint: unix:///x\n---\n"
    text += "kind: Container\nname: web\nhost: ws\nimage: nginx:1.27\nprobe: {http: /, body: '(('}\n"
    result = _checked(_tree(tmp_path, {"lab.yaml": text}))
    assert any(d.message.startswith("probe") for d in result.diagnostics)


def test_enormous_size_is_a_diagnostic(tmp_path: Path) -> None:
    text = LAB + "---\nkind: Gpu\nname: g\nnode: pve1\npci: '01:00'\nvram: " + "9" * 400 + "GiB\n"
    result = _checked(_tree(tmp_path, {"lab.yaml": text}))
    assert any(d.message.startswith("vram") for d in result.diagnostics)


# ---- property: mutated real documents only ever give diagnostics ----------------------------------


def _example_trees() -> list[dict[str, list[Any]]]:
    """The documents of every example tree and of specs/, per file, as plain Python values."""
    folders = [p for p in sorted((ROOT / "examples").iterdir()) if p.is_dir()] + [ROOT / "specs"]
    trees = []
    for folder in folders:
        files = {}
        for path in sorted(folder.rglob("*.yaml")):
            documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
            files[str(path.relative_to(folder))] = documents
        trees.append(files)
    return trees


TREES = _example_trees()

_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 2**31, 2**63, 10**40, -(10**40)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", " ", "32", "32GiB", "1e999GiB", "-5GiB", "0x10", "~", "null", "yes", "((", "[", "ä€𝄞"])
    | st.binary(max_size=24)
)
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _parent(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        document = document[part]
    return document


def _deeply(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = {"n": value} if depth % 2 else [value]
    return value


@st.composite
def _mutated_tree(draw: st.DrawFn) -> list[SpecFile]:
    tree = draw(st.sampled_from(TREES))
    files = {name: [copy.deepcopy(d) for d in docs] for name, docs in tree.items()}
    target = draw(st.sampled_from(sorted(files)))
    documents = files[target]
    raw: bytes | None = None
    for _ in range(draw(st.integers(1, 4))):
        action = draw(
            st.sampled_from(["drop", "rename", "replace", "add", "deepen", "duplicate", "bytes", "drop-document"])
        )
        if not documents:
            break
        index = draw(st.integers(0, len(documents) - 1))
        paths = [p for p in _paths(documents[index]) if p]
        if action == "bytes":
            raw = draw(st.binary(max_size=300))
        elif action == "duplicate":
            documents.append(copy.deepcopy(documents[index]))
        elif action == "drop-document":
            documents.pop(index)
        elif action == "add":
            if isinstance(documents[index], dict):
                documents[index][draw(st.text(max_size=12))] = draw(_values)
        elif not paths:
            documents[index] = draw(_values)
        else:
            path = draw(st.sampled_from(paths))
            parent = _parent(documents[index], path)
            key = path[-1]
            if action == "drop":
                del parent[key]
            elif action == "rename" and isinstance(parent, dict):
                new_key = draw(st.text(max_size=12) | st.just(str(key)[:-1]) | st.just(str(key) + "s"))
                parent[new_key] = parent.pop(key)
            elif action == "deepen":
                parent[key] = _deeply(parent[key], draw(st.integers(1, 120)))
            else:
                parent[key] = draw(_values)
    spec_files = []
    for name, docs in files.items():
        if name == target and raw is not None:
            data = raw
        else:
            data = yaml.safe_dump_all(docs, allow_unicode=True, sort_keys=False).encode("utf-8")
        spec_files.append(SpecFile(name, data))
    return spec_files


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_mutated_tree())
def test_mutated_examples_only_ever_give_diagnostics(spec_files: list[SpecFile]) -> None:
    loaded = load_files(spec_files)
    diagnostics = list(loaded.diagnostics)
    if loaded.ok:
        diagnostics += validate(loaded.state)
    lines = {f.path: f.data.count(b"\n") + 1 for f in spec_files}
    for diagnostic in diagnostics:
        assert isinstance(diagnostic, Diagnostic)
        assert diagnostic.message
        position = diagnostic.position
        assert position is not None, f"no position: {diagnostic}"
        assert position.file in lines, diagnostic
        assert 1 <= position.line <= lines[position.file], diagnostic
        assert position.column >= 1, diagnostic
