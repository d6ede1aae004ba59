"""The soak of bench/soak.py, 15 seconds instead of 60: 64 clients with abusive requests mixed in,
a SIGKILL and restart midway; the ledger audit must be clean and no 5xx may come outside the kill."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_a_short_soak_has_a_clean_audit_and_no_unexpected_5xx(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = soak  # dataclasses look their module up there
    spec.loader.exec_module(soak)
    out = tmp_path / "soak.json"
    rc = soak.main(["--duration", "15", "--clients", "64", "--workdir", str(tmp_path), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["unexpected_5xx"] == 0, r["unexpected_failures_by_kind"]
    assert r["audit"]["problems"] == [] and r["audit"]["held_after_end"] == "0"
    assert r["unexpected_failures"] == {} and r["health_not_ok_outside_kill"] == 0
    assert r["by_kind"]["stream"].get("200", 0) > 0 and r["audit"]["ledger_rows"] > 0
    assert rc == 0
