"""Settings from the environment: each variable reaches its setting, and the rest keep their defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierstack.server import Settings
from tierstack.server.crosstier import Thresholds


def test_alert_thresholds_and_ports_come_from_the_environment() -> None:
    env = {
        "TIERSTACK_ALERT_RESPONSE_TIME_SECONDS": "0.5",
        "TIERSTACK_ALERT_MEMORY_BYTES": "1000",
        "TIERSTACK_ALERT_MIN_CALLS": "3",
        "TIERSTACK_EXECUTE_METRICS_PORT": "off",
        "TIERSTACK_MODEL_FALLBACKS": "small, local",
        "TIERSTACK_WORKER_PROCESSES": "3",
        "TIERSTACK_WORKER_MEMORY_MB": "256",
        "TIERSTACK_ADVICE_WINDOW_SECONDS": "60",
    }
    settings = Settings.from_env("execute", env)
    assert settings.advice_window_seconds == 60.0 and Settings().advice_window_seconds == 300.0
    assert settings.alert_thresholds == Thresholds(response_time_seconds=0.5, memory_bytes=1000, min_calls=3)
    assert settings.metrics_port is None
    assert settings.model_fallbacks == ("small", "local")
    assert (settings.worker_processes, settings.worker_memory_mb) == (3, 256)
    assert Settings.from_env("coordinate", {}).metrics_port == 9451


def test_retention_and_the_execution_store_budget_come_from_the_environment() -> None:
    env = {"TIERSTACK_RETENTION_SECONDS": "0", "TIERSTACK_EXECUTION_STORE_BYTES": "4096"}
    settings = Settings.from_env("orchestrate", env)
    assert (settings.retention_seconds, settings.execution_store_bytes) == (0.0, 4096)
    defaults = Settings.from_env("orchestrate", {})
    assert (defaults.retention_seconds, defaults.execution_store_bytes) == (7 * 24 * 3600, 1 << 30)


def test_the_store_url_names_sqlite_folders_or_a_postgresql_database() -> None:
    assert Settings.from_env("orchestrate", {"TIERSTACK_DATA_DIR": "d"}).sqlite_dir == Path("d")
    relative = Settings.from_env("orchestrate", {"TIERSTACK_STORE_URL": "sqlite:///state/here"})
    assert (relative.sqlite_dir, relative.postgres_url) == (Path("state/here"), None)
    assert Settings(store_url="sqlite:////var/lib/ts").sqlite_dir == Path("/var/lib/ts")
    url = "postgresql://user@db.internal:5432/tierstack"
    assert Settings.from_env("execute", {"TIERSTACK_STORE_URL": url}).postgres_url == url
    with pytest.raises(ValueError, match="TIERSTACK_STORE_URL"):
        Settings(store_url="mysql://somewhere")
