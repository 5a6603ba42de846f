"""The model this process serves, and how a promotion reaches it without a restart.

A leaf module, like flaskr's ``db.py``: the blueprints ask ``get_predictor()`` and
never import the app factory. Each request uses one predictor from start to end
(kept in ``g``), so every answer names the version that computed it.

Hot swap: in each process a watcher thread looks at the store's pointer once a
second (one ``stat``); when it has moved, it loads the new version while requests go
on with the old one, then swaps with one assignment. A forked worker (gunicorn
recycles workers from the preloaded master) catches up before its first answer and
starts its own watcher. A version that cannot be loaded, or whose preprocessing
differs from this code's, never replaces a working model: the worker keeps what it
has, logs one line, says so in ``/healthz`` (``problem``) and asks again every second
until the pointer is repaired. A store whose pointer cannot be read at start-up serves
the bundled model the same way, degraded, rather than not at all.

A version runs on ONNX Runtime from its serving file (``model.serving_file``), so a
worker never imports PyTorch; one without such a file runs on PyTorch where it is
installed, and cannot serve where it is not.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from functools import lru_cache
from pathlib import Path

from flask import Flask, current_app, g

from model import CheckpointError, DecodeLimits, Predictor, PreprocessParams, TsneMapError, prior_shift
from model.checkpoint import PreprocessMismatch
from model.neighbours import NeighbourIndex
from model.serving_file import ServingFile, graph_beside
from model.settings import DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT, torch_installed
from model.store import ModelStore, StoreError, read_weightless
from model.tsne_map import load_shared

log = logging.getLogger("app")

CHECK_INTERVAL_S = 1.0


class ServedModel:
    """The current predictor of one process; ``store`` is None for a pinned checkpoint file."""

    def __init__(self, predictor: Predictor, store: ModelStore | None = None, limits: DecodeLimits = DecodeLimits(),
                 stamp: tuple | None = None):
        self.predictor = predictor
        self.store = store
        self.limits = limits
        self._stamp = stamp  # the pointer's stamp when ``predictor`` was read from it
        self._watching_pid: int | None = None  # the process whose watcher thread runs
        self._start = threading.Lock()
        #: Why this process does not serve what the store's pointer names (None when it does):
        #: for /healthz, so in words without server paths.
        self.problem: str | None = None
        #: The history entry that put the served version in service ({"forced", "by", "reason"...}).
        self.entry: dict | None = None

    @classmethod
    def from_store(cls, store: ModelStore, limits: DecodeLimits) -> ServedModel:
        """Start-up: the serving version must load (``CheckpointError``/``StoreError`` otherwise)."""
        stamp = store.pointer_stamp()  # before loading: a promotion meanwhile is caught by the first refresh
        pointer = store.read_pointer()
        served = cls(_load(store, pointer.serving, limits), store, limits, stamp)
        served.entry = pointer.history[-1] if pointer.history else None
        return served

    @property
    def forced(self) -> dict | None:
        """The history entry of a promotion that overrode the guard, while its version serves here."""
        entry = self.entry
        if entry and entry.get("forced") and entry.get("version") == self.predictor.version and not self.problem:
            return entry
        return None

    @classmethod
    def degraded(cls, store: ModelStore, limits: DecodeLimits, error: Exception) -> ServedModel:
        """Start-up with a pointer that cannot be read, or that names a version that cannot
        serve: the bundled model serves, said to be a stand-in, until the pointer is repaired."""
        served = cls(pinned_predictor(DEFAULT_CHECKPOINT, limits), store, limits, stamp=None)
        served._fail(error)
        return served

    def current(self) -> Predictor:
        """The predictor to use now; the first call in a process catches up and starts watching."""
        if self.store is not None and self._watching_pid != os.getpid():
            with self._start:
                if self._watching_pid != os.getpid():  # a new process: a fork of the preloaded master
                    self.refresh()
                    threading.Thread(target=self._watch, daemon=True, name="model-watch").start()
                    self._watching_pid = os.getpid()
        return self.predictor

    def refresh(self) -> None:
        """Serve the store's pointer if it has moved, or if it could not be served last time;
        a pointer or version that cannot serve is logged once and asked again next time."""
        stamp = self.store.pointer_stamp()
        if stamp == self._stamp and self.problem is None:
            return
        old = self.predictor.version
        try:
            pointer = self.store.read_pointer()
            version = pointer.serving
            if version != old:
                self.predictor = _load(self.store, version, self.limits)  # one assignment: requests see old or new
                log.info("now serving model %s (was %s)", version, old)
        except (CheckpointError, StoreError) as exc:
            self._fail(exc)
            return
        if self.problem is not None:
            log.info("the model store's pointer serves again: model %s", version)
            self.problem = None
        self.entry = pointer.history[-1] if pointer.history else None
        self._stamp = stamp

    def _fail(self, error: Exception) -> None:
        if isinstance(error, StoreError):
            problem = "the model store's pointer cannot be read"
        else:
            problem = "the version the model store's pointer names cannot be loaded"
        problem += f"; serving {self.predictor.version} until an admin runs python -m training.store repair"
        if problem != self.problem:
            log.error("keeping model %s: %s", self.predictor.version, error)
        self.problem = problem

    def _watch(self) -> None:
        while True:
            time.sleep(CHECK_INTERVAL_S)
            try:
                self.refresh()
            except Exception:  # the watcher must outlive anything one refresh meets
                log.exception("model watcher: refresh failed; keeping model %s", self.predictor.version)


def _load(store: ModelStore, version: str, limits: DecodeLimits) -> Predictor:
    """``version`` on ONNX Runtime from its serving file; a version without one serves on PyTorch
    where it is installed (the training image), and cannot serve where it is not."""
    problem = store.graph_problem(version)
    if problem is None:
        predictor = store.load_serving(version, limits, expected_preprocess=PreprocessParams())
    elif torch_installed():
        log.warning("model %s runs on PyTorch: %s", version, problem)
        predictor = Predictor(store.load(version, expected_preprocess=PreprocessParams()), limits)
    else:
        raise CheckpointError(f"version {version} cannot serve without PyTorch: {problem}")
    if not predictor.works:
        raise CheckpointError(f"model {version} gives no finite probability")
    return predictor


def pinned_predictor(path: Path, limits: DecodeLimits) -> Predictor:
    """A checkpoint file's predictor: on its serving file beside it (``.onnx``) where there is one."""
    if graph_beside(path).is_file():
        return ServingFile(graph_beside(path), PreprocessParams()).predictor(limits)
    return Predictor.from_path(path, limits)


