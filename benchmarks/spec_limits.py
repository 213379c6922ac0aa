"""`make bench`, part 3: how long `validate` takes on hostile spec trees under 10 MB (goal: under 2 s each).

Each tree is written to a temporary folder and loaded and validated in this
process (`load_and_validate`, what `reconciler validate` runs after start-up).
Prints the time, the size of the tree and the number of diagnostics; asserts
nothing. The trees are the ones that took 40 s and more before the loader was
bounded: 150,000 unknown keys, long lists, many documents, many files, alias
bombs, documents full of errors, symlinks to `/`, `/etc` and `/proc/self`, and
a real-looking lab as large as the limits allow.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from reconciler.spec.validate import load_and_validate

LAB = "kind: Lab\nname: lab\nnodes: [pve1]\nproxmox: {url: 'https://pve1:8006', auth: password, user: root@pam}\n"
GUEST = """---
kind: Lxc
name: ct{i}
node: pve1
vmid: {vmid}
template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
cores: 8
memory: 32GiB
rootfs: {{storage: local-lvm, size: 64GiB}}
mounts:
  - {{host: /tank/models, path: /models, readonly: true}}
network:
  - {{name: eth0, bridge: vmbr0, ip: 10.10.{a}.{b}/16, gateway: 10.10.0.1}}
features: {{nesting: true, keyctl: true}}
tags: [llm, gpu]
docker: {{endpoint: "ssh://root@ct{i}.lan"}}
"""
BAD_GUEST = """---
kind: Lxc
name: Bad_{i}
node: 7
vmid: -1
template: "local:vztmpl/../../etc/shadow"
memory: 0B
rootfs: {{storage: "local-lvm:1,import-from=/dev/sda", size: 1B}}
mounts: [{{host: "/tank,shared=1", path: x}}]
network: [{{bridge: "vmbr0,rate=1", ip: "1.2.3.4/24,gw=1.1.1.1", hwaddr: zz}}]
unknown_field_{i}: 1
"""


def _realistic(root: Path) -> None:
    (root / "lab.yaml").write_text(LAB)
    per_file = 500
    for part in range(4):
        text = "".join(
            GUEST.format(i=i, vmid=1000 + i, a=i // 250, b=1 + i % 250)
            for i in range(part * per_file, (part + 1) * per_file)
        )
        (root / f"guests-{part}.yaml").write_text(text)


def _unknown_keys(root: Path) -> None:
    (root / "lab.yaml").write_text(LAB + "".join(f"unknown{i}: {i}\n" for i in range(150_000)))


def _long_list(root: Path) -> None:
    (root / "lab.yaml").write_text(LAB + "ignore:\n" + "- a\n" * 2_000_000)


def _flow_list(root: Path) -> None:
    (root / "lab.yaml").write_text(LAB + "ignore: [" + "a," * 3_900_000 + "a]\n")


def _many_documents(root: Path) -> None:
    (root / "lab.yaml").write_text(LAB + "".join(f"---\nkind: GpuRole\nname: r{i}\n" for i in range(250_000)))


def _many_files(root: Path) -> None:
    (root / "lab.yaml").write_text(LAB)
    for i in range(3_000):
        (root / f"role-{i:05}.yaml").write_text(f"kind: GpuRole\nname: r{i}\ndescription: {'x' * 3000}\n")


def _errors_everywhere(root: Path) -> None:
    (root / "lab.yaml").write_text(LAB + "".join(BAD_GUEST.format(i=i) for i in range(4_000)))


def _alias_bomb(root: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (root / "lab.yaml").write_text(LAB + "description: x\n" + "\n".join(f"x{line}" for line in lines) + "\n")


def _symlinks_out(root: Path) -> None:
    (root / "lab.yaml").write_text(LAB)
    os.symlink("/", root / "everything")
    os.symlink("/etc", root / "etc")
    os.symlink("/proc/self", root / "self")
    os.symlink("/etc/passwd", root / "passwd.yaml")


def _deep(root: Path) -> None:
    (root / "lab.yaml").write_text(LAB + "description: " + "[" * 100_000 + "]" * 100_000 + "\n")


CASES: dict[str, Callable[[Path], None]] = {
    "lab of 2,000 guests (near the limits)": _realistic,
    "150,000 unknown keys": _unknown_keys,
    "2,000,000-item list": _long_list,
    "3,900,000-item flow list": _flow_list,
    "250,000 documents": _many_documents,
    "3,000 files": _many_files,
    "4,000 documents full of errors": _errors_everywhere,
    "alias bomb": _alias_bomb,
    "symlinks to /, /etc, /proc/self": _symlinks_out,
    "100,000 levels deep": _deep,
}


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def bench_spec_limits() -> None:
    for label, build in CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            build(root)
            start = time.perf_counter()
            result = load_and_validate(root)
            took = time.perf_counter() - start
            lines = sum(1 for _ in result.diagnostics)
            print(
                f"validate, {label}: {took:.2f} s, {_size(root) / 1e6:.1f} MB, "
                f"{len(result.state.resources)} resources, {lines} diagnostic lines"
            )


if __name__ == "__main__":
    bench_spec_limits()
