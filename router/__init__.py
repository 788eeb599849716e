"""Routes, broker topology, stage workers, sequencing, retry policy and the `router` CLI."""
