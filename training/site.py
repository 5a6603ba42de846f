"""A new hospital: how the serving model does on the site's own confirmed films, and a
model adapted to them.

    python -m training.site report --films DIR [--json FILE]
    python -m training.site report --cases --films EXPORT_DIR [--database URL] [--json FILE]
    python -m training.site adapt --films DIR --site NAME [--patients CSV] [--threshold-only]

``DIR`` holds the site's confirmed films as the dataset does (``NORMAL/``, ``PNEUMONIA/``;
any format the app reads, DICOM included, in sub-folders too). With ``--cases`` the labels
are the clinicians' overreads in the case record instead, and the films are found by
their SHA-256 in a folder the admin exported (any layout); "uncertain" reads are left
out and counted.

``report`` reads every film through the product's path (decoding, the DICOM header's
checks, preprocessing, network, both gates) and prints the site's figures beside the
model card's: refusals and why, sensitivity and false-positive rate with Wilson 95%
intervals, AUC with a bootstrap interval, calibration, and whether there are enough films
to trust them (``model.validation``).

``adapt`` starts from the serving model. It first sets a third of the site's patients
aside (grouped by patient where ``--patients`` maps files to patients, and always by
identical pixels), then fine-tunes the normalisation layers and the head on part of the
rest with the original training films replayed in every batch, refits both gates with
the site's films among the children's, and sets the threshold at the recipe's
sensitivity on the rest's other part and the original validation films together, so
that one threshold serves both kinds of film. The candidate records its parent, the
site, every film's hash and the held-out slice; ``training.store promote --site-films
DIR`` judges it there. ``--threshold-only`` keeps the weights and moves the gates and
the threshold (the site's 0.97 floor on every site film it may see).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from model import (
    CLASS_NAMES,
    Checkpoint,
    CheckpointError,
    DecodeLimits,
    ImageError,
    PneumoniaNet,
    Predictor,
    calibrate,
    infer_batches,
    load_checkpoint,
    preprocess,
)
from model.card import card_figures
from model.decode import decode_film
from model.film_facts import FilmFacts
from model.intended_use import metadata_reasons
from model.settings import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CHECKPOINT,
    DEFAULT_TSNE_ARTIFACT,
    adult_data_dir,
    data_dir,
    database_url,
    model_store_dir,
)
from model.store import ModelStore, StoreError
from model.validation import auc, local_validation

from .augment import augment
from .calibrate import fit_temperature
from .data import DatasetError, checkpoint_splits, grouped_split, load_adult_films, processed_copies
from .evaluate import evaluate, transformer_figures
from .gate import fit_gate
from .metrics import threshold_for_sensitivity
from .onnx_export import add_to_store
from .population import fit_population_head, gate_sets, population_figures
from .recipe import Recipe

log = logging.getLogger("training")

#: Share of the site's films (by patient) held out for the promotion guard.
HELD_OUT_FRACTION = 1 / 3
#: Of the rest, the share that sets the threshold and the gates' quantiles (the others tune).
CHOOSE_FRACTION = 1 / 3
#: Fine-tuning: steps, films a step (half the site's, half replayed), learning rate, what moves.
#: The normalisation layers and the head (``norm``): on a simulated site they brought the site's
#: normal films back below the original threshold, where tuning every weight or the head alone
#: did not (docs/model.md, onboarding a site).
STEPS = 600
BATCH = 64
LEARNING_RATE = 1e-3
TUNE_CHOICES = ("norm", "all", "head")
#: The site's sensitivity floor: the threshold keeps it on the site's choosing films, and the
#: promotion guard asks it of the held-out slice.
SITE_MIN_SENSITIVITY = 0.97
#: The site's tuning films are repeated until they are this share of the children both gates fit on (at
#: most ``MAX_REPEATS`` times): weighted so, the gates learn the site's look and need little raising, and
#: the feature gate's thin margin over photos and documents survives (docs/experiments.md).
SITE_SHARE_OF_CHILDREN = 0.25
MAX_REPEATS = 400
#: The feature gate's quantile, as ``training.gate.fit_gate`` takes it on the validation films.
GATE_QUANTILE = 0.995


# ---- the site's films -------------------------------------------------------------------


@dataclass
class SiteFilms:
    """A site's films, read through the product's decoding and preprocessing."""

    inputs: np.ndarray  # float32 (N, S, S), model inputs
    labels: np.ndarray  # int64 (N,), 1 = pneumonia
    files: list[str]  # relative to the folder they were read from
    sha256: list[str]  # of each file's bytes, as the case record keeps it
    pixels: list[str]  # of the decoded pixels: the same film in another file shares it
    facts: list[FilmFacts]  # what a DICOM header said
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> why it could not be read

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> SiteFilms:
        index = np.asarray(index, dtype=int)
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        return SiteFilms(self.inputs[index], self.labels[index], pick(self.files), pick(self.sha256),
                         pick(self.pixels), pick(self.facts))

    def summary(self) -> dict:
        positives = int(self.labels.sum())
        return {"films": len(self), "pneumonia": positives, "normal": len(self) - positives}


def film_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (sub-folders too; hidden files and folders skipped), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def labelled_files(root: Path) -> list[tuple[Path, int]]:
    """(file, label) from ``root/NORMAL`` and ``root/PNEUMONIA``."""
    if not root.is_dir():
        raise DatasetError(f"site films folder not found: {root}")
    items = []
    for label, name in enumerate(CLASS_NAMES):
        folder = root / name
        if not folder.is_dir():
            raise DatasetError(f"{root} has no {name}/ folder: the site's films go in {'/ and '.join(CLASS_NAMES)}/")
        items += [(path, label) for path in film_files(folder)]
    if not items:
        raise DatasetError(f"{root} holds no films")
    return items


def _read_one(path: Path, params, limits: DecodeLimits):
    data = path.read_bytes()
    film = decode_film(data, limits, params.decode_side)
    pixels = np.ascontiguousarray(film.pixels)
    pixel_hash = hashlib.sha256(f"{pixels.shape}{pixels.dtype}".encode() + pixels.tobytes()).hexdigest()
    return preprocess(pixels, params, limits), hashlib.sha256(data).hexdigest(), pixel_hash, film.facts


def read_films(items: list[tuple[Path, int]], root: Path, params, workers: int = 2) -> SiteFilms:
    """Decode and preprocess each file as the app does; a file that cannot be read is skipped and named."""
    limits = DecodeLimits()

    def read(item):
        try:
            return _read_one(item[0], params, limits)
        except ImageError as exc:
            return str(exc)
        except Exception as exc:  # a reader's own failure on a malformed file, as the app treats it
            return f"could not be read ({type(exc).__name__})"

    with ThreadPoolExecutor(max(1, workers)) as pool:  # the decoders release the GIL
        results = list(pool.map(read, items))
    kept = [(item, result) for item, result in zip(items, results) if not isinstance(result, str)]
    skipped = {str(item[0].relative_to(root)): result
               for item, result in zip(items, results) if isinstance(result, str)}
    for name, why in skipped.items():
        log.warning("skipping %s: %s", name, why)
    if not kept:
        raise DatasetError(f"no readable films in {root}")
    size = params.size
    return SiteFilms(
        inputs=np.stack([r[0] for _, r in kept]).astype(np.float32).reshape(-1, size, size),
        labels=np.array([item[1] for item, _ in kept], dtype=np.int64),
        files=[str(item[0].relative_to(root)) for item, _ in kept],
        sha256=[r[1] for _, r in kept], pixels=[r[2] for _, r in kept], facts=[r[3] for _, r in kept],
        skipped=skipped,
    )


def overread_labels(url: str) -> dict[str, str]:
    """SHA-256 of a file -> the latest overread of its latest case, from the case record.

    Read with SQLAlchemy's reflection of the ``cases`` table (the app owns its schema)."""
    from sqlalchemy import MetaData, Table, create_engine, select
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = create_engine(url)
        cases = Table("cases", MetaData(), autoload_with=engine)
        with engine.connect() as connection:
            rows = connection.execute(select(cases.c.input_sha256, cases.c.overread)
                                      .where(cases.c.overread.is_not(None)).order_by(cases.c.created_at)).all()
    except SQLAlchemyError as exc:
        raise DatasetError(f"cannot read the case record at {url.split('@')[-1]}: {type(exc).__name__}") from None
    return {sha: read for sha, read in rows}  # later cases overwrite earlier ones


