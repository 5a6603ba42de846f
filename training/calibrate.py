"""Temperature scaling on validation logits, and how well probabilities mean what they say.

The loss is weighted for the class imbalance, which shifts raw probabilities; a
temperature with a bias term (Platt scaling) undoes both over- or under-confidence
and that shift. It is monotonic, so AUC and the ranking of cases do not change.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Minimise the validation log-loss over (temperature, bias)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t, bias], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z / log_t.exp() + bias, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return {"temperature": log_t.detach().exp().item(), "bias": bias.detach().item()}


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error and the reliability diagram's bins."""
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        if not mask.any():
            continue
        confidence, observed = probabilities[mask].mean(), labels[mask].mean()
        ece += mask.mean() * abs(confidence - observed)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                     "mean_probability": round(float(confidence), 4), "observed": round(float(observed), 4)})
    return {"ece": float(ece), "bins": rows}
