"""Fit the population gate, which refuses adults' films and lateral views.

Outlier exposure: children's frontal films (the training split) against adult frontal
films and lateral views from ``ADULT_CXR_DATA``, fitted on 60% of the adult patients;
the other 40% are never seen here and report the gate's figures. The gate is a
logistic regression on the classifier's own middle activations (``PopulationHead``),
fitted on each film as it is and under strong augmentation, so that crops, arrows and
exposure (quirks of where a film came from) matter less than anatomy. The threshold is
a high quantile of the validation split's scores: chosen on children's validation
films, never on the test split.

    python -m training.population --version VERSION   # refit on a stored model: a new candidate
    python -m training.population --checkpoint FILE   # the same for a file from training.train --out
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from model import CheckpointError, Predictor, load_checkpoint, save_checkpoint
from model.card import ADULT_HELD_OUT, LATERAL_HELD_OUT, TEST_NORMAL, TEST_SPLIT, VALIDATION_SPLIT
from model.population import KINDS, PopulationHead
from model.predictor import infer_batches
from model.settings import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CHECKPOINT,
    DEFAULT_TSNE_ARTIFACT,
    adult_data_dir,
    data_dir,
    model_store_dir,
)
from model.store import ModelStore, StoreError

from .augment import augment
from .data import (
    HELD_OUT_FRACTION,
    AdultFilms,
    DatasetError,
    Split,
    checkpoint_splits,
    load_adult_films,
    processed_copies,
)
from .evaluate import evaluate, transformer_figures
from .metrics import format_table
from .onnx_export import add_to_store, save_beside

log = logging.getLogger("training")

#: Children's validation films allowed above the threshold (0.75%).
QUANTILE = 0.9925
#: The head's fit: each film as it is and in this many augmented copies; the inverse
#: regularisation strength, chosen by five-fold cross-validation grouped by patient on the
#: fitting films (docs/model.md).
HEAD_COPIES = 3
HEAD_C = 0.01
#: How every fit's threshold is chosen, as its rule ends.
THRESHOLD_RULE = f"refused above the {QUANTILE:.2%} quantile of the validation split's scores"


def outlier_exposure_films(children: np.ndarray, adult: np.ndarray, adult_kinds: np.ndarray):
    """(images, kinds) to fit on: the children's frontal films (kind 0), then the adult and lateral ones."""
    images = np.concatenate([children, adult]).astype(np.float32)
    return images, np.concatenate([np.zeros(len(children), np.int64), adult_kinds.astype(np.int64)])


def validation_threshold(probabilities: np.ndarray) -> float:
    """The ``QUANTILE`` of the children's validation films' scores (1 - P(in population))."""
    return float(np.clip(np.quantile(1.0 - probabilities[:, 0], QUANTILE), 1e-4, 1 - 1e-4))


def fit_weights(kinds: np.ndarray, children_labels: np.ndarray | None) -> np.ndarray:
    """Per-film weights: each kind weighs alike in all, and within the children's films the normal and
    the pneumonia films weigh alike (``children_labels``, 1 = pneumonia, or None to leave them as counted).

    Three in four training films have pneumonia, and the children's films the head refused as adults'
    were normal ones: counted as they come, the normal children set too little of the boundary."""
    weights = np.ones(len(kinds))
    if children_labels is not None:
        labels = np.asarray(children_labels)
        if len(labels) != int((kinds == 0).sum()):
            raise ValueError(f"{len(labels)} children's labels for {int((kinds == 0).sum())} children's films")
        for label in np.unique(labels):
            members = np.flatnonzero(kinds == 0)[labels == label]
            weights[members] = len(labels) / (len(np.unique(labels)) * len(members))
    present = np.unique(kinds)
    for kind in present:
        members = kinds == kind
        weights[members] *= len(kinds) / (len(present) * weights[members].sum())
    return weights


def fit_population_head(model, children: np.ndarray, children_val: np.ndarray, adult: np.ndarray,
                        adult_kinds: np.ndarray, children_labels: np.ndarray | None = None,
                        copies: int = HEAD_COPIES, strength: float = 1.5, seed: int = 0,
                        C: float = HEAD_C) -> PopulationHead:
    """A multinomial logistic regression on ``model``'s taps (the network as it serves), weighted by
    ``fit_weights``."""
    images, labels = outlier_exposure_films(children, adult, adult_kinds)
    weights = np.tile(fit_weights(labels, children_labels), 1 + copies)
    generator = torch.Generator().manual_seed(seed)
    taps = [infer_batches(model, images).taps]  # then each augmented copy's, one copy in memory at a time
    for _ in range(copies):
        augmented = augment(torch.from_numpy(images).unsqueeze(1), generator, strength)[:, 0].numpy()
        taps.append(infer_batches(model, augmented).taps)
    taps = np.concatenate(taps).astype(np.float64)
    labels = np.tile(labels, 1 + copies)
    mean, scale = taps.mean(axis=0), np.maximum(taps.std(axis=0), 1e-6)
    regression = LogisticRegression(C=C, max_iter=3000)
    regression.fit((taps - mean) / scale, labels, sample_weight=weights)
    # As rows over every kind; a kind absent from the films (a dry run's few) is never chosen.
    weight, bias = np.zeros((len(KINDS), taps.shape[1])), np.full(len(KINDS), -30.0)
    if len(regression.classes_) == 2:  # scikit-learn gives one row: the second class's logit against the first's
        rows, row_bias = np.vstack([np.zeros_like(regression.coef_), regression.coef_]), [0.0, regression.intercept_[0]]
    else:
        rows, row_bias = regression.coef_, regression.intercept_
    weight[regression.classes_], bias[regression.classes_] = rows, row_bias
    head = PopulationHead(mean, scale, weight, bias, threshold=0.5)
    head.threshold = validation_threshold(head.probabilities(infer_batches(model, children_val).taps))
    head.rule = ("a logistic regression on the network's middle activations tells children's frontal films from "
                 f"adults' films and lateral views; {THRESHOLD_RULE}")
    return head


