"""The quality gate: a fine-tuned version becomes a candidate for promotion only if it beats the blue
model on the same held-out sessions by the configured margin. Otherwise it stays registered, with
the decision and both scores recorded, and is never deployed."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from es_ray.train.config import GateConfig


@dataclass(frozen=True)
class GateDecision:
    candidate: bool
    metric: str
    new: float
    blue: float
    margin: float
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def decide(new: dict[str, float], blue: dict[str, float], config: GateConfig) -> GateDecision:
    gain = new[config.metric] - blue[config.metric]
    candidate = gain > config.margin
    verdict = "beats" if candidate else "does not beat"
    reason = (f"held-out {config.metric} {new[config.metric]:.4f} vs blue {blue[config.metric]:.4f} "
              f"({gain:+.4f}) {verdict} the margin {config.margin}")
    return GateDecision(candidate, config.metric, round(new[config.metric], 6), round(blue[config.metric], 6),
                        config.margin, reason)
