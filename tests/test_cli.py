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
