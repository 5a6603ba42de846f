"""The dataset folder: scanning, patient grouping, the validation split and the cache.

Layout: ``DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. Decoding thousands of
JPEGs is most of a cold run's cost, so preprocessed arrays are cached on disk, keyed
by the preprocessing parameters and the exact file list.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from model import CLASS_NAMES, ImageError, PreprocessParams, preprocess
from model.atomic import atomic_write
from model.decode import decode_image
from model.pixels import stretch, to_gray_float
from model.settings import IMAGE_SUFFIXES

from .processing import PROCESSING_VERSION, process, rng_for

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DatasetError(RuntimeError):
    """The dataset folder is missing, empty or not laid out as train|val|test/NORMAL|PNEUMONIA."""


@dataclass
class Split:
    """Preprocessed images of one split, in a stable order."""

    images: np.ndarray  # float32 (N, S, S)
    labels: np.ndarray  # int64 (N,), 1 = PNEUMONIA
    files: list[str]  # paths relative to the dataset folder
    #: float32 (copies, N, S, S): each film under random site processing (``training/processing.py``), or None
    processed: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        processed = None if self.processed is None else self.processed[:, index]
        return Split(self.images[index], self.labels[index], [self.files[i] for i in index], processed)

    @cached_property
    def with_processed(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels): the films as they are, then every processed copy of them; made once,
        as the feature gate and the population head both fit on it."""
        if self.processed is None:
            return self.images, self.labels
        copies = len(self.processed)
        images = np.concatenate([self.images, self.processed.reshape(-1, *self.images.shape[1:])])
        return images, np.tile(self.labels, 1 + copies)

    def summary(self) -> dict:
        positives = int(self.labels.sum())
        return {"images": len(self), "pneumonia": positives, "normal": len(self) - positives}


def scan_split(root: str | os.PathLike, split: str) -> list[tuple[str, int]]:
    """(relative path, label) for every image file of a split, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"{root} has no {split}/ folder; expected {'|'.join(SPLITS)}/{'|'.join(CLASS_NAMES)}/ image folders"
        )
    items = []
    for label, name in enumerate(CLASS_NAMES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DatasetError(f"{split_dir} has no {name}/ folder")
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{class_dir} holds no images")
        items += [(str(p.relative_to(root)), label) for p in files]
    return items


_PATIENT = re.compile(r"^(person\d+|(?:NORMAL2-)?IM-\d+)")


def patient_id(path: str) -> str:
    """``person1261_virus_2147`` -> ``person1261``; ``IM-0115-0001`` -> ``IM-0115``."""
    stem = Path(path).stem
    match = _PATIENT.match(stem)
    return match.group(1) if match else stem


def validation_split(files: list[str], labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices, stratified by label and grouped by patient.

    One child's films never sit on both sides, so validation measures generalisation to
    new patients (the dataset has several films per child, and duplicate images).
    """
    return grouped_split(labels, [patient_id(f) for f in files], fraction, seed)


