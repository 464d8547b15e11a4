"""`es-ray backup` and `es-ray restore`: a state dir's data as one archive, taken while the stack serves.

A backup is a tar file (mode 0600: it holds every item and session) with manifest.json first:
- `postgres.dump`: pg_dump's custom format of the stack's database: items with their vectors (pgvector's
  types restore with its extension), sessions and events, the lifecycle rows (models, collections, the
  blue pointer, switches, tasks). pg_dump reads everything in one repeatable-read transaction, so a
  write that commits while it runs is wholly in the dump or not at all, and every write acknowledged
  before the backup started is in it.
- `mlflow/`: the registry's sqlite store, copied with sqlite's online backup API (a consistent copy
  while trials and deploys write to it), and its artifacts (the model files of every version).
- `models/`: the local encoder copies the `models` rows name (`source_dir`): the tokenizer the replicas
  load and the source a Triton version is traced from.
- `triton/models`: the Triton repository.
- `auth/`: the state dir's secrets, only with `--with-secrets`. Without them a restored stack makes new
  ones at its first `up`: a new admin key, and a new user-token secret, so user tokens and the session
  ids search handed out before the backup no longer verify.
Left out: Ray's temp dir, logs, stack.json (ports and addresses: a restored stack chooses its own) and
Triton's server binaries (copied from the wheel at `up`). An external Postgres (`postgres.dsn`) is
dumped with the pg_dump on PATH; an external MLflow server is not copied (the manifest says so).

Order: Postgres first, then MLflow, models/ and Triton. A model version gets its MLflow registration,
its local copy and its Triton files before blue or a collection points to it, and those files are
added later but never changed: copies taken after the snapshot hold everything it refers to. (A version
removed by a cleanup in between can miss its Triton files; the lifecycle driver traces a live version
again from models/ when Triton lacks it. A version half-written to the Triton repository is left out
for the same reason.)

`restore` unpacks into a fresh state dir (nothing in it but its logs), checks every file's SHA-256,
restores the dump into that state dir's own Postgres (or the configured `postgres.dsn`, which must be
an empty database), and moves every path that named the old state dir (MLflow's artifact URIs, the
models' `source_dir`) to the new one. `es-ray up --state-dir NEW` then serves the restored data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import tarfile
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from es_ray.config import Settings
from es_ray.inference import registry, triton_repo
from es_ray.logs import get_logger
from es_ray.stack import credentials, postgres, triton
from es_ray.stack.manifest import StackManifest
from es_ray.store import blue_green, db
from es_ray.store.collections import Collection

log = get_logger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
POSTGRES_DUMP = "postgres.dump"
MLFLOW_STORE = "mlflow/mlflow.db"
MLFLOW_ARTIFACTS = "mlflow/artifacts"
MODEL_COPIES = "models"
TRITON_REPOSITORY = "triton/models"
SECRETS = "auth"
# A state dir holding only this is fresh: the restore command writes its own log there before it starts.
FRESH_ALLOWS = {"logs"}
TEMPORARY = "*.tmp"  # files and directories being written (registry.download, triton_repo): not data yet


class BackupError(RuntimeError):
    """A backup or restore that cannot go on; the message says why and what to do."""


class BackupManifest(BaseModel):
    format: int = FORMAT
    es_ray_version: str
    commit: str
    created_at: str
    host: str
    source_state_dir: str
    parts: dict[str, str]          # part (its path in the archive) -> what it is
    files: dict[str, str]          # every file's path in the archive -> its SHA-256
    secrets_included: bool
    notes: list[str] = []


# --- backup ------------------------------------------------------------------------------------------------

def backup(settings: Settings, output: Path, with_secrets: bool = False) -> BackupManifest:
    """Writes the state dir's data to the tar file `output` (which must not exist); returns its manifest."""
    state, output = settings.state_path, Path(output).expanduser().resolve()
    if output.exists():
        raise BackupError(f"{output} exists: choose another name (a backup never overwrites one)")
    if not (state / "postgres" / "PG_VERSION").exists() and not settings.postgres.dsn:
        raise BackupError(f"{state} holds no es-ray database: is it the state dir `es-ray up` used?")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".es-ray-backup-", dir=output.parent))
    try:
        parts, notes = {}, []
        _dump_postgres(settings, staging / POSTGRES_DUMP)
        parts[POSTGRES_DUMP] = "pg_dump custom format: items and vectors, sessions, lifecycle rows"
        if settings.mlflow.tracking_uri:
            notes.append(f"MLflow is an external server ({settings.mlflow.tracking_uri}): back it up with its "
                         "own tools; it is not in this backup")
        elif (state / MLFLOW_STORE).exists():
            _copy_sqlite(state / MLFLOW_STORE, staging / MLFLOW_STORE)
            parts[MLFLOW_STORE] = "MLflow's tracking and registry store (sqlite online backup)"
            _copy_tree(state / MLFLOW_ARTIFACTS, staging / MLFLOW_ARTIFACTS)
            parts[MLFLOW_ARTIFACTS] = "MLflow's artifacts: the files of every registered model version"
        _copy_tree(state / MODEL_COPIES, staging / MODEL_COPIES)
        parts[MODEL_COPIES] = "local encoder copies named by the models rows (source_dir)"
        _copy_tree(triton.model_repository(state), staging / TRITON_REPOSITORY)
        dropped = drop_incomplete_triton_versions(staging / TRITON_REPOSITORY)
        parts[TRITON_REPOSITORY] = "the Triton model repository"
        if dropped:
            notes.append(f"Triton versions {dropped} were being written and are left out: `es-ray up` traces "
                         "a live version again from models/")
        if with_secrets:
            _copy_tree(credentials.auth_dir(state), staging / SECRETS)
            parts[SECRETS] = "the state dir's secrets (API key, user-token secret, Ray token, Triton key)"
        else:
            notes.append("secrets (auth/) are not included (--with-secrets includes them): a restored stack "
                         "makes new ones, and user tokens and session ids handed out before no longer verify")
        manifest = BackupManifest(es_ray_version=_version(), commit=_source_commit(),
                                  created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  host=socket.gethostname(), source_state_dir=str(state), parts=parts,
                                  files=checksums(staging), secrets_included=with_secrets, notes=notes)
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        _write_archive(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("backup.written", path=str(output), files=len(manifest.files), bytes=output.stat().st_size,
             secrets=with_secrets)
    return manifest


def _dump_postgres(settings: Settings, target: Path) -> None:
    """pg_dump of the stack's database; the embedded server is started for it (and stopped after) if it
    is not running."""
    state = settings.state_path
    started_here = False
    if settings.postgres.dsn:
        dsn, tool = settings.postgres.dsn, _pg_tool("pg_dump", external=True)
    else:
        started_here = not postgres.is_running(state)
        recorded = StackManifest.load(state)
        dsn = recorded.postgres_dsn if recorded and recorded.postgres_dsn and not started_here else postgres.start(state)
        tool = _pg_tool("pg_dump", external=False)
    try:
        _run([tool, "--format=custom", f"--file={target}", f"--dbname={dsn}"], "pg_dump")
    finally:
        if started_here:
            postgres.stop(state)


def _pg_tool(name: str, external: bool) -> str:
    """The embedded server's own client tools; for an external server the ones on PATH (a pg_dump refuses
    a server newer than itself), else the embedded ones."""
    import pgserver._commands

    bundled = str(pgserver._commands.POSTGRES_BIN_PATH / name)
    return (shutil.which(name) or bundled) if external else bundled


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BackupError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")


def _copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live sqlite database: sqlite's backup API copies it whole under a read lock."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source_conn, target_conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=60), sqlite3.connect(target)
    try:
        source_conn.backup(target_conn)
    finally:
        source_conn.close()
        target_conn.close()


def _copy_tree(source: Path, target: Path) -> None:
    if source.exists():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(TEMPORARY))


