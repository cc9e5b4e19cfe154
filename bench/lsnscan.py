"""Figure 5: the page-LSN check of a copy (``check_page_lsns``: every page's pd_lsn against the backup's
consistency point) in GB/s, against ``cat`` reading the same files.

A cluster is filled with ``pgbench -i -s SCALE`` and stopped cleanly: no page is newer than its
shutdown checkpoint, so the check of its data directory, with a label of a backup of a primary and
that checkpoint as the stop LSN, passes after reading every relation file (what it reads on a copy).
Timed RUNS times with the files in the page cache (as right after a copy), then RUNS times after
``posix_fadvise(DONTNEED)`` dropped them from it (read from disk); ``cat FILES > /dev/null`` the same
way is the reference: the speed of reading the bytes at all. Medians are reported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import quantile, say
from bench.dagbench import load_pgbench
from pg_safe_backup.files.pgcontrol import PageLsnResult, check_page_lsns, page_files, read_pg_control
from pg_safe_backup.state import format_lsn


def drop_from_page_cache(files: list[Path]) -> None:
    """Evict the (clean: the server is stopped and the disk synced) files' pages from the page cache."""
    subprocess.run(["sync"], check=False)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_cat(files: list[Path]) -> float:
    """Seconds ``cat`` takes to read ``files`` to /dev/null."""
    t0 = time.monotonic()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - t0


def run(work: Path, scale: int, runs: int) -> dict[str, Any]:
    say(
        f"page-LSN check of a pgbench -s {scale} data directory: {runs} run(s) from the page cache,"
        f" {runs} from disk"
    )
    cluster = load_pgbench(work / "lsn" / "data", scale)
    try:
        cluster.stop()
        datadir = cluster.datadir
        control = read_pg_control(datadir)
        label = f"START WAL LOCATION: {format_lsn(control.checkpoint)}\nBACKUP FROM: primary\n"
        files = [path for _, path in page_files(datadir, control)]

        def check() -> PageLsnResult:
            result = check_page_lsns(datadir, backup_label=label, stop_lsn=format_lsn(control.checkpoint))
            if not result.ok:
                raise RuntimeError(
                    f"the page-LSN check of a cleanly stopped cluster failed: {result.message}"
                )
            return result

        check()  # the files into the page cache
        warm = [check().gb_per_s for _ in range(runs)]
        cat_warm = [timed_cat(files) for _ in range(runs)]
        # From disk, alternately: this VM's disk reads at ~0.7 or ~1.8 GB/s from one read to the next,
        # whatever reads (cat too), so one of each would compare chance.
        cold, cat_cold = [], []
        for _ in range(runs):
            drop_from_page_cache(files)
            result = check()
            cold.append(result.gb_per_s)
            drop_from_page_cache(files)
            cat_cold.append(timed_cat(files))
        gb = result.bytes_scanned / 1e9
        out = {
            "lsn_scan_gb_s": round(quantile(warm, 0.5), 2),
            "lsn_scan_cold_gb_s": round(quantile(cold, 0.5), 2),
            "cat_gb_s": round(gb / quantile(cat_warm, 0.5), 2),
            "cat_cold_gb_s": round(gb / quantile(cat_cold, 0.5), 2),
            "detail": {
                "scale": scale,
                "scanned_gb": round(gb, 3),  # 10^9 bytes, as in GB/s
                "files": result.files,
                "runs": runs,
                "lsn_scan_gb_s_each": [round(x, 2) for x in warm],
                "cat_gb_s_each": [round(gb / x, 2) for x in cat_warm],
                "lsn_scan_cold_gb_s_each": [round(x, 2) for x in cold],
                "cat_cold_gb_s_each": [round(gb / x, 2) for x in cat_cold],
                "newest_page": str(result.newest),
                "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            },
        }
        say(
            f"  {gb:.2f} GB in {result.files} files: {out['lsn_scan_gb_s']} GB/s in the page cache"
            f" (cat {out['cat_gb_s']}), {out['lsn_scan_cold_gb_s']} GB/s from disk"
            f" (cat {out['cat_cold_gb_s']})"
        )
        return out
    finally:
        cluster.stop()
        shutil.rmtree(work / "lsn", ignore_errors=True)
