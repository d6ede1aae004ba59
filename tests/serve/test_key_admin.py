"""Per-key settings: the admin flag and limits in the store, the `keys` CLI that sets them, and the
limiter enforcing them over the server-wide defaults."""

from __future__ import annotations

import pytest

from nanoseek import cli
from nanoseek.serve.accounts import AccountsError
from nanoseek.serve.key_admin import KeyAdmin, KeySettings, LimitsUpdate
from nanoseek.serve.limits import KeyLimits, Limiter

DEFAULT = KeyLimits(requests_per_minute=600, tokens_per_minute=1000, max_concurrent=4)


def test_settings_fall_back_to_the_server_defaults_and_0_is_unlimited():
    assert KeySettings().limits(DEFAULT) == DEFAULT
    own = KeySettings(requests_per_minute=5, tokens_per_minute=0, max_concurrent=None)
    assert own.limits(DEFAULT) == KeyLimits(5, None, 4)


@pytest.mark.parametrize("values, fragment", [
    ({"requests_per_minute": -1}, "requests_per_minute=-1"), ({"max_concurrent": "two"}, "'two'"),
    ({"tokens_per_minute": 1.5}, "1.5"), ({"max_concurrent": True}, "True"), ({"rpm": 1}, "unknown limit 'rpm'")])
def test_bad_limits_are_refused_by_name(values, fragment):
    with pytest.raises(AccountsError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        LimitsUpdate.parse(values)


def test_store_keeps_admin_and_limits_and_logs_each_change(accounts):
    admin = KeyAdmin(accounts)
    root, _ = admin.create_key("root", "0", admin=True)
    alice, _ = admin.create_key("alice", "1", actor=root.id)
    plain, _ = accounts.create_key("plain", "0")  # made without settings: an ordinary key
    assert admin.settings(root.id).admin and not admin.settings(alice.id).admin
    assert admin.settings(plain.id) == KeySettings()
    admin.set_limits("alice", LimitsUpdate.parse({"requests_per_minute": "7", "max_concurrent": 0}), actor=root.id)
    assert admin.settings(alice.id) == KeySettings(False, 7, None, 0)
    admin.topup(alice.id, "2", actor=root.id)
    admin.revoke(alice.id, actor=root.id)
    assert [(a.action, a.actor_key_id) for a in admin.log(target=alice.id)] == [
        ("revoke", root.id), ("topup", root.id), ("limits", root.id), ("create", root.id)]
    assert accounts.audit() == []
    assert set(admin.all_settings()) == {root.id, alice.id}


def test_keys_cli_creates_admin_keys_and_sets_limits(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'keys.db'}"
    assert cli.main(["keys", "create", "--name", "root", "--admin", "--db", db]) == 0
    assert cli.main(["keys", "create", "--name", "alice", "--db", db]) == 0
    capsys.readouterr()
    assert cli.main(["keys", "limits", "alice", "--rpm", "60", "--concurrency", "0", "--db", db]) == 0
    assert "rpm 60, tpm server default, concurrency unlimited" in capsys.readouterr().out
    assert cli.main(["keys", "limits", "alice", "--tpm", "500", "--db", db]) == 0  # rpm kept
    assert "rpm 60, tpm 500" in capsys.readouterr().out
    assert cli.main(["keys", "limits", "alice", "--rpm", "default", "--db", db]) == 0
    assert "rpm server default, tpm 500" in capsys.readouterr().out
    assert cli.main(["keys", "limits", "alice", "--rpm", "-2", "--db", db]) == 2
    assert "requests_per_minute=-2" in capsys.readouterr().err
    assert cli.main(["keys", "limits", "root", "--db", db]) == 0
    assert capsys.readouterr().out.strip().endswith(", admin")
    assert cli.main(["keys", "admin", "root", "--revoke", "--db", db]) == 0
    from nanoseek.serve.accounts import Accounts
    acc = Accounts(db)
    assert not KeyAdmin(acc).settings(acc.get_key("root").id).admin
    acc.close()


def test_limiter_applies_a_keys_own_limits_from_its_next_request():
    now = [0.0]
    lim = Limiter(KeyLimits(requests_per_minute=None, tokens_per_minute=None, max_concurrent=2), clock=lambda: now[0])
    first = lim.acquire("a")
    assert first.allowed and lim.acquire("a").allowed and not lim.acquire("a").allowed  # default: 2 at once
    lim.release(first.permit)
    lim.set_limits("a", KeyLimits(requests_per_minute=1, tokens_per_minute=None, max_concurrent=5))
    # was unlimited: the new bucket starts full (one request), then refuses until it refills
    assert lim.acquire("a").allowed
    refused = lim.acquire("a")
    assert not refused.allowed and refused.reason == "requests"
    assert lim.acquire("b").allowed  # another key keeps the default
    lim.set_limits("a", None)
    assert lim.limits_for("a") == lim.default
