"""`nanoseek serve --worker`: the local engine behind an unauthenticated OpenAI API, for a gateway.

    accounts = Unmetered()                       # every caller is the gateway: no keys, no ledger
    key_admin = NoKeyAdmin()                     # ... and no per-key settings
    check_worker_host("127.0.0.1")               # loopback and private addresses only ...
    check_worker_host("0.0.0.0", allow_public=True)   # ... unless the operator says otherwise

A worker keeps no balances: the gateway in front of it authenticates, limits, holds and settles.
So it must not be reachable from the internet, and it refuses to bind an interface that is (or may
be) public unless started with --allow-public.
"""

from __future__ import annotations

import ipaddress
import socket
from datetime import datetime, timezone
from decimal import Decimal

from .accounts import Key, Reservation
from .key_admin import KeySettings

WORKER_KEY = Key(id=0, name="worker", key_prefix="", balance=Decimal("1e12"), held=Decimal(0),
                 created_at=datetime(2020, 1, 1, tzinfo=timezone.utc), revoked_at=None)


class Unmetered:
    """The Accounts interface the routes use, with nothing to check and nothing to bill."""

    def authenticate(self, bearer_token: str | None) -> Key:
        return WORKER_KEY

    def reserve(self, key, request_id: str, max_cost, prices, model: str = "") -> Reservation:
        return Reservation(WORKER_KEY.id, request_id, Decimal(0), prices, model)

    def settle(self, reservation: Reservation, usage) -> None:
        return None

    def release(self, reservation: Reservation) -> None:
        return None

    def record_progress(self, reservation: Reservation, usage) -> bool:
        return True

    # the lease a server keeps on its holds (leases.LeaseKeeper): a worker holds nothing
    instance_id = "worker"

    def renew_lease(self, ttl_s: float) -> bool:
        return True

    def settle_orphans(self) -> int:
        return 0

    def end_lease(self) -> None:
        return None

    def close(self) -> None:
        return None


class NoKeyAdmin:
    """The worker's one caller has the server's limits (the gateway's keys have their own there)."""

    def settings(self, key_id: int) -> KeySettings:
        return KeySettings()


def is_private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or (ip.is_private and not ip.is_unspecified) or ip.is_link_local


def check_worker_host(host: str, allow_public: bool = False) -> None:
    """ValueError unless every address `host` names is loopback or private (or allow_public)."""
    if allow_public:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: cannot resolve it ({e})") from None
    public = sorted(a for a in addresses if not is_private(a))
    if public:
        raise ValueError(f"--host {host!r} binds {', '.join(public)}, which is not a loopback or private "
                         "address; a worker has no authentication, so it serves only a private network. "
                         "Pass --allow-public to bind it anyway (behind your own firewall)")
