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
import copy
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

from .augment import augment
from .calibrate import fit_temperature
from .data import HELD_OUT_FRACTION, AdultFilms, DatasetError, Split, load_adult_films, load_split, validation_split
from .evaluate import evaluate, transformer_figures
from .gate import fit_gate
from .metrics import format_table, roc_auc, threshold_for_sensitivity
from .population import fit_population, format_gate_table, gate_sets, population_figures

log = logging.getLogger("training")

#: A dry run trains on this many batches an epoch: enough to exercise every step.
DRY_RUN_BATCHES = 3


def number_from(low: float, high: float, wanted: str):
    """An argparse type: a number with low <= x < high, else a usage error that says ``wanted``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")  # fails the check below
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}")
        return value
    return parse


#: --label-smoothing: 0 (off) up to, not including, 1 (every target 0.5).
smoothing_amount = number_from(0, 1, "a number from 0 up to (not including) 1")
#: --bias-field and --consistency: 0 (off) or more.
off_or_amount = number_from(0, float("inf"), "a number, 0 (off) or more")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_dir(), help="dataset folder (train|val|test/NORMAL|PNEUMONIA)")
    parser.add_argument("--store", type=Path, default=model_store_dir(), help="model store to add the candidate to")
    parser.add_argument("--out", type=Path, default=None,
                        help="write a checkpoint file (and FILE.metrics.json) instead of a store candidate")
    parser.add_argument("--epochs", type=int, default=15,
                        help="passes over the training films (with --consistency each pass shows every film twice)")
    parser.add_argument("--members", type=int, default=1, help="networks in the ensemble, each from its own seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.15, help="share of train/ patients held out")
    parser.add_argument("--select", choices=("best", "average"), default="average",
                        help="best: the epoch with the best validation AUC; average: the mean weights of the "
                             "last --average-epochs epochs (batch-norm statistics recomputed)")
    parser.add_argument("--average-epochs", type=int, default=3)
    parser.add_argument("--swa-lr", type=float, default=0.0,
                        help="with --select average: the last --average-epochs epochs run at this constant "
                             "learning rate (stochastic weight averaging, Izmailov et al. 2018) after a one-cycle "
                             "schedule over the epochs before them; 0: one cycle over all epochs")
    parser.add_argument("--mixup", type=float, default=0.0,
                        help="mixup's Beta(a, a) parameter (0: off): mixes pairs of films and their labels")
    parser.add_argument("--label-smoothing", type=smoothing_amount, default=0.0,
                        help="train towards eps/2 and 1 - eps/2 instead of 0 and 1 (0: off); a remedy for "
                             "mislabelled training films")
    parser.add_argument("--augment-strength", type=float, default=1.5,
                        help="scales every augmentation's range (1.5: the recipe measured on three seeds, README)")
    parser.add_argument("--zoom-strength", type=float, default=2.5,
                        help="scales the zoom and aspect ranges alone (2.5: zooms of ±25%%, aspect ±20%%; the squash "
                             "to a square imprints each film's aspect ratio, which differs between the classes: README)")
    parser.add_argument("--bias-field", type=off_or_amount, default=0.3,
                        help="multiply training films by a smooth random intensity field of this strength "
                             "(0: off; training/augment.py): exposure that varies across a film changes no "
                             "diagnosis, and without it a mild field moves validation normals towards pneumonia (README)")
    parser.add_argument("--consistency", type=off_or_amount, default=0.1,
                        help="two augmented views of each film in a batch (half as many films a step, twice the "
                             "steps an epoch) and this weight on the squared difference of their logits (0: one "
                             "view, no penalty): a diagnosis does not depend on how the film was framed (README)")
    parser.add_argument("--stn-lr-scale", type=float, default=0.1,
                        help="the spatial transformer's learning rate as a share of --lr (at 1 its "
                             "localisation net died in every run measured: one fixed warp for all films)")
    parser.add_argument("--channels", type=int, nargs="+", default=list(NetworkConfig().channels),
                        help="the classifier's convolution widths, one block each")
    parser.add_argument("--no-stn", dest="stn", action="store_false",
                        help="hold the spatial transform at the identity (ablation)")
    parser.add_argument("--target-sensitivity", type=float, default=0.98, help="threshold is set for this on validation")
    parser.add_argument("--geometry", choices=("squash", "center_crop"), default=PreprocessParams().geometry)
    parser.add_argument("--equalize", choices=("none", "hist", "clahe"), default=PreprocessParams().equalize)
    parser.add_argument("--adult-data", type=Path, default=adult_data_dir(),
                        help="adult frontal and lateral films that the population gate learns to refuse")
    parser.add_argument("--population-gate", choices=("head", "networks"), default="head",
                        help="a head on the network's activations, or small networks of its own")
    parser.add_argument("--population-epochs", type=int, default=15, help="--population-gate networks only")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument("--dry-run", action="store_true", help="a few images and batches: checks the pipeline (CI)")
    return parser


def train_one_epoch(model, optimizer, scheduler, split: Split, args, generator, device, pos_weight, bar) -> float:
    """One pass over the (shuffled, augmented) training images; returns the mean loss."""
    model.train()
    order = torch.randperm(len(split), generator=generator)
    images = torch.from_numpy(split.images).unsqueeze(1)
    labels = torch.from_numpy(split.labels).float()
    views, films = batch_layout(args)
    batches = [order[i : i + films] for i in range(0, len(order), films)]
    if args.dry_run:
        batches = batches[:DRY_RUN_BATCHES]
    total, count = 0.0, 0
    for index in batches:
        if len(index) < 2:  # BatchNorm needs two samples
            continue
        x = torch.cat([augment(images[index], generator, args.augment_strength, args.zoom_strength, args.bias_field)
                       for _ in range(views)]).to(device)
        y = labels[index].repeat(views).to(device)
        if args.mixup > 0:
            x, y = mixup(x, y, args.mixup, generator)
        if args.label_smoothing > 0:
            y = smooth_labels(y, args.label_smoothing)
        logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        if views == 2:
            first, second = logits.view(2, -1)
            loss = loss + args.consistency * (first - second).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(index)
        count += len(index)
        bar.update(1)
        bar.set_postfix_str(f"loss {total / count:.4f}", refresh=False)
    return total / max(count, 1)


def batch_layout(args) -> tuple[int, int]:
    """(views of each film, films) in a batch of --batch-size images."""
    views = 2 if args.consistency > 0 else 1
    return views, max(args.batch_size // views, 1)


def smooth_labels(y: torch.Tensor, eps: float) -> torch.Tensor:
    """Targets eps/2 and 1 - eps/2: a confidently wrong label can pull the logits only so far."""
    return y * (1 - eps) + eps / 2


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator):
    """Blend each film with another of the batch, labels alike (Zhang et al. 2018): softer decision edges."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())  # global RNG, seeded per member
    lam = max(lam, 1 - lam)  # the first film dominates
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def learning_rate_schedule(optimizer, args, steps_per_epoch: int):
    """One cycle over all epochs; with ``--swa-lr``, one cycle over all but the averaged
    epochs, then a constant rate while the weights are averaged (SWA: the mean of weights
    from a wide stretch of the loss surface, rather than from where one cycle came to rest)."""
    scale = [1.0, args.stn_lr_scale]
    averaged = min(args.average_epochs, args.epochs - 1) if args.swa_lr > 0 and args.select == "average" else 0
    cycle = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[args.lr * k for k in scale], epochs=args.epochs - averaged,
        steps_per_epoch=steps_per_epoch, pct_start=0.2
    )
    if not averaged:
        return cycle
    return CycleThenConstant(optimizer, cycle, [args.swa_lr * k for k in scale],
                             switch=(args.epochs - averaged) * steps_per_epoch, climb=steps_per_epoch)


