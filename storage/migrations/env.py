"""Alembic environment: the engine comes from storage.db.alembic_config, never from a URL here.

On SQLite, changing a column rebuilds the table (batch mode); foreign key enforcement is off
while migrations run so that rebuilding a referenced table is allowed, as SQLite's ALTER
TABLE documentation prescribes.
"""

from alembic import context

from storage.models import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()  # the pragma is refused inside a transaction
    try:
        with connection.begin():
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=sqlite,
            )
            context.run_migrations()
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
