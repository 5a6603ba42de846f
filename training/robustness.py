"""AUC of checkpoints on films rotated, shifted, zoomed, reframed and unevenly exposed: what the
spatial transformer is worth, and how much an answer depends on how the film was framed and exposed.

    python -m training.robustness --checkpoint A.pt B.pt ... [--split validation] [--json FILE]

Each perturbation is applied to the preprocessed 64x64 model input (``cv2.warpAffine``,
bilinear, edges repeated as the network's own sampling does), the same for every
checkpoint, and so is the last row's smooth exposure field (one fixed draw per film of
``training.augment.intensity_field``, exp(0.1 f): typically ±9%); the AUC ranks raw logits
(calibration is monotonic). A checkpoint trained
with ``--no-stn`` is the ablation: the same recipe with the transform held at identity.
Beside the AUC it prints how far the normal films' mean logit moves under each
perturbation: no diagnosis changes when a film is framed taller or narrower (the squash
to a square does that to a wider film), so a model that moves there reads the framing.
``--split validation`` measures each checkpoint on its own validation films, so that a
recipe can be chosen on them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from model import CheckpointError, infer_batches, load_checkpoint
from model.settings import DEFAULT_CACHE_DIR, data_dir

from .augment import intensity_field
from .data import DatasetError, checkpoint_splits, load_split
from .metrics import roc_auc

log = logging.getLogger("training")

#: name -> (rotation in degrees anticlockwise, shift as a fraction of the side (x, y), zoom[, height])
#: ``height`` stretches the film vertically on top of the zoom: a film 8% wider than another,
#: squashed to a square, shows its chest 8% taller against its width.
PERTURBATIONS: dict[str, tuple] = {
    "as is": (0.0, (0.0, 0.0), 1.0),
    "rotated +10°": (10.0, (0.0, 0.0), 1.0),
    "rotated -10°": (-10.0, (0.0, 0.0), 1.0),
    "rotated +15°": (15.0, (0.0, 0.0), 1.0),
    "rotated -15°": (-15.0, (0.0, 0.0), 1.0),
    "shifted +8% (right, down)": (0.0, (0.08, 0.08), 1.0),
    "shifted -8% (left, up)": (0.0, (-0.08, -0.08), 1.0),
    "zoomed in 10%": (0.0, (0.0, 0.0), 1.1),
    "zoomed out 10%": (0.0, (0.0, 0.0), 0.9),
    "stretched 8% taller (as a film 8% wider)": (0.0, (0.0, 0.0), 1.0, 1.08),
    "squeezed 8% narrower (as a film 8% wider)": (0.0, (0.0, 0.0), 1 / 1.08, 1.08),
    "squeezed 8% shorter (as a film 8% narrower)": (0.0, (0.0, 0.0), 1.0, 1 / 1.08),
}


def perturb(images: np.ndarray, angle: float, shift: tuple[float, float], zoom: float,
            height: float = 1.0) -> np.ndarray:
    """(N, S, S) -> the same films turned about their centre, zoomed, stretched vertically and moved."""
    side = images.shape[-1]
    centre = ((side - 1) / 2, (side - 1) / 2)
    matrix = cv2.getRotationMatrix2D(centre, angle, zoom)
    matrix[1] *= height
    matrix[1, 2] += (1 - height) * centre[1]
    matrix[:, 2] += np.asarray(shift) * side
    return np.stack([
        cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        for image in images
    ])


EXPOSURE = 0.2  # the exposure row's field strength: exp(EXPOSURE / 2 * f), typically ±9%


def expose(images: np.ndarray, amount: float = EXPOSURE, seed: int = 0) -> np.ndarray:
    """(N, S, S) -> each film times its own smooth field exp(amount / 2 * f), drawn from ``seed``:
    the same fields for every checkpoint, so their rows compare."""
    field = intensity_field(len(images), images.shape[-1], amount, torch.Generator().manual_seed(seed))[:, 0]
    return np.clip(images * field.numpy(), 0, 1).astype(np.float32)


#: Every row the tables print, as name -> (N, S, S) films -> the films changed so: the
#: geometric perturbations, then the exposure field.
CONDITIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    **{name: (lambda images, how=how: perturb(images, *how)) for name, how in PERTURBATIONS.items()},
    f"exposure field, exp({EXPOSURE / 2:g} f)": expose,
}


def perturbed_logits(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """The model's logits for every film under every condition in ``CONDITIONS``."""
    return {name: infer_batches(model, change(images)).logits for name, change in CONDITIONS.items()}


def robustness(model, images: np.ndarray, labels: np.ndarray,
               logits: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """AUC under every perturbation (``logits``: from ``perturbed_logits``, when already computed)."""
    logits = perturbed_logits(model, images) if logits is None else logits
    return {name: roc_auc(labels, scores) for name, scores in logits.items()}


def normal_shift(logits: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """How far the normal films' mean logit moves under every perturbation (positive: towards pneumonia)."""
    normal = labels == 0
    return {name: float(np.mean(scores[normal] - logits["as is"][normal])) for name, scores in logits.items()}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--split", choices=("test", "validation", "val"), default="test",
                        help="validation: each checkpoint's own validation films (carved from train/); "
                             "val: the dataset's val/ folder")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        checkpoints = [load_checkpoint(path) for path in args.checkpoint]
        params = checkpoints[0].preprocess
        if any(c.preprocess != params for c in checkpoints):
            raise CheckpointError("the checkpoints were trained on different preprocessing")
        splits = [films(args, checkpoint) for checkpoint in checkpoints]
    except (CheckpointError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    figures = {}
    for path, checkpoint, split in zip(args.checkpoint, checkpoints, splits):
        logits = perturbed_logits(checkpoint.model, split.images)  # one pass per perturbation serves both tables
        figures[path.stem] = {
            "stn": checkpoint.network.stn, "version": checkpoint.version, "films": len(split),
            "auc": robustness(checkpoint.model, split.images, split.labels, logits),
            "normal_logit_shift": normal_shift(logits, split.labels),
        }
    names = list(figures)
    films_counted = ", ".join(sorted({str(f["films"]) for f in figures.values()}))
    tables = (("AUC", "auc", "{:.4f}"), ("normal films' mean logit change", "normal_logit_shift", "{:+.2f}"))
    for title, key, fmt in tables:
        print(f"{title} on the {args.split} split ({films_counted} films)")
        print("| films | " + " | ".join(names) + " |")
        print("| --- " * (len(names) + 1) + "|")
        for condition in CONDITIONS:
            print(f"| {condition} | " + " | ".join(fmt.format(figures[n][key][condition]) for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def films(args, checkpoint):
    """The split to perturb: a dataset folder, or the checkpoint's own validation films."""
    if args.split != "validation":
        return load_split(args.data, args.split, checkpoint.preprocess, args.cache_dir, progress=False)
    return checkpoint_splits(checkpoint.training_data, args.data, checkpoint.preprocess, args.cache_dir,
                             progress=False)[1]


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
