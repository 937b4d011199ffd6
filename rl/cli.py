"""`tiderl` command line. The config is loaded and validated before torch or Ray are imported, so a bad YAML
fails in well under a second and leaves no processes behind."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from rl.config import ConfigError, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tiderl: INT4-aware agentic RL post-training.")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Job config YAML, e.g. configs/calculator.yaml.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. trainer.steps=40.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default: runs/<config>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this directory from its latest checkpoint.")] = None,
) -> None:
    """Run an RL job (on a local Ray instance unless cluster.address is set)."""
    cfg = _load(config, overrides or [])
    if resume is not None and run_dir is not None and resume != run_dir:
        raise typer.BadParameter("--resume already names the run directory; drop --run-dir")
    target = resume or run_dir or Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume is not None and not resume.is_dir():
        _fail(f"--resume {resume}: no such run directory")
    from rl.controller import train as run_job  # heavy imports (torch, ray) only once the config is known good

    run_job(cfg, target, resume=resume is not None)


@app.command()
def config(
    config: Annotated[Path, typer.Argument(help="Job config YAML.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides.")] = None,
) -> None:
    """Validate a job config and print it resolved, with every default filled in."""
    typer.echo(dump_config(_load(config, overrides or [])), nl=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a finished (or checkpointed) job.")],
    out: Annotated[Path, typer.Argument(help="Output directory for the Hugging Face checkpoint.")],
    step: Annotated[int | None, typer.Option("--step", help="Checkpoint step to export (default: the latest).")] = None,
) -> None:
    """Write the run's policy as a compressed-tensors pack-quantized (W4A16) Hugging Face checkpoint."""
    from rl.export import export_run

    try:
        path = export_run(run_dir, out, step)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        _fail(str(e))
    typer.echo(f"exported {path} (compressed-tensors pack-quantized INT4)")


@app.command("check-env")
def check_env(
    name: Annotated[str, typer.Argument(help="Registered environment name or path/to/file.py:Class.")],
    kwargs: Annotated[list[str] | None, typer.Argument(help="key=value constructor arguments (env.kwargs), values parsed as YAML.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Reset from the first row of this jsonl/parquet file (verl layout).")] = None,
) -> None:
    """Run an environment through the contract the agent loop relies on, with a scripted policy."""
    from envs.contract import DEFAULT_ROW, ContractError, check_env as run_check
    from rl.config import EnvConfig, apply_override

    raw: dict = {}
    for item in kwargs or []:
        apply_override(raw, item)
    row = DEFAULT_ROW
    if data is not None:
        from rl.data import read_rows, to_prompt_row

        row = to_prompt_row(0, read_rows(str(data))[0])
    from envs.sandbox import SandboxUnavailable
    from rl.registry import RegistryError

    try:
        report = run_check(EnvConfig(name=name, kwargs=raw), row)
    except (ContractError, RegistryError, SandboxUnavailable, TypeError, ValueError, OSError) as e:
        _fail(f"{type(e).__name__}: {e}")
    typer.echo(f"{name}: contract holds; tools {', '.join(report['tools']) or '(none)'}")
    for tool_name, obs in zip(report["tools"], report["observations"], strict=True):
        typer.echo(f"  {tool_name}(example arguments) -> {obs[:100]!r}")


def _load(path: Path, overrides: list[str]):
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        _fail(str(e))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


if __name__ == "__main__":
    app()
