"""The accounts database: engine setup for SQLite and PostgreSQL, the schema, its version.

    from nanoseek.serve.db import open_engine
    engine = open_engine("runs/nanoseek.db")                        # SQLite file (created)
    engine = open_engine("postgresql+psycopg://user@127.0.0.1/db")  # PostgreSQL

`open_engine` creates missing tables and records SCHEMA_VERSION in `schema_version`; a later
version adds its step to MIGRATIONS. A new SQLite file is created readable by its owner only
(0600): it holds the key hashes and every tenant's usage. Money is stored as an exact integer count of
1e-9 currency units (`Money`), because SQLite's NUMERIC silently becomes a float; Python sees
`Decimal` either way. SQLite write transactions start with BEGIN IMMEDIATE so that two
writers serialise instead of failing on lock upgrade; PostgreSQL uses row locks.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, Column, DateTime, Engine, ForeignKey, Index,
                        Integer, MetaData, String, Table, create_engine, event, inspect, literal, select, text)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.types import TypeDecorator

from .pricing import MONEY_PLACES

SCHEMA_VERSION = 2
_SCHEMA_LOCK_ID = 0x6E616E6F  # "nano": the advisory lock serialising schema changes on PostgreSQL
DEFAULT_DB = "sqlite:///runs/nanoseek.db"


class SchemaError(RuntimeError):
    """The database holds a schema this code cannot use."""


class Money(TypeDecorator):
    """Decimal in Python, an exact integer of 10**-MONEY_PLACES units in the database."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        d = Decimal(value)
        units = d.scaleb(MONEY_PLACES)
        if units != units.to_integral_value():
            raise ValueError(f"amount {d} has more than {MONEY_PLACES} decimal places")
        return int(units)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return Decimal(int(value)).scaleb(-MONEY_PLACES)


def money(amount: Decimal):
    """A Money bind parameter. Explicit type: arithmetic on Money columns yields plain BigInteger
    expressions, which would bind a Decimal unscaled (0.5 instead of 500000000 units)."""
    return literal(amount, type_=Money)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both backends (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; expected a timezone-aware one")
        return value.astimezone(timezone.utc).replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


metadata = MetaData()

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", UTCDateTime, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False, unique=True),   # sha256 hex of the secret
    Column("key_prefix", String(16), nullable=False),              # "sk-1a2b…" to tell keys apart
    Column("balance", Money, nullable=False),
    Column("held", Money, nullable=False),                         # sum of this key's open holds
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    # backstops: the code never reaches these, the database refuses if it ever does
    CheckConstraint("balance >= 0", name="ck_api_keys_balance_nonneg"),
    CheckConstraint("held >= 0 AND held <= balance", name="ck_api_keys_held_covered"),
)

# one row per running server instance; a hold whose instance has no live lease is an orphan
leases = Table(
    "leases", metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),       # hostname/boot id/pid namespace, or hostname
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False, index=True),
)

