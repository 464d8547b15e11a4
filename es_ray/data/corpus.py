"""Reading BEIR-layout collections (corpus.jsonl, queries.jsonl, qrels/*.tsv) into es-ray items."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator


def beir_item(record: dict[str, Any]) -> dict[str, Any]:
    """A BEIR corpus record -> {"id", "text", "payload"}; title and metadata go to the payload."""
    title = (record.get("title") or "").strip()
    text = (record.get("text") or "").strip()
    payload: dict[str, Any] = {"title": title} if title else {}
    metadata = record.get("metadata")
    if isinstance(metadata, dict):
        payload.update(metadata)
    return {"id": str(record["_id"]), "text": f"{title}. {text}" if title and text else (title or text),
            "payload": payload}


def read_corpus(path: Path) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield beir_item(json.loads(line))


def read_queries(path: Path) -> dict[str, str]:
    with open(path) as f:
        return {str(q["_id"]): q["text"] for q in map(json.loads, filter(str.strip, f))}


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path) as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader, None)  # header
        for row in reader:
            if len(row) >= 3:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels
