"""Memory over a long run: bench/soak.py streams 100 cases back to back through one `appliance run` process
(on a real pty, with the real model and SQLite) and reads its VmRSS after each case; the resident memory may
grow by less than 5% from case 10 to case 100. A memory figure, not a wall-clock time.

Slow (not in `make test`, nor so in CI, which runs `make test`): `make test-slow` runs it."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_rss_grows_less_than_5_percent_over_100_cases(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--cases", "100", "--json", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["rss_series_kb"]) == 100 and res["daemon_exit_code"] == 0
    print(f"soak: RSS at case 10 {res['rss10_kb'] / 1024:.1f} MB, at case 100 {res['rss100_kb'] / 1024:.1f} MB, "
          f"rss_growth {res['rss_growth']:+.4f}")
    assert res["rss_growth"] < 0.05, res["rss_growth"]
