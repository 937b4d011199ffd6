"""`tiderl` command line. The config is loaded and validated before torch or Ray are imported, so a bad YAML
fails in well under a second and leaves no processes behind."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Annotated

import typer

from rl.config import ConfigError, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tiderl: INT4-aware agentic RL post-training.")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Job config YAML, e.g. configs/calculator.yaml.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. trainer.steps=40.")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Run directory (default: runs/<config>-<time>).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this directory from its latest checkpoint.")
    ] = None,
) -> None:
    """Run an RL job (on a local Ray instance unless cluster.address is set)."""
    cfg = _load(config, overrides or [])
    if resume is not None and run_dir is not None and resume != run_dir:
        raise typer.BadParameter("--resume already names the run directory; drop --run-dir")
    target = resume or run_dir or Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume is not None and not resume.is_dir():
        _fail(f"--resume {resume}: no such run directory")
    from rl.loop.controller import train as run_job  # heavy imports (torch, ray) only once the config is known good
    from rl.loop.failures import JobFailed

    try:
        run_job(cfg, target, resume=resume is not None)
    except ConfigError as e:  # what the config asks for that this machine lacks (a tracker's package)
        _fail(str(e))
    except JobFailed as e:  # it ran, and every step failed: the summary says what and where to look
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


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
    adapter: Annotated[
        bool, typer.Option("--adapter", help="LoRA runs: write the adapters in peft's format instead (docs/lora.md).")
    ] = False,
) -> None:
    """Write the run's policy as a compressed-tensors pack-quantized (W4A16) Hugging Face checkpoint (a LoRA run's:
    merged), or with --adapter a LoRA run's adapters in peft's format."""
    from rl.policy.export import export_adapter, export_run

    try:
        path = (export_adapter if adapter else export_run)(run_dir, out, step)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        _fail(str(e))
    what = "LoRA adapters, peft format" if adapter else "compressed-tensors pack-quantized INT4"
    typer.echo(f"exported {path} ({what})")


@app.command("eval")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a finished (or checkpointed) job.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.sub=value overrides of the run's config, e.g. data.eval_size=64.")
    ] = None,
    heavy: Annotated[
        int | None,
        typer.Option(
            "--heavy",
            min=1,
            help="Heavy mode: N sampled trajectories per prompt, majority vote and reflective "
            "aggregation reported for n = 1, 2, 4, ..., N (docs/eval.md).",
        ),
    ] = None,
    step: Annotated[int | None, typer.Option("--step", help="Checkpoint step (default: the latest).")] = None,
    reflect_greedy: Annotated[
        bool, typer.Option("--reflect-greedy", help="Heavy mode: the reflection decodes greedily (default: sampled).")
    ] = False,
) -> None:
    """Evaluate a run's policy on its held-out prompts (greedy and sampled accuracy, as the job's eval), with
    heavy mode when asked; the results go into the run's eval.json (`checkpoint`, `heavy`)."""
    if not (run_dir / "config.yaml").is_file():
        _fail(f"{run_dir} has no config.yaml: not a tiderl run directory")
    from rich.console import Console

    from rl.loop.evaluation import evaluate_run
    from rl.loop.failures import eval_status
    from rl.loop.heavy import heavy_table

    try:
        out = evaluate_run(run_dir, overrides or [], step, heavy, reflect_greedy)
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    result = out["checkpoint"]
    sampled = f", sampled {eval_status(result, 'sampled_')}" if "sampled_failed_samples" in result else ""
    typer.echo(f"step {result['step']}: held-out greedy {eval_status(result)}{sampled}")
    if "heavy" in out:
        Console().print(heavy_table(out["heavy"]))
    typer.echo(f"wrote {run_dir / 'eval.json'}")


