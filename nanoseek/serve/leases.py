"""Server leases: every server instance renews a row in `leases`; its holds name it. A hold whose
instance has no live lease is an orphan, and any server may settle it (Accounts.settle_orphans).

    from nanoseek.serve.leases import LeaseKeeper
    keeper = LeaseKeeper(accounts, ttl_s=30)   # a thread: renews every ttl/3, settles orphans it finds
    keeper.start(); ...; keeper.stop()          # stop: ends the lease, settles what it still holds

A lease lives `ttl_s` seconds after its last renewal; servers compare it with their own clocks, so
clocks must agree to well within the TTL (NTP does). Within one machine (same hostname, boot and
pid namespace) a lease whose process is gone is dead at once, so a restart after a crash settles
the dead server's holds immediately instead of after the TTL. The renewal runs in a thread, not on
the event loop, so a stalled loop does not lose the lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from .db import holds, leases

log = logging.getLogger("nanoseek.serve")

DEFAULT_TTL_S = 30.0


def local_identity() -> str:
    """hostname/boot id/pid namespace: two processes with the same identity see each other's pids.
    Just the hostname where the rest is unknown (then pids are never trusted)."""
    host = socket.gethostname()[:128]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return host
    return f"{host}/{boot}/{pidns}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def renew(conn: Connection, instance_id: str, ttl_s: float, now: datetime) -> bool:
    """Extend the lease to now + ttl_s; creates it when missing. False when it was missing (never
    taken, or ended and its holds settled by another server after it expired)."""
    expires = now + timedelta(seconds=ttl_s)
    if conn.execute(leases.update().where(leases.c.instance_id == instance_id)
                    .values(expires_at=expires)).rowcount == 1:
        return True
    # an upsert: two first reservations of one instance may both find the row missing
    dialect = {"postgresql": postgresql, "sqlite": sqlite}[conn.dialect.name]
    stmt = dialect.insert(leases).values(instance_id=instance_id, host=local_identity(), pid=os.getpid(),
                                         started_at=now, expires_at=expires)
    conn.execute(stmt.on_conflict_do_update(index_elements=[leases.c.instance_id],
                                            set_={"expires_at": stmt.excluded.expires_at}))
    return False


def ensure_live(conn: Connection, instance_id: str, ttl_s: float, now: datetime) -> None:
    """Inside a transaction that adds a hold for instance_id: make sure its lease is live until the
    transaction commits. The shared row lock (PostgreSQL) keeps a reaper from ending the lease
    between this check and the commit; SQLite serialises writers anyway."""
    row = conn.execute(select(leases.c.expires_at).where(leases.c.instance_id == instance_id)
                       .with_for_update(read=True)).first()
    if row is None or row.expires_at < now + timedelta(seconds=ttl_s / 2):
        renew(conn, instance_id, ttl_s, now)


def expire(conn: Connection, instance_id: str, now: datetime) -> None:
    conn.execute(leases.update().where(leases.c.instance_id == instance_id).values(expires_at=now))


def dead_instances(conn: Connection, now: datetime) -> list[str]:
    """Lock and return the instances whose lease has expired, or whose process on this machine is
    gone (their expiry is moved to now, so the rest of the transaction sees them expired)."""
    me = local_identity()
    dead = list(conn.execute(select(leases.c.instance_id).where(leases.c.expires_at < now)
                             .order_by(leases.c.instance_id).with_for_update()).scalars())
    if "/" in me:  # pids are checked unlocked; only the leases of dead ones are locked and expired
        local = conn.execute(select(leases.c.instance_id, leases.c.pid).where(
            and_(leases.c.host == me, leases.c.expires_at >= now, leases.c.pid != os.getpid()))).all()
        gone = sorted(row.instance_id for row in local if not pid_alive(row.pid))
        if gone:
            conn.execute(select(leases.c.instance_id).where(leases.c.instance_id.in_(gone))
                         .order_by(leases.c.instance_id).with_for_update())
            conn.execute(leases.update().where(leases.c.instance_id.in_(gone))
                         .values(expires_at=now - timedelta(microseconds=1)))
            dead += gone
    return dead


def orphaned(now: datetime):
    """Holds no live lease covers: their instance's lease expired, or they predate leases."""
    live = select(leases.c.instance_id).where(leases.c.expires_at >= now)
    return or_(holds.c.instance_id.is_(None), holds.c.instance_id.not_in(live))


def anything_to_settle(conn: Connection, now: datetime) -> bool:
    """Read-only, lock-free check whether settling orphans would do anything: an orphaned hold,
    an expired lease, or a live-looking lease on this machine whose process is gone."""
    if conn.execute(select(holds.c.request_id).where(orphaned(now)).limit(1)).first():
        return True
    if conn.execute(select(leases.c.instance_id).where(leases.c.expires_at < now).limit(1)).first():
        return True
    me = local_identity()
    if "/" not in me:
        return False
    rows = conn.execute(select(leases.c.pid).where(and_(leases.c.host == me, leases.c.expires_at >= now)))
    return any(pid != os.getpid() and not pid_alive(pid) for (pid,) in rows)


class LeaseKeeper:
    """Renews one instance's lease every ttl/3 seconds in a daemon thread and settles orphaned
    holds (of any dead instance) each time round."""

    def __init__(self, accounts, ttl_s: float = DEFAULT_TTL_S):
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s={ttl_s} must be > 0")
        self.accounts, self.ttl_s = accounts, ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = 0            # times the lease was found ended by another server

    def start(self) -> None:
        """Take the lease and settle the orphans of dead servers, then keep renewing."""
        self.accounts.renew_lease(self.ttl_s)
        self.accounts.settle_orphans()
        self._thread = threading.Thread(target=self._run, name="nanoseek-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.accounts.renew_lease(self.ttl_s):
                    self.lost += 1
                    log.warning("lease %s had ended (this server stalled past its TTL); its holds were "
                                "settled by another server at their recorded progress",
                                self.accounts.instance_id)
                self.accounts.settle_orphans()
            except Exception:  # the database may be briefly away; the next round tries again
                log.exception("lease renewal failed; retrying in %.1fs", self.ttl_s / 3)

    def stop(self) -> None:
        """End the lease: what this instance still holds is settled at its recorded progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.accounts.end_lease()


def progress_due(recorded_tokens: int, recorded_at: float, tokens: int, now: float,
                 every_tokens: int, every_s: float) -> bool:
    """Whether a request's usage should be written onto its hold now: at its first output token
    (so a crash bills the prompt), then every `every_tokens` output tokens or `every_s` seconds.
    Checked before the tokens are sent, so delivered tokens never run K = every_tokens or more
    ahead of the recorded ones."""
    if tokens <= recorded_tokens:
        return False
    return recorded_tokens == 0 or tokens - recorded_tokens >= every_tokens or now - recorded_at >= every_s
