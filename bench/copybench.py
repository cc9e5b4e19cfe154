"""The copy engine against ``cp -a`` and ``rsync -a`` on one data directory, side by side in one run.

``python -m bench.copybench DATADIR WORKDIR [ROUNDS]``: each round copies DATADIR into WORKDIR/copy with
each tool in turn (the copy deleted and the disk synced before the next): ours with checksums and fsync
(its default), ours without fsync (as cp and rsync, which sync nothing), ``cp -a``, ``rsync -a``. Ours runs
in a child process, whose maximum RSS is reported. Prints one JSON object: MB/s (MB = 2**20 bytes) per
tool, the median over the rounds, and the machine.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: Ours in a child process: its figures on stdout as JSON.
_OURS = """
import json, resource, sys
from pg_safe_backup.files.copier import copy_data_directory
r = copy_data_directory(sys.argv[1], sys.argv[2], fsync=sys.argv[3] == "1")
print(json.dumps({"bytes": r.bytes, "seconds": r.seconds,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _du(path: Path) -> int:
    return int(
        subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    )


def _timed(cmd: list[str]) -> tuple[float, str]:
    began = time.monotonic()
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    # rsync exits 24 when files vanished: normal on a live cluster.
    if done.returncode not in (0, 24):
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.monotonic() - began, done.stdout


def run(datadir: Path, work: Path, rounds: int = 3) -> dict:
    """Median MB/s of each tool over ``rounds`` rounds, and our copy's maximum RSS.

    :param datadir: the data directory to copy.
    :param work: a folder on the disk to copy to.
    :param rounds: rounds of the four copies.
    """
    copy = work / "copy"
    size_mb = _du(datadir) / 2**20
    tools = {
        "copy_mb_s": [sys.executable, "-c", _OURS, str(datadir), str(copy), "1"],
        "copy_nofsync_mb_s": [sys.executable, "-c", _OURS, str(datadir), str(copy), "0"],
        "cp_a_mb_s": ["cp", "-a", str(datadir), str(copy)],
        "rsync_mb_s": ["rsync", "-a", f"{datadir}/", f"{copy}/"],
    }
    speeds: dict[str, list[float]] = {name: [] for name in tools}
    rss: list[float] = []
    for _ in range(rounds):
        for name, cmd in tools.items():
            shutil.rmtree(copy, ignore_errors=True)
            os.sync()
            time.sleep(1)
            seconds, out = _timed(cmd)
            if name.startswith("copy"):
                figures = json.loads(out)
                rss.append(figures["rss_mb"])
                speeds[name].append(figures["bytes"] / 2**20 / seconds)
            else:
                speeds[name].append(size_mb / seconds)
    shutil.rmtree(copy, ignore_errors=True)
    return {
        **{name: round(statistics.median(v), 1) for name, v in speeds.items()},
        "all_mb_s": {name: [round(x, 1) for x in v] for name, v in speeds.items()},
        "copy_rss_mb": round(max(rss), 1),
        "data_mb": round(size_mb, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "self_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    print(
        json.dumps(
            run(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3), indent=1
        )
    )