holds = Table(
    "holds", metadata,
    Column("request_id", String(128), primary_key=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False, index=True),
    Column("amount", Money, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # schema 2: the instance holding it, the prices it was admitted at, and the usage recorded so far,
    # so that another server can settle it if this one dies (NULL instance: a schema-1 hold, an orphan)
    Column("instance_id", String(64), nullable=True),
    Column("model", String(128), nullable=False, server_default=""),
    Column("price_input_hit", Money, nullable=True),
    Column("price_input_miss", Money, nullable=True),
    Column("price_output", Money, nullable=True),
    Column("cache_hit_tokens", Integer, nullable=False, server_default="0"),
    Column("cache_miss_tokens", Integer, nullable=False, server_default="0"),
    Column("output_tokens", Integer, nullable=False, server_default="0"),
    Column("progress_at", UTCDateTime, nullable=True),
    CheckConstraint("amount >= 0", name="ck_holds_amount_nonneg"),
)
Index("ix_holds_instance_id", holds.c.instance_id)

ledger = Table(
    "ledger", metadata,
    Column("id", Integer, primary_key=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False, index=True),
    Column("request_id", String(128), nullable=False, unique=True),  # never billed twice
    Column("model", String(128), nullable=False, default=""),
    Column("cache_hit_tokens", Integer, nullable=False),
    Column("cache_miss_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("price_input_hit", Money, nullable=False),    # per million tokens, as charged
    Column("price_input_miss", Money, nullable=False),
    Column("price_output", Money, nullable=False),
    Column("amount", Money, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    CheckConstraint("amount >= 0", name="ck_ledger_amount_nonneg"),
)

topups = Table(
    "topups", metadata,
    Column("id", Integer, primary_key=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False, index=True),
    Column("amount", Money, nullable=False),
    Column("note", String(256), nullable=False, default=""),
    Column("created_at", UTCDateTime, nullable=False),
)

# ---- the console's per-key settings and admin trail (nanoseek.serve.key_admin). New tables in
# their own right: create_all makes them on an existing database, no migration step needed.
key_settings = Table(
    "key_settings", metadata,
    Column("key_id", Integer, ForeignKey("api_keys.id"), primary_key=True, autoincrement=False),
    Column("admin", Boolean, nullable=False, default=False),
    # per-key limits: NULL = the server's flag, 0 = unlimited
    Column("requests_per_minute", Integer, nullable=True),
    Column("tokens_per_minute", Integer, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint("requests_per_minute >= 0 AND tokens_per_minute >= 0 AND max_concurrent >= 0",
                    name="ck_key_settings_limits_nonneg"),
)

admin_log = Table(
    "admin_log", metadata,
    Column("id", Integer, primary_key=True),
    Column("actor_key_id", Integer, ForeignKey("api_keys.id"), nullable=True),  # NULL: the keys CLI
    Column("action", String(32), nullable=False),             # create, topup, revoke, limits, admin
    Column("target_key_id", Integer, ForeignKey("api_keys.id"), nullable=False, index=True),
    Column("detail", String(512), nullable=False, default=""),
    Column("created_at", UTCDateTime, nullable=False),
)


def _add_missing_columns(conn: Connection, table: Table) -> None:
    """ALTER TABLE ... ADD COLUMN for each column of `table` the database lacks (with its default)."""
    have = {c["name"] for c in inspect(conn).get_columns(table.name)}
    for col in table.columns:
        if col.name in have:
            continue
        ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(dialect=conn.dialect)}"
        if col.server_default is not None:
            ddl += f" DEFAULT '{col.server_default.arg}'"
        if not col.nullable:
            ddl += " NOT NULL"
        conn.execute(text(ddl))


def _migrate_2(conn: Connection) -> None:
    """Leases: holds gain their instance, prices and recorded progress (the leases table itself is
    new, so create_all has made it)."""
    _add_missing_columns(conn, holds)
    for index in holds.indexes:
        index.create(conn, checkfirst=True)


# version -> step that upgrades a database from version-1 to version; run in one transaction
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _migrate_2}


def normalize_url(url: str) -> str:
    """A plain path means an SQLite file; a bare postgresql:// URL gets the psycopg 3 driver."""
    if "://" not in url:
        return f"sqlite:///{url}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


READ_ONLY = "nanoseek_read_only"


def read_only(conn: Connection) -> Connection:
    """Mark a connection as a reader (on SQLite: a deferred transaction that takes no write lock)."""
    return conn.execution_options(**{READ_ONLY: True})


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        # let SQLAlchemy, not the sqlite3 module, decide when transactions begin
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        # WAL lets readers proceed while one writer commits; must be set outside a transaction
        cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # a writer takes the write lock up front: a deferred transaction that reads and then
        # writes can fail with "database is locked" when another writer got there first.
        # Readers (read_only(conn)) stay deferred so that, under WAL, they never wait for writers.
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _create_private_file(path: Path) -> None:
    """Create an empty SQLite file readable by its owner only; an existing file is left as it is.
    SQLite gives its -wal and -shm files the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def open_engine(url: str = DEFAULT_DB, *, create: bool = True) -> Engine:
    """An engine with the schema in place (created or migrated unless create=False)."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _create_private_file(Path(parsed.database))
        engine = create_engine(url, connect_args={"timeout": 30})
        _sqlite_pragmas(engine)
    elif parsed.get_backend_name() == "postgresql":
        try:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        except ModuleNotFoundError as e:
            raise SchemaError(f"{parsed.drivername} needs the {e.name!r} module: "
                              "pip install 'psycopg[binary]'") from None
    else:
        raise SchemaError(f"database URL {parsed.render_as_string(hide_password=True)!r}: "
                          "expected sqlite:///FILE or postgresql+psycopg://...")
    if create:
        ensure_schema(engine)
    return engine


def ensure_schema(engine: Engine) -> int:
    """Create missing tables, apply pending migrations; returns the schema version now in place."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # replicas starting together: one creates or migrates, the others wait and see it done
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_ID})
        metadata.create_all(conn, checkfirst=True)
        current = conn.execute(select(schema_version.c.version)
                               .order_by(schema_version.c.version.desc()).limit(1)).scalar()
        if current is None:
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION, applied_at=utcnow()))
            return SCHEMA_VERSION
        if current > SCHEMA_VERSION:
            raise SchemaError(f"database schema version {current} is newer than this nanoseek "
                              f"understands ({SCHEMA_VERSION}); upgrade nanoseek")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            if version not in MIGRATIONS:
                raise SchemaError(f"no migration from schema version {version - 1} to {version}")
            MIGRATIONS[version](conn)
            conn.execute(schema_version.insert().values(version=version, applied_at=utcnow()))
    return SCHEMA_VERSION
