"""The console's JSON endpoints against a live server: each key reads only its own rows, admin
endpoints refuse other keys with 403, admin actions land in the ledger and the admin trail, and
per-key limits set there are what the limiter enforces. (The pages themselves: test_console_browser.)"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from nanoseek.serve.key_admin import KeyAdmin
from nanoseek.serve.pricing import format_money
from tests.serve.test_app import chat, live, model_dir, sheet  # noqa: F401  (fixtures)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def keys(live):
    admin = KeyAdmin(live.state.accounts)
    root, root_secret = admin.create_key("root", "0", admin=True)
    alice, alice_secret = admin.create_key("alice", "10")
    bob, bob_secret = admin.create_key("bob", "10")
    return {"root": (root, root_secret), "alice": (alice, alice_secret), "bob": (bob, bob_secret)}


def get(live, path: str, secret: str | None) -> httpx.Response:
    return httpx.get(live.url + path, headers=bearer(secret) if secret else {}, timeout=30)


def test_pages_are_served_with_a_same_origin_policy(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert '<script type="module" src="/console/app.js">' in r.text
    for asset in ("app.js", "api.js", "charts.js", "style.css"):
        assert httpx.get(f"{live.url}/console/{asset}").status_code == 200, asset
    # nothing the console ships names another origin (the browser test records every request too)
    from nanoseek.serve.routes_console import CONSOLE_DIR
    for f in CONSOLE_DIR.iterdir():
        assert not re.search(r"""(src|href|url)\(?\s*=?\s*["']?(https?:)?//""", f.read_text()), f.name


@pytest.mark.parametrize("path", ["/v1/dashboard/me", "/v1/dashboard/usage", "/v1/dashboard/requests",
                                  "/v1/dashboard/server", "/v1/dashboard/admin/keys"])
def test_every_endpoint_needs_a_key(live, path):
    r = get(live, path, None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert get(live, path, "sk-" + "0" * 64).status_code == 401


def test_a_key_sees_only_its_own_usage(live, keys):
    (alice, a), (bob, b) = keys["alice"][:2], keys["bob"]
    ra, rb = chat(live.client(a), max_tokens=5), chat(live.client(b), max_tokens=3)
    me = get(live, "/v1/dashboard/me", a).json()
    assert me["name"] == "alice" and me["admin"] is False
    assert me["available"] == format_money(live.state.accounts.get_key(alice.id).available)
    page = get(live, "/v1/dashboard/requests", a).json()
    assert [r["request_id"] for r in page["data"]] == [ra.id]
    row = live.state.accounts.ledger_row(ra.id)
    assert page["data"][0]["cost"] == format_money(row.amount) and page["data"][0]["output_tokens"] == 5
    assert get(live, f"/v1/dashboard/requests/{ra.id}", a).status_code == 200
    assert get(live, f"/v1/dashboard/requests/{rb.id}", a).status_code == 404  # bob's, not hers
    today = datetime.now(timezone.utc).date().isoformat()
    days = get(live, "/v1/dashboard/usage?days=3", a).json()["days"]
    assert [d["date"] for d in days][-1] == today and len(days) == 3
    assert days[-1]["output_tokens"] == 5 and days[-1]["requests"] == 1
    assert days[-1]["cost"] == format_money(row.amount)
    assert get(live, "/v1/dashboard/usage?days=0", a).status_code == 400


def test_requests_page_by_ledger_id(live, keys):
    _, a = keys["alice"]
    ids = [chat(live.client(a), max_tokens=2).id for _ in range(5)]
    first = get(live, "/v1/dashboard/requests?limit=2", a).json()
    second = get(live, f"/v1/dashboard/requests?limit=2&before={first['next_before']}", a).json()
    third = get(live, f"/v1/dashboard/requests?limit=2&before={second['next_before']}", a).json()
    seen = [r["request_id"] for p in (first, second, third) for r in p["data"]]
    assert seen == ids[::-1] and third["next_before"] is None


def test_server_metrics_are_the_metrics_counters(live, keys):
    _, a = keys["alice"]
    chat(live.client(a), max_tokens=4)
    m = get(live, "/v1/dashboard/server", a).json()
    text = httpx.get(live.url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("nanoseek:generation_tokens_total"))
    assert m["generation_tokens_total"] == int(float(line.split()[-1])) >= 4
    assert m["requests_running"] == 0 and m["engine_alive"] is True


def test_admin_endpoints_refuse_other_keys(live, keys):
    (alice, a), (_, b) = keys["alice"], keys["bob"]
    for method, path, body in [("GET", "/v1/dashboard/admin/keys", None), ("GET", "/v1/dashboard/admin/log", None),
                               ("POST", "/v1/dashboard/admin/keys", {"name": "x", "balance": "1"}),
                               ("POST", f"/v1/dashboard/admin/keys/{alice.id}/topup", {"amount": "5"}),
                               ("POST", f"/v1/dashboard/admin/keys/{alice.id}/revoke", None),
                               ("PUT", f"/v1/dashboard/admin/keys/{alice.id}/limits", {"rpm": 1})]:
        r = httpx.request(method, live.url + path, headers=bearer(b), json=body)
        assert r.status_code == 403, (method, path, r.text)
        assert "--admin" in r.json()["error"]["message"]
    after = live.state.accounts.get_key(alice.id)
    assert after.balance == Decimal("10") and after.active  # nothing happened
    assert KeyAdmin(live.state.accounts).settings(alice.id).requests_per_minute is None


def test_admin_actions_go_to_the_ledger_and_limits_are_enforced(live, keys):
    (root, r), (alice, a) = keys["root"], keys["alice"]
    post = lambda path, body=None: httpx.post(live.url + path, headers=bearer(r), json=body)  # noqa: E731
    created = post("/v1/dashboard/admin/keys", {"name": "carol", "balance": "1.5"}).json()
    carol_id, carol = created["id"], created["secret"]
    assert created["balance"] == "1.50" and not created["admin"]
    assert post(f"/v1/dashboard/admin/keys/{carol_id}/topup", {"amount": "2"}).json()["balance"] == "3.50"
    assert post(f"/v1/dashboard/admin/keys/{carol_id}/topup", {"amount": "-1"}).status_code == 400
    assert post(f"/v1/dashboard/admin/keys/{root.id}/revoke").status_code == 400  # not yourself
    chat(live.client(carol), max_tokens=2)
    assert post(f"/v1/dashboard/admin/keys/{carol_id}/revoke").json()["revoked_at"]
    with pytest.raises(openai.AuthenticationError):
        chat(live.client(carol), max_tokens=2)
    # the money trail: the top-up note names the admin; the admin trail names every action
    assert live.state.accounts.audit() == []
    log = get(live, "/v1/dashboard/admin/log", r).json()["data"]
    assert [(x["action"], x["actor_key_id"], x["target_key_id"]) for x in log][:3] == [
        ("revoke", root.id, carol_id), ("topup", root.id, carol_id), ("create", root.id, carol_id)]
    listed = {k["name"]: k for k in get(live, "/v1/dashboard/admin/keys", r).json()["data"]}
    assert listed["carol"]["usage"]["requests"] == 1 and listed["carol"]["revoked_at"]
    # per-key limits: one request a minute for alice; bob keeps the server's 600
    put = httpx.put(f"{live.url}/v1/dashboard/admin/keys/{alice.id}/limits", headers=bearer(r),
                    json={"rpm": 1, "tpm": None, "concurrency": 2})
    assert put.json()["effective_limits"] == {"rpm": 1, "tpm": 1_000_000, "concurrency": 2}
    chat(live.client(a), max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        chat(live.client(a), max_tokens=2)
    chat(live.client(keys["bob"][1]), max_tokens=2)
    chat(live.client(keys["bob"][1]), max_tokens=2)
    bad = httpx.put(f"{live.url}/v1/dashboard/admin/keys/{alice.id}/limits", headers=bearer(r), json={"rpm": -1})
    assert bad.status_code == 400 and "requests_per_minute" in bad.json()["error"]["message"]


def test_every_console_file_is_package_data():
    """A non-editable install carries the pages: pyproject's package-data globs cover every file."""
    import fnmatch
    import tomllib

    from nanoseek.serve.routes_console import CONSOLE_DIR
    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["nanoseek.serve"]
    for f in CONSOLE_DIR.iterdir():
        assert any(fnmatch.fnmatch(f"console/{f.name}", g) for g in globs), f"{f.name} is not in package-data"
