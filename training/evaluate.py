"""Print the metrics table of any checkpoint on a split of the dataset.

    python -m training.evaluate --checkpoint model/weights/pneumonia_stn.pt --split test

``--geometry`` / ``--prefilter`` override the checkpoint's preprocessing: an
experiment for measuring which geometry serves original-size X-rays best, never
what the app does (the app refuses a checkpoint whose preprocessing differs).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model import CheckpointError, Predictor, calibrate, load_checkpoint
from model.alignment import describe
from model.saliency import grad_cam
from model.settings import DEFAULT_CACHE_DIR, DEFAULT_CHECKPOINT, data_dir

from .calibrate import reliability
from .data import DatasetError, Split, load_split
from .metrics import binary_metrics, format_table
from .robustness import robustness

log = logging.getLogger("training")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--split", choices=("train", "val", "test"), default="test")
    parser.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--geometry", choices=("squash", "center_crop"), default=None)
    parser.add_argument("--prefilter", type=int, default=None, help="prefilter size; 0 disables it")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--no-cache", action="store_true", help="decode every image (timing)")
    parser.add_argument("--workers", type=int, default=2)
    return parser


def evaluate(predictor: Predictor, split: Split, threshold: float | None = None) -> dict:
    """Screening metrics, calibration and the gate's flag rate of ``predictor`` on ``split``."""
    out = predictor.predict_many(split.images)
    metrics = binary_metrics(split.labels, out.probabilities, predictor.threshold if threshold is None else threshold)
    metrics["calibration"] = reliability(split.labels, out.probabilities)
    if out.ood_scores is not None:
        metrics["ood_flagged"] = float(np.mean(out.ood_scores > 1))
    return metrics


def alignment_summary(predictor: Predictor, split: Split, shown: int = 8) -> dict:
    """What the spatial transformer does on ``split``: typical rotation, zoom and shift, and
    the ``shown`` films it moves most (by file, for the model card's before/after grid)."""
    theta = predictor.predict_many(split.images).theta
    moves = [describe(t) for t in theta]
    angle = np.abs([m.angle_deg for m in moves])
    zoom = np.array([m.zoom for m in moves])
    shift = np.hypot([m.shift_x for m in moves], [m.shift_y for m in moves])
    movement = np.array([m.movement for m in moves])
    largest = np.argsort(-movement, kind="stable")[:shown]
    return {
        "films": len(moves),
        "median": {"abs_angle_deg": float(np.median(angle)), "zoom": float(np.median(zoom)),
                   "shift": float(np.median(shift)), "movement": float(np.median(movement))},
        "p95": {"abs_angle_deg": float(np.percentile(angle, 95)),
                "zoom_deviation": float(np.percentile(np.abs(zoom - 1), 95)),
                "shift": float(np.percentile(shift, 95)), "movement": float(np.percentile(movement, 95))},
        #: below about 0.001 every film gets the same warp: the transformer does not align films one by one
        "movement_std": float(np.std(movement)),
        "largest": [{"file": split.files[i], "label": int(split.labels[i]), **moves[i].to_dict()} for i in largest],
    }


#: The aligned film's middle quarter of columns (of 64): the heart and mediastinum, between the lung fields.
MIDDLE = (24, 40)


def saliency_summary(predictor: Predictor, split: Split, batch: int = 256) -> dict:
    """Where the Grad-CAM map is warm on ``split``, by the model's answer: the result page's
    caption states this (what the map measured on this model), not what a map ought to show."""
    maps, logits = [], []
    for start in range(0, len(split.images), batch):  # one forward pass gives both the answer and the map
        with torch.inference_mode():
            out = predictor.model.infer(torch.from_numpy(split.images[start:start + batch, None]))
        maps.append(grad_cam(predictor.model, out, split.images.shape[-1]))
        logits.append(out.logits.float().numpy())
    cams = np.concatenate(maps)
    probabilities = calibrate(np.concatenate(logits), predictor.checkpoint.calibration)
    side = cams.shape[-1]
    low, high = (round(edge * side / 64) for edge in MIDDLE)
    pushed = cams.reshape(len(cams), -1).max(axis=1) > 0
    positive = probabilities >= predictor.threshold
    warm = cams[positive & pushed]
    peak_columns = warm.reshape(len(warm), -1).argmax(axis=1) % side
    peak_middle = (peak_columns >= low) & (peak_columns < high)
    mass_middle = warm[:, :, low:high].sum((1, 2)) / np.maximum(warm.sum((1, 2)), 1e-8)
    return {
        "films": len(cams), "middle_columns": [low, high], "side": side,
        "pneumonia": {"films": int(positive.sum()),
                      "peak_middle": float(np.mean(peak_middle)) if len(warm) else None,
                      "mass_middle": float(np.mean(mass_middle)) if len(warm) else None},
        "normal": {"films": int((~positive).sum()),
                   "empty": float(np.mean(~pushed[~positive])) if (~positive).any() else None},
    }


def transformer_figures(predictor: Predictor, test: Split) -> dict:
    """The checkpoint's record of what its spatial transformer does, what a skewed film costs it,
    and where its heat map is warm."""
    return {"alignment": alignment_summary(predictor, test),
            "robustness": robustness(predictor.model, test.images, test.labels),
            "saliency": saliency_summary(predictor, test)}


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    started = time.perf_counter()
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        params = checkpoint.preprocess
        if args.geometry is not None:
            params = dataclasses.replace(params, geometry=args.geometry)
        if args.prefilter is not None:
            params = dataclasses.replace(params, prefilter_size=args.prefilter or None)
        split = load_split(args.data, args.split, params, None if args.no_cache else args.cache_dir, args.workers)
    except (CheckpointError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    metrics = evaluate(Predictor(checkpoint), split, args.threshold)
    print(f"checkpoint {checkpoint.version}, preprocessing {params.to_dict()}")
    print(format_table({args.split: metrics}))
    flagged = f"; out-of-population flagged {metrics['ood_flagged']:.1%}" if "ood_flagged" in metrics else ""
    print(f"threshold {metrics['threshold']:.4f}; ECE {metrics['calibration']['ece']:.4f}{flagged}; "
          f"{len(split)} images in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