def films_from_record(export: Path, reads: dict[str, str], params, workers: int = 2) -> tuple[SiteFilms, dict]:
    """The exported films that have an overread of "pneumonia" or "normal", labelled by it, and the counts
    of what was left out."""
    if not export.is_dir():
        raise DatasetError(f"exported films folder not found: {export}")
    items, found, counts = [], set(), {"uncertain": 0, "no_overread": 0}
    for path in film_files(export):
        with open(path, "rb") as handle:
            sha = hashlib.file_digest(handle, "sha256").hexdigest()
        read = reads.get(sha)
        if read is None:
            counts["no_overread"] += 1
        elif read == "uncertain":
            counts["uncertain"] += 1
        elif read in ("pneumonia", "normal") and sha not in found:
            found.add(sha)
            items.append((path, int(read == "pneumonia")))
    counts["overread_not_exported"] = sum(1 for sha, read in reads.items() if read != "uncertain" and sha not in found)
    if not items:
        raise DatasetError(f"none of the films in {export} has a clinician's read of pneumonia or normal "
                           f"in the case record ({counts['uncertain']} uncertain, {counts['no_overread']} not read)")
    return read_films(items, export, params, workers), counts


# ---- answers and the report ---------------------------------------------------------------


def answers(predictor: Predictor, films: SiteFilms) -> tuple[np.ndarray, list[str]]:
    """(calibrated probabilities, refusals): per film "" when answered, else the checks that refused it
    ("age", "view", "body_part", "image:adult", "image:lateral"...), as the app would refuse it."""
    out = predictor.predict_many(films.inputs)
    use = predictor.checkpoint.intended_use
    refusals = []
    for i, facts in enumerate(films.facts):
        checks = [reason.check for reason in metadata_reasons(facts, None, use)]
        if out.outside is not None and out.outside[i]:
            checks.append(f"image:{out.outside[i]}")
        refusals.append(",".join(checks))
    return out.probabilities, refusals