class CycleThenConstant:
    """``cycle`` for ``switch`` steps, then a linear climb over ``climb`` steps to ``rates`` (one per
    parameter group), held there. Stepped once a batch, as OneCycleLR is."""

    def __init__(self, optimizer, cycle, rates: list[float], switch: int, climb: int):
        self.optimizer, self.cycle, self.rates, self.switch, self.climb = optimizer, cycle, rates, switch, climb
        self.steps, self.start = 0, None

    def step(self) -> None:
        self.steps += 1
        if self.steps < self.switch:
            self.cycle.step()
            return
        if self.start is None:
            self.start = [group["lr"] for group in self.optimizer.param_groups]
        t = min(1.0, (self.steps - self.switch + 1) / self.climb)
        for group, start, rate in zip(self.optimizer.param_groups, self.start, self.rates):
            group["lr"] = start + t * (rate - start)


def train_member(args, member: int, train: Split, val: Split, device) -> tuple[PneumoniaNet, dict]:
    """Train one network; keep the epoch with the best validation AUC, or average the last epochs."""
    seed = args.seed + 1000 * member
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # Channels-last: oneDNN's training convolutions (forward and backward) run about 30% faster so on a CPU.
    model = PneumoniaNet(NetworkConfig(input_size=train.images.shape[-1], channels=tuple(args.channels), stn=args.stn))
    model = model.to(device, memory_format=torch.channels_last)
    stn = [p for name, p in model.named_parameters() if name.startswith("stn.")]
    rest = [p for name, p in model.named_parameters() if not name.startswith("stn.")]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": args.lr},
                                   {"params": stn, "lr": args.lr * args.stn_lr_scale}],
                                  lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(train) // batch_layout(args)[1])
    if args.dry_run:
        steps_per_epoch = min(steps_per_epoch, DRY_RUN_BATCHES)
    scheduler = learning_rate_schedule(optimizer, args, steps_per_epoch)
    positives = float(train.labels.sum())
    pos_weight = torch.tensor((len(train) - positives) / max(positives, 1.0), device=device)
    best_auc, best_state, best_epoch = -1.0, None, 0
    history = []
    averaged = torch.optim.swa_utils.AveragedModel(model) if args.select == "average" else None
    bar = tqdm(
        total=args.epochs * steps_per_epoch,
        desc=f"member {member + 1}/{args.members}",
        unit="batch",
        mininterval=0.5 if sys.stderr.isatty() else 30,
    )
    for epoch in range(args.epochs):
        loss = train_one_epoch(model, optimizer, scheduler, train, args, generator, device, pos_weight, bar)
        # Raw logits rank as the calibrated probabilities will (calibration is monotonic).
        val_auc = roc_auc(val.labels, infer_batches(model, val.images, device=device).logits)
        history.append({"epoch": epoch + 1, "loss": round(loss, 5), "val_auc": round(val_auc, 5)})
        if val_auc > best_auc or best_state is None:
            best_auc, best_epoch = val_auc, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        if averaged is not None and epoch >= args.epochs - args.average_epochs:
            averaged.update_parameters(model)
        bar.set_postfix_str(f"loss {loss:.4f} val AUC {val_auc:.4f} (best {best_auc:.4f} @ {best_epoch})")
    bar.close()
    info = {"seed": seed, "best_epoch": best_epoch, "best_val_auc": best_auc, "history": history, "select": args.select}
    if averaged is None:
        model.load_state_dict(best_state)
        return model.cpu().eval(), stn_spread(model, val, info)
    images = torch.from_numpy(train.images).unsqueeze(1)
    batches = [images[i : i + 256].to(device) for i in range(0, len(images), 256)]
    torch.optim.swa_utils.update_bn(batches, averaged)  # the averaged weights need their own BN statistics
    model.load_state_dict(averaged.module.state_dict())
    info["averaged_epochs"] = min(args.average_epochs, args.epochs)
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
    """Calibration and threshold from validation; the out-of-population gate from train (+ validation quantiles)."""
    train_features = infer_batches(model, train.images).features
    val_out = infer_batches(model, val.images)
    val_logits, val_features = val_out.logits, val_out.features
    calibration = fit_temperature(val_logits, val.labels)
    gate = fit_gate(train_features, train.labels, train.images, val_features, val.images)
    threshold = threshold_for_sensitivity(val.labels, calibrate(val_logits, calibration), target_sensitivity)
    return calibration, gate, threshold


