"""JSON Schema for spec documents, generated from the models (never written by hand).

`reconciler schema --out schemas/` writes one schema per kind and one for any
document (`reconciler.schema.json`, which editors use through the
yaml-language-server comment at the top of each spec file). A test fails when
the committed files differ from what the models generate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from reconciler.spec.models import KINDS

__all__ = ["ALL_DOCUMENTS", "render_schemas", "write_schemas"]

ALL_DOCUMENTS = "reconciler.schema.json"
_BASE_URI = "https://reconciler.invalid/schemas/"


def render_schemas() -> dict[str, str]:
    """File name -> JSON text, for every kind and for the union of all kinds."""
    files: dict[str, str] = {}
    for kind, cls in KINDS.items():
        schema = cls.model_json_schema(mode="validation")
        files[f"{kind}.schema.json"] = _dump(schema, f"{kind}.schema.json", f"A reconciler {kind} document")
    union: Any = Annotated[Union[tuple(KINDS.values())], Field(discriminator="kind")]  # noqa: UP007 - built at run time
    schema = TypeAdapter(union).json_schema(mode="validation")
    files[ALL_DOCUMENTS] = _dump(schema, ALL_DOCUMENTS, "Any reconciler spec document, chosen by its 'kind'")
    return files


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _dump(schema: dict[str, Any], name: str, title: str) -> str:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": _BASE_URI + name,
        "title": schema.pop("title", title),
        "description": title,
        **schema,
    }
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"
