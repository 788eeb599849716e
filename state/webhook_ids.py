"""Webhook ids in the store (table ``webhook_ids``): the ids a partner already delivered, per route,
with the hash of the body accepted under each (connectors.webhooks.intake.WebhookIdLedger)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select, tuple_

from state.engine import StoreEngine, aware, chunks, rows_changed
from state.tables import WebhookIdRow


@dataclass(frozen=True)
class AcceptedWebhook:
    """A webhook id the broker confirmed, as the ledger keeps it."""

    route: str
    webhook_id: str
    message_id: str
    body_sha256: str



class WebhookIdStore(StoreEngine):
    """Accepted webhook ids, kept for the journal retention."""

    def webhook_bodies(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The body hash accepted under each known (route, webhook_id) of ``keys``, unknown ones absent."""
        found: dict[tuple[str, str], str] = {}
        if not keys:
            return found
        # Table columns, not ORM attributes: a plain query skips the ORM's per-call compile state,
        # which the webhook intake would otherwise pay on every group.
        table = WebhookIdRow.__table__.c
        with self._transaction() as session:
            connection = session.connection()
            for chunk in chunks(list(keys)):
                rows = connection.execute(
                    select(table.route, table.webhook_id, table.body_sha256).where(
                        tuple_(table.route, table.webhook_id).in_(chunk)
                    )
                )
                found.update(((route, webhook_id), sha) for route, webhook_id, sha in rows)
        return found

    def remember_webhooks(self, accepted: Sequence[AcceptedWebhook]) -> None:
        """Record accepted webhook ids in one transaction; an id recorded already is left as it was."""
        if not accepted:
            return
        now = datetime.now(UTC)
        rows = [
            {
                "route": webhook.route,
                "webhook_id": webhook.webhook_id,
                "message_id": webhook.message_id,
                "body_sha256": webhook.body_sha256,
                "at": now,
            }
            for webhook in accepted
        ]
        # One executemany of a cached statement: a multi-row VALUES would be compiled anew for every group.
        statement = self._insert(WebhookIdRow.__table__).on_conflict_do_nothing()
        with self._transaction() as session:
            session.connection().execute(statement, rows)

    def prune_webhook_ids(self, before: datetime) -> int:
        """Forget webhook ids accepted before ``before`` (journal retention); rows removed."""
        cutoff = aware("before", before)
        with self._transaction() as session:
            return rows_changed(session.execute(delete(WebhookIdRow).where(WebhookIdRow.at < cutoff)))
