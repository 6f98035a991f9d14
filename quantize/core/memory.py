"""Peak resident memory: of this process (resettable so one stage can be measured on its own), and of a child
process watched from outside (benchmarks run each measurement in its own child)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (Linux: writing 5 to clear_refs). False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last successful reset (or since start), in MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` now (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def watch_child(process: subprocess.Popen, rss_cap_gb: float, timeout: float, poll: float = 0.1
                ) -> tuple[int, str | None]:
    """Poll ``process`` (started with ``start_new_session=True``) until it exits: its peak resident KiB, and why it
    was killed (its whole process group) when it passed ``rss_cap_gb`` or ran past ``timeout`` seconds, else None."""
    cap_kib = int(rss_cap_gb * 1024 * 1024)
    started = time.perf_counter()
    peak = 0
    while process.poll() is None:
        rss = rss_kib(process.pid)
        peak = max(peak, rss)
        killed = (f"resident memory passed the cap of {rss_cap_gb:g} GiB" if rss > cap_kib else
                  f"still running after the {timeout:g} s limit" if time.perf_counter() - started > timeout else None)
        if killed:
            os.killpg(process.pid, signal.SIGKILL)
            return peak, killed
        time.sleep(poll)
    return peak, None
