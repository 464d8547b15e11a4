"""The `es-ray` command: up, status, down, key, demo, cycle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from es_ray.config import load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="es-ray: self-improving semantic search on Ray. State lives in --state-dir.")

StateDir = typer.Option(None, "--state-dir", envvar="ES_RAY_STATE_DIR",
                        help="Where Postgres data, MLflow, the Triton repository and Ray's temp dir live "
                             "(default .es-ray)")


@app.command()
def up(state_dir: Optional[Path] = StateDir) -> None:
    """Start the stack (or what of it is not running) and return once it is healthy."""
    from es_ray.stack import control

    settings = load_settings(state_dir)
    manifest = control.up(settings)
    typer.echo(f"es-ray is up: {manifest.serve_url}  (API docs: {manifest.serve_url}/docs)")
    typer.echo(f"Ray dashboard: {manifest.ray_dashboard_url}   submit jobs with RAY_ADDRESS={manifest.ray_dashboard_url}"
               f" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={settings.state_path / 'auth' / 'ray.token'}")
    key_file = settings.state_path / "auth" / "admin.key"
    if key_file.exists():
        typer.echo(f"API key for admin and write routes (X-API-Key header): {key_file}")


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
def down(state_dir: Optional[Path] = StateDir) -> None:
    """Stop everything this state dir started (and nothing else). Data stays for the next `up`."""
    from es_ray.stack import control

    stopped = control.down(load_settings(state_dir))
    typer.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


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
                                              help="Switch to each new model even where the quality gate refuses")) -> None:
    """Rounds of the self-improvement loop on a BEIR collection (configs/demo.yaml): simulated users click,
    the improvement loop learns, a fine-tune cycle deploys, reindexes and switches; quality after each round."""
    from pydantic import ValidationError

    from es_ray.data.beir import DataUnavailable
    from es_ray.demo.config import load_demo_config
    from es_ray.demo.loop import run

    try:
        config = load_demo_config(docs=docs, train_queries=train_queries, test_queries=test_queries, rounds=rounds,
                                  force=force)
        run(load_settings(state_dir), data, config)
    except (DataUnavailable, ValidationError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def cycle(state_dir: Optional[Path] = StateDir,
          overrides: str = typer.Option("{}", help="JSON merged over configs/finetune.yaml, e.g. "
                                                   "'{\"tune\": {\"num_samples\": 2}}'"),
          force: bool = typer.Option(False, "--force", help="Deploy and switch even if the quality gate refuses"),
          cleanup_now: bool = typer.Option(False, "--cleanup-now",
                                           help="Drop the old collection right after the switch, not after "
                                                "lifecycle.grace_s")) -> None:
    """Run one cycle as a Ray job: fine-tune -> gate -> deploy -> reindex -> switch -> cleanup."""
    from es_ray.lifecycle.cycle import entrypoint
    from es_ray.stack import control, jobs

    try:
        parsed = json.loads(overrides)
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"not JSON: {err}", param_hint="--overrides") from None
    settings = load_settings(state_dir)
    manifest = control.up(settings)
    status, _ = jobs.submit_and_wait(manifest, entrypoint(parsed, force, cleanup_now, settings.ray.namespace),
                                     timeout_s=6 * 3600)
    if status != "SUCCEEDED":
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
