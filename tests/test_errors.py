"""The error tree: every domain exception sits on one branch and keeps the builtin base its callers catch."""

from __future__ import annotations

import pytest

from pg_safe_backup.catalog import CatalogError
from pg_safe_backup.errors import PermanentError, PgSafeBackupError, TransientError, retryable
from pg_safe_backup.files.copier import CopyError, DestinationNotEmpty
from pg_safe_backup.files.extconfig import ConfigCaptureError
from pg_safe_backup.files.manifest import ManifestError, ManifestUnsupported
from pg_safe_backup.files.pgcontrol import BadPgControl, CopyMismatch, MissingStopLsn
from pg_safe_backup.files.tablespaces import TablespaceNotCopied
from pg_safe_backup.files.wal import NotWal, WalMissing
from pg_safe_backup.hooks.backup import BackupError
from pg_safe_backup.hooks.server import ServerUnreachable
from pg_safe_backup.restore import ArchiveNotUsable, RestoreError
from pg_safe_backup.retention import RetentionRefused
from pg_safe_backup.verify import CheckNotRun

#: exception, retried?, the builtin base callers catch it by (``except ValueError`` and the like).
TREE = [
    (BackupError, False, Exception),
    (CopyError, True, RuntimeError),
    (DestinationNotEmpty, False, CopyError),
    (WalMissing, True, Exception),
    (NotWal, False, ValueError),
    (CopyMismatch, False, Exception),
    (BadPgControl, False, CopyMismatch),
    (MissingStopLsn, False, ValueError),
    (ConfigCaptureError, False, ValueError),
    (ManifestError, False, ValueError),
    (ManifestUnsupported, False, ManifestError),
    (TablespaceNotCopied, False, ValueError),
    (RestoreError, False, ValueError),
    (ArchiveNotUsable, False, RestoreError),
    (CatalogError, False, ValueError),
    (RetentionRefused, False, RuntimeError),
    (CheckNotRun, True, Exception),
    (ServerUnreachable, True, RuntimeError),
]
IDS = [cls.__name__ for cls, _, _ in TREE]


@pytest.mark.parametrize(("cls", "retried", "builtin"), TREE, ids=IDS)
def test_each_domain_exception_is_on_the_tree(cls: type[Exception], retried: bool, builtin: type) -> None:
    assert issubclass(cls, PgSafeBackupError)


@pytest.mark.parametrize(("cls", "retried", "builtin"), TREE, ids=IDS)
def test_each_domain_exception_keeps_the_base_its_callers_catch(
    cls: type[Exception], retried: bool, builtin: type
) -> None:
    assert issubclass(cls, builtin)


@pytest.mark.parametrize(("cls", "retried", "builtin"), TREE, ids=IDS)
def test_each_domain_exception_is_retried_only_when_transient(
    cls: type[Exception], retried: bool, builtin: type
) -> None:
    assert retryable(cls("why")) is retried


@pytest.mark.parametrize(("cls", "retried", "builtin"), TREE, ids=IDS)
def test_each_domain_exception_is_on_one_branch_or_a_refusal_under_a_transient_family(
    cls: type[Exception], retried: bool, builtin: type
) -> None:
    assert issubclass(cls, TransientError if retried else PermanentError)


@pytest.mark.parametrize(
    ("err", "retried"),
    [
        (OSError("disk full"), False),
        (ValueError("bad"), False),
        (PgSafeBackupError("neither branch"), False),
        (TransientError("later"), True),
        (PermanentError("never"), False),
    ],
    ids=["os-error", "value-error", "root", "transient", "permanent"],
)
def test_only_the_transient_branch_is_retryable(err: BaseException, retried: bool) -> None:
    assert retryable(err) is retried