def report(predictor: Predictor, films: SiteFilms) -> dict:
    """The local validation of ``predictor`` on ``films``, beside its model card's test-split figures."""
    probabilities, refusals = answers(predictor, films)
    return {"model_version": predictor.version, "site": local_validation(films.labels, probabilities,
                                                                        predictor.threshold, refusals),
            "model_card": card_figures(predictor.checkpoint.metrics)}


def scored(predictor: Predictor, films: SiteFilms) -> dict:
    """Every film scored, whether or not a gate refuses it: sensitivity and false-positive rate at the
    model's threshold, AUC, and the share its gates refuse. Two models compare on the same films so."""
    probabilities, refusals = answers(predictor, films)
    positive, labels = probabilities >= predictor.threshold, films.labels
    return {"films": len(films), "pneumonia": int((labels == 1).sum()),
            "sensitivity": float(positive[labels == 1].mean()) if (labels == 1).any() else None,
            "false_positive_rate": float(positive[labels == 0].mean()) if (labels == 0).any() else None,
            "auc": auc(labels, probabilities), "refused": float(np.mean([bool(r) for r in refusals]))}


def leaked(site: dict) -> int:
    """How many held-out films a site candidate also fitted on (by file or by pixels): 0 for a fair slice."""
    fit, held = site.get("fit", {}), site.get("held_out", {})
    by_file = set(fit.get("sha256", ())) & set(held.get("sha256", ()))
    by_pixels = set(fit.get("pixels", ())) & set(held.get("pixels", ()))
    return max(len(by_file), len(by_pixels))


def held_out_films(site: dict, folder: Path, params, workers: int = 2) -> SiteFilms:
    """The held-out slice a site candidate recorded, read again from the site's folder (found by hash)."""
    films = read_films(labelled_files(folder), folder, params, workers)
    wanted = set(site["held_out"]["sha256"])
    index = [i for i, sha in enumerate(films.sha256) if sha in wanted]
    found = {films.sha256[i] for i in index}
    if len(found) < len(wanted):
        raise DatasetError(f"{folder} holds {len(found)} of the {len(wanted)} held-out films this candidate "
                           f"recorded for site {site['name']}: give the folder it was adapted on")
    return films.subset(index)


