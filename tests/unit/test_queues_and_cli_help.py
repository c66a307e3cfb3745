"""Queue names, and a CLI whose help, README and docs agree."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from tests.doc_blocks import blocks, doc_files
from workers.queues import (
    ADVANCE_TASK,
    JUDGE_TASKS,
    TASK_NAMES,
    TASK_ROUTES,
    TRAIN_TASK,
    VLM_PREFIX,
    model_slug,
    queue_for,
    run_queues,
    shard_of,
    shard_queue,
    worker_queues,
)

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


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


# What a worker started with ``celery -A <module> worker`` serves: the module's app, after the
# worker's start-up import of the app's ``include``. A fresh interpreter, so that nothing this test
# process imported registers a task the worker itself would not have.
_SERVED = """
import json, sys
from celery.app.utils import find_app
app = find_app(sys.argv[1])
app.loader.import_default_modules()
routes = {name: app.amqp.router.route({}, name)["queue"].name for name in app.tasks if name.startswith("cvgl.")}
print(json.dumps(routes))
"""


def _served(module: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", _SERVED, module], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_task_is_registered_where_its_workers_run_and_routed_beside_its_queue():
    assert len(set(TASK_NAMES)) == len(TASK_NAMES) == 6
    coordinator = _served("orchestrator.tasks")  # the coordinator and the embedded worker
    assert set(coordinator) == set(TASK_NAMES)
    for name, queue in TASK_ROUTES.items():
        assert coordinator[name] == queue, name
    # Judgments and fine-tunes have no fixed queue: each send names its model's
    # (tests/embedded/test_open_queries.py, tests/integration/test_finetune.py).
    assert not {*JUDGE_TASKS.values(), TRAIN_TASK} & set(TASK_ROUTES)
    # A GPU or retrieval worker runs workers.app: every task but the coordinator's own.
    assert set(_served("workers.app")) == set(TASK_NAMES) - {ADVANCE_TASK}
    assert queue_for("simulated").startswith(VLM_PREFIX)


def test_slug_refuses_an_empty_name():
    with pytest.raises(ValueError):
        model_slug("///")


def _shows_a_default(option: click.Option, ctx: click.Context) -> bool:
    """Whether the option has a default worth showing: not None, not a list, not an off switch."""
    if option.hidden or option.is_eager or option.multiple or option.count or option.required:
        return False
    default = option.get_default(ctx, call=False)
    return default is not None and not (option.is_flag and not option.secondary_opts and default is False)


def help_problems(command: click.Command, name: str, overview: str) -> list[str]:
    """What is wrong with a command's help: a cut or missing summary, no example, a hidden default."""
    problems = []
    summary = command.short_help or ""
    if not summary or summary.endswith("...") or f"{name}  " not in overview or summary not in overview:
        problems.append(f"{name}: no whole summary in the overview")
    result = CliRunner().invoke(cli, [name, "--help"], terminal_width=100)
    text = " ".join(result.output.split())
    if result.exit_code != 0 or not command.help or len(command.help.split()) < 5:
        problems.append(f"{name}: no help text")
        return problems
    first = " ".join(command.help.split("\n\n")[0].split())
    if first not in text:
        problems.append(f"{name}: help does not start with its docstring")
    last = " ".join(command.help.strip().split("\n\n")[-1].split())
    if not re.match(rf"Example: orchestrator {re.escape(name)}( |$)", last) or last not in text:
        problems.append(f"{name}: the help does not end with 'Example: orchestrator {name} ...'")
    with click.Context(command, info_name=name, parent=click.Context(cli, info_name="orchestrator")) as ctx:
        for option in command.params:
            if isinstance(option, click.Option) and _shows_a_default(option, ctx):
                record = option.get_help_record(ctx)
                if record is None or "default" not in record[1].lower():
                    problems.append(f"{name}: {option.opts[0]} does not show its default {option.default!r}")
    return problems


def test_every_command_has_help():
    overview = CliRunner().invoke(cli, ["--help"], terminal_width=80).output
    assert "..." not in overview.split("Commands:")[1], overview
    assert set(cli.commands) >= {"migrate", "synth", "ingest", "import-candidates", "calibrate", "worker",
                                 "coordinator", "submit", "status", "resume", "report"}  # fmt: skip
    problems = [p for name, command in cli.commands.items() for p in help_problems(command, name, overview)]
    assert not problems, "\n".join(problems)


def test_the_help_check_finds_a_missing_example_and_a_hidden_default():
    @click.command(short_help="A command without an example.")
    @click.option("--size", type=int, default=3, help="How big.")
    def bare(size: int) -> None:
        """Do something with a size, with no example given."""

    cli.add_command(bare)
    try:
        overview = CliRunner().invoke(cli, ["--help"], terminal_width=80).output
        assert help_problems(bare, "bare", overview) == [
            "bare: the help does not end with 'Example: orchestrator bare ...'",
            "bare: --size does not show its default 3",
        ]
    finally:
        del cli.commands["bare"]


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