def fit_on_splits(model, train: Split, val: Split, adult: AdultFilms) -> PopulationHead:
    """The head as training fits it: the training split's films as they are and their processed
    copies (when loaded with them) against the adult and lateral films of the fitting patients."""
    fit = np.flatnonzero(~adult.held_out())
    adult_images, adult_kinds = adult.films.subset(fit).with_processed
    children, children_labels = train.with_processed
    return fit_population_head(model, children, val.with_processed[0], adult_images, adult_kinds, children_labels)


def population_figures(predictor: Predictor, sets: dict[str, np.ndarray]) -> dict:
    """Share of each set that the whole gate (both parts) refuses."""
    figures = {}
    for name, images in sets.items():
        if len(images):
            flagged = predictor.predict_many(images).ood_scores > 1
            figures[name] = {"n": int(len(images)), "flagged": float(np.mean(flagged))}
    return figures


def gate_sets(val: Split, test: Split, adult: AdultFilms) -> dict[str, np.ndarray]:
    """The sets the gate is judged on: adults' and lateral films of held-out patients, test (and its normal
    films alone), validation."""
    kinds, held_out = adult.films.labels, adult.held_out()
    return {
        ADULT_HELD_OUT: adult.films.images[held_out & (kinds == 1)],
        LATERAL_HELD_OUT: adult.films.images[held_out & (kinds == 2)],
        TEST_SPLIT: test.images,
        TEST_NORMAL: test.images[test.labels == 0],
        VALIDATION_SPLIT: val.images,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=model_store_dir())
    parser.add_argument("--version", default=None, help="stored model to refit (default: the serving one)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="refit a checkpoint file instead (one written by training.train --out)")
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--adult-data", type=Path, default=adult_data_dir())
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write a checkpoint file instead of a store candidate")
    return parser


def main(args) -> int:
    """Refit the population gate of a stored model; everything else of it stays as it was."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    store = ModelStore(args.store)
    try:
        store.ensure_seeded(DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT)
        if args.checkpoint:
            old = load_checkpoint(args.checkpoint)
        else:
            old = store.load(args.version or store.serving_version())
        copies = processed_copies(old.training_data)
        train, val, test = checkpoint_splits(old.training_data, args.data, old.preprocess, args.cache_dir,
                                             args.workers, processed=copies)
        adult = load_adult_films(args.adult_data, old.preprocess, args.cache_dir, args.workers, processed=copies)
    except (CheckpointError, DatasetError, StoreError) as exc:
        log.error("%s", exc)
        return 2
    data = old.training_data
    held_out = adult.held_out()
    log.info("fitting the population gate on %d children's films and %d adult/lateral films of %d patients",
             len(train), int((~held_out).sum()), len(np.unique(adult.patients[~held_out])))
    gate = fit_on_splits(old.model, train, val, adult)
    created = dt.datetime.now(dt.UTC)
    checkpoint = dataclasses.replace(old, population_gate=gate, created_at=created.isoformat(timespec="seconds"),
                                     training_data={**data, "population_gate": {
                                         "kind": "head", "adult_films": str(Path(args.adult_data).resolve().name),
                                         "fitted_on_patients": int(len(np.unique(adult.patients[~held_out]))),
                                         "held_out_fraction": HELD_OUT_FRACTION, "refit_of": old.version}})
    checkpoint.version = checkpoint.content_version(created)
    predictor = Predictor(checkpoint)
    checkpoint.metrics = {**old.metrics, "validation": evaluate(predictor, val), "test": evaluate(predictor, test),
                          "population_gate": population_figures(predictor, gate_sets(val, test, adult)),
                          **transformer_figures(predictor, test)}
    print(format_table({k: checkpoint.metrics[k] for k in ("validation", "test")}))
    print(format_gate_table(checkpoint.metrics["population_gate"]))
    if args.out:
        save_checkpoint(checkpoint, args.out)
        save_beside(checkpoint, args.out)
        print(f"wrote {args.out} ({checkpoint.version})")
    else:
        add_to_store(store, checkpoint, source=f"population gate refit of {old.version}")
        print(f"version {checkpoint.version}\nNothing served has changed. To serve it: "
              f"python -m training.store promote {checkpoint.version}")
    return 0


def format_gate_table(figures: dict) -> str:
    lines = [f"{'set':<36}{'images':>8}{'flagged':>10}"]
    lines += [f"{name:<36}{f['n']:>8}{f['flagged']:>10.1%}" for name, f in figures.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
