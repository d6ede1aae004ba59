"""The web console in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright for Python, against a live server on 127.0.0.1.

    make test-console                                   # these tests alone
    NANOSEEK_SCREENSHOTS=docs make test-console         # also rewrite the README's screenshots

Every page the tests open records every request it makes (all must go to the server's own origin)
and every console message and uncaught error (none allowed but the 401/403 a test provokes).
Screenshots go to the test's tmp folder; with NANOSEEK_SCREENSHOTS=DIR the README's ones are
written there too. A missing browser fails the tests (it does not skip them): CI installs it.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from nanoseek.serve.key_admin import KeyAdmin
from nanoseek.serve.pricing import format_money
from tests.serve.test_app import chat, model_dir, sheet, start_server  # noqa: F401  (fixtures)

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the console tests need Playwright for Python: pip install -e '.[test]'")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium) "
                    "or point NANOSEEK_CHROMIUM at a Chromium binary")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(model_dir, sheet, tmp_path_factory):  # noqa: F811
    db = f"sqlite:///{tmp_path_factory.mktemp('console') / 'accounts.db'}"
    live = start_server(model_dir, db, sheet)
    yield live
    live.stop()
    live.state.accounts.close()


@pytest.fixture(scope="module")
def keys(server):
    admin = KeyAdmin(server.state.accounts)
    made = {}
    for name, balance, is_admin in [("root", "0", True), ("alice", "10", False), ("bob", "10", False)]:
        made[name] = admin.create_key(name, balance, admin=is_admin)
    return made


class Page:
    """A fresh browser tab (own session storage) that records requests, console messages and errors."""

    def __init__(self, browser, server, tmp_path: Path):
        self.context = browser.new_context(viewport={"width": 1280, "height": 860})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.server, self.tmp_path = server, tmp_path
        self.requests: list[str] = []
        self.closed = False
        self.console: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.console.append(m.text))
        self.page.on("pageerror", lambda e: self.console.append(f"uncaught: {e}"))

    def sign_in(self, secret: str) -> None:
        self.page.goto(self.server.url + "/")
        self.page.fill("#key-input", secret)
        self.page.click("#sign-in-form button")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.tmp_path / f"{name}.png"), full_page=True)
        out = os.environ.get("NANOSEEK_SCREENSHOTS")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(out) / f"console-{name}.png"), full_page=True)

    def check(self, allowed_console: tuple[str, ...] = ()) -> None:
        origin = urlsplit(self.server.url)
        elsewhere = [u for u in self.requests
                     if not u.startswith("data:") and urlsplit(u)[:2] != origin[:2]]
        assert not elsewhere, f"the page reached outside its origin: {elsewhere}"
        assert self.requests, "no requests recorded"
        unexpected = [m for m in self.console if not any(re.search(a, m) for a in allowed_console)]
        assert not unexpected, f"console errors: {unexpected}"
        self.context.close()
        self.closed = True


@pytest.fixture
def tab(browser, server, tmp_path):
    t = Page(browser, server, tmp_path)
    yield t
    if not t.closed:  # the test failed before check(): keep what the page showed and said
        t.page.screenshot(path=str(tmp_path / "at-failure.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'at-failure.png'}\nconsole: {t.console}\nrequests: {t.requests}")
        t.context.close()


def test_sign_in_rejects_a_bad_key_and_shows_the_balance(tab, server, keys):
    tab.sign_in("sk-" + "0" * 64)
    error = tab.page.locator("#sign-in-error")
    error.wait_for(state="visible")
    assert "not accepted" in error.inner_text()
    assert tab.page.evaluate("sessionStorage.length") == 0  # the bad key is not kept
    alice, secret = keys["alice"]
    tab.page.fill("#key-input", secret)
    tab.page.click("#sign-in-form button")
    expected = format_money(server.state.accounts.get_key(alice.id).available)
    # not wait_for_function("..."): a string predicate that is false at first is polled through eval,
    # which the console's Content-Security-Policy refuses (so the wait failed whenever the balance
    # came after the first check); Playwright's own assertions run in its injected script
    from playwright.sync_api import expect

    expect(tab.page.locator("#balance")).not_to_have_text("–", timeout=TIMEOUT_MS)
    assert tab.page.inner_text("#balance") == expected
    assert not tab.page.locator("#nav-admin").is_visible()
    assert secret not in tab.page.url and all(secret not in u for u in tab.requests)
    tab.page.goto(server.url + "/#/billing")
    tab.page.locator("#price-table").wait_for()
    assert tab.page.inner_text("#bal-available").startswith(expected)
    price = tab.page.inner_text("#price-table tr[data-kind=output] .price")
    assert Decimal(price) == server.state.sheet.prices.output
    tab.check(allowed_console=(r"status of 401",))


def test_playground_streams_a_reply_and_shows_its_usage_and_cost(tab, server, keys):
    _, secret = keys["alice"]
    tab.sign_in(secret)
    tab.page.locator("#pg-form").wait_for()
    # record each length the reply's text passes through, to see it arrive in pieces
    tab.page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const c = document.querySelector('.msg.assistant .content');
            if (c) window.lengths.push(c.textContent.length);
        }).observe(document.querySelector('#pg-transcript'), {subtree: true, childList: true, characterData: true});
    }""")
    tab.page.fill("#pg-system", "Answer briefly.")
    tab.page.fill("#pg-max-tokens", "24")
    tab.page.fill("#pg-message", "def add(a, b):")
    tab.page.click("#pg-send")
    line = tab.page.locator(".msg.assistant .usage-line")
    line.wait_for()
    lengths = tab.page.evaluate("window.lengths")
    assert len(set(x for x in lengths if x > 0)) > 1, f"the reply did not stream: lengths {lengths}"
    request_id = line.get_attribute("data-request-id")
    row = server.state.accounts.ledger_row(request_id)
    text = line.inner_text()
    assert f"output {row.output_tokens}" in text and row.output_tokens == 24
    assert f"cache hit {row.cache_hit_tokens}, miss {row.cache_miss_tokens}" in text
    assert f"cost {format_money(row.amount)} {server.state.sheet.currency}" in text
    tab.shot("playground")
    tab.check()


