"""The settings object: parsing, the command line over the environment, the docs table, and that
every CVGL_* name the code reads is declared in it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from db import settings as settings_module
from db.engine import database_url, pg_session_limits
from db.settings import Settings, SettingsError, env_names, override, settings
from orchestrator import launch
from orchestrator.cli import cli
from workers.app import app, broker_url, is_embedded

REPO = Path(__file__).resolve().parents[2]
SETTINGS_DOC = REPO / "docs" / "settings.md"
# Read by code but not settings: the throughput benchmark hands its no-op app's broker to its children.
NOT_SETTINGS = {"CVGL_BENCH_BROKER"}


def test_values_parse_with_their_types_and_unset_means_the_default():
    s = Settings.from_env(
        {
            "CVGL_VLM_SHARDS": " 3 ",
            "CVGL_LEASE_SECONDS": "0.4",
            "CVGL_MAX_IMAGE_PIXELS": "25e6",
            "CVGL_VLM_REUSE": "off",
            "CVGL_VLM_FEATURE_CACHE_MB": "auto",
            "CVGL_VLM_PREFIX_CACHE_MB": "512",
            "CVGL_VLM_DTYPE": "Float16",
            "CVGL_HOME": "~/cvgl",
            "CVGL_DATABASE_URL": "",
        }
    )
    assert (s.vlm_shards, s.lease_seconds, s.max_image_pixels) == (3, 0.4, 25_000_000)
    assert s.vlm_reuse is False and s.vlm_feature_cache_mb is None and s.vlm_prefix_cache_mb == 512.0
    assert s.vlm_dtype == "float16" and s.home == Path.home() / "cvgl"
    assert s.database_url is None and s.visibility_timeout == 7200.0 and s.retrieval_precision == "bf16"
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CVGL_VLM_SHARDS", "none", "CVGL_VLM_SHARDS must be a whole number, got 'none'"),
        ("CVGL_VLM_SHARDS", "0", "CVGL_VLM_SHARDS must be at least 1, got '0'"),
        ("CVGL_VLM_BATCH_SIZE", "2.5", "CVGL_VLM_BATCH_SIZE must be a whole number, got '2.5'"),
        ("CVGL_VISIBILITY_TIMEOUT", "2h", "CVGL_VISIBILITY_TIMEOUT must be a number, got '2h'"),
        ("CVGL_LEASE_SECONDS", "nan", "CVGL_LEASE_SECONDS must be a finite number, got 'nan'"),
        ("CVGL_VLM_REUSE", "maybe", "CVGL_VLM_REUSE must be one of 1, true, yes, on, 0, false, no, off"),
        ("CVGL_RETRIEVAL_PRECISION", "fp8", "CVGL_RETRIEVAL_PRECISION must be one of bf16, fp16, fp32"),
        ("CVGL_VLM_PREFIX_CACHE_MB", "-1", "CVGL_VLM_PREFIX_CACHE_MB must be at least 0, got '-1'"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_variable(name, value, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: value})
    assert str(err.value).startswith(message)


def test_the_modules_read_the_settings_of_the_environment_as_it_is_now(monkeypatch, tmp_path):
    assert is_embedded() and database_url() == f"sqlite:///{tmp_path / 'cvgl-home' / 'cvgl.sqlite3'}"
    monkeypatch.setenv("CVGL_BROKER_URL", "redis://127.0.0.1:6390/0")
    monkeypatch.setenv("CVGL_DATABASE_URL", "postgresql://me@db/cvgl")
    monkeypatch.setenv("CVGL_DB_LOCK_TIMEOUT", "0.3")
    assert broker_url() == "redis://127.0.0.1:6390/0" and not is_embedded()
    assert database_url() == "postgresql+psycopg://me@db/cvgl"
    assert "-c lock_timeout=300 " in pg_session_limits()["options"]
    monkeypatch.delenv("CVGL_BROKER_URL")
    assert is_embedded()


def test_the_command_line_wins_over_the_environment_for_its_block_only(monkeypatch):
    monkeypatch.setenv("CVGL_DATABASE_URL", "sqlite:///from-env.sqlite3")
    with override(database_url="sqlite:///from-cli.sqlite3", broker_url=None) as s:
        assert s.database_url == settings().database_url == "sqlite:///from-cli.sqlite3"
        assert settings().broker_url is None  # an option not given changes nothing
        child = settings().to_env()  # what a worker started now would get
        assert child["CVGL_DATABASE_URL"] == "sqlite:///from-cli.sqlite3" and "CVGL_BROKER_URL" not in child
    assert settings().database_url == "sqlite:///from-env.sqlite3"
    with pytest.raises(SettingsError, match="CVGL_VLM_SHARDS must be a whole number"):
        with override(vlm_shards="two"):
            pass


def test_database_and_broker_options_override_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CVGL_DATABASE_URL", f"sqlite:///{tmp_path / 'env.sqlite3'}")
    url = f"sqlite:///{tmp_path / 'option.sqlite3'}"
    out = CliRunner().invoke(cli, ["--database-url", url, "migrate"])
    assert out.exit_code == 0 and out.output == f"database at head: {url}\n"
    assert (tmp_path / "option.sqlite3").exists() and not (tmp_path / "env.sqlite3").exists()

    # A worker started with --broker-url gets it (and this process's other settings) as variables.
    started = {}

    def execvpe(file, argv, env):
        started.update(argv=argv, env=env, app_broker=app.conf.broker_url)

    assert app.conf.broker_url == "memory://localhost/"  # configured before the command
    monkeypatch.setattr(launch.os, "execvpe", execvpe)
    monkeypatch.setenv("CVGL_VLM_SHARDS", "2")
    out = CliRunner().invoke(cli, ["--broker-url", "redis://:pw@127.0.0.1:6390/1", "worker", "--gpu", "1"])
    assert out.exit_code == 0, out.output
    assert started["argv"][:4] == [sys.executable, "-m", "celery", "-A"]
    assert "-Q vlm.simulated.1,vlm.simulated.0,vlm.simulated " in " ".join(started["argv"]) + " "
    env = started["env"]
    assert env["CVGL_BROKER_URL"] == "redis://:pw@127.0.0.1:6390/1" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["CVGL_VLM_SHARDS"] == "2" and env["CVGL_DATABASE_URL"].endswith("env.sqlite3")
    # The app in this process follows the option during the command, and goes back after it.
    assert started["app_broker"] == "redis://:pw@127.0.0.1:6390/1"
    assert app.conf.broker_url == broker_url() == "memory://localhost/"


def test_a_separate_worker_without_a_broker_is_one_line():
    out = CliRunner().invoke(cli, ["coordinator"])
    assert out.exit_code == 1
    assert out.output == (
        "Error: set CVGL_BROKER_URL or --broker-url (and CVGL_DATABASE_URL or --database-url): "
        "a separate worker needs Redis\n"
    )


def test_a_bad_setting_stops_any_command_with_one_line_and_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVGL_")}
    env.update(CVGL_HOME=str(tmp_path), CVGL_VISIBILITY_TIMEOUT="2h", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "Error: CVGL_VISIBILITY_TIMEOUT must be a number, got '2h'\n"


def test_every_cvgl_variable_the_code_reads_is_a_setting():
    pattern = re.compile(r"CVGL_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])")
    found: dict[str, str] = {}
    for folder in ("db", "workers", "orchestrator", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for name in pattern.findall(path.read_text()):
                found.setdefault(name, str(path.relative_to(REPO)))
    assert len(found) > 25, found  # the scan sees the code
    undeclared = {n: where for n, where in found.items() if n not in env_names() | NOT_SETTINGS}
    assert not undeclared, f"declare these in db/settings.py (Settings): {undeclared}"


def test_the_docs_table_is_the_one_the_settings_write():
    text = SETTINGS_DOC.read_text()
    assert settings_module.markdown_table() in text
    assert text == settings_module.with_table(text), (
        "docs/settings.md is out of date: run `.venv/bin/python -m db.settings --write docs/settings.md`"
    )
    for name in env_names():
        assert f"| `{name}` |" in text
