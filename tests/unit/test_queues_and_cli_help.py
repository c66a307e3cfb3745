"""Queue names, and a CLI whose help, README and docs agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from tests.doc_blocks import blocks, doc_files
from workers.queues import model_slug, queue_for, run_queues, shard_of, shard_queue, worker_queues

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize(
    ("model", "queue"),
    [
        ("llava-hf/llava-1.5-7b-hf", "vlm.llava-1.5-7b-hf"),
        ("Qwen/Qwen2.5-VL-7B-Instruct", "vlm.qwen2.5-vl-7b-instruct"),
        ("/models/my llava/", "vlm.my-llava"),
        ("simulated", "vlm.simulated"),
    ],
)
def test_queue_for_model(model, queue):
    assert queue_for(model) == queue


def test_slug_refuses_an_empty_name():
    with pytest.raises(ValueError):
        model_slug("///")


def test_every_command_has_help():
    runner = CliRunner()
    overview = runner.invoke(cli, ["--help"], terminal_width=80).output
    for name, command in cli.commands.items():
        # A whole summary in the overview (not cut with "..."), and the command's own text.
        assert command.short_help and not command.short_help.endswith("..."), name
        assert f"{name}  " in overview and command.short_help in overview, (name, overview)
        assert command.help and len(command.help.split()) >= 5, name
        result = runner.invoke(cli, [name, "--help"], terminal_width=100)
        assert result.exit_code == 0, result.output
        first_line = " ".join(command.help.split("\n\n")[0].split())
        assert first_line in " ".join(result.output.split()), (name, result.output)


def test_commands_named_in_the_readme_and_docs_exist():
    readme = set(re.findall(r"`orchestrator ([a-z][a-z-]+)", README.read_text()))
    assert readme, "README names no command"
    # The README's command table lists every command.
    assert set(cli.commands) <= readme, set(cli.commands) - readme
    for path in doc_files():
        text = path.read_text()
        named = set(re.findall(r"`orchestrator ([a-z][a-z-]+)", text))
        for b in blocks(path):
            named |= set(re.findall(r"(?:^\s*|\$\()orchestrator ([a-z][a-z-]+)", b.text, flags=re.M))
        assert named <= set(cli.commands), (path.name, named - set(cli.commands))


def _dry_run(*args: str) -> str:
    out = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert out.exit_code == 0, out.output
    return out.output.strip()


def test_documented_celery_workers_are_what_the_cli_starts():
    """Every `celery ... worker` line of the docs logs at INFO (so its "ready." line shows), and a
    judgment or coordination worker's line is exactly what `orchestrator worker|coordinator
    --dry-run` prints for it."""
    lines = [
        (b.where, re.sub(r"\s*(#.*)?$", "", line).removesuffix("&").strip())
        for path in doc_files()
        for b in blocks(path)
        for line in b.text.splitlines()
        if re.search(r"\bcelery -A \S+ worker\b", line)
    ]
    assert len(lines) >= 3, lines
    for where, line in lines:
        assert "--loglevel INFO" in line, (where, line)
        if " -Q coordination " in line:
            assert line == _dry_run("coordinator"), where
        elif node := re.search(r" -n vlm-(?P<slug>[\w.-]+?)(?:-gpu(?P<gpu>\d+))?@%h", line):
            gpu = ["--gpu", node["gpu"]] if node["gpu"] else []
            assert line == _dry_run("worker", "--model", node["slug"], *gpu), where


def test_a_query_always_has_the_same_gpu_queue_and_queries_spread_over_them():
    shards = [shard_of(q, 4) for q in range(1, 401)]
    assert shards == [shard_of(q, 4) for q in range(1, 401)]  # stable (not Python's salted hash)
    assert all(60 < shards.count(i) < 140 for i in range(4))
    assert shard_of(7, 1) == 0 and shard_queue("vlm.m", 0, 1) == "vlm.m"
    assert run_queues("vlm.m", 3) == ["vlm.m.0", "vlm.m.1", "vlm.m.2"]


def test_a_worker_reads_its_own_gpu_queue_first(monkeypatch):
    assert worker_queues("vlm.m", 1, 5) == ["vlm.m"]
    assert worker_queues("vlm.m", 3, 1) == ["vlm.m.1", "vlm.m.0", "vlm.m.2", "vlm.m"]
    monkeypatch.setenv("CVGL_VLM_SHARDS", "3")
    out = CliRunner().invoke(
        cli, ["worker", "--model", "llava-hf/llava-1.5-7b-hf", "--gpu", "2", "--dry-run"]
    )
    assert out.exit_code == 0
    assert (
        "-Q vlm.llava-1.5-7b-hf.2,vlm.llava-1.5-7b-hf.0,vlm.llava-1.5-7b-hf.1,vlm.llava-1.5-7b-hf "
        in out.output
    )
    monkeypatch.setenv("CVGL_VLM_SHARDS", "none")
    bad = CliRunner().invoke(cli, ["worker", "--dry-run"])
    assert bad.exit_code == 1 and "CVGL_VLM_SHARDS must be a whole number" in bad.output
