"""The store's schema as the router created it before migrations: every table, index and constraint.

A store created by a router from before migrations has these tables and no ``alembic_version``: this
revision adopts it, creating only the tables it lacks (a store older still may miss some) and giving an
``audit_log`` from before the hash chain its chain columns, so the store is stamped here with its data.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

from state.audit_chain import add_chain_columns

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The column types as the tables declare them: UtcDateTime stores DateTime(timezone=True).
Timestamp = sa.DateTime(timezone=True)
Document = sa.JSON(none_as_null=True)


def _dead_letters() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("stage", sa.String(20), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("reason", sa.String(100), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("payload", Document, nullable=True),
        sa.Column("source_ref", Document, nullable=True),
        sa.Column("event_id", sa.String(200), nullable=True),
        sa.Column("sequence_key", sa.String(500), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_index("ix_dead_letters_route_status", "dead_letters", ["route", "status"])
    op.create_index("ix_dead_letters_target_key_status", "dead_letters", ["target", "sequence_key", "status"])
    op.create_index("ix_dead_letters_created_at", "dead_letters", ["created_at"])
    op.create_index("ix_dead_letters_event_id", "dead_letters", ["event_id"])


def _audit_log() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", Timestamp, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("subject", sa.String(300), nullable=False),
        sa.Column("detail", Document, nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=True),
        sa.Column("hash", sa.String(64), nullable=True),
    )
    op.create_index("ix_audit_log_subject", "audit_log", ["subject"])


def _audit_chain() -> None:
    op.create_table(
        "audit_chain",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.Column("started_at", Timestamp, nullable=False),
    )


def _source_cursors() -> None:
    op.create_table(
        "source_cursors",
        sa.Column("name", sa.String(300), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )


def _delivered_events() -> None:
    op.create_table(
        "delivered_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("sequence_key", sa.String(500), nullable=True),
        sa.Column("occurred_at", Timestamp, nullable=True),
        sa.Column("delivered_at", Timestamp, nullable=False),
        sa.Column("event", Document, nullable=False),
        sa.UniqueConstraint("target", "event_id", name="uq_delivered_events_target_event"),
    )
    op.create_index(
        "ix_delivered_events_target_delivered_at", "delivered_events", ["target", "delivered_at"]
    )
    op.create_index("ix_delivered_events_delivered_at", "delivered_events", ["delivered_at"])


def _snapshot_marks() -> None:
    op.create_table(
        "snapshot_marks",
        sa.Column("target", sa.String(200), primary_key=True),
        sa.Column("sequence_key", sa.String(500), primary_key=True),
        sa.Column("occurred_at", Timestamp, nullable=False),
        sa.Column("event_id", sa.String(200), nullable=False),
    )


def _leases() -> None:
    op.create_table(
        "leases",
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(500), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
    )


def _webhook_ids() -> None:
    op.create_table(
        "webhook_ids",
        sa.Column("route", sa.String(200), primary_key=True),
        sa.Column("webhook_id", sa.String(300), primary_key=True),
        sa.Column("message_id", sa.String(300), nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("at", Timestamp, nullable=False),
    )
    op.create_index("ix_webhook_ids_at", "webhook_ids", ["at"])


TABLES: dict[str, Callable[[], None]] = {
    "dead_letters": _dead_letters,
    "audit_log": _audit_log,
    "audit_chain": _audit_chain,
    "source_cursors": _source_cursors,
    "delivered_events": _delivered_events,
    "snapshot_marks": _snapshot_marks,
    "leases": _leases,
    "webhook_ids": _webhook_ids,
}


def upgrade() -> None:
    connection = op.get_bind()
    present = set(sa.inspect(connection).get_table_names())
    for name, create in TABLES.items():
        if name not in present:
            create()
    add_chain_columns(connection)


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
