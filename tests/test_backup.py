"""`es-ray backup` and `es-ray restore` (es_ray/stack/backup.py).

The end-to-end test backs up the shared test stack while a writer upserts and a searcher searches through
it, restores into a fresh state dir, and checks what the restored state dir holds. It starts only the
restored Postgres, not a second Ray, Triton and Serve (a second stack would cost minutes on the test
machine): it compares rows (items with their vectors, sessions, models, the blue pointer), reads the
restored MLflow registry through MLflow, and compares the Triton repository's files. What `es-ray up`
does with a restored state dir (bootstrap with an existing blue row) is the same path as a restart,
which test_zz_restart.py covers.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from es_ray.stack import backup

# --- without a stack ----------------------------------------------------------------------------------------


def test_restore_refuses_a_state_dir_that_holds_data(tmp_path):
    backup.ensure_fresh(tmp_path / "not-made-yet")
    (tmp_path / "logs").mkdir()
    backup.ensure_fresh(tmp_path)  # its own log may be there already
    (tmp_path / "postgres").mkdir()
    with pytest.raises(backup.BackupError, match="is not empty \\(postgres\\)"):
        backup.ensure_fresh(tmp_path)


def test_the_restore_command_says_why_it_refuses(tmp_path):
    from es_ray.cli import app

    archive = tmp_path / "some.tar"
    archive.write_bytes(b"")
    (tmp_path / "state" / "mlflow").mkdir(parents=True)
    result = CliRunner().invoke(app, ["restore", str(archive), "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 2
    assert "is not empty (mlflow)" in result.output and "new state dir" in result.output


def test_a_changed_missing_or_unlisted_file_fails_verification(tmp_path):
    (tmp_path / "models" / "v1").mkdir(parents=True)
    (tmp_path / "models" / "v1" / "config.json").write_text("{}")
    (tmp_path / "postgres.dump").write_bytes(b"dump")
    manifest = backup.BackupManifest(es_ray_version="0", commit="c", created_at="now", host="h",
                                     source_state_dir="/s", parts={}, files=backup.checksums(tmp_path),
                                     secrets_included=False)
    backup.verify(tmp_path, manifest)
    (tmp_path / "postgres.dump").write_bytes(b"dumq")
    with pytest.raises(backup.BackupError, match="checksum differs \\['postgres.dump'\\]"):
        backup.verify(tmp_path, manifest)
    (tmp_path / "postgres.dump").write_bytes(b"dump")
    (tmp_path / "extra").write_text("x")
    with pytest.raises(backup.BackupError, match="not in the manifest \\['extra'\\]"):
        backup.verify(tmp_path, manifest)
    (tmp_path / "extra").unlink()
    (tmp_path / "models" / "v1" / "config.json").unlink()
    with pytest.raises(backup.BackupError, match="missing \\['models/v1/config.json'\\]"):
        backup.verify(tmp_path, manifest)


def test_mlflow_paths_under_the_old_state_dir_move_to_the_new_one(tmp_path):
    store = tmp_path / "mlflow.db"
    old, new = "/old/state", "/new/place"
    values = {"file:///old/state/mlflow/artifacts/1": "file:///new/place/mlflow/artifacts/1",
              "/old/state/models/v1": "/new/place/models/v1",
              "file:///old/statefoo/x": "file:///old/statefoo/x",       # another dir that shares the prefix
              "file:///elsewhere/old/state/x": "file:///elsewhere/old/state/x",
              "models:/es-ray-embedding/1": "models:/es-ray-embedding/1"}
    with sqlite3.connect(store) as conn:
        conn.execute("CREATE TABLE model_versions (version INTEGER, source VARCHAR(500))")
        conn.execute("CREATE TABLE params (key VARCHAR(250), value TEXT)")
        conn.executemany("INSERT INTO model_versions VALUES (1, ?)", [(v,) for v in values])
        conn.executemany("INSERT INTO params VALUES ('p', ?)", [(v,) for v in values])
    conn.close()
    assert backup.move_mlflow_paths(store, old, new) == 4
    with sqlite3.connect(store) as conn:
        for table, column in (("model_versions", "source"), ("params", "value")):
            assert sorted(r[0] for r in conn.execute(f"SELECT {column} FROM {table}")) == sorted(values.values())
    conn.close()


def test_a_half_written_triton_version_is_left_out(tmp_path):
    from es_ray.inference import triton_repo

    for version, model_file in ((1, "model.pt"), (2, "model.onnx"), (3, "model.onnx")):  # either runtime's file
        for name in triton_repo.ENCODERS:
            directory = triton_repo.version_dir(tmp_path, name, version)
            directory.mkdir(parents=True)
            (directory / model_file).write_bytes(b"weights")
            (directory / "model.py").write_text("code")
            (directory.parent / "config.pbtxt").write_text("config")
    (triton_repo.version_dir(tmp_path, triton_repo.ITEM_ENCODER, 2) / "model.py").unlink()  # being copied
    (triton_repo.version_dir(tmp_path, triton_repo.QUERY_ENCODER, 3) / "model.onnx").rename(  # being exported
        triton_repo.version_dir(tmp_path, triton_repo.QUERY_ENCODER, 3) / "model.onnx.tmp")
    assert backup.drop_incomplete_triton_versions(tmp_path) == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["item_encoder_v1", "query_encoder_v1"]


# --- on the test stack --------------------------------------------------------------------------------------


class Traffic:
    """A writer that upserts new items and a searcher that searches, each in its own thread and with its
    own client, until stopped; each records what the stack acknowledged and when."""

    def __init__(self, serve_url: str, api_key: str):
        self.serve_url, self.api_key = serve_url, api_key
        self.stop = threading.Event()
        self.written: list[tuple[float, str]] = []    # (when acknowledged, item id)
        self.sessions: list[tuple[float, str]] = []   # (when answered, served session id)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._write, daemon=True),
                        threading.Thread(target=self._search, daemon=True)]

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _write(self) -> None:
        with httpx.Client(base_url=self.serve_url, headers={"X-API-Key": self.api_key}, timeout=60) as api:
            n = 0
            while not self.stop.is_set():
                item = {"id": f"backup-during-{n:04d}", "text": f"tidal marsh sediment survey number {n}"}
                response = api.put("/v1/items", json={"items": [item]})
                if response.status_code != 200 or response.json()["failed"]:
                    self.errors.append(f"upsert: {response.status_code} {response.text[:200]}")
                else:
                    self.written.append((time.monotonic(), item["id"]))
                n += 1

    def _search(self) -> None:
        # With the API key: an anonymous client's rate limit (serve.rate_limits.search) would refuse this
        # loop once searches are fast, and the 429s would follow into the next tests from this address.
        with httpx.Client(base_url=self.serve_url, headers={"X-API-Key": self.api_key}, timeout=60) as searcher:
            while not self.stop.is_set():
                response = searcher.post("/v1/search", json={"query": "tidal marsh sediment", "limit": 5})
                if response.status_code != 200:
                    self.errors.append(f"search: {response.status_code} {response.text[:200]}")
                elif response.json()["session_id"]:
                    self.sessions.append((time.monotonic(), response.json()["session_id"]))
                time.sleep(0.05)

    def acknowledged_before(self, moment: float) -> tuple[list[str], list[str]]:
        return ([i for t, i in self.written if t < moment], [s for t, s in self.sessions if t < moment])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_backup_under_writes_restores_items_sessions_models_and_blue(stack, api, settings, tmp_path):
    from es_ray.inference import registry, triton_repo
    from es_ray.stack import postgres, triton
    from es_ray.stack.credentials import local_api_key
    from es_ray.store import blue_green, clickstream, db
    from es_ray.store.collections import Collection

    items = [{"id": f"backup-before-{n:02d}", "text": f"estuary water quality report {n}"} for n in range(10)]
    assert api.put("/v1/items", json={"items": items}).json() == {"upserted": 10, "failed": []}
    ingested = api.post("/v1/sessions", json={"query": "estuary water", "user_id": "backup-user",
                                              "results": [{"id": "backup-before-03", "rank": 1}]})
    assert ingested.status_code == 200, ingested.text
    ingested_id = ingested.json()["session_id"]

    restored = Path(tempfile.mkdtemp(prefix="esr-restore-", dir="/tmp"))
    shutil.rmtree(restored)  # a state dir that does not exist yet is fresh
    archive = tmp_path / "stack.tar"
    traffic = None
    try:
        with Traffic(stack.serve_url, local_api_key(settings.state_path)) as traffic:
            while len(traffic.written) < 3 or len(traffic.sessions) < 3:  # both are under way
                assert not traffic.errors, traffic.errors
                time.sleep(0.2)
            backup_started = time.monotonic()
            manifest = backup.backup(settings, archive)
            backup_ended = time.monotonic()
            while not [t for t, _ in traffic.written if t > backup_ended]:  # writes went on after it
                time.sleep(0.2)
        assert not traffic.errors, traffic.errors
        written_before, sessions_before = traffic.acknowledged_before(backup_started)
        assert written_before and sessions_before
        assert not manifest.secrets_included and backup.SECRETS not in manifest.parts
        assert {backup.POSTGRES_DUMP, backup.MLFLOW_STORE, backup.MLFLOW_ARTIFACTS,
                backup.TRITON_REPOSITORY} <= set(manifest.parts)

        from es_ray.config import load_settings

        report = backup.restore(load_settings(restored), archive)
        assert report["problems"] == []
        assert not (restored / "auth").exists()  # secrets only with --with-secrets

        with db.connect(stack.postgres_dsn) as conn:
            blue = blue_green.get_blue(conn)
            source_models = blue_green.list_models(conn)
            during = [i for _, i in traffic.written]
            source_vectors = Collection(blue.collection, blue.dim).chunk_vectors(conn, [i["id"] for i in items] + during)
            source_sessions = {s: clickstream.get_session(conn, s) for s in sessions_before + [ingested_id]}
        dsn = postgres.start(restored)
        try:
            with db.connect(dsn) as conn:
                restored_blue = blue_green.get_blue(conn)
                assert (restored_blue.model_version, restored_blue.collection) == (blue.model_version, blue.collection)
                assert Path(restored_blue.source_dir) == restored / Path(blue.source_dir).relative_to(settings.state_path)
                assert [(m["version"], m["state"]) for m in blue_green.list_models(conn)] == \
                       [(m["version"], m["state"]) for m in source_models]
                vectors = Collection(blue.collection, blue.dim).chunk_vectors(conn, [i["id"] for i in items] + during)
                for item_id in [i["id"] for i in items] + written_before:  # acknowledged before: all there
                    assert item_id in vectors, f"{item_id} was acknowledged before the backup and is missing"
                for item_id, parts in vectors.items():  # and whatever is there is whole, vectors included
                    assert [(n, v.tolist()) for n, v in parts] == [(n, v.tolist()) for n, v in source_vectors[item_id]]
                for session_id, session in source_sessions.items():
                    copy = clickstream.get_session(conn, session_id)
                    assert (copy.query, copy.source, copy.results, copy.model_version) == \
                           (session.query, session.source, session.results, session.model_version)
        finally:
            postgres.stop(restored)

        mlflow = registry.client(f"sqlite:///{restored / 'mlflow' / 'mlflow.db'}")
        versions = mlflow.search_model_versions(f"name = '{settings.mlflow.registered_model}'")
        assert sorted(int(v.version) for v in versions) == sorted(m["version"] for m in source_models)
        assert not [v.source for v in versions if settings.state_path.as_uri() in v.source]  # all moved
        moved = [v for v in versions if v.source.startswith(restored.as_uri() + "/")]
        assert moved and all((Path(v.source.removeprefix("file://")) / "config.json").exists() for v in moved)

        source_repo, restored_repo = triton.model_repository(settings.state_path), triton.model_repository(restored)
        assert triton_repo.has_version(restored_repo, blue.model_version)
        for name in triton_repo.ENCODERS:
            model = triton_repo.model_file(triton_repo.version_dir(source_repo, name, blue.model_version))
            copy = triton_repo.version_dir(restored_repo, name, blue.model_version) / model.name
            assert _sha256(copy) == _sha256(model)
    finally:
        postgres.stop(restored)
        shutil.rmtree(restored, ignore_errors=True)
        ids = [i["id"] for i in items] + [i for _, i in traffic.written] if traffic else [i["id"] for i in items]
        for start in range(0, len(ids), 500):  # the stack's other tests search without them
            api.request("DELETE", "/v1/items", json={"ids": ids[start:start + 500]}).raise_for_status()