@app.command()
def view(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, e.g. runs/calculator-20261202-120000.")],
    export: Annotated[
        Path | None, typer.Option("--export", help="Write one self-contained HTML file instead of serving.")
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8765,
    host: Annotated[str, typer.Option("--host", help="Address to serve on (0.0.0.0: every interface).")] = "127.0.0.1",
) -> None:
    """Look at a run in the browser: curves, each step's samples, tokens colored by the rollout-vs-learner gap."""
    from rl.view.data import RunDirError, check_run_dir, snapshot

    try:
        check_run_dir(run_dir)
    except RunDirError as e:
        _fail(str(e))
    needs = ("plotly",) if export is not None else ("plotly", "starlette", "uvicorn")
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        _fail(f"tiderl view needs {', '.join(missing)}: pip install -e '.[view]'")
    from rl.view.page import render_page

    if export is not None:
        export.write_text(render_page(snapshot(run_dir)))
        typer.echo(f"wrote {export} ({export.stat().st_size / 1e6:.1f} MB; opens in a browser with no server)")
        return
    from rl.view.server import serve

    typer.echo(f"serving {run_dir} at http://{host}:{port}/ (Ctrl-C stops; the page follows the run while it goes)")
    serve(run_dir, host, port)


@app.command()
def serve(
    target: Annotated[Path, typer.Argument(help="Run directory (its latest checkpoint) or a policy directory.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. rollout.max_new_tokens_per_turn=200.")
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Address to serve on (0.0.0.0: every interface).")] = "127.0.0.1",
    step: Annotated[int | None, typer.Option("--step", help="Checkpoint step of a run (default: the latest).")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Decode greedily (default: rollout.temperature).")] = False,
) -> None:
    """Serve a policy on an OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions, /v1/models), as
    the rollout workers serve agents (docs/agents.md)."""
    from rl.launch.serve import serve as run_server

    try:
        run_server(target, overrides or [], step, host, port, greedy)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("stopped")


@app.command("check-env")
def check_env(
    name: Annotated[str, typer.Argument(help="Registered environment name or path/to/file.py:Class.")],
    kwargs: Annotated[
        list[str] | None, typer.Argument(help="key=value constructor arguments (env.kwargs), values parsed as YAML.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Reset from the first row of this jsonl/parquet file (verl layout).")
    ] = None,
) -> None:
    """Run an environment through the contract the agent loop relies on, with a scripted policy."""
    from envs.config import EnvConfig
    from envs.contract import DEFAULT_ROW, ContractError
    from envs.contract import check_env as run_check
    from rl.config import apply_override

    raw: dict = {}
    for item in kwargs or []:
        apply_override(raw, item)
    row = DEFAULT_ROW
    if data is not None:
        from rl.loop.data import read_rows, to_prompt_row

        row = to_prompt_row(0, read_rows(str(data))[0])
    from envs.registry import RegistryError
    from envs.sandbox import SandboxUnavailable

    try:
        report = run_check(EnvConfig(name=name, kwargs=raw), row)
    except (ContractError, RegistryError, SandboxUnavailable, TypeError, ValueError, OSError) as e:
        _fail(f"{type(e).__name__}: {e}")
    typer.echo(f"{name}: contract holds; tools {', '.join(report['tools']) or '(none)'}")
    for tool_name, obs in zip(report["tools"], report["observations"], strict=True):
        typer.echo(f"  {tool_name}(example arguments) -> {obs[:100]!r}")


Address = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray dashboard of the cluster, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else an http "
        "$RAY_ADDRESS).",
    ),
]


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="Job config YAML, inside the working directory.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. trainer.steps=40.")
    ] = None,
    address: Address = None,
    working_dir: Annotated[
        Path, typer.Option("--working-dir", help="Directory uploaded to the cluster; the job runs from it.")
    ] = Path("."),
    run_dir: Annotated[
        str | None, typer.Option("--run-dir", help="Run directory on the cluster (default: ~/tiderl-runs/<job id>).")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue the run in this directory on the cluster from its latest checkpoint."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Stream the job's logs until it ends; exit 1 unless it succeeded.")
    ] = False,
    job_id: Annotated[
        str | None, typer.Option("--job-id", help="Submission id (default: <config>-<time>-<random>).")
    ] = None,
) -> None:
    """Submit an RL job to a Ray cluster (Ray Jobs API), with the working directory as its code."""
    cfg = _load(config, overrides or [], check=False)
    from rl.launch.jobs import JobsClient, JobsError, plan_submission, resolve_address
    from rl.launch.preflight import PreflightError, preflight
    from rl.launch.preflight_io import check_resources, driver_modules

    try:
        preflight(cfg, local_model=False, resources=False)  # what needs no cluster, before reaching it
        plan = plan_submission(
            config, overrides or [], cfg, working_dir=working_dir, run_dir=run_dir, resume=resume, submission_id=job_id
        )
        client = JobsClient(resolve_address(address))
        problems = check_resources(cfg, client.nodes())  # against the cluster's nodes as Ray reports them
        if problems:
            raise PreflightError(problems)
        client.check_python(plan, driver_modules())
        for note in plan.notes:
            typer.echo(f"note: {note}")
        submitted = client.submit(plan)
    except (JobsError, ConfigError) as e:
        _fail(str(e))
    flag = f"--address {client.address}"
    typer.echo(f"submitted job {submitted}\nrun directory (on the cluster): {plan.run_dir}")
    typer.echo(
        f"  tiderl status {submitted} {flag}\n  tiderl logs {submitted} --follow {flag}\n  tiderl stop {submitted} "
        f"{flag}"
    )
    if follow:
        _follow(client, submitted)


