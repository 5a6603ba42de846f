"""Train the STN+CNN, choose the operating threshold on validation, evaluate once on test.

    python -m training.train --data ../shared/data/chest_xray

The result is a new candidate in the model store (``PNEUMONIA_MODEL_STORE``): it
changes nothing that is served until ``python -m training.store promote VERSION``
passes the promotion guard. ``--out FILE`` writes a checkpoint file instead, for
experiments (never the bundled one). Files are written atomically at the end, and
only then; a lock keeps two runs from writing into the same place at once.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.nn import functional as F
from tqdm import tqdm

from model import (
    Checkpoint,
    Ensemble,
    NetworkConfig,
    PneumoniaNet,
    Predictor,
    PreprocessParams,
    calibrate,
    for_inference,
    infer_batches,
    save_checkpoint,
)
from model.atomic import atomic_write
from model.settings import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CHECKPOINT,
    DEFAULT_TSNE_ARTIFACT,
    adult_data_dir,
    data_dir,
    model_store_dir,
)
from model.store import ModelStore, StoreError

from .augment import augment, random_affine, then, tighter_framing
from .calibrate import fit_temperature
from .data import HELD_OUT_FRACTION, AdultFilms, DatasetError, Split, load_adult_films, load_split, validation_split
from .evaluate import evaluate, transformer_figures
from .gate import fit_gate
from .metrics import format_table, roc_auc, threshold_for_sensitivity
from .onnx_export import add_to_store, save_beside
from .population import fit_on_splits, format_gate_table, gate_sets, population_figures
from .recipe import Recipe

log = logging.getLogger("training")

#: A dry run trains on this many batches an epoch: enough to exercise every step.
DRY_RUN_BATCHES = 3


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_dir(),
                        help="dataset folder (train|val|test/NORMAL|PNEUMONIA)")
    parser.add_argument("--store", type=Path, default=model_store_dir(), help="model store to add the candidate to")
    parser.add_argument("--out", type=Path, default=None,
                        help="write a checkpoint file (and FILE.metrics.json) instead of a store candidate")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--geometry", choices=("squash", "center_crop"), default=PreprocessParams().geometry)
    parser.add_argument("--equalize", choices=("none", "hist", "clahe"), default=PreprocessParams().equalize)
    parser.add_argument("--adult-data", type=Path, default=adult_data_dir(),
                        help="adult frontal and lateral films that the population gate learns to refuse")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    Recipe.add_arguments(parser)
    return parser


def train_one_epoch(model, optimizer, scheduler, split: Split, recipe: Recipe, generator, device, pos_weight,
                    bar) -> float:
    """One pass over the (shuffled, augmented) training images; returns the mean loss."""
    model.train()
    order = torch.randperm(len(split), generator=generator)
    images = torch.from_numpy(split.images).unsqueeze(1)
    labels = torch.from_numpy(split.labels).float()
    processed = None if split.processed is None or not recipe.processed_share else torch.from_numpy(split.processed)
    views, films = recipe.views, recipe.films_per_batch
    batches = [order[i : i + films] for i in range(0, len(order), films)]
    if recipe.dry_run:
        batches = batches[:DRY_RUN_BATCHES]
    total, count = 0.0, 0
    for index in batches:
        if len(index) < 2:  # BatchNorm needs two samples
            continue
        batch, warps = [], []
        for _ in range(views):
            view, cut = framed(view_of(images, processed, index, recipe.processed_share, generator),
                               labels[index], recipe, generator)
            affine = random_affine(len(index), generator, recipe.augment_strength, recipe.zoom_strength)
            batch.append(augment(view, generator, recipe.augment_strength, recipe.zoom_strength,
                                 recipe.bias_field, affine=affine))
            if recipe.stn_equivariance:  # where the view's pixels lie on the film
                warps.append(affine if cut is None else then(cut, affine))
        x = torch.cat(batch).to(device)
        y = labels[index].repeat(views).to(device)
        out = model.infer(x) if recipe.stn_equivariance else None  # the spatial transforms as well
        logits = model(x) if out is None else out.logits
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        if views == 2:
            first, second = logits.view(2, -1)
            loss = loss + recipe.consistency * (first - second).pow(2).mean()
            if out is not None:  # where each view's aligned image lies on the film: the same place for both
                first, second = then(torch.cat(warps).to(device), out.theta).view(2, -1, 2, 3)
                loss = loss + recipe.stn_equivariance * (first - second).pow(2).sum(dim=(1, 2)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(index)
        count += len(index)
        bar.update(1)
        bar.set_postfix_str(f"loss {total / count:.4f}", refresh=False)
    return total / max(count, 1)


def framed(view: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The view with half its normal films framed tighter (``recipe.framing_cut``), and the cut's
    warps; off: the view unchanged and None, with no random draw, so a recipe without it trains
    as before."""
    if not recipe.framing_cut:
        return view, None
    chosen = (labels == 0) & (torch.rand(len(labels), generator=generator) < 0.5)
    return tighter_framing(view, chosen, recipe.framing_cut, generator)


