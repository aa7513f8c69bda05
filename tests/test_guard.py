"""scripts/guard.py, which every CI tier runs under: a hang, a killed test worker, runaway memory or an orphaned
process fails the tier within seconds of its limit, with one `error:` line, instead of hanging until CI's own limit."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

GUARD = Path(__file__).resolve().parents[1] / "scripts" / "guard.py"
PY = sys.executable


def guard(*command: str, limit_gib: float = 16, idle: int = 60, grace: int = 60, wall: int = 120, cwd=None):
    """Run a command under the guard; (exit code, stdout, stderr, seconds)."""
    start = time.monotonic()
    r = subprocess.run([PY, str(GUARD), "--label", "t", "--limit-gib", str(limit_gib), "--idle", str(idle),
                        "--grace", str(grace), "--wall", str(wall), "--", *command],
                       capture_output=True, text=True, timeout=150, cwd=cwd)
    return r.returncode, r.stdout, r.stderr, time.monotonic() - start


def test_passes_the_commands_exit_status_and_output_through_and_reports_time_and_peak():
    rc, out, err, _ = guard(PY, "-c", "import sys; print('hello'); sys.exit(3)")
    assert rc == 3 and "hello" in out and err == ""
    assert out.strip().splitlines()[-1].startswith("t: ") and "peak memory" in out


@pytest.mark.parametrize("case, command, limits, reason", [
    ("hang", [PY, "-c", "import time; print('started', flush=True); time.sleep(100)"], {"idle": 3},
     "printed nothing for 3 s"),
    ("wall", [PY, "-c", "import time\nfor _ in range(100): print('.', flush=True); time.sleep(1)"], {"wall": 3},
     "past its 3 s limit"),
    ("memory", [PY, "-c", "import time; b = bytearray(600 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                          "print('allocated', flush=True); time.sleep(100)"], {"limit_gib": 0.25},
     "above the 0.25 GiB limit"),
    ("crashed worker", [PY, "-c", "import time; print('[gw0] node down: Not properly terminated', flush=True); "
                                  "time.sleep(100)"], {"grace": 2}, "did not end within 2 s"),
])
def test_a_limit_stops_the_command_with_one_error_line(case, command, limits, reason):
    rc, out, err, seconds = guard(*command, **limits)
    assert rc == 1 and seconds < 30, (case, rc, seconds)
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: t stopped: ") and reason in err, err


def test_a_process_left_behind_by_the_command_does_not_hold_the_run():
    """The command exits but a child it started keeps the output pipe open (an orphaned test worker): the guard
    ends the group and returns the command's status instead of waiting for the orphan."""
    rc, out, err, seconds = guard("sh", "-c", "sleep 100 & echo done; exit 0")
    assert rc == 0 and "done" in out and seconds < 30


def test_a_killed_pytest_xdist_worker_fails_the_run_within_the_grace(tmp_path):
    """A real pytest-xdist run whose worker is SIGKILLed (as the kernel's OOM killer does) while another test is still
    busy: the run fails within the grace period rather than waiting for the rest."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_crash.py").write_text(textwrap.dedent("""
        import os, signal, time

        def test_killed():
            os.kill(os.getpid(), signal.SIGKILL)

        def test_busy():
            time.sleep(100)
    """))
    rc, out, err, seconds = guard(PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "test_crash.py",
                                  grace=3, idle=60, cwd=tmp_path)
    assert rc == 1 and seconds < 60, (rc, seconds, out[-2000:])
    assert "a test worker crashed" in err
