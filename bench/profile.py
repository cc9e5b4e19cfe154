"""`--profile`: where a process spends its CPU, sampled from outside with py-spy (bench/requirements.txt)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def ensure_py_spy() -> str:
    if not py_spy():
        req = Path(__file__).with_name("requirements.txt")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(req)], check=True)
    found = py_spy()
    if not found:
        raise RuntimeError("py-spy is not installed and could not be installed with pip")
    return found


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> dict[str, Any]:
    """Sample ``pid`` (active stacks only) for ``seconds``; the top frames by own and inclusive samples."""
    cmd = [
        ensure_py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr or proc.stdout).strip()[-500:]}
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    wall_samples = seconds * rate

    def top(c: Counter[str], k: int) -> list[str]:
        return [f"{100 * n / total:.0f}% {f}" for f, n in c.most_common(k)] if total else []

    return {
        "seconds": seconds,
        "rate_hz": rate,
        "active_samples": total,
        "active_percent_of_wall": round(100 * total / wall_samples, 1),
        "top_own": top(own, 8),
        "top_inclusive": top(inclusive, 12),
    }


def record_during(
    targets: dict[str, int], seconds: float, action: Any, work: Path, rate: int = 100
) -> dict[str, Any]:
    """Profile ``targets`` (name -> pid, with their subprocesses) while ``action()`` runs."""
    exe = ensure_py_spy()
    procs = {}
    for name, pid in targets.items():
        out = work / f"py-spy_{name.replace('+', '_')}.txt"
        procs[name] = (
            out,
            subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--subprocesses",
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    import time

    time.sleep(1)  # py-spy attached
    action()
    result: dict[str, Any] = {}
    for name, (out, proc) in procs.items():
        _, err = proc.communicate(timeout=seconds + 60)
        result[name] = summarize(out, seconds, rate) if out.exists() else {"error": err.strip()[-500:]}
    return result


#: Inclusive CPU of frames whose text contains these: what the DAG run's CPU time was spent on.
BUCKETS = {
    "pg_safe_backup code": "pg_safe_backup/",
    "imports": "_find_and_load",
    "task process start-up (task_runner.startup: DAG file parse)": (
        "startup (airflow/sdk/execution_time/task_runner.py"
    ),
    "task supervisor (fork, start-up, log/heartbeat loop)": "supervise_task (",
    "scheduler loop": "_run_scheduler_loop (",
    "triggers running": "TriggerRunner.run (",
}


def summarize(out: Path, seconds: float, rate: int) -> dict[str, Any]:
    """CPU seconds by bucket, the heaviest leaf frames and the heaviest non-trivial inclusive frames."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
        for name, needle in BUCKETS.items():
            if any(needle in f for f in frames):
                buckets[name] += n
    specific = [(f, n) for f, n in inclusive.most_common() if n < 0.8 * total][:25]
    return {
        "cpu_seconds_sampled": round(total / rate, 1),
        "cpu_seconds_by_kind": {k: round(buckets[k] / rate, 2) for k in BUCKETS},
        "top_own": [f"{n / rate:.2f}s {f}" for f, n in own.most_common(12)],
        "top_inclusive": [f"{n / rate:.2f}s {f}" for f, n in specific],
    }
