"""The shipped systemd unit, udev rule and installer, checked without booting anything: the unit's settings,
`systemd-analyze verify` and the offline `systemd-analyze security` exposure score. (Booting it for real
under systemd is tests/reliability/test_real_systemd.py, marked slow.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "appliance.service"
RULE = SYSTEMD / "99-appliance-scanner.rules"
INSTALL = SYSTEMD / "install.sh"
MAX_EXPOSURE = 2.5
EXEC_START = "/opt/appliance/venv/bin/appliance --config /etc/appliance/appliance.toml run"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; keys may repeat (an empty value resets a list, as systemd does)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """systemd-analyze from PATH; the tests that need it skip when it is not installed (nothing is installed)."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package), so the unit cannot be "
                    "verified or scored here")
    return exe


def console_script() -> Path:
    """`appliance`, the console script of the Python running the tests (its venv's bin/, wherever that is)."""
    return Path(sys.executable).parent / "appliance"


def test_the_unit_is_a_notify_service_with_a_watchdog_run_as_the_appliance_user(unit):
    s = unit["Service"]
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == EXEC_START
    assert re.fullmatch(r"\d+s", one["WatchdogSec"]) and 10 <= int(one["WatchdogSec"][:-1]) <= 120
    assert one["Restart"] == "on-failure" and one["RestartSec"]
    assert one["User"] == "appliance" and one["Group"] == "appliance"
    assert one["SupplementaryGroups"] == "dialout"
    assert one["StateDirectory"] == "appliance" and one["ConfigurationDirectory"] == "appliance"
    assert one["StandardOutput"] == one["StandardError"] == "journal"
    assert one["UMask"] == "0077"
    assert one["CapabilityBoundingSet"] == "" and one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict" and one["ProtectProc"] == "invisible" and one["ProcSubset"] == "pid"
    assert one["DevicePolicy"] == "closed"
    assert sorted(s["DeviceAllow"]) == ["char-ttyACM rw", "char-ttyUSB rw"]  # the serial port, nothing else
    assert s["IPAddressDeny"] == ["any"] and s["IPAddressAllow"] == ["localhost"]
    assert one["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    # The API is on localhost and the scanner is a device: neither may be cut off.
    assert one.get("PrivateNetwork", "no") == "no" and one.get("PrivateUsers", "no") == "no"
    assert one.get("PrivateDevices", "no") == "no"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_installer_puts_the_venv_and_config_where_the_unit_looks(unit):
    """ExecStart and the installer must agree on the paths (the unit cannot be verified against /opt here)."""
    script = INSTALL.read_text()
    assert "PREFIX=/opt/appliance" in script and "VENV=$PREFIX/venv" in script
    assert "CONF=$CONF_DIR/appliance.toml" in script and "CONF_DIR=/etc/appliance" in script
    assert "DATA_DIR=/var/lib/appliance" in script and "SERVICE_USER=appliance" in script
    assert re.search(r'data_dir = "\$DATA_DIR"', script) and 'serial_port = "/dev/scanner"' in script
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    subprocess.run(["bash", "-n", str(SYSTEMD / "uninstall.sh")], check=True)


def world_traversable_temp_folder() -> Path | None:
    """The temporary folder, if another user can reach what is made in it (every folder above it o+x)."""
    base = Path(tempfile.gettempdir()).resolve()
    if all(p.stat().st_mode & 0o001 for p in (base, *base.parents)):
        return base
    return None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_the_installer_refuses_to_run_without_root():
    # The unprivileged user must be able to read the script, as in a lab user's own checkout; this checkout may
    # sit in a folder only root can enter, so the user runs a copy in a world-readable folder.
    base = world_traversable_temp_folder()
    if base is None:
        pytest.skip(f"{tempfile.gettempdir()} (TMPDIR) cannot be entered by another user: nowhere to put a copy "
                    "of install.sh that an unprivileged user can read")
    folder = Path(tempfile.mkdtemp(prefix="installer-", dir=base))
    try:
        folder.chmod(0o755)
        copy = folder / "systemd" / "install.sh"
        copy.parent.mkdir(mode=0o755)
        shutil.copy(INSTALL, copy)
        copy.chmod(0o755)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(copy)],
                           capture_output=True, text=True)
    finally:
        shutil.rmtree(folder)
    assert r.returncode == 1 and "must run as root" in r.stderr, r.stderr


def test_the_udev_rule_names_the_scanner_for_the_dialout_group():
    rules = [ln for ln in RULE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(rules) == 1
    pairs = re.findall(r'([A-Za-z_]+(?:\{[^}]+\})?)\s*(==|!=|\+=|:=|=)\s*"([^"]*)"', rules[0])
    assert ", ".join(f'{k}{op}"{v}"' for k, op, v in pairs) == rules[0].strip()  # nothing unparsed
    got = {(k, op): v for k, op, v in pairs}
    assert got[("SUBSYSTEM", "==")] == "tty"
    assert got[("ATTRS{idVendor}", "==")] == "0403" and got[("ATTRS{idProduct}", "==")] == "6001"  # FTDI default
    assert got[("SYMLINK", "+=")] == "scanner"
    assert got[("GROUP", "=")] == "dialout" and got[("MODE", "=")] == "0660"


def _verify(systemd_analyze: str, tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "appliance.service"
    path.write_text(text)
    return subprocess.run([systemd_analyze, "verify", "--man=no", str(path)], capture_output=True, text=True)


def test_systemd_analyze_verify_passes(systemd_analyze, tmp_path):
    # `verify` checks that ExecStart's program exists. /opt/appliance/venv/bin/appliance exists only on an
    # installed bench PC, so the unit is verified as a copy whose ExecStart points at the `appliance` console
    # script of the venv running the tests (the same console script, same arguments); nothing else is changed.
    # The path agreement between unit and installer is checked in the test above.
    local = console_script()
    assert local.is_file() and os.access(local, os.X_OK), \
        f"{local} is missing: install the package into the venv running the tests (pip install -e '.[dev]')"
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/appliance/venv/bin/appliance ") == 1
    r = _verify(systemd_analyze, tmp_path, text.replace("ExecStart=/opt/appliance/venv/bin/appliance ",
                                                        f"ExecStart={local} "))
    assert r.returncode == 0 and "appliance.service" not in (r.stdout + r.stderr), r.stdout + r.stderr

    # The check can fail: the unit as shipped (ExecStart missing here) and a mistyped setting both complain.
    r = _verify(systemd_analyze, tmp_path, text)
    assert "/opt/appliance/venv/bin/appliance" in r.stderr
    r = _verify(systemd_analyze, tmp_path, text.replace("Type=notify", "Type=notfy"))
    assert "notfy" in r.stderr


def test_offline_security_exposure_is_at_most_2_5(systemd_analyze):
    r = subprocess.run([systemd_analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    m = re.search(r"Overall exposure level for appliance\.service:\s*([0-9]+(?:\.[0-9]+)?)", out)
    assert m, out
    exposure = float(m.group(1))
    print(f"\nsystemd-analyze security --offline=true: overall exposure {exposure} (limit {MAX_EXPOSURE})")
    for line in out.splitlines():
        if line.startswith("✗"):
            print("  " + " ".join(line.split()))
    assert exposure <= MAX_EXPOSURE, out
