"""How many CPU threads the model runs with, and how those threads wait.

Two things decide decode speed on a CPU that other work shares:

* the thread count: more OpenMP threads than the cores this process may use only adds contention. The default is
  the cores this process may actually run on (`os.sched_getaffinity`, capped by a cgroup CPU quota), like
  llama.cpp's and Ollama's default of one thread per core; `--threads N`, a model's `num_thread` parameter,
  `LLAMAFORGE_NUM_THREADS` or `OMP_NUM_THREADS` override it (in that order).
* the wait policy: PyTorch's libgomp lets a thread that reaches a barrier spin for ~300k iterations before it
  sleeps. When another process holds one of the cores, the spinning thread burns the time slice the preempted
  thread needs, and one decode step (hundreds of barriers) can take a second instead of 10 ms. We set
  `GOMP_SPINCOUNT=0` (a waiting thread sleeps at once and gives its core back): on a loaded 2-core machine it
  decoded 6.1 tokens/s where libgomp's default spin gave 0.7 and a 10k spin 1.4 (bench/contention.py);
  `LLAMAFORGE_SPINCOUNT=N` chooses another spin count, `OMP_WAIT_POLICY` / `GOMP_SPINCOUNT` of your own win.
  libgomp reads these variables once, when PyTorch loads it, so `prepare_openmp()` runs at `import llamaforge`
  (before torch) and never overrides what the user set. `bench/contention.py` measures each setting.
"""
from __future__ import annotations

import os
import sys

from .errors import InvalidRequestError

ENV_THREADS = "LLAMAFORGE_NUM_THREADS"
ENV_SPIN = "LLAMAFORGE_SPINCOUNT"            # our default spin count, overridable ("0" = sleep at once)
DEFAULT_SPINCOUNT = "0"                      # sleep at once: measured in bench/NOTES.md (contention)
MAX_THREADS = 1024                           # a sanity bound: a typo like 20000 is an error, not 20000 threads
_USER_OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup quota (containers, systemd slices), or None when unlimited/unknown."""
    for path, parse in (("/sys/fs/cgroup/cpu.max", _parse_cpu_max),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", _parse_cfs_v1)):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read(256)
        except (OSError, ValueError):
            continue
        limit = parse(text, path)
        if limit is not None:
            return limit
    return None


def _parse_cpu_max(text: str, _path: str) -> float | None:
    parts = text.split()  # "max 100000" or "150000 100000"
    if len(parts) == 2 and parts[0] != "max":
        try:
            quota, period = int(parts[0]), int(parts[1])
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def _parse_cfs_v1(text: str, path: str) -> float | None:
    try:
        quota = int(text.strip())
        with open(os.path.join(os.path.dirname(path), "cpu.cfs_period_us"), encoding="ascii") as f:
            period = int(f.read(64).strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, cpusets), capped by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, int(limit)))  # a quota of 1.5 CPUs: one thread never waits for a throttled second
    return max(1, n)


def parse_threads(value, field: str = "threads") -> int:
    """A thread count from a flag, a model parameter or the environment: an integer in 1..1024."""
    if isinstance(value, bool):
        raise InvalidRequestError(f"{field} must be a whole number of threads, got {value!r}", field=field)
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise InvalidRequestError(f"{field} must be a whole number of threads, got {value!r}", field=field) from None
    if not 1 <= n <= MAX_THREADS:
        raise InvalidRequestError(f"{field} must be between 1 and {MAX_THREADS}, got {n}", field=field)
    return n


def default_threads() -> int:
    """LLAMAFORGE_NUM_THREADS when set, else OMP_NUM_THREADS (its first level), else one thread per usable core."""
    env = os.environ.get(ENV_THREADS, "").strip()
    if env:
        return parse_threads(env, ENV_THREADS)
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp:
        return parse_threads(omp, "OMP_NUM_THREADS")
    return usable_cores()


def prepare_openmp(environ=None, modules=None) -> bool:
    """Set the OpenMP spin count (GOMP_SPINCOUNT, default 0) before PyTorch loads libgomp, unless the user chose a wait policy
    or torch is already imported (then it is too late: libgomp read its settings at load). True if it set one."""
    env = os.environ if environ is None else environ
    if "torch" in (sys.modules if modules is None else modules) or any(v in env for v in _USER_OPENMP_VARS):
        return False
    spin = env.get(ENV_SPIN, DEFAULT_SPINCOUNT).strip()
    if not spin.isdigit():
        return False
    env["GOMP_SPINCOUNT"] = spin  # inherited by child processes too (background builds, workers)
    return True


def apply_threads(n: int | None = None) -> int:
    """Run PyTorch's intra-op (OpenMP) pool with `n` threads (None: `default_threads()`); returns the count."""
    import torch
    n = default_threads() if n is None else parse_threads(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def limit_to_usable_cores() -> int:
    """Lower PyTorch's thread count to the usable cores if it is above them (never raises it); returns it."""
    import torch
    n = usable_cores()
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
