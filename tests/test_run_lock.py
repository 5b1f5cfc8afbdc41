"""One writer per run directory: the lock names its holder, refuses a live one and takes a stale one over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from refiner_hf.training.run_lock import LOCK_FILE, RunLock, RunLockedError


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(directory, host, pid, age: float = 0.0) -> None:
    path = directory / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-11-30 08:00:00"}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_the_lock_names_its_holder_and_refuses_a_second_writer(tmp_path):
    with RunLock(tmp_path) as lock:
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from refiner_hf.training.run_lock import RunLock; RunLock({str(tmp_path)!r}).acquire()",
            ],
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0
        assert f"is being written by another run (process {os.getpid()} on {socket.gethostname()}" in other.stderr
        assert lock.taken_over is None
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize(
    "case, host, pid, age, stale",
    [
        ("live process on this host", socket.gethostname(), os.getppid(), 0, False),
        ("dead process on this host", socket.gethostname(), None, 0, True),
        ("fresh lock of another host", "node-17", 12345, 60, False),
        ("another host, not refreshed for 20 minutes", "node-17", 12345, 1200, True),
    ],
)
def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, case, host, pid, age, stale):
    write_lock(tmp_path, host, dead_pid() if pid is None else pid, age)
    lock = RunLock(tmp_path, stale_after=600)
    if not stale:
        with pytest.raises(RunLockedError, match=rf"another run \(process \d+ on {host}, started 2026-11-30 08:00:00"):
            lock.acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == host  # left alone
        return
    with lock:
        assert lock.taken_over["host"] == host
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_is_refreshed_while_held_and_release_leaves_another_holders_lock(tmp_path):
    lock = RunLock(tmp_path, refresh_every=0.05).acquire()
    path = tmp_path / LOCK_FILE
    os.utime(path, (time.time() - 100, time.time() - 100))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    write_lock(tmp_path, "node-3", 99, 0)  # taken over by another run meanwhile
    lock.release()
    assert json.loads(path.read_text())["host"] == "node-3"
