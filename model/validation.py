"""How a model does on one site's confirmed films: the figures of a local validation.

Shared by ``python -m training.site report`` (films in a folder, or the case record's
overreads) and ``/monitor`` (the serving version's overread cases), so that both say the
same thing from the same numbers. Plain numpy: the app needs no scikit-learn for it.

The rule for trusting the figures is a count, not a p-value: below ``TRUST_PER_CLASS``
films with pneumonia and as many without, an interval is too wide to act on (with 100
normal films a false-positive rate of 0.23 reads 0.16-0.32).
"""
from __future__ import annotations

import math

import numpy as np

#: Films of each class (answered, not refused) before the figures are called enough to trust.
TRUST_PER_CLASS = 100
#: Bootstrap draws for the AUC's interval; the seed keeps a report the same every run.
BOOTSTRAP_DRAWS = 2000
#: Above this many films the AUC's interval is Hanley and McNeil's (Radiology 1982) instead of
#: the bootstrap's, whose cost grows with the films (100,000 overread cases: 19 s on /monitor);
#: at such counts the two agree to the third decimal (tests/test_site.py).
BOOTSTRAP_MAX_FILMS = 5000


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95% by default); None for no trials."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict:
    """{"value", "n", "successes", "interval"}: a share with its Wilson interval."""
    interval = wilson(successes, n)
    return {"value": successes / n if n else None, "n": int(n), "successes": int(successes),
            "interval": list(interval) if interval else None}


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); NaN without both classes."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        return float("nan")
    ranks = _ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                  seed: int = 0) -> list[float] | None:
    """95% percentile interval of the AUC over films resampled with replacement, each class
    resampled within itself (so every draw has both); None without both classes."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        return None
    if len(scores) > BOOTSTRAP_MAX_FILMS:
        return hanley_mcneil(auc(labels, scores), len(positive), len(negative))
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    y = np.r_[np.ones(len(positive), bool), np.zeros(len(negative), bool)]
    for i in range(draws):
        drawn = np.r_[rng.choice(positive, len(positive)), rng.choice(negative, len(negative))]
        values[i] = auc(y, drawn)
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def hanley_mcneil(area: float, positives: int, negatives: int, z: float = 1.96) -> list[float]:
    """95% interval of an AUC from its standard error under Hanley and McNeil's approximation."""
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    variance = (area * (1 - area) + (positives - 1) * (q1 - area**2) + (negatives - 1) * (q2 - area**2)) / (
        positives * negatives)
    half = z * math.sqrt(max(variance, 0.0))
    return [max(0.0, area - half), min(1.0, area + half)]


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = 5) -> dict:
    """Observed against predicted in bins of equal counts, and the calibration slope and
    intercept: y ~ intercept + slope * logit(p) by maximum likelihood. A slope below 1 says
    the probabilities are too extreme for this site, an intercept off 0 that they sit too
    high or too low; (1, 0) is calibrated."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1 - 1e-6)
    rows = []
    for chunk in np.array_split(np.argsort(p, kind="mergesort"), min(bins, len(p))) if len(p) else []:
        rows.append({"films": int(len(chunk)), "predicted": round(float(p[chunk].mean()), 4),
                     "observed": round(float(labels[chunk].mean()), 4)})
    slope, intercept = _logistic_fit(np.log(p / (1 - p)), labels)
    return {"bins": rows, "slope": slope, "intercept": intercept,
            "mean_predicted": float(p.mean()) if len(p) else None,
            "observed": float(labels.mean()) if len(p) else None}


def _logistic_fit(x: np.ndarray, y: np.ndarray, steps: int = 50) -> tuple[float | None, float | None]:
    """(slope, intercept) of a one-variable logistic regression by Newton's method; None where
    it has no finite answer (one class only, or the classes separated by x)."""
    if len(y) < 2 or y.min() == y.max():
        return None, None
    beta = np.zeros(2)
    design = np.c_[np.ones_like(x), x]
    for _ in range(steps):
        mu = 1 / (1 + np.exp(-np.clip(design @ beta, -30, 30)))
        hessian = design.T @ (design * (mu * (1 - mu))[:, None])
        try:
            step = np.linalg.solve(hessian + 1e-9 * np.eye(2), design.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None, None
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    if not np.isfinite(beta).all() or np.abs(beta).max() > 1e3:
        return None, None
    return float(beta[1]), float(beta[0])


def trust(pneumonia: int, normal: int) -> dict:
    """The verdict on a set of answered films: enough to trust once each class has ``TRUST_PER_CLASS``."""
    missing = {"pneumonia": max(0, TRUST_PER_CLASS - pneumonia), "normal": max(0, TRUST_PER_CLASS - normal)}
    enough = not any(missing.values())
    if enough:
        text = f"enough to trust: {pneumonia} films with pneumonia and {normal} without"
    else:
        wanted = " and ".join(f"{n} more {'with' if kind == 'pneumonia' else 'without'} pneumonia"
                              for kind, n in missing.items() if n)
        text = (f"not yet enough to trust: {pneumonia} films with pneumonia and {normal} without; "
                f"{wanted} ({TRUST_PER_CLASS} of each)")
    return {"enough": enough, "per_class": TRUST_PER_CLASS, "missing": missing, "text": text}


def local_validation(labels: np.ndarray, probabilities: np.ndarray, threshold: float,
                     refusals: list[str] | None = None) -> dict:
    """The figures of one site's confirmed films under one model.

    ``labels``: 1 pneumonia, 0 normal; ``probabilities``: calibrated; ``refusals``: per film
    "" when answered, else the check that refused it ("image", "age", ...). Sensitivity,
    false-positive rate, AUC and calibration are measured on the films answered; the
    refusals are counted, by reason and by class.
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    refusals = list(refusals) if refusals is not None else [""] * len(labels)
    refused = np.array([bool(r) for r in refusals], dtype=bool)
    why: dict[str, int] = {}
    for reason in refusals:
        for check in filter(None, reason.split(",")):
            why[check] = why.get(check, 0) + 1
    y, p = labels[~refused], probabilities[~refused]
    positive = p >= threshold
    return {
        "films": int(len(labels)),
        "pneumonia": int(labels.sum()), "normal": int(len(labels) - labels.sum()),
        "refused": {**proportion(int(refused.sum()), len(labels)), "why": why,
                    "pneumonia": int(refused[labels == 1].sum()), "normal": int(refused[labels == 0].sum())},
        "answered": {"pneumonia": int(y.sum()), "normal": int(len(y) - y.sum())},
        "threshold": float(threshold),
        "sensitivity": proportion(int(positive[y == 1].sum()), int((y == 1).sum())),
        "false_positive_rate": proportion(int(positive[y == 0].sum()), int((y == 0).sum())),
        "auc": {"value": _finite(auc(y, p)), "interval": bootstrap_auc(y, p)},
        "calibration": calibration(y, p),
        "trust": trust(int(y.sum()), int(len(y) - y.sum())),
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN
