"""What the demo shows: a table row per round, a PNG plot of quality across rounds, a markdown report."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.table import Table

QUALITY = (("test_ndcg@10", "test nDCG@10"), ("test_mrr@10", "test MRR@10"), ("test_recall@100", "test R@100"),
           ("train_ndcg@10", "train nDCG@10"))


@dataclass
class RoundRow:
    round: int
    model: str                      # blue after the round
    quality: dict[str, float]       # QUALITY keys
    sessions: int = 0
    clicks: int = 0
    gate: str = ""                  # passed / refused / overridden, with the reason
    switched: str = ""              # "v1 -> v2", or why not
    traffic: dict[str, Any] = field(default_factory=dict)   # searches during the cycle: requests, failed, models
    steps: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def cells(self, brief: bool = False) -> list[str]:
        failed = f"{self.traffic['failed']} / {self.traffic['requests']}" if self.traffic else "-"
        gate = self.gate or "-"
        if brief:  # "passed (+0.0074)": the decision and the held-out difference; the report has the reason
            delta = re.search(r"\(([+-][0-9.]+)\)", gate)
            gate = gate.split(":", 1)[0] + (f" ({delta.group(1)})" if delta else "")
        return [str(self.round), self.model, *(f"{self.quality[k]:.4f}" for k, _ in QUALITY),
                str(self.sessions), str(self.clicks), gate, self.switched or "-", failed, f"{self.wall_s:.0f}"]


HEADERS = ["round", "model", *(label for _, label in QUALITY), "sessions", "clicks", "gate", "switch",
           "failed / searches (cycle)", "wall s"]


def table(rows: list[RoundRow], title: str) -> Table:
    out = Table(title=title)
    for header in HEADERS:
        out.add_column(header, justify="left" if header in ("gate", "switch") else "right", overflow="fold")
    for row in rows:
        out.add_row(*row.cells(brief=True))
    return out


def plot(rows: list[RoundRow], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    rounds = [r.round for r in rows]
    for key, label in QUALITY:
        axes.plot(rounds, [r.quality[key] for r in rows], marker="o", label=label)
    for r in rows:
        axes.annotate(r.model, (r.round, r.quality["test_ndcg@10"]), textcoords="offset points", xytext=(0, -14),
                      ha="center", fontsize=8)
    axes.set_xticks(rounds)
    axes.set_xlabel("round (0: before any click)")
    axes.set_ylabel("score")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def markdown(rows: list[RoundRow], context: dict[str, Any], plot_path: Path, path: Path) -> Path:
    lines = [f"# es-ray demo: {context['dataset']}", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {context['machine']}, {context['wall_s']:.0f} s in all "
             f"(loading {context['load_s']:.0f} s).", "",
             f"{context['docs']} documents, {context['train_queries']} train queries searched and clicked by "
             f"simulated users (click model configs/clicks.yaml), {context['test_queries']} test queries that "
             "never produce a click. Quality is measured through `POST /v1/search` on the blue model after "
             "each round (the sample is easier than the whole collection: compare rounds, not other papers).",
             "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row.cells()) + " |" for row in rows]
    lines += ["", f"![quality across rounds]({plot_path.name})", "", "## Steps of each cycle", ""]
    for row in rows[1:]:
        steps = ", ".join(f"{s['step']} {s['status']} ({s.get('seconds', '?')} s)" for s in row.steps)
        lines.append(f"- round {row.round}: {steps or 'no cycle'}; searches during the cycle by model: "
                     f"{json.dumps(row.traffic.get('models', {}))}")
    lines += ["", "## Settings", "", "```json", json.dumps(context["config"], indent=2), "```", ""]
    path.write_text("\n".join(lines))
    (path.parent / "rounds.json").write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
    return path
