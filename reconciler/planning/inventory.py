"""What the journal hands the planner: the inventory of what the reconciler made, and the spec hash.

The journal (`engine.journal`) fills an `Inventory` from its tables; the planner reads it to tell
what it owns, what is protected and whether a difference is a spec edit or drift; the applier records
`spec_hash` after each apply. Kept apart from the planner so the engine depends on these alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.spec.models import ExclusiveGroup, Resource
from reconciler.spec.state import DesiredState

__all__ = ["OLD_SUFFIX", "Inventory", "spec_hash"]

OLD_SUFFIX = "-reconciler-old"  # a replaced container kept, stopped, until the new one is healthy


@dataclass(frozen=True)
class Inventory:
    """What the journal knows: the spec each resource was last applied from, and what is protected."""

    spec_hashes: Mapping[str, str] = field(default_factory=dict)  # "Lxc/llm" -> spec_hash at last apply
    protected: frozenset[str] = frozenset()  # addresses never to delete
    protected_vmids: frozenset[int] = frozenset()  # guests never to delete, whatever they are called now
    owned: frozenset[str] = frozenset()  # every address the reconciler made and has not deleted
    owned_vmids: frozenset[int] = frozenset()  # the guests among them, by vmid


def spec_hash(resource: Resource, desired: DesiredState) -> str:
    """Fingerprint of what the spec asks of a resource, to tell a spec edit from drift.

    It covers the group switch too: making another member active changes what
    is asked of every member, though their own documents stay the same.
    """
    body = resource.model_dump(mode="json", exclude={"description"})
    membership = getattr(resource, "exclusive", None)
    if membership is not None:
        group = next((g for g in desired.of(ExclusiveGroup) if g.name == membership.group), None)
        body["_active"] = group.active if group else None
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