def _share(figure: dict) -> str:
    if figure.get("value") is None or figure["value"] != figure["value"]:  # none, or NaN
        return "-"
    interval = figure.get("interval")
    counts = f" ({figure['successes']}/{figure['n']})" if "successes" in figure else ""
    return f"{figure['value']:.3f} [{interval[0]:.3f}-{interval[1]:.3f}]{counts}" if interval else \
        f"{figure['value']:.3f}{counts}"


def format_report(found: dict, source: str) -> str:
    site, card = found["site"], found["model_card"]
    refused = site["refused"]
    why = ", ".join(f"{k} {v}" for k, v in sorted(refused["why"].items())) or "none"
    calibration = site["calibration"]
    slope = "-" if calibration["slope"] is None else f"{calibration['slope']:.2f}"
    intercept = "-" if calibration["intercept"] is None else f"{calibration['intercept']:+.2f}"
    rows = [
        ("films", f"{site['films']} ({site['pneumonia']} pneumonia, {site['normal']} normal)",
         str(card["films"] or "-")),
        ("refused", f"{refused['value']:.1%} ({refused['successes']}; {why})",
         "-" if card["refused"]["value"] is None else f"{card['refused']['value']:.1%}"),
        ("answered", f"{site['answered']['pneumonia']} pneumonia, {site['answered']['normal']} normal", ""),
        ("sensitivity", _share(site["sensitivity"]), _share(card["sensitivity"])),
        ("false-positive rate", _share(site["false_positive_rate"]), _share(card["false_positive_rate"])),
        ("AUC", _share(site["auc"]), _share(card["auc"])),
        ("calibration slope", f"{slope} (intercept {intercept}; 1 and 0 is calibrated)", ""),
    ]
    width = max(len(ours) for _, ours, _ in rows) + 3
    lines = [f"{found['model_version']} at threshold {site['threshold']:.4f} on {source}",
             f"{'':<22}{'this site':<{width}}model card (test split)"]
    lines += [f"{label:<22}{ours:<{width}}{theirs}".rstrip() for label, ours, theirs in rows]
    lines.append("observed against predicted, fifths of the answered films: " + "; ".join(
        f"{b['observed']:.2f} vs {b['predicted']:.2f}" for b in calibration["bins"]))
    lines.append(f"verdict: {site['trust']['text']}")
    return "\n".join(lines)


# ---- adapting ---------------------------------------------------------------------------


def patient_map(path: Path | None) -> dict[str, str]:
    """file name (as under the folder, or its bare name) -> patient, from a CSV with ``file`` and ``patient``."""
    if path is None:
        return {}
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return {row["file"].strip(): row["patient"].strip() for row in rows}
    except (OSError, KeyError, csv.Error) as exc:
        raise DatasetError(f"cannot read the patient map {path} (a CSV with file and patient columns): {exc}") from None


