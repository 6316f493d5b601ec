"""`mics backend migrate | cleanup | reconcile` as an operator runs them."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path


def mics(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mics", "backend", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_migrate_cleanup_and_reconcile_on_a_fresh_database(tmp_path: Path) -> None:
    database = tmp_path / "offline.db"
    config = tmp_path / "backend.toml"
    config.write_text(
        f'database_url = "sqlite+aiosqlite:///{database}"\n[tenants.t1]\nsecret = "s"\n'
    )
    migrated = mics("migrate", "--config", str(config))
    assert migrated.returncode == 0, migrated.stderr
    tables = {row[0] for row in sqlite3.connect(database).execute("SELECT name FROM sqlite_master")}
    assert {"offline_messages", "offline_consume_stats"} <= tables
    cleaned = mics("cleanup", "--config", str(config), "--days", "1")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "deleted 0 delivered rows" in cleaned.stdout
    reconciled = mics("reconcile", "--config", str(config), "--day", "2026-01-01")
    assert reconciled.returncode == 0, reconciled.stderr


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "backend.toml"
    config.write_text('[tenants."a|b"]\nsecret = ""\n')
    result = mics("migrate", "--config", str(config))
    assert result.returncode == 2
    assert "invalid backend configuration" in result.stderr
