"""Screening metrics, the operating threshold and the results table."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

#: The threshold sits this far below the score of the last positive it must catch: the
#: same film scores up to 7e-7 differently in another memory layout or on another CPU,
#: which put a shipped threshold 3e-8 above the film it was chosen for.
THRESHOLD_MARGIN = 1e-5


def threshold_for_sensitivity(labels: np.ndarray, probabilities: np.ndarray, target: float) -> float:
    """The highest threshold at which at least ``target`` of the positives score >= it.

    Missing pneumonia costs more than a false alarm, so the threshold is set by the
    sensitivity we insist on, and specificity is whatever remains.
    """
    positives = np.sort(np.asarray(probabilities)[np.asarray(labels) == 1])
    if positives.size == 0:
        raise ValueError("no positive cases to set a threshold on")
    allowed_misses = int(np.floor((1.0 - target) * positives.size + 1e-9))
    return float(np.clip(positives[allowed_misses] - THRESHOLD_MARGIN, 1e-6, 1 - 1e-6))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN where one class is absent (a tiny dry run)."""
    labels = np.asarray(labels).astype(int)
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < labels.size else float("nan")


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float, roc_points: int = 101) -> dict:
    """AUC, sensitivity, specificity, confusion matrix and a thinned ROC curve."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = (probabilities >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    both_classes = 0 < labels.sum() < labels.size
    auc = roc_auc(labels, probabilities)
    metrics = {
        "n": int(labels.size),
        "auc": auc,
        "sensitivity": tp / max(tp + fn, 1),
        "specificity": tn / max(tn + fp, 1),
        "false_positive_rate": fp / max(tn + fp, 1),
        "accuracy": (tp + tn) / max(labels.size, 1),
        "threshold": float(threshold),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }
    if both_classes:
        fpr, tpr, _ = roc_curve(labels, probabilities)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(roc_points, len(fpr))).round().astype(int))
        metrics["roc"] = {"fpr": fpr[keep].round(4).tolist(), "tpr": tpr[keep].round(4).tolist()}
    return metrics


def format_table(results: dict[str, dict]) -> str:
    """One row per split: the figures a reviewer asks for first."""
    header = f"{'split':<12}{'n':>6}{'AUC':>8}{'sens':>8}{'spec':>8}{'FPR':>8}{'acc':>8}   TN  FP  FN  TP"
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        c = m["confusion"]
        lines.append(
            f"{name:<12}{m['n']:>6}{m['auc']:>8.4f}{m['sensitivity']:>8.4f}{m['specificity']:>8.4f}"
            f"{m['false_positive_rate']:>8.4f}{m['accuracy']:>8.4f}  "
            f"{c['tn']:>3} {c['fp']:>3} {c['fn']:>3} {c['tp']:>3}"
        )
    return "\n".join(lines)
