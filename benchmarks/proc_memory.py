"""This process's memory as the Linux kernel reports it (/proc/self), for the memory benchmarks.

Imports nothing but the standard library, so a fresh process measuring its own imports can use it.
"""

from __future__ import annotations

from pathlib import Path

PROC_SELF = Path("/proc/self")
#: the /proc/self/status fields the benchmarks read: resident set, its peak, and its two backings
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status_kb(fields: tuple[str, ...] = FIELDS) -> dict[str, int]:
    """``fields`` of /proc/self/status in kB; a one-line error off Linux, where there is no /proc."""
    try:
        text = (PROC_SELF / "status").read_text()
    except OSError:
        raise SystemExit("the memory benchmarks read /proc/self/status: run them on Linux") from None
    lines = (line.partition(":") for line in text.splitlines())
    found = {key: int(value.split()[0]) for key, _, value in lines if key in fields}
    missing = [f for f in fields if f not in found]
    if missing:
        raise SystemExit(f"/proc/self/status has no {missing[0]} on this kernel")
    return found


def reset_peak() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0), so a later peak is this process's from here."""
    (PROC_SELF / "clear_refs").write_text("5")
