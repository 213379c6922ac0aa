"""`make demo`: the main job, end to end, on the embedded demo lab (specs/) with no lab at hand.

Proxmox and Docker are in memory (they store configs the way the real ones
do), the GPUs come from the fake NVML library through the real nvidia-ml-py.
The demo validates the spec, plans from an empty lab, applies with health
checks, plans again (nothing to do), makes a change by hand (drift), shows
that exact drift in the plan and corrects it, then switches an exclusive
group with one edit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from reconciler.cli.render import print_diagnostics, print_history, print_plan, print_report, print_step
from reconciler.engine.apply import HealthPolicy
from reconciler.engine.journal import Journal
from reconciler.engine.run import ApplyOptions, apply_pass, plan_pass
from reconciler.fakes.lab import memory_lab
from reconciler.planning.plan import Plan
from reconciler.spec.models import ExclusiveGroup
from reconciler.spec.placement import member_of
from reconciler.spec.state import DesiredState
from reconciler.spec.validate import load_and_validate

__all__ = ["run_demo"]

SPECS = Path("specs")


def run_demo(console: Console, specs: Path = SPECS) -> int:
    console.print(Rule(f"1. validate {specs}/"))
    loaded = load_and_validate(specs)
    print_diagnostics(console, loaded.diagnostics)
    if not loaded.ok:
        return 1
    desired = loaded.state
    console.print(f"valid: {len(desired.resources)} resources, revision {desired.revision}")

    with tempfile.TemporaryDirectory(prefix="reconciler-demo-") as scratch:
        work = Path(scratch)
        lab = memory_lab(desired, work_dir=work)
        journal = Journal(work / "journal.sqlite")
        console.print(f"[dim]Proxmox and Docker in memory; {lab.nvml_note}[/]")
        options = ApplyOptions(health=HealthPolicy(max_timeout=5.0, interval=0.05), prober=lab.probe)
        endpoints = {name: "unix:///demo.sock" for name in desired.docker_hosts()}

        def apply(state: DesiredState, title: str) -> int:
            console.print(Rule(title))
            plan, report = apply_pass(
                state,
                lab.readers,
                proxmox=lab.proxmox,
                docker=lab.docker,
                journal=journal,
                env={},
                docker_endpoints=endpoints,
                options=options,
                confirm=lambda p: _show_and_approve(console, p),
                on_step=lambda step: print_step(console, step),
            )
            if report is None:
                print_plan(console, plan)
                return 0 if plan.applicable else 1
            print_report(console, report)
            return report.exit_code

        if apply(desired, "2. plan and apply, from an empty lab") != 0:
            return 1
        console.print(Rule("3. plan again: the live state matches the spec"))
        print_plan(console, plan_pass(desired, lab.readers, journal))

        guest = next(iter(desired.guests()), None)
        if guest is not None:
            console.print(Rule(f"4. someone changes {guest.ref}'s memory by hand in the Proxmox UI"))
            lab.proxmox.guests[guest.vmid].config["memory"] = "1024"
            print_plan(console, plan_pass(desired, lab.readers, journal))
            if apply(desired, "5. apply corrects the drift") != 0:
                return 1

        group = next(iter(desired.of(ExclusiveGroup)), None)
        if group is not None:
            members = sorted(
                {
                    member_of(r)
                    for r in (*desired.guests(), *desired.workloads())
                    if r.exclusive and r.exclusive.group == group.name
                }
                - {group.active}
            )
            if members:
                switched = _switch(desired, group, members[0])
                if apply(switched, f"6. one edit in git: {group.name}.active: {group.active} -> {members[0]}") != 0:
                    return 1
        console.print(Rule("journal"))
        print_history(console, journal.runs(10))
        journal.close()
    return 0


def _show_and_approve(console: Console, plan: Plan) -> bool:
    print_plan(console, plan)
    return True


def _switch(desired: DesiredState, group: ExclusiveGroup, member: str) -> DesiredState:
    switched = group.model_copy(update={"active": member})
    resources = tuple(switched if r is group else r for r in desired.resources)
    return DesiredState(resources, desired.origins, revision=f"{desired.revision}+{group.name}={member}")
