"""The command driver: snapshots taken, mounted and deleted by command templates the user gives.

For LVM, ZFS, a cloud CLI, or anything else that can snapshot a volume. Each template is run with
``/bin/sh -c`` after its placeholders are replaced, each value shell-quoted:

* ``{volume}``: the top folder of the file system holding the data directory or a tablespace (the mount
  point; for btrfs, the subvolume);
* ``{snapshot}``: the folder where the snapshot's contents must be readable (``snapshot_dir/<name>``);
* ``{name}``: the snapshot's base name, unique per backup attempt and volume (``pgsb-<attempt>-<n>``).

``snapshot`` runs in backup mode, once per volume (keep it short: create, nothing more); ``mount``
(optional) runs after backup mode ended, before the copy reads ``{snapshot}``; ``delete`` removes it
(unmounting first where ``mount`` mounted), also after a failure, and must succeed when there is nothing
left to delete. A template that exits non-zero fails the step, with its error output's last line.

Examples (run here: the btrfs ones, in tests/test_snapshots.py)::

    # btrfs, as templates
    snapshot="btrfs subvolume snapshot -r {volume} {snapshot}"
    delete="if [ -e {snapshot} ]; then btrfs subvolume delete {snapshot}; fi"
    # LVM thin (not run here: no device-mapper on the test machine)
    snapshot="lvcreate -s -n {name} $(findmnt -no SOURCE --target {volume})"
    mount="mkdir -p {snapshot} && mount -o ro,nouuid /dev/vg0/{name} {snapshot}"
    delete="(! mountpoint -q {snapshot} || umount {snapshot}) && rmdir {snapshot} 2>/dev/null;"
           " (! lvs vg0/{name} >/dev/null 2>&1 || lvremove -y vg0/{name})"
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

from pg_safe_backup.snapshots.base import Snapshot, SnapshotError, volume_root

#: Seconds a template may run by default.
TIMEOUT_S = 600.0
PLACEHOLDERS = ("volume", "snapshot", "name")


def check_template(template: Any, param: str) -> str:
    """``template`` when it is a command with only known placeholders; else ValueError naming ``param``."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{param} must be a command template, got {template!r}")
    try:
        template.format(**dict.fromkeys(PLACEHOLDERS, ""))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"{param}: {template!r} is not a template of {{volume}}, {{snapshot}} and {{name}} ({err!r})"
        ) from err
    return template


class CommandDriver:
    """Snapshots made by command templates (see the module's docstring).

    :param snapshot: template that snapshots ``{volume}`` so that it is (or, after ``mount``, becomes)
        readable at ``{snapshot}``.
    :param delete: template that removes the snapshot ``{snapshot}`` / ``{name}``; nothing there is no error.
    :param mount: template that makes ``{snapshot}`` readable after backup mode ended (None: it is already).
    :param timeout: seconds each command may run.
    """

    def __init__(
        self, snapshot: str, delete: str, mount: str | None = None, timeout: float | None = None
    ) -> None:
        self.snapshot = check_template(snapshot, "snapshot_command")
        self.delete_template = check_template(delete, "delete_command")
        self.mount_template = check_template(mount, "mount_command") if mount else None
        self.timeout = float(timeout) if timeout else TIMEOUT_S

    def spec(self) -> dict[str, Any]:
        return {
            "driver": "command",
            "snapshot": self.snapshot,
            "delete": self.delete_template,
            "mount": self.mount_template,
            "timeout": self.timeout,
        }

    def volume_of(self, folder: Path) -> Path:
        return volume_root(folder)

    def run(self, what: str, template: str, volume: str, snapshot: str) -> None:
        """Run ``template`` for one snapshot; :class:`SnapshotError` naming ``what`` when it fails."""
        values = {"volume": volume, "snapshot": snapshot, "name": Path(snapshot).name}
        command = template.format(**{k: shlex.quote(v) for k, v in values.items()})
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", command],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired as err:
            raise SnapshotError(f"{what} of {snapshot} did not end within {self.timeout:.0f}s") from err
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise SnapshotError(
                f"{what} of {snapshot} failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}"
            )

    def take(self, volume: Path, snapshot: Path) -> None:
        self.run("snapshot_command", self.snapshot, str(volume), str(snapshot))
        if not self.mount_template and not snapshot.is_dir():
            raise SnapshotError(
                f"snapshot_command ran but left nothing readable at {snapshot} (give a mount_command if it"
                " must be mounted)"
            )

    def mount(self, snapshot: Snapshot) -> None:
        if self.mount_template:
            self.run("mount_command", self.mount_template, snapshot.volume, snapshot.path)
        if not Path(snapshot.path).is_dir():
            raise SnapshotError(f"snapshot {snapshot.path} is not readable after mount_command")

    def delete(self, snapshot: Snapshot) -> None:
        self.run("delete_command", self.delete_template, snapshot.volume, snapshot.path)
