"""Fixtures of the deployment tests: one throwaway PostgreSQL server for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.deployment.daemon_stack import PG_INSTALL_HINT, postgres_bin, postgres_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL server on 127.0.0.1 for the session (daemon_stack.postgres_server);
    yields the DAGSTER_POSTGRES_* variables that docker/dagster.yaml reads. Missing server
    binaries fail the test in CI (the CI variable set, as .ci/run does), with how to install
    them; elsewhere they skip it with the same advice."""
    binaries = postgres_bin()
    if binaries is None:
        message = f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: {PG_INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with postgres_server(binaries) as env:
        yield env


@pytest.fixture
def postgres_db(postgres: dict[str, str]) -> dict[str, str]:
    """`postgres` with a fresh, empty database of this test's own: what another test stored on
    the session server (the daemon end-to-end run's partitions) is not seen here."""
    import uuid

    import psycopg2

    name = f"test_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(
        host=postgres["DAGSTER_POSTGRES_HOST"], port=int(postgres["DAGSTER_POSTGRES_PORT"]),
        user=postgres["DAGSTER_POSTGRES_USER"], password=postgres["DAGSTER_POSTGRES_PASSWORD"],
        dbname=postgres["DAGSTER_POSTGRES_DB"])
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()
    return {**postgres, "DAGSTER_POSTGRES_DB": name}
