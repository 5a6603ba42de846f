"""Films as other hospitals export them: the site-shift suite.

    python -m training.site_shift --checkpoint FILE [--split test|validation] [--json FILE]

Each row changes every film of a split the way another X-ray system or export may
(borders and letterboxing, collimation, local contrast processing, sharpening, gamma,
noise, JPEG re-compression, low resolution, burned-in text, small rotations, inverted
polarity), at the film's own resolution, before the product's whole path: decoding,
``model.preprocess``, the network and both gates. Per row: the share the gate refuses,
and on the films it passes the AUC, sensitivity and false-positive rate at the
checkpoint's threshold, and the share of decisions that differ from the films as they
are. Exact duplicate images (same pixels) are counted once. ``--split validation`` is
the checkpoint's own validation films, for choosing; the test split is for reporting;
``--split adults`` the adult frontal films and lateral views of the patients held out
from the population gate's fit, where only the share refused counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from model import CheckpointError, ImageError, Predictor, load_checkpoint, preprocess, save_checkpoint
from model.decode import decode_image
from model.settings import DEFAULT_CACHE_DIR, DEFAULT_CHECKPOINT, adult_data_dir, data_dir

from . import film_changes as changes
from .data import DatasetError, checkpoint_splits, eight_bit, load_adult_films, scan_split
from .metrics import roc_auc

log = logging.getLogger("training")

Change = Callable[[np.ndarray], np.ndarray]  # uint8 (H, W) film -> uint8 film


def seeded_noise(sigma: float) -> Change:
    """Grain of ``sigma`` gray levels, the same for a film every run."""
    return lambda film: changes.noise(film, sigma, np.random.default_rng(int(film[::97, ::89].sum()) % 2**32))


#: The rows of the suite, in the order they print.
CHANGES: dict[str, Change] = {
    "as is": lambda film: film,
    "black border, 2% of the side": partial(changes.border, fraction=0.02, value=0),
    "black border, 5%": partial(changes.border, fraction=0.05, value=0),
    "black border, 10%": partial(changes.border, fraction=0.10, value=0),
    "gray border, 5%": partial(changes.border, fraction=0.05, value=128),
    "white border, 5%": partial(changes.border, fraction=0.05, value=255),
    "padded to a square (letterbox, black)": partial(changes.letterbox, value=0),
    "padded to a square (letterbox, white)": partial(changes.letterbox, value=255),
    "collimated: 8% of each side cut": partial(changes.collimate, fraction=0.08),
    "CLAHE, clip 1, 8 x 8 tiles": partial(changes.clahe, clip=1.0, tiles=8),
    "CLAHE, clip 2, 8 x 8 tiles": partial(changes.clahe, clip=2.0, tiles=8),
    "CLAHE, clip 4, 8 x 8 tiles": partial(changes.clahe, clip=4.0, tiles=8),
    "CLAHE, clip 2, 4 x 4 tiles": partial(changes.clahe, clip=2.0, tiles=4),
    "CLAHE, clip 2, 16 x 16 tiles": partial(changes.clahe, clip=2.0, tiles=16),
    "histogram equalisation": changes.equalise,
    "unsharp masking, large kernel": lambda film: changes.unsharp(film, 0.05 * min(film.shape), 1.0),
    "unsharp masking, small kernel": lambda film: changes.unsharp(film, 0.005 * min(film.shape), 1.5),
    "multi-scale enhancement": changes.multiscale,
    "gamma 0.7": partial(changes.curve, gamma=0.7),
    "gamma 1.4": partial(changes.curve, gamma=1.4),
    "low contrast window (20-80%)": partial(changes.curve, low=0.2, high=0.8),
    "darker exposure (0-70%)": partial(changes.curve, low=0.0, high=0.7),
    "noise, sigma 6 gray levels": seeded_noise(6.0),
    "JPEG quality 30": partial(changes.jpeg, quality=30),
    "low resolution, 320 px": partial(changes.resample, side=320, enlarge=False),
    "resampled to 800 px": partial(changes.resample, side=800),
    "resampled to 2,500 px": partial(changes.resample, side=2500),
    "burned-in text and side marker": changes.burned_in,
    "rotated +5°": partial(changes.rotate, degrees=5.0),
    "rotated -5°": partial(changes.rotate, degrees=-5.0),
    "inverted polarity": changes.invert,
}


def chain(*changes: Change) -> Change:
    """The changes one after the other, as a site's system applies its steps."""
    def change(film: np.ndarray) -> np.ndarray:
        for step in changes:
            film = step(film)
        return film
    return change