def drop_incomplete_triton_versions(repo: Path) -> list[int]:
    """Removes from the copy the versions whose files were not all written yet; returns them."""
    versions = {int(m["version"]) for d in (repo.iterdir() if repo.exists() else [])
                if (m := triton_repo.SERVED_NAME.match(d.name))}
    incomplete = sorted(v for v in versions if not all(
        triton_repo.model_file(triton_repo.version_dir(repo, name, v)) is not None
        and (triton_repo.version_dir(repo, name, v) / "model.py").exists()
        and (repo / triton_repo.served_name(name, v) / "config.pbtxt").exists() for name in triton_repo.ENCODERS))
    for version in incomplete:
        triton_repo.remove_version(repo, version)
    return incomplete


def checksums(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): _sha256(path)
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_archive(staging: Path, output: Path) -> None:
    """The tar is written beside `output` and renamed into place: a failed backup leaves no file that
    looks like one. Mode 0600 from the start."""
    partial = output.with_name(output.name + ".partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle, tarfile.open(fileobj=handle, mode="w") as archive:
            archive.add(staging / MANIFEST, arcname=MANIFEST)
            for entry in sorted(staging.iterdir()):
                if entry.name != MANIFEST:
                    archive.add(entry, arcname=entry.name)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


def _version() -> str:
    try:
        return metadata.version("es-ray")
    except metadata.PackageNotFoundError:
        return "unknown"


def _source_commit() -> str:
    """The git commit of the es-ray source that made the backup, where it runs from a checkout."""
    try:
        result = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


# --- restore -----------------------------------------------------------------------------------------------

def ensure_fresh(state: Path) -> None:
    """Refuses a state dir that holds anything but logs: a restore never mixes with or overwrites data."""
    found = sorted(p.name for p in state.iterdir() if p.name not in FRESH_ALLOWS) if state.exists() else []
    if found:
        raise BackupError(f"{state} is not empty ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}): "
                          "restore into a new state dir (--state-dir), then `es-ray up --state-dir` it")


def read_manifest(backup_path: Path) -> BackupManifest:
    """The manifest of a backup archive (or of a directory an archive was unpacked into)."""
    backup_path = Path(backup_path)
    if backup_path.is_dir():
        return BackupManifest.model_validate_json((backup_path / MANIFEST).read_text())
    with tarfile.open(backup_path) as archive:
        member = archive.extractfile(MANIFEST)
        if member is None:
            raise BackupError(f"{backup_path} has no {MANIFEST}: not an es-ray backup")
        return BackupManifest.model_validate_json(member.read())


def verify(root: Path, manifest: BackupManifest) -> None:
    """Every file the manifest lists is there with its SHA-256, and there is no other."""
    found = checksums(root)
    missing = sorted(set(manifest.files) - set(found))
    changed = sorted(p for p in set(manifest.files) & set(found) if found[p] != manifest.files[p])
    extra = sorted(set(found) - set(manifest.files))
    if missing or changed or extra:
        raise BackupError(f"the backup is damaged: missing {missing[:5]}, checksum differs {changed[:5]}, "
                          f"not in the manifest {extra[:5]}")


def restore(settings: Settings, backup_path: Path) -> dict[str, Any]:
    """Restores a backup into the fresh state dir of `settings`; returns what was restored and any
    inconsistency found (`problems`). Leaves the state dir stopped, ready for `es-ray up`."""
    state, backup_path = settings.state_path, Path(backup_path).expanduser().resolve()
    ensure_fresh(state)
    manifest = read_manifest(backup_path)
    if manifest.format != FORMAT:
        raise BackupError(f"backup format {manifest.format}; this es-ray reads format {FORMAT}")
    state.mkdir(parents=True, exist_ok=True)
    staging, changed = state / ".restoring", False
    try:
        if backup_path.is_dir():
            shutil.copytree(backup_path, staging)
        else:
            with tarfile.open(backup_path) as archive:
                archive.extractall(staging, filter="data")  # no absolute paths, links out or devices
        verify(staging, manifest)
        old, changed = manifest.source_state_dir, True
        for part in (MLFLOW_STORE, MLFLOW_ARTIFACTS, MODEL_COPIES, TRITON_REPOSITORY):
            if (staging / part).exists():
                (state / part).parent.mkdir(parents=True, exist_ok=True)
                (staging / part).rename(state / part)
        if (state / MLFLOW_STORE).exists():
            move_mlflow_paths(state / MLFLOW_STORE, old, str(state))
        if (staging / SECRETS).exists():
            _restore_secrets(staging / SECRETS, credentials.auth_dir(state))
        report = _restore_postgres(settings, staging / POSTGRES_DUMP, old)
    except BackupError as err:
        if changed:
            raise BackupError(f"{err}\n{state} is half restored: remove it before restoring again") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.update(state_dir=str(state), backup=str(backup_path), created_at=manifest.created_at,
                  source_state_dir=old, secrets_restored=manifest.secrets_included, notes=manifest.notes)
    log.info("restore.done", **{k: v for k, v in report.items() if k != "notes"})
    return report


def move_mlflow_paths(store: Path, old: str, new: str) -> int:
    """Rewrites every text value of the MLflow store that begins with the old state dir (as a path or a
    file URI: artifact locations, run artifact URIs, model version sources) to begin with the new one.
    Every table is looked at, not a list of MLflow's columns: a newer MLflow's schema is covered too."""
    prefixes = [(Path(old).as_uri() + "/", Path(new).as_uri() + "/"), (old + "/", new + "/")]
    changed = 0
    with sqlite3.connect(store) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')
                       if any(kind in (row[2] or "").upper() for kind in ("CHAR", "TEXT", "CLOB"))]
            for column in columns:
                for before, after in prefixes:
                    changed += conn.execute(
                        f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                        f'WHERE substr("{column}", 1, ?) = ?', (after, len(before) + 1, len(before), before)).rowcount
    conn.close()
    return changed


