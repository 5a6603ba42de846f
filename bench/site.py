"""Onboarding simulated sites: the learning curve of ``training.site adapt``.

    python -m bench.site [--sizes 50 100 200 300] [--modes threshold fine-tune] [--sites NAME ...]

Each simulated site (``training.site_shift.SIMULATED_SITES``) takes the test split's
patients in two halves. The first half, changed the way the site exports, is what the
site gives for onboarding: ``adapt`` gets the first N of its films (stratified; its own
held-out slice for the guard comes out of those N). The second half, changed the same way,
is held out of everything: the candidate is measured there (the site's goals), and on that
half as it is (the original films: nothing forgotten), and on the adult and lateral films
of the patients the population gate never saw, and on the tests' non-X-ray images. Per row: refused, sensitivity and
false-positive rate on the films answered, AUC; whether ``training.store promote`` would
pass it (its guard on the candidate's own held-out slice and on the test split); and the
seconds ``adapt`` took. The first row of each site is the serving (parent) model.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from harness.non_xray import non_xray_images
from model import CLASS_NAMES, Predictor, load_checkpoint
from model.card import ADULT_HELD_OUT, LATERAL_HELD_OUT
from model.settings import DEFAULT_CACHE_DIR, DEFAULT_CHECKPOINT, adult_data_dir, data_dir
from training.data import checkpoint_splits, grouped_split, load_adult_films, patient_id, processed_copies, scan_split
from training.site import (
    HELD_OUT_FRACTION,
    adapt,
    groups_of,
    held_out_films,
    labelled_files,
    leaked,
    read_films,
    report,
    scored,
    split_site,
)
from training.site_shift import SIMULATED_SITES, read_film
from training.store import guard, site_guard

GOALS = "site held-out half: sensitivity >= 0.97, FPR <= 0.25, refused <= 5%; as is: AUC >= 0.985, " \
        "sensitivity >= 0.98, FPR <= 0.25; adults refused >= 90%, laterals >= 95%"


def _export(task: tuple[str, str, str]) -> None:
    source, target, site = task
    film = SIMULATED_SITES[site](read_film(Path(source))) if site else read_film(Path(source))
    cv2.imwrite(target, film, [cv2.IMWRITE_JPEG_QUALITY, 95])


def export(items: list[tuple[str, int]], data: Path, folder: Path, site: str | None, workers: int) -> None:
    """The films, changed as ``site`` exports them, as JPEG files in ``folder/NORMAL|PNEUMONIA``."""
    for name in CLASS_NAMES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    tasks = [(str(data / rel), str(folder / CLASS_NAMES[label] / f"{Path(rel).stem}.jpeg"), site or "")
             for rel, label in items]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_export, tasks, chunksize=8))


def first_n(items: list[tuple[str, int]], n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` of the items, the classes in their proportion, in a fixed random order."""
    order = np.random.default_rng(seed).permutation(len(items))
    labels = np.array([label for _, label in items])
    chosen = []
    for label in (0, 1):
        members = [i for i in order if labels[i] == label]
        chosen += members[: round(n * len(members) / len(items))]
    return [items[i] for i in sorted(chosen)]


def subset_folder(items: list[tuple[str, int]], exported: Path, folder: Path) -> None:
    """Links to the exported files of ``items``: the folder an admin would point ``adapt`` at."""
    for name in CLASS_NAMES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for rel, label in items:
        name = f"{Path(rel).stem}.jpeg"
        os.symlink(exported / CLASS_NAMES[label] / name, folder / CLASS_NAMES[label] / name)