def attach_population_gate(args, checkpoint: Checkpoint, train: Split, val: Split, params) -> AdultFilms | None:
    """Attach the population gate, fitted on adult films of 60% of their patients; None without them."""
    try:
        adult = load_adult_films(args.adult_data, params, args.cache_dir, args.workers,
                                 limit=24 if args.dry_run else None)
    except DatasetError as exc:
        log.warning("%s: this model gets no population gate, and the promotion guard will refuse it", exc)
        return None
    fit = ~adult.held_out()
    checkpoint.population_gate = fit_population(
        args.population_gate, checkpoint.model, train.images, val.images, adult.films.images[fit],
        adult.films.labels[fit], epochs=1 if args.dry_run else args.population_epochs,
        max_batches=DRY_RUN_BATCHES if args.dry_run else None)
    checkpoint.training_data["population_gate"] = {
        "kind": args.population_gate, "adult_films": str(Path(args.adult_data).resolve().name),
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
    if args.mixup > 0 and args.consistency > 0:
        log.error("--mixup and --consistency do not go together: mixup blends the two views of a film with "
                  "different partners, so they could no longer be compared; choose one (--consistency 0 turns it off)")
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
        return _run(args, device, store)
    except (DatasetError, StoreError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        lock.release()


def _run(args, device, store: ModelStore | None) -> int:
    started = time.perf_counter()
    params = PreprocessParams(geometry=args.geometry, equalize=args.equalize)
    limit = 48 if args.dry_run else None
    full = load_split(args.data, "train", params, args.cache_dir, args.workers, limit=limit)
    test = load_split(args.data, "test", params, args.cache_dir, args.workers, limit=limit)
    train_index, val_index = validation_split(full.files, full.labels, args.val_fraction, args.seed)
    train, val = full.subset(train_index), full.subset(val_index)
    log.info("train %s | validation %s | test %s", train.summary(), val.summary(), test.summary())

    members, member_logs = [], []
    for member in range(args.members):
        net, info = train_member(args, member, train, val, device)
        members.append(net)
        member_logs.append(info)
    # The operating point is fitted on the network as it will serve (``Checkpoint.model``).
    served = for_inference(Ensemble(members))
    calibration, gate, threshold = fit_operating_point(served, train, val, args.target_sensitivity)
    state_dicts = [m.state_dict() for m in members]
    created = dt.datetime.now(dt.timezone.utc)
    checkpoint = Checkpoint(
        network=members[0].config,
        preprocess=params,
        state_dicts=state_dicts,
        threshold=threshold,
        threshold_rule=(
            f"lowest score among the top {args.target_sensitivity:.0%} of validation pneumonia cases "
            f"(target sensitivity {args.target_sensitivity}, chosen on validation, never on test)"
        ),
        version="",
        created_at=created.isoformat(timespec="seconds"),
        training_data={
            "dataset": str(Path(args.data).resolve().name),
            "train": train.summary(),
            "validation": val.summary(),
            "test": test.summary(),
            "validation_rule": f"{args.val_fraction:.0%} of train/ patients, stratified, grouped by patient",
            "validation_split": {"fraction": args.val_fraction, "seed": args.seed},
            "epochs": args.epochs,
            "members": member_logs,
            "seed": args.seed,
            "recipe": {"select": args.select, "average_epochs": args.average_epochs, "mixup": args.mixup,
                       "label_smoothing": args.label_smoothing,
                       "augment_strength": args.augment_strength, "stn": args.stn, "lr": args.lr, "swa_lr": args.swa_lr,
                       "zoom_strength": args.zoom_strength, "bias_field": args.bias_field,
                       "stn_lr_scale": args.stn_lr_scale, "consistency": args.consistency},
            "dry_run": bool(args.dry_run),
        },
        calibration=calibration,
        gate=gate,
    )
    adult = attach_population_gate(args, checkpoint, train, val, params)
    checkpoint.version = checkpoint.content_version(created)
    predictor = Predictor(checkpoint)
    results = {"validation": evaluate(predictor, val), "test": evaluate(predictor, test)}
    checkpoint.metrics = dict(results)
    checkpoint.metrics.update(transformer_figures(predictor, test))
    if adult is not None:
        checkpoint.metrics["population_gate"] = population_figures(predictor, gate_sets(val, test, adult))
    if store is None:
        save_checkpoint(checkpoint, args.out)
        metrics_path = args.out.with_suffix(".metrics.json")
        with atomic_write(metrics_path) as handle:
            handle.write(json.dumps({"version": checkpoint.version, "threshold": threshold, **results}, indent=2).encode())
        written = f"{args.out} and {metrics_path}"
    else:
        written = f"candidate {checkpoint.version}{' (dry run)' if args.dry_run else ''} into the store {store.root}"
        store.add(checkpoint)
    print(format_table(results))
    print(f"threshold {threshold:.4f} ({args.target_sensitivity} target sensitivity on validation); "
          f"calibration T={calibration['temperature']:.3f} b={calibration['bias']:.3f}; "
          f"ECE validation {results['validation']['calibration']['ece']:.4f}, test {results['test']['calibration']['ece']:.4f}; "
          f"out-of-population flagged: validation {results['validation']['ood_flagged']:.1%}, "
          f"test {results['test']['ood_flagged']:.1%}")
    if "population_gate" in checkpoint.metrics:
        print(format_gate_table(checkpoint.metrics["population_gate"]))
    print(f"wrote {written} in {time.perf_counter() - started:.0f} s")
    print(f"version {checkpoint.version}")
    if store is not None:
        print(f"Nothing served has changed. To serve it: python -m training.store promote {checkpoint.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
