"""Parsers, declarative record mapping, lookups, filters and outbound renderers."""
