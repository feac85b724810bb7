"""Resident memory of this process, from ``/proc/self/status`` (Linux), for the benchmarks."""


def status_kb(field):
    """``field`` of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mb():
    """Resident set size in MiB (NaN where ``/proc`` has no ``VmRSS``)."""
    try:
        return status_kb("VmRSS") / 1024
    except (OSError, RuntimeError):
        return float("nan")