def grouped_split(labels: np.ndarray, groups: list, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, set aside) indices: about ``fraction`` of the groups set aside, stratified by label;
    a group's films all fall on one side."""
    folds = max(2, round(1 / fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    kept, aside = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return kept, aside


def processed_copies(training_data: dict) -> int:
    """How many processed copies of each training film the checkpoint's gates were fitted with (none
    before site processing): what a refit loads to fit them the same way."""
    return int(training_data.get("recipe", {}).get("processed_copies", 0))


def checkpoint_splits(training_data: dict, root, params: PreprocessParams, cache_dir, workers: int = 2,
                      progress: bool = True, processed: int = 0) -> tuple[Split, Split, Split]:
    """(train, validation, test) as the checkpoint with this ``training_data`` was fitted and measured.

    The validation split is carved again from ``train/`` by the recorded rule (15% of
    patients and the run's seed, for checkpoints that predate the record). ``processed``:
    the training films' processed copies too (``load_split``).
    """
    rule = training_data.get("validation_split", {"fraction": 0.15, "seed": training_data.get("seed", 0)})
    full = load_split(root, "train", params, cache_dir, workers, progress=progress, processed=processed)
    test = load_split(root, "test", params, cache_dir, workers, progress=progress)
    train_index, val_index = validation_split(full.files, full.labels, rule["fraction"], rule["seed"])
    return full.subset(train_index), full.subset(val_index), test


def load_split(
    root: str | os.PathLike,
    split: str,
    params: PreprocessParams,
    cache_dir: str | os.PathLike | None,
    workers: int = 2,
    limit: int | None = None,
    progress: bool = True,
    processed: int = 0,
) -> Split:
    """Preprocess every image of a split, from the cache when it matches.

    Unreadable images are skipped with a warning that names them. ``limit`` keeps a
    class-balanced prefix (for dry runs) and bypasses the cache. ``processed``: also
    that many copies of each film under random site processing (``Split.processed``).
    """
    root = Path(root)
    items = scan_split(root, split)
    if limit is not None:
        per_class = max(1, limit // 2)
        items = [it for label in (0, 1) for it in [i for i in items if i[1] == label][:per_class]]
    return load_items(root, items, params, None if limit is not None else cache_dir, workers, split, progress,
                      processed)


def load_items(
    root: Path,
    items: list[tuple[str, int]],
    params: PreprocessParams,
    cache_dir: str | os.PathLike | None,
    workers: int,
    name: str,
    progress: bool = True,
    processed: int = 0,
) -> Split:
    """Preprocess (relative path, label) items of a folder, through the cache."""
    cache_path = None
    if cache_dir is not None:
        key = _cache_key(root, items, params, processed)
        cache_path = Path(cache_dir) / f"{name}{f'-processed{processed}' if processed else ''}-{key}.npz"
        if cache_path.is_file():
            try:
                with np.load(cache_path) as data:
                    copies = data["processed"] if processed else None
                    return Split(data["images"], data["labels"], [str(f) for f in data["files"]], copies)
            except (OSError, ValueError, KeyError):
                log.warning("ignoring unreadable cache file %s", cache_path)
    jobs = [(str(root / rel), rel, processed) for rel, _ in items]
    results = _preprocess_files(jobs, params, workers, desc=f"preprocess {name}" if progress else None)
    images, copies, labels, files = [], [], [], []
    for (rel, label), result in zip(items, results):
        if isinstance(result, str):
            log.warning("skipping %s: %s", rel, result)
            continue
        images.append(result[0])
        copies.append(result[1])
        labels.append(label)
        files.append(rel)
    if not images:
        raise DatasetError(f"no readable images in {root / name}")
    split_data = Split(np.stack(images).astype(np.float32), np.asarray(labels, dtype=np.int64), files,
                       np.stack(copies, axis=1).astype(np.float32) if processed else None)
    if cache_path is not None:
        _write_cache(cache_path, split_data)
    return split_data


def _cache_key(root: Path, items: list[tuple[str, int]], params: PreprocessParams, processed: int = 0) -> str:
    digest = hashlib.sha256(json.dumps(params.to_dict(), sort_keys=True).encode())
    if processed:
        digest.update(f"processed {processed} {PROCESSING_VERSION}\n".encode())
    for rel, label in items:
        stat = (root / rel).stat()
        digest.update(f"{rel}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _write_cache(path: Path, split: Split) -> None:
    extra = {} if split.processed is None else {"processed": split.processed}
    with atomic_write(path) as handle:
        np.savez(handle, images=split.images, labels=split.labels, files=np.asarray(split.files), **extra)


def _preprocess_one(args: tuple[tuple[str, str, int], PreprocessParams]) -> tuple[np.ndarray, list] | str:
    """(model input, processed copies' inputs) of one file, or the reason it cannot be read."""
    (path, name, processed), params = args
    try:
        with open(path, "rb") as handle:
            pixels = decode_image(handle.read(), min_side=params.decode_side)  # as preprocess decodes bytes
        copies = []
        if processed:
            film = eight_bit(pixels)
            copies = [preprocess(process(film, rng_for(name, 0, copy)), params) for copy in range(processed)]
        return preprocess(pixels, params), copies
    except (ImageError, OSError) as exc:
        return str(exc)


def eight_bit(film: np.ndarray) -> np.ndarray:
    """A decoded film as 8-bit gray, the depth the processing works in."""
    if film.ndim == 3:
        film = to_gray_float(film)
    if film.dtype == np.uint8:
        return film
    return np.round(stretch(film) * 255).astype(np.uint8)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def _preprocess_files(files: list[tuple[str, str, int]], params: PreprocessParams, workers: int, desc: str | None):
    from tqdm import tqdm

    jobs = [(f, params) for f in files]
    bar = dict(total=len(jobs), desc=desc, disable=desc is None, unit="img", leave=False)
    if workers <= 1 or len(jobs) < 64:
        return [_preprocess_one(job) for job in tqdm(jobs, **bar)]
    # forkserver, not fork: forking a process whose torch thread pool has run can deadlock.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, mp_context=context) as pool:
        return list(tqdm(pool.map(_preprocess_one, jobs, chunksize=32), **bar))


# ---- adult films, for the population gate ---------------------------------------------

ADULT_KINDS = {"adult": 1, "lateral": 2}  # indices into model.population.KINDS
#: Share of the adult collection's patients never used for fitting: they report the gate's figures.
HELD_OUT_FRACTION = 0.4


@dataclass
class AdultFilms:
    """Adult frontal films and lateral views (``adult_cxr/manifest.csv``), preprocessed."""

    films: Split  # labels: 1 adult frontal, 2 lateral view
    patients: np.ndarray  # (N,) str; one patient's films share it

    def held_out(self, fraction: float = HELD_OUT_FRACTION, seed: int = 0) -> np.ndarray:
        """Mask of the films of a fixed ``fraction`` of patients, never used for fitting."""
        patients = np.unique(self.patients)
        np.random.default_rng(seed).shuffle(patients)
        chosen = set(patients[: int(round(fraction * len(patients)))])
        return np.array([p in chosen for p in self.patients])


def load_adult_films(root: str | os.PathLike, params: PreprocessParams, cache_dir, workers: int = 2,
                     limit: int | None = None, progress: bool = True, processed: int = 0) -> AdultFilms:
    """Every film the manifest lists (view ``L`` is a lateral view; any other, an adult frontal film)."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DatasetError(f"no adult films at {root} (expected manifest.csv with file, patient, view columns)")
    with open(manifest, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if (root / r["file"]).is_file()]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DatasetError(f"{manifest} lists no film that exists")
    kind = {r["file"]: ADULT_KINDS["lateral" if r["view"].strip().upper() in ("L", "LL", "RL", "LATERAL") else "adult"]
            for r in rows}
    patient = {r["file"]: r["patient"] for r in rows}
    films = load_items(root, sorted(kind.items()), params, None if limit else cache_dir, workers, "adult", progress,
                       processed)
    return AdultFilms(films, np.array([patient[f] for f in films.files]))