#: Sites simulated for onboarding (``training.site``, ``bench.site``): what each does to every film it exports.
SIMULATED_SITES: dict[str, Change] = {
    "collimated 8% + CLAHE clip 4": chain(CHANGES["collimated: 8% of each side cut"],
                                          CHANGES["CLAHE, clip 4, 8 x 8 tiles"]),
    "burned-in text + CLAHE 16 x 16 tiles": chain(changes.burned_in, CHANGES["CLAHE, clip 2, 16 x 16 tiles"]),
}


def read_film(path: Path) -> np.ndarray:
    """The film's gray pixels at full size, 8-bit, as the dataset holds them."""
    return eight_bit(decode_image(path.read_bytes()))


def _inputs_for(args: tuple[str, tuple, list[str]]) -> tuple[str, np.ndarray]:
    """(path, params, change names) -> (pixel hash, (changes, S, S) model inputs) of one film:
    a worker's task, which reads the film once for both."""
    path, params, names = args
    film = read_film(Path(path))
    out = []
    for name in names:
        try:
            out.append(preprocess(CHANGES[name](film), params))
        except ImageError:  # a change the product would refuse to read: a blank input stands for it
            out.append(np.zeros((params.size, params.size), np.float32))
    return hashlib.sha256(film.tobytes()).hexdigest(), np.stack(out)


def films_of(split: str, checkpoint, data: Path, cache_dir: Path) -> tuple[list[Path], np.ndarray]:
    """(paths, labels) of a split (``model_inputs`` counts exact duplicates once)."""
    if split == "validation":
        _, val, _ = checkpoint_splits(checkpoint.training_data, data, checkpoint.preprocess, cache_dir, progress=False)
        return [data / f for f in val.files], np.asarray(val.labels)
    items = scan_split(data, split)
    return [data / f for f, _ in items], np.array([label for _, label in items])


def adult_films(checkpoint, root: Path, cache_dir: Path) -> tuple[list[Path], np.ndarray]:
    """(paths, kinds: 1 adult frontal, 2 lateral) of the held-out patients' adult films."""
    adult = load_adult_films(root, checkpoint.preprocess, cache_dir, progress=False)
    held_out = np.flatnonzero(adult.held_out())
    return [root / adult.films.files[i] for i in held_out], adult.films.labels[held_out]


def refusals(predictor: Predictor, inputs: np.ndarray, kinds: np.ndarray, names: list[str]) -> dict:
    """Per change, the share of adult frontal films and of lateral views the gate refuses."""
    rows = {}
    for i, name in enumerate(names):
        refused = predictor.predict_many(inputs[i]).ood_scores > 1
        rows[name] = {"adult frontal": float(refused[kinds == 1].mean()), "lateral": float(refused[kinds == 2].mean()),
                      "films": {"adult frontal": int((kinds == 1).sum()), "lateral": int((kinds == 2).sum())}}
    return rows


