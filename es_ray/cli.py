"""The `es-ray` command: up, status, down, backup, restore, key, demo, cycle, prune, learn-fusion, abandon-green.

Each command imports what it runs inside its function: `es-ray --help` and `es-ray key` stay quick, and
nothing imports Ray before the command has set the stack's environment (Ray's token mode is read when
Ray is imported).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import typer
from rich.markup import escape

from es_ray.config import Settings, load_settings

if TYPE_CHECKING:
    from es_ray.console import Display

# Our display shows progress; tqdm's bars (sentence-transformers, the simulated users) would only be
# noise in the log file. tqdm reads this when it is imported, so it is set before anything imports it.
os.environ.setdefault("TQDM_DISABLE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="es-ray: self-improving semantic search on Ray. State lives in --state-dir.")

StateDir = typer.Option(None, "--state-dir", envvar="ES_RAY_STATE_DIR",
                        help="Where Postgres data, MLflow, the Triton repository and Ray's temp dir live "
                             "(default .es-ray)")
Verbose = typer.Option(False, "--verbose", "-v",
                       help="Show the log lines too (they always go to <state dir>/logs/<command>.log)")


@contextlib.contextmanager
def _terminal(settings: Settings, command: str, verbose: bool) -> Iterator[Display]:
    """The command's display; every log line of the process goes to <state dir>/logs/<command>.log, whose
    path is printed first. With --verbose the log is shown as well, and the display prints plain lines
    (a live display and log lines would overwrite each other)."""
    from es_ray.console import Display
    from es_ray.logs import get_logger, to_file

    path = settings.state_path / "logs" / f"{command}.log"
    with to_file(path, verbose) as terminal, Display(terminal, live=False if verbose else None) as display:
        display.note(f"[dim]logs: {path}" + ("" if verbose else " (--verbose shows them here)") + "[/dim]")
        try:
            yield display
        except (typer.Exit, KeyboardInterrupt):
            raise
        except Exception as err:
            get_logger("es_ray.cli").exception(f"{command}.failed")
            display.note(f"[bold red]{command} failed[/bold red]: {type(err).__name__}: {escape(str(err))}\n"
                         f"The traceback and every log line: {path}")
            raise typer.Exit(1) from None


@app.command()
def up(state_dir: Optional[Path] = StateDir, verbose: bool = Verbose) -> None:
    """Start the stack (or what of it is not running) and return once it is healthy."""
    from es_ray.stack import control

    settings = load_settings(state_dir)
    with _terminal(settings, "up", verbose) as display:
        manifest = control.up(settings, display=display)
        display.note(f"[bold green]es-ray is up[/bold green]: {manifest.serve_url}  "
                     f"(API docs: {manifest.serve_url}/docs)")
        display.note(f"Ray dashboard: {manifest.ray_dashboard_url}   "
                     f"submit jobs with RAY_ADDRESS={manifest.ray_dashboard_url} RAY_AUTH_MODE=token "
                     f"RAY_AUTH_TOKEN_PATH={settings.state_path / 'auth' / 'ray.token'}")
        key_file = settings.state_path / "auth" / "admin.key"
        if key_file.exists():
            display.note(f"API key for admin and write routes (X-API-Key header): {key_file}")


@app.command()
def status(state_dir: Optional[Path] = StateDir,
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON")) -> None:
    """Show what runs: Ray, Postgres, Triton, MLflow, Serve, the blue model and collection, item count."""
    from es_ray.stack import control

    report = control.status(load_settings(state_dir))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        typer.echo(f"{key:>10}: {json.dumps(value) if isinstance(value, dict) else value}")


@app.command()
def down(state_dir: Optional[Path] = StateDir, verbose: bool = Verbose) -> None:
    """Stop everything this state dir started (and nothing else). Data stays for the next `up`."""
    from es_ray.stack import control

    settings = load_settings(state_dir)
    with _terminal(settings, "down", verbose) as display:
        display.step("stopping")
        stopped = control.down(settings)
        display.note(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def backup(output: Optional[Path] = typer.Argument(None, help="The archive to write (default "
                                                               "es-ray-backup-<UTC time>.tar here)"),
           state_dir: Optional[Path] = StateDir,
           with_secrets: bool = typer.Option(False, "--with-secrets",
                                             help="Include the state dir's secrets (auth/): API key, user-token "
                                                  "secret; without them a restored stack makes new ones"),
           verbose: bool = Verbose) -> None:
    """Back up Postgres (items, vectors, sessions, lifecycle), MLflow and the Triton repository to one tar,
    consistent while the stack serves and takes writes."""
    from datetime import datetime, timezone

    from es_ray.stack import backup as backups

    settings = load_settings(state_dir)
    target = output or Path(f"es-ray-backup-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.tar")
    with _terminal(settings, "backup", verbose) as display:
        display.step(f"backing up {settings.state_path}")
        try:
            manifest = backups.backup(settings, target, with_secrets=with_secrets)
        except backups.BackupError as err:
            display.note(f"[bold red]error[/bold red]: {escape(str(err))}")
            raise typer.Exit(2) from None
        display.note(f"[bold green]backup written[/bold green]: {target.resolve()} "
                     f"({len(manifest.files)} files)\n{escape(backups.describe(manifest))}")


@app.command()
def restore(backup_file: Path = typer.Argument(..., exists=True, help="An archive from `es-ray backup`"),
            state_dir: Optional[Path] = StateDir, verbose: bool = Verbose) -> None:
    """Restore a backup into a new, empty state dir; then `es-ray up --state-dir` serves it."""
    from es_ray.stack import backup as backups

    settings = load_settings(state_dir)
    try:  # before the log file exists: it is the one thing a fresh state dir may hold
        backups.ensure_fresh(settings.state_path)
    except backups.BackupError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    with _terminal(settings, "restore", verbose) as display:
        display.step(f"restoring {backup_file} into {settings.state_path}")
        try:
            report = backups.restore(settings, backup_file)
        except backups.BackupError as err:
            display.note(f"[bold red]error[/bold red]: {escape(str(err))}")
            raise typer.Exit(2) from None
        blue = report["blue"]
        display.note(f"restored: blue v{blue['model_version']} ({blue['collection']}, {report['items_in_blue']} "
                     f"items), models {report['models']}, MLflow versions {report['mlflow_versions']}, "
                     f"Triton versions {report['triton_versions']}" if blue else "restored: no blue model yet")
        for note in report["notes"]:
            display.note(f"note: {escape(note)}")
        if report["problems"]:
            for problem in report["problems"]:
                display.note(f"[bold red]problem[/bold red]: {escape(problem)}")
            raise typer.Exit(1)
        display.note(f"[bold green]restored[/bold green]: start it with "
                     f"`es-ray up --state-dir {settings.state_path}`")


@app.command()
def key(name: str = typer.Argument("admin", help="A name for the key, shown in logs")) -> None:
    """Make a new API key: prints the key (for the client) and the hash entry for auth.api_keys."""
    from es_ray.serve.auth import hash_key, new_api_key

    new = new_api_key()
    typer.echo(f"key (give it to the client as the X-API-Key header; it is not stored anywhere): {new}")
    typer.echo("entry for configs/stack.yaml, under auth.api_keys:")
    typer.echo(f"  - {{name: {name}, sha256: {hash_key(new)}}}")
    typer.echo("then run `es-ray up` again: the Serve replicas roll over to the new keys.")


@app.command()
def demo(state_dir: Optional[Path] = StateDir,
         data: Optional[Path] = typer.Option(None, "--data", envvar="DATA", help="A BEIR directory"),
         rounds: Optional[int] = typer.Option(None, help="Rounds of the loop (configs/demo.yaml: rounds)"),
         docs: Optional[int] = typer.Option(None, help="Documents to load (judged ones first)"),
         train_queries: Optional[int] = typer.Option(None, help="Queries the simulated users search and click"),
         test_queries: Optional[int] = typer.Option(None, help="Held-out queries that measure quality"),
         force: Optional[bool] = typer.Option(None, "--force/--no-force",
                                              help="Switch to each new model even where the quality gate refuses"),
         config_file: Optional[Path] = typer.Option(None, "--config",
                                                    help="Another demo.yaml (default configs/demo.yaml)"),
         verbose: bool = Verbose) -> None:
    """Rounds of the self-improvement loop on a BEIR collection (configs/demo.yaml): simulated users click,
    the improvement loop learns, a fine-tune cycle deploys, reindexes and switches; quality after each round."""
    from pydantic import ValidationError

    from es_ray.data.beir import DataUnavailable
    from es_ray.demo.config import load_demo_config
    from es_ray.demo.loop import run

    try:
        config = load_demo_config(*([config_file] if config_file else []), docs=docs, train_queries=train_queries,
                                  test_queries=test_queries, rounds=rounds, force=force)
    except ValidationError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    settings = load_settings(state_dir)
    with _terminal(settings, "demo", verbose) as display:
        try:
            run(settings, data, config, display)
        except DataUnavailable as err:
            display.note(f"[bold red]error[/bold red]: {escape(str(err))}")
            raise typer.Exit(2) from None


@app.command()
def cycle(state_dir: Optional[Path] = StateDir,
          overrides: str = typer.Option("{}", help="JSON merged over configs/finetune.yaml, e.g. "
                                                   "'{\"tune\": {\"num_samples\": 2}}'"),
          force: bool = typer.Option(False, "--force", help="Deploy and switch even if the quality gate refuses"),
          cleanup_now: bool = typer.Option(False, "--cleanup-now",
                                           help="Drop the old collection right after the switch, not after "
                                                "lifecycle.grace_s"),
          verbose: bool = Verbose) -> None:
    """Run one cycle as a Ray job: fine-tune -> gate -> deploy -> reindex -> switch -> cleanup."""
    from es_ray.demo.config import Cycle
    from es_ray.demo.cycle_job import CycleJobFailed, submit_cycle_job
    from es_ray.stack import control

    try:
        parsed = json.loads(overrides)
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"not JSON: {err}", param_hint="--overrides") from None
    settings = load_settings(state_dir)
    with _terminal(settings, "cycle", verbose) as display:
        display.step("stack")
        manifest = control.up(settings, display=display)
        try:
            result = submit_cycle_job(manifest, settings.ray.namespace,
                                      Cycle(force=force, cleanup_now=cleanup_now, finetune=parsed), display,
                                      timeout_s=6 * 3600)
        except CycleJobFailed as err:
            display.note(f"[bold red]the cycle failed[/bold red]: {escape(str(err))}")
            raise typer.Exit(1) from None
        for step in result["steps"]:
            display.note(f"{step['step']:<10} {step['status']} ({step.get('seconds', '?')} s)"
                         + (f": {escape(str(step['reason']))}" if step.get("reason") else ""))
        display.note(f"[bold]switched v{result['from_version']} -> v{result['version']}[/bold]"
                     if result.get("switched") else
                     f"[bold]v{result['version']} stopped at the {result.get('stopped_at', '?')}[/bold]")


@app.command()
def prune(state_dir: Optional[Path] = StateDir,
          rounds: int = typer.Option(0, min=0, help="Stop after this many bounded rounds (retention.max_batches "
                                                     "DELETEs each); 0: until nothing is left to prune"),
          verbose: bool = Verbose) -> None:
    """Prune old sessions now, as the lifecycle driver does every retention.interval_s (configs/stack.yaml:
    retention). Only sessions already learned from (or of an excluded source, past the age) are pruned."""
    from es_ray.store import db, retention

    settings = load_settings(state_dir)
    dsn = _database(settings)
    with _terminal(settings, "prune", verbose) as display:
        display.step("pruning")
        totals = {"by_age": 0, "by_count": 0}
        done = 0
        with db.connect(dsn) as conn:
            while True:
                pruned = retention.prune(conn, settings.retention, settings.learning.exclude_sources)
                totals["by_age"] += pruned.by_age
                totals["by_count"] += pruned.by_count
                done += 1
                if pruned.finished or done == rounds:
                    break
        display.note(f"pruned {totals['by_age']} session(s) by age (retention.max_age_days) and "
                     f"{totals['by_count']} by count (retention.max_sessions)"
                     + ("" if pruned.finished else "; more remain (run again)"))


def _database(settings: Settings) -> str:
    """The DSN of postgres.dsn, else of this state dir's running stack; exits 1 with a message without either."""
    from es_ray.stack.manifest import StackManifest

    manifest = StackManifest.load(settings.state_path)
    dsn = settings.postgres.dsn or (manifest.postgres_dsn if manifest else "")
    if not dsn:
        typer.echo(f"no database: postgres.dsn is empty and {settings.state_path} has no stack (es-ray up)", err=True)
        raise typer.Exit(1)
    return dsn


