"""Test AUC of checkpoints on films rotated, shifted and zoomed: what the spatial transformer is worth.

    python -m training.robustness --checkpoint A.pt B.pt ... [--json FILE]

Each perturbation is applied to the preprocessed 64x64 model input (``cv2.warpAffine``,
bilinear, edges repeated as the network's own sampling does), the same for every
checkpoint; the AUC ranks raw logits (calibration is monotonic). A checkpoint trained
with ``--no-stn`` is the ablation: the same recipe with the transform held at identity.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from model import CheckpointError, infer_batches, load_checkpoint
from model.settings import DEFAULT_CACHE_DIR, data_dir

from .data import DatasetError, load_split
from .metrics import roc_auc

log = logging.getLogger("training")

#: name -> (rotation in degrees anticlockwise, shift as a fraction of the side (x, y), zoom)
PERTURBATIONS: dict[str, tuple[float, tuple[float, float], float]] = {
    "as is": (0.0, (0.0, 0.0), 1.0),
    "rotated +10°": (10.0, (0.0, 0.0), 1.0),
    "rotated -10°": (-10.0, (0.0, 0.0), 1.0),
    "rotated +15°": (15.0, (0.0, 0.0), 1.0),
    "rotated -15°": (-15.0, (0.0, 0.0), 1.0),
    "shifted +8% (right, down)": (0.0, (0.08, 0.08), 1.0),
    "shifted -8% (left, up)": (0.0, (-0.08, -0.08), 1.0),
    "zoomed in 10%": (0.0, (0.0, 0.0), 1.1),
    "zoomed out 10%": (0.0, (0.0, 0.0), 0.9),
}


def perturb(images: np.ndarray, angle: float, shift: tuple[float, float], zoom: float) -> np.ndarray:
    """(N, S, S) -> the same films turned about their centre, zoomed and moved."""
    side = images.shape[-1]
    centre = ((side - 1) / 2, (side - 1) / 2)
    matrix = cv2.getRotationMatrix2D(centre, angle, zoom)
    matrix[:, 2] += np.asarray(shift) * side
    return np.stack([
        cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        for image in images
    ])


def robustness(model, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC under every perturbation in ``PERTURBATIONS``."""
    return {name: roc_auc(labels, infer_batches(model, perturb(images, *how)).logits)
            for name, how in PERTURBATIONS.items()}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--split", choices=("val", "test"), default="test")
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
        split = load_split(args.data, args.split, params, args.cache_dir, progress=False)
    except (CheckpointError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    figures = {}
    for path, checkpoint in zip(args.checkpoint, checkpoints):
        figures[path.stem] = {
            "stn": checkpoint.network.stn, "version": checkpoint.version,
            "auc": robustness(checkpoint.model, split.images, split.labels),
        }
    names = list(figures)
    print(f"AUC on the {args.split} split ({len(split)} films)")
    print("| films | " + " | ".join(names) + " |")
    print("| --- " * (len(names) + 1) + "|")
    for condition in PERTURBATIONS:
        print(f"| {condition} | " + " | ".join(f"{figures[n]['auc'][condition]:.4f}" for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
