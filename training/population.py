"""Fit the population gate, which refuses adults' films and lateral views.

Outlier exposure: children's frontal films (the training split) against adult frontal
films and lateral views from ``ADULT_CXR_DATA``, fitted on 60% of the adult patients;
the other 40% are never seen here and report the gate's figures. Two kinds, both
reading the 64x64 model input (one preprocessing path) under strong augmentation, so
that crops, arrows and exposure (quirks of where a film came from) matter less than
anatomy: the default, a logistic regression on the classifier's own middle activations
(``PopulationHead``: seconds to fit, microseconds to run), or ``--kind networks``, small
networks of its own (``PopulationGate``, the kind before it). The threshold is a high
quantile of the validation split's scores: chosen on children's validation films,
never on the test split.

    python -m training.population --version VERSION   # refit on a stored model: a new candidate
    python -m training.population --checkpoint FILE   # the same for a file from training.train --out
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch.nn import functional as F

from model import CheckpointError, Predictor, load_checkpoint, save_checkpoint
from model.population import KINDS, PopulationGate, PopulationHead, PopulationNet
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
from .data import HELD_OUT_FRACTION, AdultFilms, DatasetError, Split, checkpoint_splits, load_adult_films
from .evaluate import evaluate, transformer_figures
from .metrics import format_table

log = logging.getLogger("training")

CHANNELS = (16, 32, 64, 96)
INPUT_POOL = 1
#: Children's validation films allowed above the threshold (0.75%).
QUANTILE = 0.9925
#: The head's fit: each film as it is and in this many augmented copies; the inverse
#: regularisation strength, chosen by five-fold cross-validation grouped by patient on the
#: fitting films (adults of the left-out folds refused: C 0.003 97.1%, 0.01 97.8%, 0.03 97.5%).
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


def fit_population_head(model, children: np.ndarray, children_val: np.ndarray, adult: np.ndarray,
                        adult_kinds: np.ndarray, copies: int = HEAD_COPIES, strength: float = 1.5, seed: int = 0,
                        C: float = HEAD_C) -> PopulationHead:
    """A multinomial logistic regression on ``model``'s taps (the network as it serves), the
    classes weighted for their sizes."""
    images, labels = outlier_exposure_films(children, adult, adult_kinds)
    generator = torch.Generator().manual_seed(seed)
    taps = [infer_batches(model, images).taps]  # then each augmented copy's, one copy in memory at a time
    taps += [infer_batches(model, augment(torch.from_numpy(images).unsqueeze(1), generator, strength)[:, 0].numpy()).taps
             for _ in range(copies)]
    taps = np.concatenate(taps).astype(np.float64)
    labels = np.tile(labels, 1 + copies)
    mean, scale = taps.mean(axis=0), np.maximum(taps.std(axis=0), 1e-6)
    regression = LogisticRegression(C=C, class_weight="balanced", max_iter=3000)
    regression.fit((taps - mean) / scale, labels)
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


def fit_population(kind: str, model, children: np.ndarray, children_val: np.ndarray, adult: np.ndarray,
                   adult_kinds: np.ndarray, **network_options) -> PopulationHead | PopulationGate:
    """``kind`` "head" (the default) or "networks" (``network_options`` go to ``fit_population_gate``)."""
    if kind == "head":
        return fit_population_head(model, children, children_val, adult, adult_kinds)
    return fit_population_gate(children, children_val, adult, adult_kinds, **network_options)


def fit_population_gate(
    children: np.ndarray,
    children_val: np.ndarray,
    adult: np.ndarray,
    adult_kinds: np.ndarray,
    seeds: tuple[int, ...] = (0, 1),
    epochs: int = 15,
    channels: tuple[int, ...] = CHANNELS,
    input_pool: int = INPUT_POOL,
    batch_size: int = 64,
    lr: float = 3e-3,
    strength: float = 1.5,
    max_batches: int | None = None,
) -> PopulationGate:
    """An ensemble of ``PopulationNet`` (one per seed); the loss is weighted for the class sizes."""
    images, labels = outlier_exposure_films(children, adult, adult_kinds)
    images, labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
    counts = torch.bincount(labels, minlength=len(KINDS)).clamp(min=1).float()
    weights = len(labels) / (len(KINDS) * counts)
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        net = PopulationNet(channels, input_pool=input_pool)
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        steps = -(-len(labels) // batch_size)
        if max_batches:
            steps = min(steps, max_batches)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps,
                                                        pct_start=0.2)
        for _ in range(epochs):
            net.train()
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, steps * batch_size, batch_size):
                index = order[start : start + batch_size]
                if len(index) < 2:  # BatchNorm needs two samples
                    continue
                loss = F.cross_entropy(net(augment(images[index], generator, strength)), labels[index], weight=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        states.append(copy.deepcopy(net.eval().state_dict()))
    gate = PopulationGate(channels, states, threshold=0.5, input_pool=input_pool)
    gate.threshold = validation_threshold(gate.probabilities(children_val))
    gate.rule = (f"{len(seeds)} small networks ({64 // input_pool} px input) tell children's frontal films from adults' films and "
                 f"lateral views; {THRESHOLD_RULE}")
    return gate


def population_figures(predictor: Predictor, sets: dict[str, np.ndarray]) -> dict:
    """Share of each set that the whole gate (both parts) refuses."""
    figures = {}
    for name, images in sets.items():
        if len(images):
            flagged = predictor.predict_many(images).ood_scores > 1
            figures[name] = {"n": int(len(images)), "flagged": float(np.mean(flagged))}
    return figures


def gate_sets(val: Split, test: Split, adult: AdultFilms) -> dict[str, np.ndarray]:
    """The sets the gate is judged on: adults' and lateral films of held-out patients, test, validation."""
    kinds, held_out = adult.films.labels, adult.held_out()
    return {
        "adult frontal, held-out patients": adult.films.images[held_out & (kinds == 1)],
        "lateral, held-out patients": adult.films.images[held_out & (kinds == 2)],
        "test split": test.images,
        "validation split": val.images,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=model_store_dir())
    parser.add_argument("--version", default=None, help="stored model to refit (default: the serving one)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="refit a checkpoint file instead (one written by training.train --out)")
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--adult-data", type=Path, default=adult_data_dir())
    parser.add_argument("--kind", choices=("head", "networks"), default="head",
                        help="a head on the network's activations, or small networks of its own")
    parser.add_argument("--epochs", type=int, default=15, help="networks only")
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS), help="of each network's blocks")
    parser.add_argument("--input-pool", type=int, default=INPUT_POOL, help="average the 64 px input over k x k first")
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
        train, val, test = checkpoint_splits(old.training_data, args.data, old.preprocess, args.cache_dir, args.workers)
        adult = load_adult_films(args.adult_data, old.preprocess, args.cache_dir, args.workers)
    except (CheckpointError, DatasetError, StoreError) as exc:
        log.error("%s", exc)
        return 2
    data = old.training_data
    held_out = adult.held_out()
    log.info("fitting the population gate on %d children's films and %d adult/lateral films of %d patients",
             len(train), int((~held_out).sum()), len(np.unique(adult.patients[~held_out])))
    gate = fit_population(args.kind, old.model, train.images, val.images, adult.films.images[~held_out],
                          adult.films.labels[~held_out], epochs=args.epochs, channels=tuple(args.channels),
                          input_pool=args.input_pool)
    created = dt.datetime.now(dt.timezone.utc)
    checkpoint = dataclasses.replace(old, population_gate=gate, created_at=created.isoformat(timespec="seconds"),
                                     training_data={**data, "population_gate": {
                                         "kind": args.kind, "adult_films": str(Path(args.adult_data).resolve().name),
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
        print(f"wrote {args.out} ({checkpoint.version})")
    else:
        store.add(checkpoint, source=f"population gate refit of {old.version}")
        print(f"version {checkpoint.version}\nNothing served has changed. To serve it: "
              f"python -m training.store promote {checkpoint.version}")
    return 0


def format_gate_table(figures: dict) -> str:
    lines = [f"{'set':<36}{'images':>8}{'flagged':>10}"]
    lines += [f"{name:<36}{f['n']:>8}{f['flagged']:>10.1%}" for name, f in figures.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