def model_inputs(paths: list[Path], params, names: list[str], workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (changes, films, S, S), kept (films,)): every film under every change, and which
    films to count: the first of each set of exact duplicates (the same pixels)."""
    tasks = [(str(p), params, names) for p in paths]
    with ProcessPoolExecutor(workers) as pool:
        per_film = list(pool.map(_inputs_for, tasks, chunksize=8))
    seen, kept = set(), []
    for digest, _ in per_film:
        kept.append(digest not in seen)
        seen.add(digest)
    if not all(kept):
        log.info("%d exact duplicate images counted once", len(kept) - sum(kept))
    return np.stack([inputs for _, inputs in per_film], axis=1), np.array(kept)


def bootstrap(labels: np.ndarray, scores: np.ndarray, decided: np.ndarray, draws: int = 1000,
              seed: int = 0) -> dict[str, list[float]]:
    """95% intervals of AUC, sensitivity and false-positive rate by resampling films."""
    rng = np.random.default_rng(seed)
    figures = {"auc": [], "sensitivity": [], "false_positive_rate": []}
    n = len(labels)
    for _ in range(draws):
        pick = rng.integers(0, n, n)
        y, s, d = labels[pick], scores[pick], decided[pick]
        if y.min() == y.max():
            continue
        figures["auc"].append(roc_auc(y, s))
        figures["sensitivity"].append(float(d[y == 1].mean()))
        figures["false_positive_rate"].append(float(d[y == 0].mean()))
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in figures.items()}


def site_shift(predictor: Predictor, inputs: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Per change: refused, and on the films passed AUC, sensitivity, FPR and decisions changed."""
    outputs = {name: predictor.predict_many(inputs[i]) for i, name in enumerate(names)}
    base = outputs["as is"]
    base_refused = base.ood_scores > 1 if base.ood_scores is not None else np.zeros(len(labels), bool)
    base_positive = base.probabilities >= predictor.threshold
    rows = {}
    for name, out in outputs.items():
        refused = out.ood_scores > 1 if out.ood_scores is not None else np.zeros(len(labels), bool)
        passed = ~refused
        positive = out.probabilities >= predictor.threshold
        both = passed & ~base_refused
        y = labels[passed]
        rows[name] = {
            "films": int(len(labels)),
            "refused": float(refused.mean()),
            "refused_by_kind": {kind: float(np.mean(out.outside == kind)) for kind in ("not_xray", "adult", "lateral",
                                                                                       "unlike")}
            if out.outside is not None else {},
            "auc": roc_auc(y, out.probabilities[passed]) if 0 < y.sum() < len(y) else float("nan"),
            "sensitivity": float(positive[passed & (labels == 1)].mean()) if (y == 1).any() else float("nan"),
            "false_positive_rate": float(positive[passed & (labels == 0)].mean()) if (y == 0).any() else float("nan"),
            "decisions_changed": float(np.mean(positive[both] != base_positive[both])) if both.any() else float("nan"),
            "mean_probability_change_normal": float(np.mean((out.probabilities - base.probabilities)[labels == 0])),
        }
    passed = ~base_refused
    rows["as is"]["intervals"] = bootstrap(labels[passed], base.probabilities[passed], base_positive[passed])
    return rows


def format_rows(rows: dict) -> str:
    lines = ["| films | gate refuses | AUC (passed) | sensitivity (passed) | false-positive rate (passed) | "
             "decisions changed |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['refused']:.1%} | {r['auc']:.4f} | {r['sensitivity']:.3f} | "
                     f"{r['false_positive_rate']:.3f} | {r['decisions_changed']:.1%} |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--split", choices=("test", "validation", "adults"), default="test")
    parser.add_argument("--adult-data", type=Path, default=adult_data_dir())
    parser.add_argument("--rows", nargs="+", default=None, help="names of the rows to run (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--record", action="store_true",
                        help="write the test split's figures into the checkpoint file (for the model card); "
                             "for a file from training.train --out, before it goes into the store")
    return parser


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    names = ["as is"] + [n for n in (args.rows or CHANGES) if n != "as is"]
    unknown = [n for n in names if n not in CHANGES]
    if unknown:
        log.error("no such rows: %s (the rows are: %s)", unknown, ", ".join(CHANGES))
        return 2
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        if args.split == "adults":
            paths, labels = adult_films(checkpoint, args.adult_data, args.cache_dir)
        else:
            paths, labels = films_of(args.split, checkpoint, args.data, args.cache_dir)
    except (CheckpointError, DatasetError, OSError) as exc:
        log.error("%s", exc)
        return 2
    predictor = Predictor(checkpoint)
    inputs, kept = model_inputs(paths, checkpoint.preprocess, names, args.workers)
    inputs, labels = inputs[:, kept], labels[kept]
    if args.split == "adults":
        rows = refusals(predictor, inputs, labels, names)
        counts = rows["as is"]["films"]
        print(f"{checkpoint.version}: held-out adult films refused ({counts['adult frontal']} adult frontal, "
              f"{counts['lateral']} lateral)")
        print("| films | adult frontal refused | lateral refused |\n| --- | --- | --- |")
        for name, row in rows.items():
            print(f"| {name} | {row['adult frontal']:.1%} | {row['lateral']:.1%} |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    rows = site_shift(predictor, inputs, labels, names)
    print(f"{checkpoint.version} on the {args.split} split ({len(labels)} films, duplicates counted once), "
          f"threshold {predictor.threshold:.3f}")
    print(format_rows(rows))
    intervals = rows["as is"]["intervals"]
    print("as is, bootstrap 95% intervals: " + ", ".join(f"{k} {lo:.3f}-{hi:.3f}" for k, (lo, hi) in intervals.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.record:
        if args.split != "test" or args.rows:
            log.error("--record keeps the whole suite on the test split only")
            return 2
        checkpoint.metrics["site_shift"] = rows
        save_checkpoint(checkpoint, args.checkpoint)
        print(f"recorded in {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