def test_usage_page_shows_two_requests_with_the_ledgers_costs(tab, server, keys):
    bob, secret = keys["bob"]
    ids = [chat(server.client(secret), "hello", max_tokens=n).id for n in (3, 5)]
    rows = [server.state.accounts.ledger_row(i) for i in ids]
    tab.sign_in(secret)
    tab.page.locator("#pg-form").wait_for()
    tab.page.click("a[href='#/usage']")
    tab.page.locator("#requests-table").wait_for()
    for row in rows:
        tr = tab.page.locator(f"#requests-table tr[data-request-id='{row.request_id}']")
        assert tr.locator(".cost").inner_text() == format_money(row.amount)
    assert tab.page.locator("#requests-table tbody tr").count() == 2
    today = datetime.now(timezone.utc).date().isoformat()

    def bar(series: str) -> float:
        return float(tab.page.get_attribute(f"rect[data-series='{series}'][data-label='{today}']", "data-value"))

    assert bar("output") == sum(r.output_tokens for r in rows) == 8
    assert bar("cache miss") + bar("cache hit") == sum(r.cache_miss_tokens + r.cache_hit_tokens for r in rows)
    assert Decimal(str(bar("spend"))) == pytest.approx(sum(r.amount for r in rows))
    tab.shot("usage")
    # the server page shows the counters /metrics exports
    tab.page.click("a[href='#/server']")
    tab.page.locator("#srv-gen-total").wait_for()
    metrics = httpx.get(server.url + "/metrics").text
    total = next(x for x in metrics.splitlines() if x.startswith("nanoseek:generation_tokens_total"))
    assert tab.page.inner_text("#srv-gen-total") == f"{int(float(total.split()[-1])):,}"
    assert tab.page.inner_text("#srv-alive") == "running"
    tab.check()


