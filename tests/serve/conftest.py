"""Fixtures for the serve tests: an accounts database on SQLite always, on PostgreSQL when
NANOSEEK_TEST_PG_URL names a server (`.ci/with-postgres` starts one). In CI (`CI` set) a missing
URL fails the PostgreSQL half instead of skipping it, so CI cannot go green without it."""

from __future__ import annotations

import os

import pytest

PG_ENV = "NANOSEEK_TEST_PG_URL"


def pg_url_or_skip() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {PG_ENV} is not: run the tests under .ci/with-postgres "
                        "so the accounts are tested on PostgreSQL too")
        pytest.skip(f"{PG_ENV} not set (run under .ci/with-postgres to test PostgreSQL)")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A URL of an empty accounts database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'accounts.db'}"
    url = pg_url_or_skip()
    from nanoseek.serve.db import metadata, open_engine

    engine = open_engine(url, create=False)
    metadata.drop_all(engine)  # a fresh schema per test; the database itself is throwaway
    engine.dispose()
    return url


@pytest.fixture
def accounts(db_url):
    from nanoseek.serve.accounts import Accounts

    acc = Accounts(db_url)
    yield acc
    acc.close()


@pytest.fixture
def prices():
    from nanoseek.serve.pricing import UnitPrices

    # per million tokens: a hit is a tenth of a miss, output dearer than input, as in practice
    return UnitPrices(input_hit="0.10", input_miss="1.00", output="2.00")