@app.command("learn-fusion")
def learn_fusion(state_dir: Optional[Path] = StateDir, verbose: bool = Verbose,
                 forget: bool = typer.Option(False, "--forget", help="Withdraw the blue collection's promoted "
                                                                     "fusion instead: search.* serves again")) -> None:
    """Learn the blue collection's hybrid fusion (RRF's k and the lexical weight) from hybrid sessions' clicks,
    with the fine-tune's debiasing and held-out split; it serves only if it passes the fine-tune's quality
    gate. Recorded in MLflow either way (experiment es-ray-fusion, a version of mlflow.registered_fusion).
    A promoted fusion serves instead of search.*'s until the collection is dropped or --forget."""
    from es_ray.train.fusion_promotion import FusionNotLearnable, forget_promoted, learn_and_promote
    from es_ray.train.fusion_weights import NotEnoughData

    settings = load_settings(state_dir)
    dsn = _database(settings)
    with _terminal(settings, "learn-fusion", verbose) as display:
        if forget:
            collection = forget_promoted(settings, dsn)
            display.note(f"withdrawn for {collection}: search.* serves" if collection
                         else "the blue collection has no promoted fusion: search.* serves")
            return
        display.step("learning the fusion from hybrid sessions")
        try:
            result = learn_and_promote(settings, dsn)
        except (NotEnoughData, FusionNotLearnable) as err:
            display.note(f"not learned: {escape(str(err))}")
            raise typer.Exit(2) from None
        if result["superseded"]:
            display.note("another learner promoted a fusion meanwhile: this one was compared with the one "
                         "before it, so it was not promoted")
        f = result["fusion"]
        display.note(f"{'promoted' if result['promoted'] else 'kept'} for {result['collection']}: rrf k={f['k']:g}, "
                     f"dense weight {f['dense_weight']:g}, lexical weight {f['lexical_weight']:g} "
                     f"({escape(result['decision']['reason'])}; MLflow run {result['mlflow_run_id']})")


@app.command("abandon-green")
def abandon_green(state_dir: Optional[Path] = StateDir,
                  collection: Optional[str] = typer.Option(None, help="Only if green is this collection")) -> None:
    """Give up the green collection a failed reindex left behind: dual writes stop, it is dropped."""
    from es_ray.client import EsRayClient, EsRayError
    from es_ray.stack.manifest import StackManifest

    manifest = StackManifest.load(load_settings(state_dir).state_path)
    if manifest is None:
        typer.echo("error: no stack in this state dir (es-ray up first)", err=True)
        raise typer.Exit(2)
    with EsRayClient.for_stack(manifest) as client:
        try:
            result = client.abandon_green(collection)
        except EsRayError as err:
            typer.echo(f"not abandoned: {err}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"abandoned green collection {result['abandoned']} (v{result['model_version']})"
               + (": it was already abandoned" if result.get("already") else ""))


if __name__ == "__main__":
    app()
