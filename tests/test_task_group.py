"""PostgresOnlineBackup composes like any TaskGroup: >>, <<, chain(), cross_downstream(), nesting, mapping.

DAG structure only (no database, no task runs): what each operator makes upstream of what.
"""

from __future__ import annotations

import ast
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, TaskGroup, chain, cross_downstream, task_group

from pg_safe_backup.task_group import PostgresOnlineBackup

from conftest import serialization_round_trip

ROOT = Path(__file__).resolve().parents[1]
#: The package's two halves: the core distribution's (no Airflow) and the provider's (core/, provider/).
CORE = ROOT / "core" / "pg_safe_backup"
PACKAGE = ROOT / "provider" / "pg_safe_backup"
HOLD, GATE, COPY, FINISH = "hold_backup_session", "wait_for_backup_mode", "copy", "finish_backup"


def backup_group(group_id: str = "backup") -> PostgresOnlineBackup:
    """A backup group with one copy task, made in the current DAG (and task group)."""
    with PostgresOnlineBackup(group_id=group_id, postgres_conn_id="pg_main") as backup:
        EmptyOperator(task_id=COPY)
    return backup


def upstream(dag: DAG, task_id: str) -> set[str]:
    return dag.get_task(task_id).upstream_task_ids


def test_the_group_is_a_task_group():
    with DAG("is_a_group", schedule=None):
        backup = backup_group()
    assert isinstance(backup, TaskGroup)
    assert set(backup.children) == {f"backup.{t}" for t in (HOLD, GATE, COPY, FINISH)}


def test_start_rshift_backup_puts_start_upstream_of_the_hold_and_the_gate():
    with DAG("rshift_in", schedule=None) as dag:
        start = EmptyOperator(task_id="start")
        start >> backup_group()
    assert upstream(dag, f"backup.{HOLD}") == {"start"}
    assert upstream(dag, f"backup.{GATE}") == {"start"}
    assert upstream(dag, f"backup.{COPY}") == {f"backup.{GATE}"}


def test_backup_lshift_start_puts_start_upstream_of_the_hold_and_the_gate():
    with DAG("lshift_in", schedule=None) as dag:
        start = EmptyOperator(task_id="start")
        backup = backup_group()
        backup << start
    assert upstream(dag, f"backup.{HOLD}") == {"start"}
    assert upstream(dag, f"backup.{GATE}") == {"start"}


def test_backup_rshift_after_puts_after_downstream_of_the_finish_only():
    """Not of the copy and the hold (Airflow's rule for a teardown leaf): after needs the label in XCom."""
    with DAG("rshift_out", schedule=None) as dag:
        after = EmptyOperator(task_id="after")
        backup_group() >> after
    assert upstream(dag, "after") == {f"backup.{FINISH}"}


def test_after_lshift_backup_puts_after_downstream_of_the_finish_only():
    with DAG("lshift_out", schedule=None) as dag:
        after = EmptyOperator(task_id="after")
        after << backup_group()
    assert upstream(dag, "after") == {f"backup.{FINISH}"}


def test_chain_runs_start_then_the_backup_then_after():
    with DAG("chained", schedule=None) as dag:
        chain(EmptyOperator(task_id="start"), backup_group(), EmptyOperator(task_id="after"))
    assert upstream(dag, f"backup.{HOLD}") == {"start"}
    assert upstream(dag, f"backup.{GATE}") == {"start"}
    assert upstream(dag, "after") == {f"backup.{FINISH}"}


def test_cross_downstream_into_the_backup_reaches_the_hold_and_the_gate():
    with DAG("cross_in", schedule=None) as dag:
        cross_downstream([EmptyOperator(task_id="a"), EmptyOperator(task_id="b")], [backup_group()])
    assert upstream(dag, f"backup.{HOLD}") == {"a", "b"}
    assert upstream(dag, f"backup.{GATE}") == {"a", "b"}


def test_cross_downstream_out_of_the_backup_starts_from_the_finish():
    with DAG("cross_out", schedule=None) as dag:
        cross_downstream([backup_group()], [EmptyOperator(task_id="c"), EmptyOperator(task_id="d")])
    assert upstream(dag, "c") == {f"backup.{FINISH}"}
    assert upstream(dag, "d") == {f"backup.{FINISH}"}