def view_of(images: torch.Tensor, processed: torch.Tensor | None, index: torch.Tensor, share: float,
            generator: torch.Generator) -> torch.Tensor:
    """(n, 1, S, S): the films ``index`` as they are, each replaced by one of its processed copies
    with probability ``share`` (each view draws on its own, so the consistency penalty compares
    a film under two processings as well as two framings)."""
    view = images[index]
    if processed is None:
        return view
    swap = torch.rand(len(index), generator=generator) < share
    copy = torch.randint(len(processed), (len(index),), generator=generator)
    if swap.any():
        view = view.clone()
        view[swap, 0] = processed[copy[swap], index[swap]]
    return view


def learning_rate_schedule(optimizer, recipe: Recipe, steps_per_epoch: int):
    """One cycle over all epochs; the spatial transformer's group at its own share of the rate."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[recipe.lr, recipe.lr * recipe.stn_lr_scale], epochs=recipe.epochs,
        steps_per_epoch=steps_per_epoch, pct_start=0.2
    )


def train_member(recipe: Recipe, member: int, train: Split, val: Split, device) -> tuple[PneumoniaNet, dict]:
    """Train one network and keep the mean weights of its last epochs (``recipe.average_epochs``)."""
    seed = recipe.seed + 1000 * member
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = NetworkConfig(input_size=train.images.shape[-1], channels=recipe.channels, stn=recipe.stn)
    # Channels-last: oneDNN's training convolutions (forward and backward) run faster so on a CPU.
    model = PneumoniaNet(config).to(device, memory_format=torch.channels_last)
    stn = [p for name, p in model.named_parameters() if name.startswith("stn.")]
    rest = [p for name, p in model.named_parameters() if not name.startswith("stn.")]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": recipe.lr},
                                   {"params": stn, "lr": recipe.lr * recipe.stn_lr_scale}],
                                  lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-len(train) // recipe.films_per_batch)
    if recipe.dry_run:
        steps_per_epoch = min(steps_per_epoch, DRY_RUN_BATCHES)
    scheduler = learning_rate_schedule(optimizer, recipe, steps_per_epoch)
    positives = float(train.labels.sum())
    pos_weight = torch.tensor((len(train) - positives) / max(positives, 1.0), device=device)
    best_auc, best_epoch, history = -1.0, 0, []
    averaged = torch.optim.swa_utils.AveragedModel(model)
    bar = tqdm(
        total=recipe.epochs * steps_per_epoch,
        desc=f"member {member + 1}/{recipe.members}",
        unit="batch",
        mininterval=0.5 if sys.stderr.isatty() else 30,
    )
    for epoch in range(recipe.epochs):
        loss = train_one_epoch(model, optimizer, scheduler, train, recipe, generator, device, pos_weight, bar)
        # Raw logits rank as the calibrated probabilities will (calibration is monotonic).
        val_auc = roc_auc(val.labels, infer_batches(model, val.images, device=device).logits)
        history.append({"epoch": epoch + 1, "loss": round(loss, 5), "val_auc": round(val_auc, 5)})
        if val_auc > best_auc:
            best_auc, best_epoch = val_auc, epoch + 1
        if epoch >= recipe.epochs - recipe.average_epochs:
            averaged.update_parameters(model)
        bar.set_postfix_str(f"loss {loss:.4f} val AUC {val_auc:.4f} (best {best_auc:.4f} @ {best_epoch})")
    bar.close()
    info = {"seed": seed, "best_epoch": best_epoch, "best_val_auc": best_auc, "history": history}
    images = torch.from_numpy(train.images).unsqueeze(1)
    batches = [images[i : i + 256].to(device) for i in range(0, len(images), 256)]
    torch.optim.swa_utils.update_bn(batches, averaged)  # the averaged weights need their own BN statistics
    model.load_state_dict(averaged.module.state_dict())
    info["averaged_epochs"] = min(recipe.average_epochs, recipe.epochs)
    info["averaged_val_auc"] = roc_auc(val.labels, infer_batches(model, val.images, device=device).logits)
    return model.cpu().eval(), stn_spread(model.cpu(), val, info)


def stn_spread(model: PneumoniaNet, val: Split, info: dict) -> dict:
    """Record how much the transform varies between validation films: near 0 means the
    spatial transformer applies one fixed warp to every film (its localisation net died)."""
    theta = infer_batches(model, val.images).theta.reshape(len(val), -1)
    info["stn_theta_spread"] = float(theta.std(axis=0).mean()) if len(theta) > 1 else 0.0
    log.info("spatial transformer: transform parameters vary by %.4f (mean std) between validation films",
             info["stn_theta_spread"])
    return info


def fit_operating_point(model: Ensemble, train: Split, val: Split, target_sensitivity: float):
    """Calibration and threshold from validation; the out-of-population gate from train (+ validation
    quantiles), with the processed copies of both, so that a site's processing is not out of population."""
    val_out = infer_batches(model, val.images)
    calibration = fit_temperature(val_out.logits, val.labels)
    threshold = threshold_for_sensitivity(val.labels, calibrate(val_out.logits, calibration), target_sensitivity)
    train_images, train_labels = train.with_processed
    val_images, _ = val.with_processed
    train_features = infer_batches(model, train_images).features
    val_features = infer_batches(model, val_images).features
    gate = fit_gate(train_features, train_labels, train_images, val_features, val_images)
    return calibration, gate, threshold