def _restore_secrets(source: Path, target: Path) -> None:
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in source.iterdir():
        shutil.copyfile(path, target / path.name)
        os.chmod(target / path.name, 0o600)


def _restore_postgres(settings: Settings, dump: Path, old_state: str) -> dict[str, Any]:
    """pg_restore into the new state dir's own server (started for it, stopped after) or into the
    configured DSN; in one transaction, so a failure (a database that is not empty) leaves nothing."""
    state = settings.state_path
    external = bool(settings.postgres.dsn)
    dsn = settings.postgres.dsn if external else postgres.start(state)
    try:
        _run([_pg_tool("pg_restore", external), "--exit-on-error", "--single-transaction", "--no-owner",
              "--no-privileges", f"--dbname={dsn}", str(dump)], "pg_restore")
        with db.connect(dsn) as conn:
            moved = blue_green.move_source_dirs(conn, old_state, str(state))
        report = check(settings, dsn)
        report["models_moved"] = moved
        return report
    finally:
        if not external:
            postgres.stop(state)


def check(settings: Settings, dsn: str) -> dict[str, Any]:
    """What a restored state dir holds and whether its parts agree: every model row registered in MLflow,
    every live version's local copy present (the replicas load its tokenizer, Triton is traced from it)."""
    state = settings.state_path
    problems = []
    with db.connect(dsn) as conn:
        lifecycle = blue_green.get_state(conn)
        models = [m["version"] for m in blue_green.list_models(conn)]
        items = Collection(lifecycle.blue.collection, lifecycle.blue.dim).count(conn) if lifecycle else 0
    live = [t for t in (lifecycle.blue, lifecycle.green, lifecycle.previous) if t] if lifecycle else []
    for target in live:
        if not (Path(target.source_dir) / "config.json").exists():
            problems.append(f"model v{target.model_version}: no encoder at {target.source_dir}")
    registered = []
    if (state / MLFLOW_STORE).exists():
        uri = f"sqlite:///{state / MLFLOW_STORE}"
        versions = registry.client(uri).search_model_versions(f"name = '{settings.mlflow.registered_model}'")
        registered = sorted(int(v.version) for v in versions)
        problems += [f"model v{v} has a models row but is not registered in MLflow" for v in models
                     if v not in registered]
    return {"blue": {"model_version": lifecycle.blue.model_version, "collection": lifecycle.blue.collection}
            if lifecycle else None, "items_in_blue": items, "models": models, "mlflow_versions": registered,
            "triton_versions": sorted(set(triton_repo.deployed_versions(triton.model_repository(state)).values())),
            "problems": problems}


def describe(manifest: BackupManifest) -> str:
    """A few lines for a person: when, from where, which parts."""
    lines = [f"es-ray {manifest.es_ray_version} ({manifest.commit[:12]}), {manifest.created_at}, "
             f"from {manifest.host}:{manifest.source_state_dir}"]
    lines += [f"  {part}: {what}" for part, what in manifest.parts.items()]
    lines += [f"  note: {note}" for note in manifest.notes]
    return "\n".join(lines)
