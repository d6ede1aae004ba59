import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_info_prints_table_1_numbers_for_v2():
    out = subprocess.run([sys.executable, "-m", "nanoseek", "info", str(ROOT / "configs/deepseek-v2.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "total 235.74B" in out and "active per token 21.38B" in out
    assert "34,560 elements" in out  # MLA: (512 + 64) * 60
    assert "1,966,080 elements" in out  # MHA: 2 * 128 * 128 * 60
    assert "2.25 groups" in out


def test_info_on_a_bad_path_fails_clearly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanoseek", "info", str(tmp_path / "nope.json")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.returncode == 2
    assert "nanoseek info: error:" in r.stderr and "nope.json" in r.stderr
    assert "Traceback" not in r.stderr


def test_info_kernels_times_the_configs_shapes_and_caches_the_choice(tmp_path):
    import json
    import os

    from tests.conftest import tiny_v2

    tiny_v2().to_json(tmp_path / "config.json")
    env = {**os.environ, "NANOSEEK_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "nanoseek", "info", str(tmp_path / "config.json"), "--kernels",
                          "--max-rows", "2"], capture_output=True, text=True, check=True, env=env).stdout
    assert "kernels on" in out and "[64, 64]" in out and "[96, 64]" in out  # o_proj; the lm_head
    cached = json.loads((tmp_path / "cache" / "kernels.json").read_text())
    (entries,) = cached.values()
    # the key names the weight's layout when column-major measured faster (a per-host choice)
    from nanoseek.model import cpu_kernels

    gemv = cpu_kernels.unsupported() is None  # then the C++ kernel is a candidate too, and names the key
    layout = entries["dense-layout|96|64|1,2" + ("|gemv" if gemv else "")]["layout"]
    key = "dense|2|96|64" + ("|col" if layout == "col" else "")
    assert key in entries and entries[key]["kernel"] in ("F.linear", "small_rows") + (("gemv",) if gemv else ())
    assert ("gemv" in entries[key]["us"]) == (gemv and layout == "row")  # it needs row-major weights
