"""Nearest training films and map placement: how well, how fast, how much memory.

    python -m bench.neighbours

Prints, for the bundled model and its t-SNE map:
- placement error of ways to put a new film on the existing map, measured by placing
  every 5th training film from the other patients' films (its patient left out) and
  taking the distance to where t-SNE put it, in units of the map's median
  nearest-neighbour spacing;
- whether the distance to the k-th nearest training film helps the population gate
  (the share of each set it would refuse at the validation split's 99.25% quantile,
  alone and added to the gate, against the gate alone);
- the cost per prediction (1 thread) and the memory the index adds to a worker.
"""
from __future__ import annotations

import sys
import time
import tracemalloc

import numpy as np
import torch

from harness.non_xray import non_xray_images
from model import Predictor, TsneMap
from model.neighbours import NeighbourIndex
from model.settings import DEFAULT_CACHE_DIR, DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT, adult_data_dir, data_dir
from training.data import checkpoint_splits, load_adult_films, patient_id
from training.population import QUANTILE, gate_sets


def placement_errors(index: NeighbourIndex) -> dict[str, float]:
    spacing = []
    rows = np.arange(0, len(index), 5)
    patients = np.array([patient_id(p) for p in index.paths])
    results: dict[str, list[float]] = {}
    for row in rows:
        distances = index.distances(index.features[row] * index.std + index.mean)
        distances[patients == patients[row]] = np.inf  # leave the film's patient out: an upload is a new child
        order = np.argsort(distances)[:25]
        true = index.positions[row]
        map_distances = np.linalg.norm(index.positions - true, axis=1)
        map_distances[patients == patients[row]] = np.inf
        spacing.append(map_distances.min())
        for k in (3, 5, 10, 25):
            chosen = order[:k]
            results.setdefault(f"plain mean of {k}", []).append(np.linalg.norm(index.positions[chosen].mean(0) - true))
            d = distances[chosen]
            weights = np.exp(-((d - d[0]) / max(float(np.median(d)), 1e-6)) ** 2)
            results.setdefault(f"affinity-weighted {k}", []).append(
                np.linalg.norm((weights[:, None] * index.positions[chosen]).sum(0) / weights.sum() - true))
        results.setdefault("nearest film's position", []).append(np.linalg.norm(index.positions[order[0]] - true))
        d = distances[order[:10]]
        sharp = np.exp(-((d - d[0]) / max(d[0], 1e-6)) ** 2 * 4)
        results.setdefault("sharp affinity 10", []).append(
            np.linalg.norm((sharp[:, None] * index.positions[order[:10]]).sum(0) / sharp.sum() - true))
    unit = float(np.median(spacing))
    return {name: float(np.median(values)) / unit for name, values in results.items()}


def main() -> int:
    torch.set_num_threads(1)
    predictor = Predictor.from_path(DEFAULT_CHECKPOINT)
    tsne_map = TsneMap.load(DEFAULT_TSNE_ARTIFACT)
    tracemalloc.start()
    index = NeighbourIndex(tsne_map)
    added_mb = tracemalloc.get_traced_memory()[1] / 1024**2
    tracemalloc.stop()
    print(f"model {predictor.version}; map of {tsne_map.checkpoint_version}; {len(index)} training films")

    print("placement error (median, in map spacings; lower is better):")
    for name, error in sorted(placement_errors(index).items(), key=lambda item: item[1]):
        print(f"  {name:<26}{error:6.2f}")

    checkpoint = predictor.checkpoint
    _, val, test = checkpoint_splits(checkpoint.training_data, data_dir(), checkpoint.preprocess, DEFAULT_CACHE_DIR,
                                     progress=False)
    adult = load_adult_films(adult_data_dir(), checkpoint.preprocess, DEFAULT_CACHE_DIR, progress=False)
    sets = {**gate_sets(val, test, adult),
            "non-X-ray images": np.stack([predictor.preprocess(image) for _, image in non_xray_images()])}
    k = 10
    kth = {}
    gate = {}
    for name, images in sets.items():
        out = predictor.predict_many(images)
        rank = k if name == "validation split" else k - 1  # a validation film is in the index itself: skip it
        kth[name] = np.array([np.partition(index.distances(f), rank)[rank] for f in out.features])
        gate[name] = out.ood_scores > 1
    threshold = np.quantile(kth["validation split"], QUANTILE)
    print(f"distance to the {k}th nearest training film as a gate (threshold: its {QUANTILE:.2%} validation quantile, "
          "each validation film's own point left out; but its patient's other films stay in):")
    print(f"  {'set':<36}{'gate':>8}{'kNN alone':>11}{'gate + kNN':>12}")
    for name in sets:
        alone = kth[name] > threshold
        print(f"  {name:<36}{gate[name].mean():>8.1%}{alone.mean():>11.1%}{(alone | gate[name]).mean():>12.1%}")

    features = predictor.predict_many(test.images[:1]).features[0]
    index.nearest(features, 6)
    started = time.perf_counter()
    for _ in range(500):
        index.nearest(features, 6)
    cost = (time.perf_counter() - started) / 500 * 1000
    print(f"neighbours + placement: {cost:.2f} ms a prediction (goal <= 2 ms); "
          f"index memory {added_mb:.1f} MB (goal <= 30 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
