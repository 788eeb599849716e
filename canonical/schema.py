"""JSON Schema (draft 2020-12) of the canonical events as the router emits them, for `router schema`."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from canonical.events import EVENT_MODELS, EVENT_TYPES, SCHEMA_VERSION, CanonicalEvent

DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID_BASE = f"urn:retail-inventory-router:canonical:v{SCHEMA_VERSION}"


def json_schema(event_type: str | None = None) -> dict[str, Any]:
    """The JSON Schema of one event type, or of any canonical event (a oneOf with its discriminator).

    Raises ValueError listing the known types for an unknown ``event_type``.
    """
    if event_type is None:
        adapter: TypeAdapter[Any] = TypeAdapter(CanonicalEvent)
        schema_id, title = SCHEMA_ID_BASE, "Canonical inventory event"
        description = f"Any canonical inventory event; `type` is one of {', '.join(EVENT_TYPES)}."
    else:
        model = EVENT_MODELS.get(event_type)
        if model is None:
            raise ValueError(f"unknown event type {event_type!r}; known types: {', '.join(EVENT_TYPES)}")
        adapter = TypeAdapter(model)
        schema_id, title = f"{SCHEMA_ID_BASE}:{event_type}", f"Canonical inventory event: {event_type}"
        description = model.__doc__ or ""
    # Serialization mode describes the JSON the router delivers: quantities as strings, GTINs as 14 digits.
    generated = adapter.json_schema(mode="serialization")
    head = {"$schema": DIALECT, "$id": schema_id, "title": title, "description": description}
    return head | {key: value for key, value in generated.items() if key not in head}