def groups_of(films: SiteFilms, patients: dict[str, str]) -> list[int]:
    """One group a patient (where mapped) joined with every file of the same pixels: neither side of
    a split ever sees a film, or a patient, of the other."""
    parent = list(range(len(films)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, (name, pixels) in enumerate(zip(films.files, films.pixels)):
        keys = [f"pixels:{pixels}"]
        patient = patients.get(name) or patients.get(Path(name).name)
        if patient:
            keys.append(f"patient:{patient}")
        for key in keys:
            if key in first:
                parent[root(i)] = root(first[key])
            else:
                first[key] = i
    return [root(i) for i in range(len(films))]


def split_site(films: SiteFilms, groups: list[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held out) indices, grouped and stratified; a set too small to split keeps nothing aside."""
    classes = np.bincount(films.labels, minlength=2)
    if classes.min() < 2 or len(set(groups)) < 4:
        raise DatasetError(f"too few films to set a held-out slice aside ({classes[1]} with pneumonia, "
                           f"{classes[0]} without): give at least a few of each, from several patients")
    return grouped_split(films.labels, groups, fraction, seed)


def trainable(net: PneumoniaNet, tune: str) -> list[dict]:
    """The optimizer's parameter groups for ``tune``: every weight (the spatial transformer at a tenth of
    the rate, as in training), the normalisation layers and the head, or the head alone."""
    if tune == "head":
        return [{"params": list(net.head.parameters())}]
    if tune == "norm":
        norms = [p for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
        return [{"params": norms + list(net.head.parameters())}]
    stn = [p for name, p in net.named_parameters() if name.startswith("stn.")]
    rest = [p for name, p in net.named_parameters() if not name.startswith("stn.")]
    return [{"params": rest}, {"params": stn, "lr": LEARNING_RATE * 0.1}]


def class_balanced(labels: torch.Tensor) -> torch.Tensor:
    """Per-film loss weights that give each class of a set the same total weight."""
    counts = torch.bincount(labels.long(), minlength=2).float().clamp(min=1)
    return (len(labels) / (2 * counts))[labels.long()]


def fine_tune(parent: Checkpoint, site: SiteFilms, replay_images: np.ndarray, replay_labels: np.ndarray,
              tune: str = "norm", steps: int = STEPS, seed: int = 0) -> list[dict]:
    """The parent's weights after ``steps`` steps on batches of half the site's films and half the
    original training films (each augmented as in training; each half's classes weighted equally)."""
    recipe = Recipe(**{k: v for k, v in parent.training_data.get("recipe", {}).items()
                       if k in {f.name for f in dataclasses.fields(Recipe)} and k != "channels"})
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    site_x, site_y = torch.from_numpy(site.inputs).unsqueeze(1), torch.from_numpy(site.labels).float()
    replay_x, replay_y = torch.from_numpy(replay_images).unsqueeze(1), torch.from_numpy(replay_labels).float()
    site_w, replay_w = class_balanced(site_y), class_balanced(replay_y)
    states = []
    for state in parent.state_dicts:
        net = PneumoniaNet(parent.network)
        net.load_state_dict(state)
        net = net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(trainable(net, tune), lr=LEARNING_RATE, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
        net.train(tune != "head")  # the head alone: the normalisation statistics stay the parent's
        half = BATCH // 2
        for _ in range(steps):
            a = torch.randint(len(site_x), (half,), generator=generator)
            b = torch.randint(len(replay_x), (half,), generator=generator)
            x = augment(torch.cat([site_x[a], replay_x[b]]), generator, recipe.augment_strength,
                        recipe.zoom_strength, recipe.bias_field)
            y = torch.cat([site_y[a], replay_y[b]])
            weight = torch.cat([site_w[a], replay_w[b]])
            loss = (F.binary_cross_entropy_with_logits(net(x), y, reduction="none") * weight).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        states.append({k: v.detach().contiguous() for k, v in net.eval().state_dict().items()})
    return states


def repeated(images: np.ndarray, times: int) -> np.ndarray:
    return np.concatenate([images] * max(1, times)) if len(images) else images


def site_factor(scores: np.ndarray) -> float:
    """How far to raise a gate's threshold (scores in its units, above 1 refused) so that the site's films
    pass: a few dozen films say little of their own tail, so the larger of their high quantile and their
    mean plus three standard deviations (a normal tail's 99.9%); never lowered."""
    scores = np.asarray(scores, dtype=np.float64)
    spread = float(scores.mean() + 3 * scores.std()) if len(scores) > 1 else 0.0
    return max(1.0, float(np.quantile(scores, GATE_QUANTILE)) if len(scores) else 0.0, spread)


def site_gates(model, parent: Checkpoint, train, val, tuning: SiteFilms, choosing: SiteFilms, adult):
    """Both gates refitted as training fits them (the films as they are and their processed copies;
    ``train``/``val``: ``Split`` with or without copies) with the site's tuning films among the children's
    (``SITE_SHARE_OF_CHILDREN``), then each threshold raised where the site's films need it
    (``site_factor``). The tail is taken over every site film the candidate may see, tuning and
    choosing: a dozen choosing films alone left 15% of a simulated site's held-out films above the
    feature gate while none of the dozen was."""
    train_images, train_labels = train.with_processed
    val_images, _ = val.with_processed
    site_inputs = np.r_[tuning.inputs, choosing.inputs]
    site_out = infer_batches(model, site_inputs)
    times = min(MAX_REPEATS, math.ceil(SITE_SHARE_OF_CHILDREN * len(train_images) / max(len(tuning), 1)
                                       / (1 - SITE_SHARE_OF_CHILDREN)))
    children = np.r_[train_images, repeated(tuning.inputs, times)]
    children_labels = np.r_[train_labels, np.tile(tuning.labels, times)]
    gate = fit_gate(infer_batches(model, children).features, children_labels,
                    children, infer_batches(model, val_images).features, val_images)
    gate.threshold *= site_factor(gate.scores(site_out.features, site_inputs))
    gate.rule += ("; raised where the site's films need it, to their mean plus three standard deviations or "
                  f"their {GATE_QUANTILE:.1%} quantile")
    population_gate = parent.population_gate
    if adult is not None:
        fit = np.flatnonzero(~adult.held_out())
        adult_images, adult_kinds = adult.films.subset(fit).with_processed
        population_gate = fit_population_head(model, children, val_images, adult_images, adult_kinds,
                                              children_labels)
        population_gate.threshold = min(0.9999, population_gate.threshold
                                        * site_factor(population_gate.assess(site_inputs, site_out.taps)[0]))
        population_gate.rule += "; raised the same way where the site's films need it"
    return gate, population_gate


def adapt(parent: Checkpoint, site_name: str, films: SiteFilms, held_out: np.ndarray, rest: np.ndarray,
          train, val, test, adult, *, threshold_only: bool = False, tune: str = "norm", steps: int = STEPS,
          seed: int = 0, replay_limit: int | None = None, patients: dict[str, str] | None = None,
          target: float | None = None) -> Checkpoint:
    """The site candidate: see the module's docstring. ``train``/``val``/``test``: the parent's own
    splits (``checkpoint_splits``); ``adult``: ``AdultFilms`` or None (the parent's population gate stays)."""
    started = time.perf_counter()
    rest_films = films.subset(rest)
    tune_index, choose_index = split_site(rest_films, groups_of(rest_films, patients or {}), CHOOSE_FRACTION, seed)
    tuning, choosing = rest_films.subset(tune_index), rest_films.subset(choose_index)
    if threshold_only:
        states = parent.state_dicts
    else:
        replay_images, replay_labels = train.with_processed  # as training saw them: as they are and processed
        if replay_limit is not None:
            replay_images, replay_labels = replay_images[:replay_limit], replay_labels[:replay_limit]
        states = fine_tune(parent, tuning, replay_images, replay_labels, tune, steps, seed)
        log.info("fine-tuned %s on %d site films with %d training views replayed (%d steps) in %.0f s",
                 tune, len(tuning), len(replay_images), steps, time.perf_counter() - started)
    model = dataclasses.replace(parent, state_dicts=states).model

    # The threshold. Weights kept: the site's sensitivity floor on every site film it may see. Weights
    # tuned: the recipe's sensitivity on the original validation films and the site's choosing films
    # together; the tuning brought the site's films to the original ones' scale, and a couple of dozen
    # choosing films alone set the threshold by their single lowest pneumonia film (100 films: site FPR 0.45).
    target = target or float(parent.training_data.get("recipe", {}).get("target_sensitivity", 0.98))
    chooser = rest_films if threshold_only else choosing
    site_logits = infer_batches(model, chooser.inputs).logits
    val_logits = infer_batches(model, val.images).logits
    calibration = fit_temperature(np.r_[val_logits, site_logits], np.r_[val.labels, chooser.labels])
    site_probabilities, val_probabilities = calibrate(site_logits, calibration), calibrate(val_logits, calibration)
    site_threshold = threshold_for_sensitivity(chooser.labels, site_probabilities, SITE_MIN_SENSITIVITY)
    val_threshold = threshold_for_sensitivity(val.labels, val_probabilities, target)
    pooled_threshold = threshold_for_sensitivity(np.r_[val.labels, chooser.labels],
                                                 np.r_[val_probabilities, site_probabilities], target)
    threshold = site_threshold if threshold_only else pooled_threshold

    gate, population_gate = site_gates(model, parent, train, val, tuning, choosing, adult)
    created = dt.datetime.now(dt.UTC)
    site_record = {
        "name": site_name, "parent": parent.version, "films": len(films), "threshold_only": threshold_only,
        "tune": None if threshold_only else tune, "steps": 0 if threshold_only else steps, "seed": seed,
        "held_out_fraction": HELD_OUT_FRACTION,
        "thresholds": {"site": site_threshold, "validation": val_threshold, "pooled": pooled_threshold,
                       "chosen": threshold, "site_sensitivity": SITE_MIN_SENSITIVITY, "target_sensitivity": target},
        "fit": {**rest_films.summary(), "sha256": rest_films.sha256, "pixels": rest_films.pixels},
        "held_out": {**films.subset(held_out).summary(), "files": [films.files[i] for i in held_out],
                     "sha256": [films.sha256[i] for i in held_out], "pixels": [films.pixels[i] for i in held_out]},
    }
    candidate = dataclasses.replace(
        parent, state_dicts=states, threshold=threshold, calibration=calibration, gate=gate,
        population_gate=population_gate,
        created_at=created.isoformat(timespec="seconds"),
        threshold_rule=(f"the score that keeps {target:.0%} of the pneumonia films above it among the original "
                        f"validation split's and the site's ({site_name}) films set apart from those it tuned on"
                        if not threshold_only else
                        f"the score that keeps {SITE_MIN_SENSITIVITY:.0%} of the site's pneumonia films "
                        f"({site_name}) above it"),
        training_data={**parent.training_data, "site": site_record},
    )
    candidate.version = candidate.content_version(created)
    predictor = Predictor(candidate)
    held = films.subset(held_out)
    metrics = {k: v for k, v in parent.metrics.items() if k not in ("site_shift", "validation", "test")}
    metrics.update({"validation": evaluate(predictor, val), "test": evaluate(predictor, test),
                    **transformer_figures(predictor, test)})
    if adult is not None:
        metrics["population_gate"] = population_figures(predictor, gate_sets(val, test, adult))
    probabilities, refusals = answers(predictor, held)
    metrics["site"] = {"name": site_name, "held_out": local_validation(held.labels, probabilities, threshold, refusals),
                       "reference": [round(float(p), 5) for p, r in zip(probabilities, refusals) if not r]}
    candidate.metrics = metrics
    log.info("adapted in %.0f s", time.perf_counter() - started)
    return candidate


# ---- the command ------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=model_store_dir(), help="the model store (PNEUMONIA_MODEL_STORE)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="decoding threads")
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("report", help="the serving model's figures on the site's confirmed films")
    rep.add_argument("--films", type=Path, required=True,
                     help="NORMAL/ and PNEUMONIA/ folders; with --cases, the folder of exported films")
    rep.add_argument("--cases", action="store_true", help="labels from the case record's overreads")
    rep.add_argument("--database", default=None, help="the case record (default: DATABASE_URL, as the app)")
    rep.add_argument("--version", default=None, help="a stored version instead of the serving one")
    rep.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint file instead of the store")
    rep.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ada = commands.add_parser("adapt", help="a site-adapted candidate, from the serving model")
    ada.add_argument("--films", type=Path, required=True, help="the site's confirmed films: NORMAL/ and PNEUMONIA/")
    ada.add_argument("--site", required=True, help="the site's name, as the history will show it")
    ada.add_argument("--patients", type=Path, default=None,
                     help="CSV with file and patient columns: a patient's films stay on one side of the held-out split")
    ada.add_argument("--threshold-only", action="store_true", help="keep the weights; move the threshold and gates")
    ada.add_argument("--tune", choices=TUNE_CHOICES, default="norm",
                     help="what the fine-tuning moves: the normalisation layers and head, every weight, the head")
    ada.add_argument("--steps", type=int, default=STEPS, help="fine-tuning steps")
    ada.add_argument("--seed", type=int, default=0)
    ada.add_argument("--version", default=None, help="the parent: a stored version (default: the serving one)")
    ada.add_argument("--data", type=Path, default=data_dir(), help="the original dataset, replayed and re-measured")
    ada.add_argument("--adult-data", type=Path, default=adult_data_dir())
    ada.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    ada.add_argument("--replay-limit", type=int, default=None, help=argparse.SUPPRESS)  # tests: fewer replayed films
    return parser


def serving_checkpoint(args, store: ModelStore) -> Checkpoint:
    if getattr(args, "checkpoint", None):
        return load_checkpoint(args.checkpoint)
    store.ensure_seeded(DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT)
    return store.load(args.version or store.serving_version())


def cmd_report(args, store: ModelStore) -> int:
    started = time.perf_counter()
    checkpoint = serving_checkpoint(args, store)
    predictor = Predictor(checkpoint)
    if args.cases:
        url = args.database or database_url()
        films, counts = films_from_record(args.films, overread_labels(url), checkpoint.preprocess, args.workers)
        source = (f"{len(films)} exported films with a clinician's read ({counts['uncertain']} uncertain reads "
                  f"left out, {counts['no_overread']} films without a read, {counts['overread_not_exported']} "
                  "reads whose film is not in the folder)")
    else:
        films, counts = read_films(labelled_files(args.films), args.films, checkpoint.preprocess, args.workers), {}
        source = f"{args.films} ({len(films)} films)"
    found = report(predictor, films)
    found["unreadable"] = films.skipped
    found["left_out"] = counts
    print(format_report(found, source))
    if films.skipped:
        print(f"{len(films.skipped)} files could not be read and are not counted")
    if args.json:
        args.json.write_text(json.dumps(found, indent=1))
    log.info("report in %.1f s", time.perf_counter() - started)
    return 0


def cmd_adapt(args, store: ModelStore) -> int:
    started = time.perf_counter()
    if args.steps < 1:
        log.error("--steps must be at least 1")
        return 2
    parent = serving_checkpoint(args, store)
    films = read_films(labelled_files(args.films), args.films, parent.preprocess, args.workers)
    patients = patient_map(args.patients)
    groups = groups_of(films, patients)
    rest, held_out = split_site(films, groups, HELD_OUT_FRACTION, args.seed)
    log.info("site %s: %d films; %d held out for the guard (%d patients or duplicate groups)", args.site, len(films),
             len(held_out), len({groups[i] for i in held_out}))
    copies = processed_copies(parent.training_data)  # as the parent's gates saw
    train, val, test = checkpoint_splits(parent.training_data, args.data, parent.preprocess, args.cache_dir,
                                         args.workers, progress=False, processed=copies)
    try:
        adult = load_adult_films(args.adult_data, parent.preprocess, args.cache_dir, args.workers, progress=False,
                                 processed=copies)
    except DatasetError as exc:
        log.warning("%s: the parent's population gate is kept as it is", exc)
        adult = None
    candidate = adapt(parent, args.site, films, held_out, rest, train, val, test, adult,
                      threshold_only=args.threshold_only, tune=args.tune, steps=args.steps, seed=args.seed,
                      replay_limit=args.replay_limit, patients=patients)
    add_to_store(store, candidate, source=f"site {args.site}, adapted from {parent.version}")
    site = candidate.metrics["site"]["held_out"]
    print(f"site {args.site}: {len(films)} films, {site['films']} held out; on them, at threshold "
          f"{candidate.threshold:.4f}: sensitivity {_share(site['sensitivity'])}, false-positive rate "
          f"{_share(site['false_positive_rate'])}, refused {site['refused']['value']:.1%}")
    test_figures = candidate.metrics["test"]
    print(f"original test split: AUC {test_figures['auc']:.4f}, sensitivity {test_figures['sensitivity']:.3f}, "
          f"false-positive rate {test_figures['false_positive_rate']:.3f}")
    print(f"adapted in {time.perf_counter() - started:.0f} s. Nothing served has changed. To serve it: "
          f"python -m training.store promote {candidate.version} --site-films {args.films}")
    print(f"version {candidate.version}")
    return 0


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    store = ModelStore(args.store)
    try:
        return cmd_report(args, store) if args.command == "report" else cmd_adapt(args, store)
    except (DatasetError, StoreError, CheckpointError) as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("could not %s: %s%s", args.command, exc.strerror or type(exc).__name__,
                  f" ({exc.filename})" if exc.filename else "")
        return 2


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
