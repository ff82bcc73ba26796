"""The team set-up's servers, started the way a team would: an MLflow tracking server on a
database (PostgreSQL) that proxies the artifacts, so clients need only its URL
(`MLFLOW_TRACKING_URI=http://host:5000`) and never touch the store or the artifact folder.
"""

from __future__ import annotations

import sys

from maas.errors import MaasInputError
from maas.tracking import redact_url

# Each server worker opens its own SQLAlchemy pool (mlflow#19379): at MLflow's default of 5 + 10
# overflow per worker, a few servers use up PostgreSQL's 100 connections. 2 + 3 per worker here.
POOL_ENVIRONMENT = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "2", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "3"}


def tracking_server_command(backend_store_uri: str, artifacts_destination: str, host: str, port: int,
                            workers: int) -> list[str]:
    """`mlflow server` with the runs in `backend_store_uri` and artifacts proxied to
    `artifacts_destination` (a folder or an object store URI): clients upload and download
    through the server (mlflow-artifacts:/)."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--serve-artifacts", "--artifacts-destination", artifacts_destination,
            "--host", host, "--port", str(port), "--workers", str(workers)]


def check_database(uri: str) -> None:
    """A backend store that cannot be reached is one line naming it (password hidden) before any
    server starts, not a traceback from each of its workers."""
    if not uri.startswith(("postgresql", "mysql", "mssql", "sqlite")):
        raise MaasInputError(f"--backend-store-uri: '{redact_url(uri)}' is not a database URL "
                             "(postgresql+psycopg://USER@HOST:5432/DB, or sqlite:///FILE)")
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(uri)
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
    except Exception as error:  # noqa: BLE001 - any driver's failure, said in one line
        raise MaasInputError(f"--backend-store-uri: cannot connect to {redact_url(uri)} "
                             f"({error.__class__.__name__}: {str(error).splitlines()[0][:200]})") from None

