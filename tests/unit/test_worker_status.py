"""Worker status files (``inspect gpu``) leave no folder behind in the temp directory."""

from __future__ import annotations

import os
import subprocess
import sys

from workers import control


def test_a_process_without_a_celery_worker_removes_its_status_folder_at_exit(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop(control.MAIN_PID_ENV, None)
    code = (
        "from workers.control import record_served, status_dir\n"
        "record_served(3, [])\n"
        "assert (status_dir() / 'placeholder').parent.is_dir()\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert not list(tmp_path.glob("cvgl-worker-*"))


def test_a_worker_removes_its_childrens_status_folder_on_shutdown(tmp_path, monkeypatch):
    monkeypatch.setattr(control.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv(control.MAIN_PID_ENV, str(os.getpid()))
    control.record_served(1, [])
    assert control.read_status() and control.status_dir().is_dir()
    control._remove_status_dir()  # what Celery's worker_shutdown signal calls in the main process
    assert not control.status_dir().exists()
