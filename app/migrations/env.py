"""Alembic's entry point: the app passes its own connection (``CaseRecord.migrate``); run by
hand, ``alembic -x url=...`` names the database."""
from alembic import context
from sqlalchemy import create_engine

from app.cases import Base

connection = context.config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(context.get_x_argument(as_dictionary=True)["url"])
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