def row(site: str, films: str, mode: str, predictor: Predictor, changed, as_is, adult_figures: dict,
        non_xray: np.ndarray, verdict: str, seconds: str) -> str:
    here = report(predictor, changed)["site"]
    refused_non_xray = float(np.mean(predictor.predict_many(non_xray).ood_scores > 1))
    there = report(predictor, as_is)["site"]

    def fig(found: dict, form: str = "{:.3f}") -> str:
        value = found["value"]
        return "-" if value is None else form.format(value)

    return (f"| {site} | {films} | {mode} | {here['refused']['value']:.1%} | {fig(here['sensitivity'])} | "
            f"{fig(here['false_positive_rate'])} | {fig(here['auc'], '{:.4f}')} | {fig(there['auc'], '{:.4f}')} | "
            f"{fig(there['sensitivity'])} | {fig(there['false_positive_rate'])} | "
            f"{adult_figures.get(ADULT_HELD_OUT, {}).get('flagged', float('nan')):.1%} | "
            f"{adult_figures.get(LATERAL_HELD_OUT, {}).get('flagged', float('nan')):.1%} | {refused_non_xray:.0%} | "
            f"{verdict} | {seconds} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="the serving (parent) model")
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--adult-data", type=Path, default=adult_data_dir())
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 300])
    parser.add_argument("--modes", nargs="+", choices=("threshold", "fine-tune"), default=["threshold", "fine-tune"])
    parser.add_argument("--sites", nargs="+", choices=list(SIMULATED_SITES), default=list(SIMULATED_SITES))
    parser.add_argument("--tune", default="norm")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target", type=float, default=None, help="the tuned threshold's pooled sensitivity")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    parent = load_checkpoint(args.checkpoint)
    serving = Predictor(parent)
    copies = processed_copies(parent.training_data)
    train, val, test = checkpoint_splits(parent.training_data, args.data, parent.preprocess, DEFAULT_CACHE_DIR,
                                         progress=False, processed=copies)
    adult = load_adult_films(args.adult_data, parent.preprocess, DEFAULT_CACHE_DIR, progress=False, processed=copies)
    non_xray = np.stack([serving.preprocess(image) for _, image in non_xray_images()])
    items = scan_split(args.data, "test")
    labels = np.array([label for _, label in items])
    onboard, held = grouped_split(labels, [patient_id(rel) for rel, _ in items], 0.5, seed=0)
    onboard_items, held_items = [items[i] for i in onboard], [items[i] for i in held]
    print(f"parent {parent.version}; test split halves by patient: {len(onboard_items)} films to onboard from, "
          f"{len(held_items)} held out; {torch.get_num_threads()} threads")
    print(f"goals: {GOALS}")
    print("| site | site films | model | refused | sensitivity | FPR | AUC | as is: AUC | as is: sensitivity | "
          "as is: FPR | adults refused | laterals refused | non-X-rays refused | promote | adapt s |")
    print("| --- " * 15 + "|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        export(held_items, args.data, root / "as-is", None, args.workers)
        as_is = read_films(labelled_files(root / "as-is"), root / "as-is", parent.preprocess)
        parent_adults = parent.metrics.get("population_gate", {})
        for s, site in enumerate(args.sites):
            export(onboard_items, args.data, root / f"site{s}" / "onboard", site, args.workers)
            export(held_items, args.data, root / f"site{s}" / "held", site, args.workers)
            changed = read_films(labelled_files(root / f"site{s}" / "held"), root / f"site{s}" / "held",
                                 parent.preprocess)
            print(row(site, "-", "serving", serving, changed, as_is, parent_adults, non_xray, "-", "-"), flush=True)
            for n in args.sizes:
                folder = root / f"site{s}" / f"n{n}"
                subset_folder(first_n(onboard_items, n), root / f"site{s}" / "onboard", folder)
                films = read_films(labelled_files(folder), folder, parent.preprocess)
                rest, held_out = split_site(films, groups_of(films, {}), HELD_OUT_FRACTION, 0)
                for mode in args.modes:
                    started = time.perf_counter()
                    extra = {} if args.steps is None else {"steps": args.steps}
                    if args.target:
                        extra["target"] = args.target
                    candidate = adapt(parent, site, films, held_out, rest, train, val, test, adult,
                                      threshold_only=mode == "threshold", tune=args.tune, **extra)
                    seconds = time.perf_counter() - started
                    predictor = Predictor(candidate)
                    slice_ = held_out_films(candidate.training_data["site"], folder, parent.preprocess)
                    reasons = site_guard(scored(predictor, slice_), scored(serving, slice_),
                                         leaked(candidate.training_data["site"]))
                    reasons += guard(candidate.metrics["test"], parent.metrics["test"], False, True)
                    verdict = "passes" if not reasons else "refused: " + "; ".join(r.split(":")[0][:40]
                                                                                  for r in reasons)
                    print(row(site, str(len(films)), mode, predictor, changed, as_is,
                              candidate.metrics.get("population_gate", {}), non_xray, verdict, f"{seconds:.0f}"),
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
