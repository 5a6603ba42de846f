"""The population gate's figures: what share of each set the bundled model refuses.

    python -m bench.gate [--checkpoint FILE]

Adult frontal films and lateral views of the patients held out from fitting (the
same patient split as training), the 33 non-X-ray images of the tests, the original-
size test split and the validation split, each against its goal. Also the cost of the
whole gate per film (in-process, one thread).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from harness.non_xray import non_xray_images
from model import Predictor
from model.card import GATE_GOALS, Goal
from model.predictor import infer_batches
from model.settings import DEFAULT_CACHE_DIR, DEFAULT_CHECKPOINT, adult_data_dir, data_dir
from training.data import checkpoint_splits, load_adult_films
from training.population import gate_sets

GOALS = {**GATE_GOALS, "non-X-ray images": Goal(at_least=True, share=1.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--adult-data", type=Path, default=adult_data_dir())
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictor = Predictor.from_path(args.checkpoint)
    checkpoint = predictor.checkpoint
    _, val, test = checkpoint_splits(checkpoint.training_data, args.data, checkpoint.preprocess, DEFAULT_CACHE_DIR,
                                     progress=False)
    adult = load_adult_films(args.adult_data, checkpoint.preprocess, DEFAULT_CACHE_DIR, progress=False)
    sets = {**gate_sets(val, test, adult),
            "non-X-ray images": np.stack([predictor.preprocess(image) for _, image in non_xray_images()])}
    print(f"model {predictor.version}")
    print(f"{'set':<36}{'images':>8}{'refused':>10}   goal")
    for name, images in sets.items():
        share = float(np.mean(predictor.predict_many(images).ood_scores > 1))
        goal = GOALS[name]
        print(f"{name:<36}{len(images):>8}{share:>10.1%}   {goal.text} {'met' if goal.met(share) else 'MISSED'}")
    gate, population = predictor.checkpoint.gate, predictor.checkpoint.population_gate
    one = test.images[:1]
    raw = infer_batches(predictor.model, one)
    timings = {"feature/pixel gate": lambda: gate.scores(raw.features, one),
               f"population gate ({population.kind})": lambda: population.assess(one, raw.taps)}
    for name, run in timings.items():
        run()
        started = time.perf_counter()
        for _ in range(200):
            run()
        print(f"{name}: {(time.perf_counter() - started) / 200 * 1000:.2f} ms a film (1 thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
