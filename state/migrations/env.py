"""Alembic's entry point for the store's migrations: run by state.migrate on the connection (and the
transaction) it passes in ``config.attributes["connection"]``, never on a URL of its own."""

from alembic import context

from state.tables import StoreBase

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the store's migrations run through `router store upgrade`, not the alembic command")
context.configure(connection=connection, target_metadata=StoreBase.metadata)
with context.begin_transaction():
    context.run_migrations()
