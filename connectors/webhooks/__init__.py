"""Partner webhook source: ``POST /webhooks/<route>`` receives signed JSON and publishes it as one chunk.

A request is answered 202 only after the intake (``intake``) had the broker confirm the chunk and the
id ledger record its ``webhook-id``; when the broker is unreachable the answer is 503 with
Retry-After and nothing is remembered, so the partner's retry (same ``webhook-id``) is taken in full.
A ``webhook-id`` already accepted answers 200 and publishes nothing, or 409 when it comes with a
different body (a sender reusing ids would otherwise lose messages silently). Deliveries of one id
racing in on two processes may both publish; that is harmless because event ids derive from the
webhook id, so downstream deduplicates them. Every rejection is an RFC 9457
``application/problem+json`` body (``problems``), counted in ``router_webhook_rejections_total``;
what needs no body is checked before the body is read (``request``), and the signature before the
rate limit (``rate_limit``) is spent. Bodies must be interoperable JSON (RFC 7493).
``GET /openapi.json`` (``openapi``) describes the configured receivers; ``routes`` mounts both.
"""
