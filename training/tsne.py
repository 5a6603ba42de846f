"""Two t-SNE maps of the train and test splits, for the app's dataset-analysis page.

    python -m training.tsne --data ../shared/data/chest_xray

One map from the preprocessed 64x64 pixels (as the seed's author did, which showed
the test split lying apart from the training split) and one from the model's learned
features. The artifact holds coordinates and metadata only, never images, and names
the checkpoint version it was made with so the page can say when it is stale. By
default it maps the store's serving model and is written beside that version in the
store, where the app finds it: a t-SNE map belongs to one model version.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from model import CLASS_NAMES, CheckpointError, Predictor, TsneMap
from model.settings import DEFAULT_CACHE_DIR, DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT, data_dir, model_store_dir
from model.store import ModelStore, StoreError

from .data import DatasetError, load_split

log = logging.getLogger("training")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--store", type=Path, default=model_store_dir())
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the store's serving model")
    parser.add_argument("--out", type=Path, default=None, help="default: beside that version in the store")
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--pca", type=int, default=50, help="PCA components before t-SNE (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    return parser


def embed(vectors: np.ndarray, perplexity: float, pca: int, seed: int) -> np.ndarray:
    """PCA (which keeps the global layout and cuts t-SNE's cost), then 2-D t-SNE."""
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors = (vectors - vectors.mean(axis=0)) / (vectors.std(axis=0) + 1e-6)
    if pca and vectors.shape[1] > pca and len(vectors) > pca:
        vectors = PCA(n_components=pca, random_state=seed).fit_transform(vectors)
    perplexity = min(perplexity, max(2.0, (len(vectors) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto")
    return tsne.fit_transform(vectors).astype(np.float32)


def build_map(args, checkpoint: Path) -> TsneMap:
    predictor = Predictor.from_path(checkpoint)
    params = predictor.checkpoint.preprocess
    splits = {name: load_split(args.data, name, params, args.cache_dir, args.workers) for name in ("train", "test")}
    images = np.concatenate([s.images for s in splits.values()])
    labels = np.concatenate([s.labels for s in splits.values()])
    steps = 3
    log.info("[1/%d] model probabilities and features for %d images", steps, len(images))
    out = predictor.predict_many(images)
    probabilities, features = out.probabilities, out.features
    predicted = (probabilities >= predictor.threshold).astype(int)
    train_features = features[: len(splits["train"])]
    mean, std = train_features.mean(axis=0).astype(np.float32), (train_features.std(axis=0) + 1e-6).astype(np.float32)
    started = time.perf_counter()
    log.info("[2/%d] t-SNE of the pixels (%d dimensions)", steps, images[0].size)
    pixel_xy = embed(images.reshape(len(images), -1), args.perplexity, args.pca, args.seed)
    log.info("      done in %.0f s", time.perf_counter() - started)
    started = time.perf_counter()
    log.info("[3/%d] t-SNE of the learned features (%d dimensions)", steps, features.shape[1])
    feature_xy = embed(features, args.perplexity, args.pca, args.seed)
    log.info("      done in %.0f s", time.perf_counter() - started)
    return TsneMap(
        checkpoint_version=predictor.version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        threshold=predictor.threshold,
        pixel_xy=pixel_xy,
        feature_xy=feature_xy,
        split=np.array([name for name, s in splits.items() for _ in range(len(s))]),
        label=labels.astype(np.int8),
        files=np.array([f for s in splits.values() for f in s.files]),
        probability=probabilities.astype(np.float32),
        correct=predicted == labels,
        features=((features - mean) / std).astype(np.float32),
        feature_mean=mean,
        feature_std=std,
    )


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    started = time.perf_counter()
    try:
        store = ModelStore(args.store)
        if args.checkpoint is None or args.out is None:
            store.ensure_seeded(DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT)
        checkpoint = args.checkpoint or store.checkpoint_path(store.serving_version())
        tsne_map = build_map(args, checkpoint)
    except (CheckpointError, DatasetError, StoreError) as exc:
        log.error("%s", exc)
        return 2
    out = args.out or store.tsne_path(tsne_map.checkpoint_version)
    tsne_map.save(out)
    wrong = int((~tsne_map.correct).sum())
    print(
        f"wrote {out}: {len(tsne_map)} points ({CLASS_NAMES[1].lower()} "
        f"{int(tsne_map.label.sum())}), {wrong} misclassified, checkpoint {tsne_map.checkpoint_version}, "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