def init_app(app: Flask) -> None:
    """Load the serving model: a pinned ``CHECKPOINT_PATH``, or the store's (seeded on first use)."""
    limits = DecodeLimits(max_pixels=app.config["MAX_IMAGE_PIXELS"])
    started = time.perf_counter()
    if app.config.get("CHECKPOINT_PATH"):
        predictor = pinned_predictor(app.config["CHECKPOINT_PATH"], limits)
        served, source = ServedModel(predictor, None, limits), app.config["CHECKPOINT_PATH"]
        if not predictor.works:
            log.error("model %s gives no finite probability: /healthz reports it unavailable", predictor.version)
    else:
        store = ModelStore(app.config["MODEL_STORE"])
        try:
            if store.ensure_seeded(DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT):
                log.info("seeded the model store %s with the bundled model", store.root)
        except StoreError as exc:  # a read-only store serves what it holds
            log.warning("could not add the bundled model to the store: %s", exc)
        try:
            try:
                served = ServedModel.from_store(store, limits)
            except PreprocessMismatch as exc:
                served = ServedModel.from_store(upgraded(store, exc), limits)
        except (CheckpointError, StoreError) as exc:
            served = ServedModel.degraded(store, limits, exc)
        source = f"the model store {store.root}"
    app.extensions["model"] = served
    with app.app_context():  # load the nearest-film index now, not on the first request
        neighbour_index(served.predictor.version)
    log.info("serving model %s from %s (loaded in %.2f s)", served.predictor.version, source,
             time.perf_counter() - started)


def upgraded(store: ModelStore, mismatch: PreprocessMismatch) -> ModelStore:
    """A code update changed the preprocessing, so the serving version cannot serve here: the
    bundled version of this code (a candidate since ``ensure_seeded``) is served instead, and
    the store's history records why. Raises the mismatch when the bundled version is the one."""
    bundled = read_weightless(DEFAULT_CHECKPOINT).version
    with store.lock("promote"):
        old = store.serving_version()
        if old == bundled:
            raise mismatch
        store.set_serving(bundled, "upgrade", reason=f"{old} was made with other preprocessing than this code's")
    log.warning("model %s cannot serve with this code's preprocessing: serving the bundled model %s instead "
                "(recorded in the store's history)", old, bundled)
    return store


def get_predictor() -> Predictor:
    """The predictor for this request: one per request, the current one when it began."""
    if "predictor" not in g:
        g.predictor = current_app.extensions["model"].current()
    return g.predictor


def clinic_probability(probability: float) -> float | None:
    """The same film's probability at the clinic's expected prevalence (``CLINIC_PREVALENCE``),
    from the serving model's calibration mix; None without that setting."""
    clinic = current_app.config.get("CLINIC_PREVALENCE")
    calibration = get_predictor().checkpoint.calibration_prevalence
    if clinic is None or calibration is None:
        return None
    return prior_shift(probability, calibration, clinic)


def tsne_map_path(version: str | None = None) -> Path:
    """The t-SNE map to show: a pinned file, the serving version's, else the newest in the store."""
    version = version or get_predictor().version
    config = current_app.config
    if config.get("TSNE_ARTIFACT"):
        return Path(config["TSNE_ARTIFACT"])
    store = current_app.extensions["model"].store
    if store is None:
        return DEFAULT_TSNE_ARTIFACT
    own = store.tsne_path(version)
    if own.is_file():
        return own
    others = sorted(store.versions_dir.glob("*.tsne.npz"), key=lambda p: p.stat().st_mtime)
    return others[-1] if others else DEFAULT_TSNE_ARTIFACT


def neighbour_index(version: str | None = None) -> tuple[NeighbourIndex | None, str | None]:
    """The serving model's nearest-film index, or None and why (no map, or a map of another version)."""
    version = version or get_predictor().version
    path = tsne_map_path(version)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        log.warning("no dataset map at %s", path)  # the path is for the admin's log, not for users
        return None, f"there is no dataset map for model {version}: an admin makes it with python -m training.tsne"
    index, problem = _index(str(path), stamp)
    if index is not None and index.version != version:
        return None, (f"the dataset map was made with model {index.version}, not the serving {version}: "
                      "run python -m training.tsne")
    return index, problem


@lru_cache(maxsize=2)
def _index(path: str, stamp: int) -> tuple[NeighbourIndex | None, str | None]:
    try:
        return NeighbourIndex(load_shared(path, stamp)), None
    except (TsneMapError, ValueError) as exc:
        return None, str(exc)
