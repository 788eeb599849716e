"""The canonical inventory model: events, identifiers, JSON Schema."""
