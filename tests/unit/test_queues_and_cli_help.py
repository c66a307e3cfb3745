"""Queue names, and a CLI whose help and README agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from workers.queues import model_slug, queue_for

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
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output


def test_commands_named_in_the_readme_exist():
    text = README.read_text()
    named = set(re.findall(r"`orchestrator ([a-z][a-z-]+)", text))
    assert named, "README names no command"
    assert named <= set(cli.commands), named - set(cli.commands)
