"""The model card's vocabulary: the keys a checkpoint's metrics are recorded under and the
goals each figure is held to.

Training writes these figures, the app's pages, ``/monitor``, the store and the benches
read them; naming every key and goal once here keeps a renamed set from silently showing
a blank row somewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

#: The sets the population gate is judged on (``metrics["population_gate"]``).
ADULT_HELD_OUT = "adult frontal, held-out patients"
LATERAL_HELD_OUT = "lateral, held-out patients"
TEST_SPLIT = "test split"
#: The test split's normal films: the children nearest the adults' films in the head's eyes.
TEST_NORMAL = "normal test films"
VALIDATION_SPLIT = "validation split"


@dataclass(frozen=True)
class Goal:
    """A share that must reach ``share`` (``at_least``) or stay at or below it."""

    at_least: bool
    share: float

    def met(self, value: float) -> bool:
        return value >= self.share if self.at_least else value <= self.share

    @property
    def text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.share:.0%}"


#: What share of each set the whole gate must refuse.
GATE_GOALS = {ADULT_HELD_OUT: Goal(True, 0.90), LATERAL_HELD_OUT: Goal(True, 0.95), TEST_SPLIT: Goal(False, 0.05),
              TEST_NORMAL: Goal(False, 0.03), VALIDATION_SPLIT: Goal(False, 0.02)}


def test_figures(metrics: dict) -> dict:
    """The test split's screening figures (AUC, sensitivity, FPR, gate flags...)."""
    return metrics.get("test", {})


def test_intervals(metrics: dict) -> dict:
    """Bootstrap 95% intervals of the test split's AUC, sensitivity and FPR, where the site-shift
    suite recorded them (``training.site_shift --record``)."""
    return metrics.get("site_shift", {}).get("as is", {}).get("intervals", {})


def gate_figures(metrics: dict) -> dict:
    """Per set (the names above): {"n", "flagged"}."""
    return metrics.get("population_gate", {})


def site(metrics: dict) -> dict | None:
    """For a version adapted to a site (``training.site adapt``): the site's name, its held-out films'
    local validation and their probabilities (the drift reference); None otherwise."""
    return metrics.get("site")


def card_figures(metrics: dict) -> dict:
    """What a model card says of the test split, in the shape a local validation compares with:
    sensitivity, false-positive rate and AUC with their intervals, and the share refused."""
    test, intervals = test_figures(metrics), test_intervals(metrics)
    return {
        "sensitivity": {"value": test.get("sensitivity"), "interval": intervals.get("sensitivity")},
        "false_positive_rate": {"value": test.get("false_positive_rate"),
                                "interval": intervals.get("false_positive_rate")},
        "auc": {"value": test.get("auc"), "interval": intervals.get("auc")},
        "refused": {"value": test.get("ood_flagged")},
        "films": test.get("n"),
    }
