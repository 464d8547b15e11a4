"""The demo's parts: its settings, the sample it loads, the report it writes, the traffic it counts.
(The whole demo is `make demo`; its cycle is the `es-ray cycle` job tested in test_lifecycle_e2e.py.)"""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from es_ray.data.corpus import read_qrels
from es_ray.demo import report
from es_ray.demo.config import load_demo_config
from es_ray.demo.loop import choose_sample
from es_ray.demo.traffic import SearchTraffic


def test_demo_config_reads_the_file_and_validates_overrides():
    config = load_demo_config(rounds=3, docs=120)
    assert (config.rounds, config.sample.docs) == (3, 120)
    assert config.cycle.finetune["tune"]["num_samples"] >= 1  # the file's small search reaches the cycle job
    with pytest.raises(ValidationError, match="rounds"):
        load_demo_config(rounds=0)
    with pytest.raises(ValidationError, match="docs"):
        load_demo_config(docs=-5)


def test_sample_holds_every_relevant_document_and_keeps_splits_apart(collection_dir):
    from es_ray.demo.config import Sample

    sample = choose_sample(collection_dir, Sample(docs=150, train_queries=40, test_queries=20, seed=3))
    ids = [item["id"] for item in sample.items]
    assert len(ids) == len(set(ids)) == 150
    assert (len(sample.train), len(sample.test)) == (40, 20)
    for queries, qrels in ((sample.train, sample.train_qrels), (sample.test, sample.test_qrels)):
        relevant = {d for q in queries for d, g in qrels[q].items() if g > 0}
        assert relevant <= set(ids)
    all_train = read_qrels(collection_dir / "qrels" / "train.tsv")
    assert set(sample.train) <= set(all_train) and not set(sample.test) & set(all_train)
    again = choose_sample(collection_dir, Sample(docs=150, train_queries=40, test_queries=20, seed=3))
    assert [i["id"] for i in again.items] == ids  # seeded: a rerun finds the same documents loaded


def test_report_writes_table_plot_and_markdown(tmp_path):
    quality = {"test_ndcg@10": 0.61, "test_mrr@10": 0.55, "test_recall@100": 0.9, "train_ndcg@10": 0.6}
    rows = [report.RoundRow(0, "v1", quality, wall_s=10),
            report.RoundRow(1, "v2", {**quality, "train_ndcg@10": 0.7}, 500, 480,
                            "passed: held-out ndcg@10 0.80 vs blue 0.79 (+0.0100) beats the margin 0.005",
                            "v1 -> v2", {"requests": 300, "failed": 0, "models": {"v1": 200, "v2": 100}},
                            [{"step": "fine-tune", "status": "done", "seconds": 100.0}], 400)]
    assert rows[1].cells(brief=True)[8] == "passed (+0.0100)"
    plot = report.plot(rows, tmp_path / "quality.png", "t")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.markdown(rows, {"dataset": "scifact", "machine": "2 cores", "wall_s": 410, "load_s": 5,
                                  "docs": 150, "train_queries": 40, "test_queries": 20, "config": {}},
                           plot, tmp_path / "report.md").read_text()
    assert "| 1 | v2 | 0.6100 | 0.5500 | 0.9000 | 0.7000 | 500 | 480 |" in text
    assert "0 / 300" in text and "![quality across rounds](quality.png)" in text
    assert (tmp_path / "rounds.json").exists()


def test_traffic_counts_every_request_and_the_model_that_answered(api, loaded_collection, stack):
    _, queries, _ = loaded_collection
    with SearchTraffic(stack.serve_url, list(queries.values()), clients=2, think_s=0.05) as traffic:
        time.sleep(3)
    result = traffic.report.as_dict()
    assert result["requests"] > 0 and result["failed"] == 0
    assert sum(result["models"].values()) == result["requests"]
    blue = api.get("/healthz").json()["blue"]["model_version"]
    assert set(result["models"]) == {f"v{blue}"}
