"""The committed JSON Schemas are exactly what the models generate, and they accept the examples."""

from __future__ import annotations

import json
from pathlib import Path

from reconciler.spec.models import KINDS
from reconciler.spec.schema import ALL_DOCUMENTS, render_schemas

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def test_committed_schemas_are_current() -> None:
    rendered = render_schemas()
    stale = [
        name
        for name, text in rendered.items()
        if not (SCHEMAS / name).is_file() or (SCHEMAS / name).read_text() != text
    ]
    assert not stale, f"schemas/ is stale for {stale}: run `make schemas` and commit the result"
    extra = {p.name for p in SCHEMAS.glob("*.json")} - set(rendered)
    assert not extra, f"schemas/ holds files no model generates: {sorted(extra)}"


def test_union_schema_dispatches_on_kind() -> None:
    schema = json.loads((SCHEMAS / ALL_DOCUMENTS).read_text())
    assert schema["discriminator"]["propertyName"] == "kind"
    assert set(schema["discriminator"]["mapping"]) == set(KINDS)


def test_sizes_are_strings_with_units_in_the_schema() -> None:
    lxc = json.loads((SCHEMAS / "Lxc.schema.json").read_text())
    memory = lxc["properties"]["memory"]
    assert memory["type"] == "string"
    assert "GiB" in memory["examples"][0]
