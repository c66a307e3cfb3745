"""The settings: every ``CVGL_*`` environment variable the project reads, in one frozen object.

``settings()`` reads the environment once per distinct set of ``CVGL_*`` values (a test that
changes one gets fresh settings; a worker pays for the parse once), then applies what the command
line overrides (``override``, used by the ``orchestrator`` group for ``--database-url`` and
``--broker-url``). A bad value is one ``SettingsError`` naming the variable. The table in
docs/settings.md is written from the fields here: ``python -m db.settings --markdown``.
Imports nothing of ours: db is the bottom layer, and workers and orchestrator both read it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "CVGL_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A ``CVGL_*`` value that does not parse or is out of range; the message names the variable."""


def _setting(
    env: str,
    default: Any,
    description: str,
    *,
    shown: str | None = None,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    auto: bool = False,
) -> Any:
    """A field read from ``env``. ``shown``: the default as the docs say it, where the field's own
    default is None ("decided at run time"); ``auto``: the word "auto" also means None."""
    meta = {"env": env, "description": description, "shown": shown, "minimum": minimum,
            "choices": choices, "auto": auto}  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    # Where things are
    database_url: str | None = _setting(
        "CVGL_DATABASE_URL", None, "SQLAlchemy URL; `postgresql://` uses psycopg 3",
        shown="SQLite file in `CVGL_HOME`")  # fmt: skip
    broker_url: str | None = _setting(
        "CVGL_BROKER_URL", None, "Celery broker, e.g. `redis://127.0.0.1:6379/0`",
        shown="in-process `memory://`")  # fmt: skip
    home: Path | None = _setting(
        "CVGL_HOME", None, "where the embedded SQLite file (and, by default, embeddings) live",
        shown="`~/.local/share/cvgl-rerank` (`$XDG_DATA_HOME/cvgl-rerank`)")  # fmt: skip
    embeddings_dir: Path | None = _setting(
        "CVGL_EMBEDDINGS_DIR", None, "stage-1 embedding files (one float16 `.npy` per shard); with "
        "PostgreSQL, shared storage mounted at the same path on every retrieval worker",
        shown="`CVGL_HOME/embeddings`")  # fmt: skip
    adapters_dir: Path | None = _setting(
        "CVGL_ADAPTERS_DIR", None, "fine-tuned adapters and their checkpoints (`orchestrator finetune`); "
        "with PostgreSQL, shared storage mounted at the same path on every training and judgment worker",
        shown="`CVGL_HOME/adapters`")  # fmt: skip
    # Delivery and recovery
    visibility_timeout: float = _setting(
        "CVGL_VISIBILITY_TIMEOUT", 7200.0, "seconds before Redis redelivers an unacknowledged task; "
        "must exceed the longest batch", minimum=0)  # fmt: skip
    unacked_restore_interval: float = _setting(
        "CVGL_UNACKED_RESTORE_INTERVAL", 10.0, "seconds between sweeps that put expired unacknowledged "
        "messages back", minimum=0)  # fmt: skip
    soft_shutdown_timeout: float = _setting(
        "CVGL_SOFT_SHUTDOWN_TIMEOUT", 10.0, "seconds a stopping worker takes to requeue late-ack "
        "messages", minimum=0)  # fmt: skip
    stall_seconds: float = _setting(
        "CVGL_STALL_SECONDS", 60.0, "`--wait` reconciles a run that has not moved for this long",
        minimum=0)  # fmt: skip
    lease_seconds: float = _setting(
        "CVGL_LEASE_SECONDS", 30.0, "how long a worker's lease on a judgment (or retrieval shard) lasts "
        "unrenewed; renewed every quarter of it while it works", minimum=0)  # fmt: skip
    task_time_limit_base: float = _setting(
        "CVGL_TASK_TIME_LIMIT_BASE", 1800.0, "a judgment task's hard time limit in seconds, before the "
        "per-judgment part (a worker's first task loads its model)", minimum=0)  # fmt: skip
    judgment_time_limit: float = _setting(
        "CVGL_JUDGMENT_TIME_LIMIT", 60.0, "seconds added to a task's hard time limit per judgment",
        minimum=0)  # fmt: skip
    # PostgreSQL session limits
    db_lock_timeout: float = _setting(
        "CVGL_DB_LOCK_TIMEOUT", 10.0, "seconds a PostgreSQL statement waits for a lock before it "
        "gives up (and is retried)", minimum=0)  # fmt: skip
    db_idle_in_transaction_timeout: float = _setting(
        "CVGL_DB_IDLE_IN_TRANSACTION_TIMEOUT", 30.0, "seconds before PostgreSQL ends a session idle "
        "in a transaction (its process frozen)", minimum=0)  # fmt: skip
    db_statement_timeout: float = _setting(
        "CVGL_DB_STATEMENT_TIMEOUT", 300.0, "seconds a PostgreSQL statement may run (migrations run "
        "without it)", minimum=0)  # fmt: skip
    # Caches
    coordinator_cache_queries: int = _setting(
        "CVGL_COORDINATOR_CACHE_QUERIES", 20_000, "open queries whose stored judgments a coordinator "
        "process keeps between rounds (more open at once still works, re-reading what falls out)",
        minimum=1)  # fmt: skip
    worker_cache_queries: int = _setting(
        "CVGL_WORKER_CACHE_QUERIES", 50_000, "queries whose image paths, positive and candidates a "
        "judgment worker process keeps", minimum=1)  # fmt: skip
    # Images
    max_image_pixels: int = _setting(
        "CVGL_MAX_IMAGE_PIXELS", 25_000_000, "images with more pixels are refused from their header",
        minimum=1)  # fmt: skip
    max_image_mb: float = _setting(
        "CVGL_MAX_IMAGE_MB", 200.0, "images that would take more MB once decoded are refused from "
        "their header", minimum=0)  # fmt: skip
    # VLM workers
    vlm_shards: int = _setting(
        "CVGL_VLM_SHARDS", 1, "queues per model, one per GPU worker (`vlm.<model>.<i>`); set the same "
        "for submit, coordinator and workers", minimum=1)  # fmt: skip
    vlm_device: str | None = _setting(
        "CVGL_VLM_DEVICE", None, "where a VLM worker runs its model (`cuda`, `cuda:1`, `cpu`)",
        shown="`cuda` if available, else `cpu`")  # fmt: skip
    vlm_dtype: str | None = _setting(
        "CVGL_VLM_DTYPE", None, "the VLM's dtype", shown="`bfloat16` on a GPU, `float32` on the CPU",
        choices=("bfloat16", "float16", "float32"))  # fmt: skip
    vlm_batch_size: int | None = _setting(
        "CVGL_VLM_BATCH_SIZE", None, "judgments per forward pass in a VLM worker (lowered by itself "
        "after running out of GPU memory)", shown="`16` on a GPU, `8` on the CPU", minimum=1)  # fmt: skip
    vlm_reuse: bool = _setting(
        "CVGL_VLM_REUSE", True, "`0` turns off the image-feature cache and the prefix key-value "
        "caches (the plain path)")  # fmt: skip
    vlm_feature_cache_mb: float | None = _setting(
        "CVGL_VLM_FEATURE_CACHE_MB", None, "bound of a VLM worker's image-feature cache in MiB "
        "(`auto`: the default)", shown="8% of the GPU memory free after loading; `2048` on the CPU",
        minimum=0, auto=True)  # fmt: skip
    vlm_prefix_cache_mb: float | None = _setting(
        "CVGL_VLM_PREFIX_CACHE_MB", None, "bound of a VLM worker's cache of prefix keys and values in "
        "MiB (`auto`: the default)", shown="55% of the GPU memory free after loading; `2048` on the CPU",
        minimum=0, auto=True)  # fmt: skip
    vlm_loader_threads: int | None = _setting(
        "CVGL_VLM_LOADER_THREADS", None, "threads decoding and preprocessing images in a VLM worker",
        shown="cores, at most 8", minimum=1)  # fmt: skip
    # Retrieval workers
    retrieval_device: str = _setting(
        "CVGL_RETRIEVAL_DEVICE", "auto", "where a retrieval worker embeds and ranks (`auto`: `cuda` if "
        "available, else `cpu`; `cuda:1`, ...)")  # fmt: skip
    retrieval_precision: str = _setting(
        "CVGL_RETRIEVAL_PRECISION", "bf16", "autocast on CUDA (`fp16` is Sample4Geo's own "
        "`autocast()`); the CPU always runs fp32", choices=("bf16", "fp16", "fp32"))  # fmt: skip
    retrieval_loader_workers: int | None = _setting(
        "CVGL_RETRIEVAL_LOADER_WORKERS", None, "DataLoader processes decoding images next to a "
        "retrieval worker's model", shown="cores - 1 (at most 16)", minimum=0)  # fmt: skip
    # Internal
    worker_main_pid: int | None = _setting(
        "CVGL_WORKER_MAIN_PID", None, "set by a Celery worker for its pool processes (where they "
        "publish their status); not for users", shown="unset")  # fmt: skip

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse the ``CVGL_*`` variables of ``environ`` (default ``os.environ``); unset or empty
        means the default. Raises ``SettingsError`` naming the first bad variable."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"], "").strip()
            if raw:
                values[f.name] = _parse(f, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (field names); a string is parsed as the variable would be."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        parsed = {}
        for name, value in changes.items():
            if name not in fields:
                raise TypeError(f"no setting named {name!r}")
            if isinstance(value, str):  # as the variable would be: empty means the default
                value = _parse(fields[name], value.strip()) if value.strip() else fields[name].default
            parsed[name] = value
        return dataclasses.replace(self, **parsed)

    def to_env(self) -> dict[str, str]:
        """The ``CVGL_*`` variables that give a child process these settings (defaults left out)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default and value is not None:
                out[f.metadata["env"]] = _format(value)
        return out


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def _hint(f: dataclasses.Field) -> Any:
    """The field's type without None: int, float, str, bool or Path."""
    hint = _hints()[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _parse(f: dataclasses.Field, raw: str) -> Any:
    m, kind = f.metadata, _hint(f)
    env = m["env"]
    if m["auto"] and raw.lower() == "auto":
        return None
    if kind is bool:
        if raw.lower() not in _TRUE + _FALSE:
            raise SettingsError(f"{env} must be one of {', '.join(_TRUE + _FALSE)}, got {raw!r}")
        return raw.lower() in _TRUE
    if kind is int:
        try:
            value: Any = int(raw)
        except ValueError:
            try:  # 25e6 pixels is a whole number too
                value = float(raw)
            except ValueError:
                value = None
            if value is None or not value.is_integer():
                raise SettingsError(f"{env} must be a whole number, got {raw!r}") from None
            value = int(value)
    elif kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{env} must be a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise SettingsError(f"{env} must be a finite number, got {raw!r}")
    elif kind is Path:
        value = Path(raw).expanduser()
    else:
        value = raw
        if m["choices"] and raw.lower() not in m["choices"]:
            raise SettingsError(f"{env} must be one of {', '.join(m['choices'])}, got {raw!r}")
        if m["choices"]:
            value = raw.lower()
    if m["minimum"] is not None and value < m["minimum"]:
        raise SettingsError(f"{env} must be at least {_format(m['minimum'])}, got {raw!r}")
    return value


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_lock = threading.Lock()
_cache: dict[tuple, Settings] = {}
_overrides: dict[str, Any] = {}


def settings() -> Settings:
    """The settings of this process now: the ``CVGL_*`` environment, then the command line's
    overrides. Parsed once per distinct environment (the key is cheap next to the parse)."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(PREFIX)))
    key = (env, tuple(sorted(_overrides.items())))
    found = _cache.get(key)
    if found is None:
        found = Settings.from_env(dict(env)).replace(**_overrides)
        with _lock:
            if len(_cache) > 64:  # tests change the environment per test; keep the cache small
                _cache.clear()
            _cache[key] = found
    return found


def cache_clear() -> None:
    """Forget parsed settings (the cache is keyed by the environment, so tests rarely need it)."""
    with _lock:
        _cache.clear()


@contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Settings from the command line, over the environment, until the block ends. ``None``
    values are ignored (an option not given). Validated at once: a bad value raises here."""
    given = {k: v for k, v in changes.items() if v is not None}
    Settings().replace(**given)  # unknown names and bad values fail before anything changes
    before = dict(_overrides)
    _overrides.update(given)
    try:
        yield settings()
    finally:
        _overrides.clear()
        _overrides.update(before)


def markdown_table() -> str:
    """The table of docs/settings.md: variable, type, default, description."""
    lines = ["| variable | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        m = f.metadata
        kind = _hint(f).__name__
        if m["choices"]:
            kind = " / ".join(f"`{c}`" for c in m["choices"])
        elif kind == "bool":
            kind = "`1` / `0`"
        default = m["shown"] or f"`{_format(f.default)}`"
        lines.append(f"| `{m['env']}` | {kind} | {default} | {m['description']} |")
    return "\n".join(lines) + "\n"


def env_names() -> set[str]:
    return {f.metadata["env"] for f in dataclasses.fields(Settings)}


BEGIN_MARK = "<!-- settings table: written by `python -m db.settings --write docs/settings.md` -->"
END_MARK = "<!-- end of settings table -->"


def with_table(text: str) -> str:
    """``text`` (docs/settings.md) with the table between its markers written anew."""
    head, begin, rest = text.partition(BEGIN_MARK)
    _, end, tail = rest.partition(END_MARK)
    if not begin or not end:
        raise SettingsError(f"the file has no {BEGIN_MARK} ... {END_MARK} markers")
    return f"{head}{BEGIN_MARK}\n{markdown_table()}{END_MARK}{tail}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--markdown"]:
        sys.stdout.write(markdown_table())
        return 0
    if len(args) == 2 and args[0] == "--write":
        path = Path(args[1])
        path.write_text(with_table(path.read_text()))
        return 0
    sys.stderr.write(
        "usage: python -m db.settings --markdown      print the settings table\n"
        "       python -m db.settings --write FILE    write it between FILE's markers (docs/settings.md)\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