def attach_population_gate(args, recipe: Recipe, checkpoint: Checkpoint, train: Split, val: Split,
                           params) -> AdultFilms | None:
    """Attach the population head, fitted on adult films of 60% of their patients; None without them."""
    try:
        adult = load_adult_films(args.adult_data, params, args.cache_dir, args.workers,
                                 limit=24 if recipe.dry_run else None, processed=recipe.processed_copies)
    except DatasetError as exc:
        log.warning("%s: this model gets no population gate, and the promotion guard will refuse it", exc)
        return None
    fit = ~adult.held_out()
    checkpoint.population_gate = fit_on_splits(checkpoint.model, train, val, adult)
    checkpoint.training_data["population_gate"] = {
        "kind": "head", "adult_films": str(Path(args.adult_data).resolve().name),
        "fitted_on_patients": int(len(np.unique(adult.patients[fit]))), "held_out_fraction": HELD_OUT_FRACTION}
    return adult


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda was asked for, but no CUDA device is available")
        return 2
    if args.out is not None and args.out.resolve() == DEFAULT_CHECKPOINT.resolve():
        log.error("%s is the bundled checkpoint, which no command writes: train into the store "
                  "(no --out) or name another file", args.out)
        return 2
    if args.stn_equivariance and not args.consistency:
        log.error("--stn-equivariance compares the two views that --consistency trains on: give it a weight too")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.out is None:
        store = ModelStore(args.store)
        lock_path = store.root / ".train.lock"
    else:
        store = None
        lock_path = Path(str(args.out) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.error("another training run is writing to %s (lock %s); try again when it ends", args.out or args.store,
                  lock_path)
        return 3
    try:
        if store is not None:
            store.ensure_seeded(DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT)
        return _run(args, Recipe.from_args(args), device, store)
    except (DatasetError, StoreError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        lock.release()


def _run(args, recipe: Recipe, device, store: ModelStore | None) -> int:
    started = time.perf_counter()
    params = PreprocessParams(geometry=args.geometry, equalize=args.equalize)
    limit = 48 if recipe.dry_run else None
    full = load_split(args.data, "train", params, args.cache_dir, args.workers, limit=limit,
                      processed=recipe.processed_copies)
    test = load_split(args.data, "test", params, args.cache_dir, args.workers, limit=limit)
    train_index, val_index = validation_split(full.files, full.labels, recipe.val_fraction, recipe.seed)
    train, val = full.subset(train_index), full.subset(val_index)
    log.info("train %s | validation %s | test %s", train.summary(), val.summary(), test.summary())

    members, member_logs = [], []
    for member in range(recipe.members):
        net, info = train_member(recipe, member, train, val, device)
        members.append(net)
        member_logs.append(info)
    # The operating point is fitted on the network as it will serve (``Checkpoint.model``).
    served = for_inference(Ensemble(members))
    calibration, gate, threshold = fit_operating_point(served, train, val, recipe.target_sensitivity)
    state_dicts = [m.state_dict() for m in members]
    created = dt.datetime.now(dt.UTC)
    checkpoint = Checkpoint(
        network=members[0].config,
        preprocess=params,
        state_dicts=state_dicts,
        threshold=threshold,
        threshold_rule=(
            f"lowest score among the top {recipe.target_sensitivity:.0%} of validation pneumonia cases "
            f"(target sensitivity {recipe.target_sensitivity}, chosen on validation, never on test)"
        ),
        version="",
        created_at=created.isoformat(timespec="seconds"),
        training_data={
            "dataset": str(Path(args.data).resolve().name),
            "train": train.summary(),
            "validation": val.summary(),
            "test": test.summary(),
            "validation_rule": f"{recipe.val_fraction:.0%} of train/ patients, stratified, grouped by patient",
            "validation_split": {"fraction": recipe.val_fraction, "seed": recipe.seed},
            "epochs": recipe.epochs,
            "members": member_logs,
            "seed": recipe.seed,
            "recipe": recipe.record(),
            "dry_run": recipe.dry_run,
        },
        calibration=calibration,
        gate=gate,
    )
    adult = attach_population_gate(args, recipe, checkpoint, train, val, params)
    checkpoint.version = checkpoint.content_version(created)
    predictor = Predictor(checkpoint)
    results = {"validation": evaluate(predictor, val), "test": evaluate(predictor, test)}
    checkpoint.metrics = dict(results)
    checkpoint.metrics.update(transformer_figures(predictor, test))
    if adult is not None:
        checkpoint.metrics["population_gate"] = population_figures(predictor, gate_sets(val, test, adult))
    if store is None:
        save_checkpoint(checkpoint, args.out)
        save_beside(checkpoint, args.out)
        metrics_path = args.out.with_suffix(".metrics.json")
        with atomic_write(metrics_path) as handle:
            record = {"version": checkpoint.version, "threshold": threshold, **results}
            handle.write(json.dumps(record, indent=2).encode())
        written = f"{args.out} and {metrics_path}"
    else:
        written = f"candidate {checkpoint.version}{' (dry run)' if recipe.dry_run else ''} into the store {store.root}"
        add_to_store(store, checkpoint)
    print(format_table(results))
    print(f"threshold {threshold:.4f} ({recipe.target_sensitivity} target sensitivity on validation); "
          f"calibration T={calibration['temperature']:.3f} b={calibration['bias']:.3f}; "
          f"ECE validation {results['validation']['calibration']['ece']:.4f}, "
          f"test {results['test']['calibration']['ece']:.4f}; "
          f"out-of-population flagged: validation {results['validation']['ood_flagged']:.1%}, "
          f"test {results['test']['ood_flagged']:.1%}")
    if "population_gate" in checkpoint.metrics:
        print(format_gate_table(checkpoint.metrics["population_gate"]))
    print(f"wrote {written} in {time.perf_counter() - started:.0f} s")
    print(f"version {checkpoint.version}")
    if recipe.dry_run:
        print("This is a dry run: it checks the pipeline and can never be served.")
    elif store is not None:
        print(f"Nothing served has changed. To serve it: python -m training.store promote {checkpoint.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
