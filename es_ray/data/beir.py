"""Finding a BEIR collection: --data / DATA, then ../shared/data/<name>, then the public BEIR archive."""

from __future__ import annotations

import os
import random
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.logs import get_logger

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BEIR_ARCHIVE = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


class DataUnavailable(RuntimeError):
    """No collection given, none beside the checkout, and the public archive cannot be fetched."""


def shared_dataset(name: str) -> Path | None:
    """../shared/data/<name> beside the checkout, where the project's test collections live.

    ES_RAY_SHARED_DATA names another directory to look in instead; a path that holds no collection
    (ES_RAY_SHARED_DATA=/nonexistent) shows the tests and benchmarks what a fresh clone without
    ../shared sees, so that case can be checked on a machine that has it."""
    path = Path(os.environ.get("ES_RAY_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data") / name
    return path if (path / "corpus.jsonl").exists() else None


def locate(data: Path | None, state_dir: Path, name: str = "scifact") -> Path:
    if data is not None:
        if not (Path(data) / "corpus.jsonl").exists():
            raise DataUnavailable(f"{data} is not a BEIR directory (no corpus.jsonl)")
        return Path(data)
    shared = shared_dataset(name)
    if shared is not None:
        return shared
    target = state_dir / "data" / name
    if (target / "corpus.jsonl").exists():
        return target
    return download(name, state_dir / "data")


def download(name: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    url = BEIR_ARCHIVE.format(name=name)
    archive = into / f"{name}.zip"
    log.info("beir.download", url=url, to=str(archive))
    try:
        urllib.request.urlretrieve(url, archive)
    except (urllib.error.URLError, OSError) as err:
        raise DataUnavailable(f"could not download {url} ({err}); pass a local BEIR directory with DATA=... "
                           "or --data") from err
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(into)
    return into / name


def sample(data: Path, docs: int, queries: int, split: str = "test", seed: int = 13):
    """Queries of `split` with judgements, every document they judge relevant, then random others up to `docs`."""
    rng = random.Random(seed)
    qrels = read_qrels(data / "qrels" / f"{split}.tsv")
    all_queries = read_queries(data / "queries.jsonl")
    chosen = sorted(q for q in qrels if q in all_queries)
    rng.shuffle(chosen)
    chosen = chosen[:queries]
    needed = {d for q in chosen for d, g in qrels[q].items() if g > 0}
    corpus = list(read_corpus(data / "corpus.jsonl"))
    relevant = [item for item in corpus if item["id"] in needed]
    others = [item for item in corpus if item["id"] not in needed]
    rng.shuffle(others)
    items = relevant + others[:max(0, docs - len(relevant))]
    return items, {q: all_queries[q] for q in chosen}, {q: qrels[q] for q in chosen}