def test_admin_creates_tops_up_and_revokes_a_key(tab, server, keys):
    root, secret = keys["root"]
    tab.sign_in(secret)
    tab.page.locator("#nav-admin").wait_for(state="visible")
    tab.page.click("#nav-admin")
    tab.page.fill("#new-key-name", "carol")
    tab.page.fill("#new-key-balance", "1")
    tab.page.click("#new-key-form button")
    carol_secret = tab.page.locator("#new-key-secret").inner_text()
    carol = server.state.accounts.authenticate(carol_secret)
    assert carol is not None and carol.name == "carol" and carol.balance == Decimal("1")
    row = tab.page.locator("#keys-table tr[data-key-name='carol']")
    row.locator("input.amount").fill("2.5")
    row.locator("button.topup").click()
    tab.page.locator("#admin-message .ok", has_text="Topped up carol").wait_for()
    assert server.state.accounts.get_key(carol.id).balance == Decimal("3.5")
    assert row.locator(".balance").inner_text() == "3.50"
    row.locator("input.limit[name=rpm]").fill("30")
    row.locator("button.save-limits").click()
    tab.page.locator("#admin-message .ok", has_text="Limits of carol saved").wait_for()
    assert KeyAdmin(server.state.accounts).settings(carol.id).requests_per_minute == 30
    chat(server.client(carol_secret), max_tokens=2)  # works before the revoke
    tab.shot("admin")
    row.locator("button.revoke").click()
    tab.page.locator("#admin-message .ok", has_text="Revoked carol").wait_for()
    with pytest.raises(openai.AuthenticationError) as e:
        chat(server.client(carol_secret), max_tokens=2)
    assert e.value.status_code == 401
    log = [(a.action, a.actor_key_id) for a in KeyAdmin(server.state.accounts).log(target=carol.id)]
    assert log == [("revoke", root.id), ("limits", root.id), ("topup", root.id), ("create", root.id)]
    assert tab.page.locator("#log-table tbody tr").count() >= 4
    tab.check()


def test_a_non_admin_key_cannot_open_admin_or_call_its_endpoints(tab, server, keys):
    alice, secret = keys["alice"]
    tab.sign_in(secret)
    tab.page.locator("#pg-form").wait_for()
    assert not tab.page.locator("#nav-admin").is_visible()
    tab.page.goto(server.url + "/#/admin")
    tab.page.locator("#page-admin .error").wait_for()
    assert "not an admin key" in tab.page.inner_text("#page-admin")
    assert tab.page.locator("#keys-table").count() == 0
    statuses = tab.page.evaluate("""async ([id]) => {
        const h = {Authorization: `Bearer ${sessionStorage.getItem('nanoseek.key')}`, 'Content-Type': 'application/json'};
        const calls = [['GET', '/v1/dashboard/admin/keys'], ['GET', '/v1/dashboard/admin/log'],
                       ['POST', '/v1/dashboard/admin/keys', {name: 'mallory', balance: '5'}],
                       ['POST', `/v1/dashboard/admin/keys/${id}/topup`, {amount: '100'}],
                       ['PUT', `/v1/dashboard/admin/keys/${id}/limits`, {rpm: 100000}]];
        const out = [];
        for (const [method, path, body] of calls)
            out.push((await fetch(path, {method, headers: h, body: body && JSON.stringify(body)})).status);
        return out;
    }""", [alice.id])
    assert statuses == [403] * 5
    assert server.state.accounts.get_key(alice.id).balance <= Decimal("10")
    assert "mallory" not in {k.name for k in server.state.accounts.list_keys()}
    tab.check(allowed_console=(r"status of 403",))