def test_two_backups_in_a_row_start_the_second_after_the_first_finished():
    with DAG("in_a_row", schedule=None) as dag:
        backup_group("east") >> backup_group("west")
    assert upstream(dag, f"west.{HOLD}") == {f"east.{FINISH}"}
    assert upstream(dag, f"west.{GATE}") == {f"east.{FINISH}"}


def test_nested_in_a_task_group_and_holding_a_group_of_copies():
    """The backup inside a parent group composes with its siblings; a group of copies inside the backup
    runs behind the gate and before the finish."""
    with DAG("nested", schedule=None) as dag:
        with TaskGroup("nightly") as nightly:
            start = EmptyOperator(task_id="start")
            with PostgresOnlineBackup(group_id="backup", postgres_conn_id="pg_main") as backup:
                with TaskGroup("copies"):
                    EmptyOperator(task_id="base") >> EmptyOperator(task_id="tablespaces")
            start >> backup >> EmptyOperator(task_id="after")
        nightly >> EmptyOperator(task_id="report")
    prefix = "nightly.backup"
    assert backup.parent_group.group_id == "nightly"
    assert dag.get_task(f"{prefix}.{HOLD}").backup_key == prefix
    assert upstream(dag, f"{prefix}.{HOLD}") == {"nightly.start"}
    assert upstream(dag, f"{prefix}.copies.base") == {f"{prefix}.{GATE}"}
    assert upstream(dag, f"{prefix}.{FINISH}") == {f"{prefix}.{GATE}", f"{prefix}.copies.tablespaces"}
    assert upstream(dag, "nightly.after") == {f"{prefix}.{FINISH}"}
    assert "nightly.after" in upstream(dag, "report")


def test_a_backup_inside_an_expanded_task_group_composes_per_map_index():

    with DAG("mapped", schedule=None) as dag:

        @task_group(group_id="clusters")
        def one_cluster(conn_id: str):
            start = EmptyOperator(task_id="start")
            with PostgresOnlineBackup(group_id="backup", postgres_conn_id=conn_id) as backup:
                EmptyOperator(task_id=COPY)
            start >> backup >> EmptyOperator(task_id="after")

        mapped = one_cluster.expand_kwargs([{"conn_id": "pg_a"}, {"conn_id": "pg_b"}])
        mapped >> EmptyOperator(task_id="report")
    restored = serialization_round_trip(dag)
    for parsed in (dag, restored):
        assert upstream(parsed, f"clusters.backup.{HOLD}") == {"clusters.start"}
        assert upstream(parsed, "clusters.after") == {f"clusters.backup.{FINISH}"}
        assert "clusters.after" in upstream(parsed, "report")
    assert dag.get_task(f"clusters.backup.{FINISH}").backup_key == "clusters.backup"