@app.command()
def status(
    job_id: Annotated[
        str | None, typer.Argument(help="Job (submission) id; without it, a table of the cluster's jobs.")
    ] = None,
    address: Address = None,
) -> None:
    """Show one job (status, times, entrypoint, message, run directory) or list the cluster's jobs."""
    from rl.launch.jobs import JobsClient, JobsError, resolve_address

    try:
        client = JobsClient(resolve_address(address))
        job = client.details(job_id) if job_id else None
        jobs = client.list() if job is None else []
    except JobsError as e:
        _fail(str(e))
    if job is not None:
        meta = job.metadata or {}
        for key, value in [
            ("job", job.submission_id),
            ("status", job.status),
            ("started", _clock(job.start_time)),
            ("ended", _clock(job.end_time)),
            ("run directory", meta.get("tiderl_run_dir")),
            ("entrypoint", job.entrypoint),
            ("message", job.message),
        ]:
            if value:
                typer.echo(f"{key + ':':<15}{value}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()  # ids never cut (people copy them); long paths and messages fold instead of ending in "…"
    table.add_column("job", no_wrap=True, min_width=max((len(j.submission_id) for j in jobs), default=3))
    table.add_column("status", no_wrap=True)
    table.add_column("started")
    table.add_column("ended")
    table.add_column("run directory", overflow="fold")
    table.add_column("message", overflow="fold")
    for j in jobs:
        table.add_row(
            j.submission_id,
            str(j.status),
            _clock(j.start_time),
            _clock(j.end_time),
            (j.metadata or {}).get("tiderl_run_dir", ""),
            j.message or "",
        )
    Console().print(table if jobs else f"no jobs on {client.address}")


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job (submission) id.")],
    address: Address = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends; exit 1 unless it succeeded.")
    ] = False,
) -> None:
    """Print a job's logs (its driver's output)."""
    from rl.launch.jobs import JobsClient, JobsError, resolve_address

    try:
        client = JobsClient(resolve_address(address))
        text = None if follow else client.logs(job_id)
    except JobsError as e:
        _fail(str(e))
    if text is not None:
        typer.echo(text, nl=False)
        return
    _follow(client, job_id)


@app.command()
def stop(
    job_id: Annotated[str, typer.Argument(help="Job (submission) id.")],
    address: Address = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the job to end.")] = 60.0,
) -> None:
    """Stop a job and wait until it has ended."""
    from rl.launch.jobs import JobsClient, JobsError, resolve_address

    try:
        was_running, final = JobsClient(resolve_address(address)).stop(job_id, timeout)
    except JobsError as e:
        _fail(str(e))
    typer.echo(f"job {job_id} {'stopped' if was_running else 'had already ended'}: {final}")


def _follow(client, job_id: str) -> None:
    """Stream logs until the job ends; exit 1 unless it succeeded. Ctrl-C leaves the job running."""
    import sys

    from rl.launch.jobs import JobsError

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        final = client.follow(job_id, write)
    except JobsError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo(
            f"\nstopped following; job {job_id} keeps running (tiderl stop {job_id} --address {client.address})",
            err=True,
        )
        raise typer.Exit(130) from None
    typer.echo(f"job {job_id}: {final}", err=final != "SUCCEEDED")
    if final != "SUCCEEDED":
        raise typer.Exit(1)


def _clock(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def _load(path: Path, overrides: list[str], check: bool = True):
    """The validated config; with `check`, also everything it refers to (`rl.launch.preflight`), for a job that
    runs here or joins a cluster (`tiderl submit` checks against the cluster itself)."""
    try:
        cfg = load_config(path, overrides)
        if check:
            from rl.launch.preflight import preflight

            preflight(cfg)
        return cfg
    except ConfigError as e:
        _fail(str(e))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


if __name__ == "__main__":
    app()
