"""The population gate's figures: what share of each set the bundled model refuses.

    python -m bench.gate [--checkpoint FILE] [--sources]

Adult frontal films and lateral views of the patients held out from fitting (the
same patient split as training), the 33 non-X-ray images of the tests, the original-
size test split, its normal films and the validation split, each against its goal. Also
the cost of the whole gate per film (in-process, one thread).

``--sources``: the head fitted again with each source of the adult collection left out
(Radiopaedia, Eurorad, SIRM, the rest: papers and case reports), as training fits it,
and judged on that source's adult films and on the normal test films: how the gate may do
on adults from a source it never saw.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from harness.non_xray import non_xray_images
from model import Predictor
from model.card import GATE_GOALS, TEST_NORMAL, Goal
from model.predictor import infer_batches
from model.settings import DEFAULT_CACHE_DIR, DEFAULT_CHECKPOINT, adult_data_dir, data_dir
from training.data import checkpoint_splits, load_adult_films, processed_copies
from training.population import fit_population_head, gate_sets

GOALS = {**GATE_GOALS, "non-X-ray images": Goal(at_least=True, share=1.0)}
#: Where an adult film came from, by its manifest's address; the rest are figures from papers.
SOURCES = ("radiopaedia", "eurorad", "sirm")
#: A source never seen in fitting must still be refused this often (issue 43).
UNSEEN_SOURCE = Goal(at_least=True, share=0.95)


def adult_sources(root: Path, files: list[str]) -> np.ndarray:
    """Each film's source, named from its manifest row's address."""
    with open(root / "manifest.csv", newline="") as handle:
        address = {row["file"]: row["source_url"] for row in csv.DictReader(handle)}
    return np.array([next((name for name in SOURCES if name in address[f]), "papers") for f in files])


def each_source_left_out(checkpoint, data: Path, adult_data: Path) -> None:
    """The head refitted without each source in turn: that source's adults, and the normal test films."""
    copies = processed_copies(checkpoint.training_data)
    train, val, test = checkpoint_splits(checkpoint.training_data, data, checkpoint.preprocess, DEFAULT_CACHE_DIR,
                                         processed=copies, progress=False)
    adult = load_adult_films(adult_data, checkpoint.preprocess, DEFAULT_CACHE_DIR, processed=copies, progress=False)
    sources, kinds = adult_sources(adult_data, adult.films.files), adult.films.labels
    children, children_labels = train.with_processed
    adult_taps = infer_batches(checkpoint.model, adult.films.images).taps
    normal = test.images[test.labels == 0]
    normal_taps = infer_batches(checkpoint.model, normal).taps
    print(f"\neach source left out of the fit{'':<6}adults refused   goal        {TEST_NORMAL} refused")
    for name in (*SOURCES, "papers"):
        fit_images, fit_kinds = adult.films.subset(np.flatnonzero(sources != name)).with_processed
        head = fit_population_head(checkpoint.model, children, val.with_processed[0], fit_images, fit_kinds,
                                   children_labels)
        refused = head.assess(None, adult_taps)[0][(sources == name) & (kinds == 1)] > 1
        share = float(refused.mean())
        normal_share = float(np.mean(head.assess(None, normal_taps)[0] > 1))
        print(f"{name:<36}{refused.sum():>4} of {len(refused):<4}{share:>7.1%}   {UNSEEN_SOURCE.text} "
              f"{'met' if UNSEEN_SOURCE.met(share) else 'MISSED':<6}{normal_share:>8.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--adult-data", type=Path, default=adult_data_dir())
    parser.add_argument("--sources", action="store_true", help="also fit the head with each adult source left out")
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
    if args.sources:
        torch.set_num_threads(2)
        each_source_left_out(checkpoint, args.data, args.adult_data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