def readme_dag_block() -> str:
    """The first python block of the README's "A backup DAG" section."""
    section = (ROOT / "README.md").read_text().split("\n## A backup DAG\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_dag_parses_and_stores_the_label_after_the_finish():
    namespace: dict = {}
    exec(compile(readme_dag_block(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    dag = namespace["backup"].dag
    assert upstream(dag, "backup.copy") == {f"backup.{GATE}"}
    assert upstream(dag, f"backup.{FINISH}") == {f"backup.{GATE}", "backup.copy"}
    assert upstream(dag, "store_label") == {f"backup.{FINISH}"}
    assert dag.get_task("store_label").copy_task_ids == ["backup.copy"], (
        "the manifest uses the copy's checksums"
    )


def module_name(path: Path) -> str:
    half = CORE if path.is_relative_to(CORE) else PACKAGE
    return ".".join(path.relative_to(half.parent).with_suffix("").parts).removesuffix(".__init__")


def package_imports(path: Path) -> set[str]:
    """The pg_safe_backup modules ``path`` imports, typing-only imports included (the package imports
    absolutely: a relative import fails here)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import of {node.module}"
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("pg_safe_backup.")}


def test_the_package_has_no_import_cycle_not_even_a_typing_only_one():
    graph = {module_name(p): package_imports(p) for half in (CORE, PACKAGE) for p in half.rglob("*.py")}

    def cycle_from(module: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                return (*path[path.index(imported) :], imported)
            found = cycle_from(imported, (*path, imported))
            if found:
                return found
        return None

    for module in sorted(graph):
        cycle = cycle_from(module, (module,))
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_what_hold_gate_and_finish_share_lives_in_utils_mixins():
    from pg_safe_backup.operators.backup import PostgresFinishBackupOperator, PostgresStartBackupOperator
    from pg_safe_backup.sensors.backup import PostgresBackupStartedSensor
    from pg_safe_backup.utils.mixins import BackupTaskMixin

    for cls in (PostgresStartBackupOperator, PostgresBackupStartedSensor, PostgresFinishBackupOperator):
        assert issubclass(cls, BackupTaskMixin)


def every_module() -> list[str]:
    """Every module of the package, subpackages' too, as pkgutil finds them (no list to keep up to date)."""
    import pg_safe_backup

    return sorted(m.name for m in pkgutil.walk_packages(pg_safe_backup.__path__, "pg_safe_backup."))


@pytest.mark.parametrize("module", every_module())
def test_each_module_imports_on_its_own(module):
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def snapshot_dag() -> DAG:
    from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
    from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator

    with DAG("snap", schedule=None) as dag:
        with PostgresOnlineBackup(
            group_id="backup",
            postgres_conn_id="pg",
            snapshot={"data_directory": "/pg/data", "snapshot_dir": "/pg/.snapshots", "queue": "pg-host"},
        ) as backup:
            PostgresCopyDataDirectoryOperator(task_id="copy_out", source="/pg/data", destination="/b")
        PostgresStoreBackupLabelOperator(task_id="store_label", backup=backup, destination="/b")
        backup >> EmptyOperator(task_id="after")
    return dag


def test_a_snapshot_group_snapshots_in_backup_mode_copies_out_after_the_finish_and_stores_after_the_copy():
    """gate >> snapshot >> finish >> copy-out >> remove_snapshots (a teardown of the snapshot step, whatever
    failed); the store and what follows the group wait for the copy-out: a label is never written into a
    copy that did not succeed, nor before it exists (the copy would then refuse the folder)."""
    made = snapshot_dag()
    assert made.get_task("store_label").copy_task_ids == ["backup.copy_out"]
    assert made.get_task("backup.remove_snapshots").copy_task_ids == ["backup.copy_out"]
    assert made.get_task("backup.copy_out").snapshot_task_id == "backup.snapshot"
    dag = serialization_round_trip(made)
    assert upstream(dag, "backup.snapshot") == {f"backup.{GATE}"}
    assert upstream(dag, f"backup.{FINISH}") == {f"backup.{GATE}", "backup.snapshot"}
    assert upstream(dag, "backup.copy_out") == {f"backup.{FINISH}"}
    assert upstream(dag, "backup.remove_snapshots") == {
        f"backup.{FINISH}",
        "backup.copy_out",
        "backup.snapshot",
    }
    remove = dag.get_task("backup.remove_snapshots")
    assert remove.is_teardown and remove.trigger_rule == "all_done" and remove.queue == "pg-host"
    assert dag.get_task("backup.snapshot").queue == "pg-host"
    assert {"backup.copy_out", f"backup.{FINISH}"} <= upstream(dag, "store_label")
    assert "backup.copy_out" in upstream(dag, "after")


def test_a_snapshot_group_needs_no_copy_task_and_names_a_bad_snapshot_setting():
    with (
        DAG("snap_keep", schedule=None) as dag,
        PostgresOnlineBackup(
            group_id="backup", snapshot={"data_directory": "/d", "snapshot_dir": "/s", "keep": True}
        ),
    ):
        pass  # a kept snapshot alone is a backup: no copy-out needed
    assert dag.get_task("backup.remove_snapshots").keep
    with (
        DAG("snap_bad", schedule=None),
        pytest.raises(ValueError, match="driver must be one of btrfs, command"),
    ):
        PostgresOnlineBackup(
            group_id="backup", snapshot={"data_directory": "/d", "snapshot_dir": "/s", "driver": "lvm"}
        )


def test_an_incremental_group_branches_before_the_hold_and_the_gate():
    """choose_full_or_incremental >> (hold, gate | incremental_backup): the branch is the group's root, so
    what precedes the group precedes it; the store after the group follows the finish (skipped on an
    incremental day, when the incremental catalogues itself)."""
    from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator

    with DAG("incremental_group", schedule=None) as made:
        start = EmptyOperator(task_id="start")
        with PostgresOnlineBackup(
            group_id="backup",
            postgres_conn_id="pg_main",
            incremental={
                "full_on": ["sunday"],
                "root": "/backups/main",
                "bindir": "/usr/lib/postgresql/18/bin",
            },
        ) as backup:
            EmptyOperator(task_id=COPY)
        (
            start
            >> backup
            >> PostgresStoreBackupLabelOperator(task_id="store_label", backup=backup, destination="/d")
        )
    dag = serialization_round_trip(made)
    kind = "backup.choose_full_or_incremental"
    assert upstream(dag, kind) == {"start"}
    assert upstream(dag, f"backup.{HOLD}") == {kind}
    assert upstream(dag, f"backup.{GATE}") == {kind}
    assert upstream(dag, "backup.incremental_backup") == {kind}
    assert f"backup.{FINISH}" in upstream(dag, "store_label")
    assert "backup.incremental_backup" not in upstream(dag, "store_label")
    branch = made.get_task(kind)
    assert branch.full_task_ids == [f"backup.{HOLD}", f"backup.{GATE}"]
    assert branch.incremental_task_id == "backup.incremental_backup"
    assert made.get_task("backup.incremental_backup").bindir == "/usr/lib/postgresql/18/bin"
    with (
        DAG("incremental_bad", schedule=None),
        pytest.raises(ValueError, match="full_on: 'someday' is not a weekday"),
    ):
        PostgresOnlineBackup(group_id="backup", incremental={"full_on": "someday", "root": "/r"})
    with (
        DAG("incremental_no_root", schedule=None),
        pytest.raises(ValueError, match="incremental must be a dict with full_on and root"),
    ):
        PostgresOnlineBackup(group_id="backup", incremental={"full_on": "sunday"})


def test_the_store_task_updates_the_asset_of_its_catalog_root_even_after_serialization():
    """Known when the DAG is parsed: the destination's folder, or catalog_root= when a template makes it; the
    object store's URL without its connection id; the incremental task of the group updates the same one."""
    from airflow.sdk import Asset

    from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator

    with DAG("assets", schedule=None) as made:
        roots = {
            "local": {"destination": "/backups/main/{{ ts_nodash }}"},
            "s3": {"destination": "s3://aws_backups@bucket/pg/{{ run_id }}"},
            "templated": {"destination": "{{ params.root }}/{{ run_id }}", "catalog_root": "/srv/pg/"},
            "unknown": {"destination": "{{ params.root }}/{{ run_id }}"},
        }
        for name, kwargs in roots.items():
            backup = backup_group(name)
            PostgresStoreBackupLabelOperator(task_id=f"store_{name}", backup=backup, **kwargs)
        with PostgresOnlineBackup(
            group_id="weekly", incremental={"full_on": "sunday", "root": "/backups/main"}
        ) as weekly:
            EmptyOperator(task_id=COPY)
    assert made.get_task("store_local").outlets == [Asset("file:///backups/main")]
    dag = serialization_round_trip(made)

    def uris(task_id: str) -> list[str]:
        return [asset.uri for asset in dag.get_task(task_id).outlets]

    assert uris("store_local") == ["file:///backups/main"]
    assert uris("store_s3") == ["s3://bucket/pg"]
    assert uris("store_templated") == ["file:///srv/pg"]
    assert uris("store_unknown") == []
    assert uris(weekly.incremental.task_id) == ["file:///backups/main"]


def test_a_catalog_root_the_destination_is_not_in_is_refused_naming_it():
    from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator

    with DAG("wrong_root", schedule=None):
        backup = backup_group()
        with pytest.raises(ValueError, match="catalog_root '/elsewhere' is not the folder destination"):
            PostgresStoreBackupLabelOperator(
                task_id="store", backup=backup, destination="/backups/{{ ts }}", catalog_root="/elsewhere"
            )
        with pytest.raises(ValueError, match="catalog_root must be an absolute path or a URL"):
            PostgresStoreBackupLabelOperator(
                task_id="store", backup=backup, destination="{{ params.d }}", catalog_root="backups"
            )
