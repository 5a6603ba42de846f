"""Admin commands for the model store: list, promote (behind a guard), rollback.

    python -m training.store list [--json]
    python -m training.store promote VERSION [--force --reason TEXT]
    python -m training.store rollback
    python -m training.store repair [VERSION]   # a pointer that cannot be read or names a broken version
    python -m training.store add FILE      # a checkpoint from training.train --out, as a candidate

The guard re-evaluates the candidate and the serving model through ``Predictor`` on
the test split and refuses a candidate that screens worse than the limits below,
ranks worse than what serves, flags too much of the test split as out of
population, is a dry run, or was made with other preprocessing. Running servers
pick up the new pointer within seconds (``app/serving.py``). Exit status: 0 done,
1 refused by the guard, 2 could not be done (unknown or damaged version, no dataset,
another promotion in progress, a store that cannot be read or written), in one line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model import CheckpointError, Predictor, PreprocessParams, load_checkpoint
from model.settings import DEFAULT_CACHE_DIR, DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT, data_dir, model_store_dir
from model.store import ModelStore, StoreError
from model.validation import TRUST_PER_CLASS, wilson

from .data import DatasetError, load_split
from .evaluate import evaluate
from .onnx_export import add_to_store
from .site import SITE_MIN_SENSITIVITY, held_out_films, leaked, scored

log = logging.getLogger("training")

#: The guard's limits, on the test split, at the candidate's own threshold.
MIN_SENSITIVITY = 0.98
MAX_FALSE_POSITIVE_RATE = 0.35
MIN_AUC = 0.96
MAX_AUC_DROP = 0.005  # below the serving model's AUC
MAX_OOD_FLAGGED = 0.05
#: And for a site candidate, on the site's held-out slice (every film scored, refused or not):
#: sensitivity at ``training.site.SITE_MIN_SENSITIVITY``, FPR not above the serving model's there.
#: A slice with fewer than ``TRUST_PER_CLASS`` pneumonia films cannot show a sensitivity of 0.97
#: either way (two misses of 60 read 0.967, 95%: 0.885-0.991), so there the floor refuses on
#: evidence (the interval wholly below it) and a point below it is a caution the history keeps;
#: the test split's 0.98 on 390 pneumonia films still holds every candidate. Measured: a candidate
#: that met the site's goals on 312 held-out films failed a point floor on its own 33- and
#: 100-film slices (docs/experiments.md).


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=model_store_dir(), help="the model store (PNEUMONIA_MODEL_STORE)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every version, its figures, and which one serves")
    listing.add_argument("--json", action="store_true", help="a JSON list of objects")
    promote = commands.add_parser("promote", help="serve VERSION if it passes the guard")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="override the guard (needs --reason; recorded)")
    promote.add_argument("--reason", default=None)
    promote.add_argument("--data", type=Path, default=data_dir(), help="dataset folder with test/")
    promote.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    promote.add_argument("--workers", type=int, default=2)
    promote.add_argument("--site-films", type=Path, default=None,
                         help="for a site candidate (training.site adapt): the site's films it was adapted on")
    commands.add_parser("rollback", help="serve the previously served version again")
    repair = commands.add_parser("repair", help="restore a pointer that cannot be read or names a broken version")
    repair.add_argument("version", nargs="?", default=None,
                        help="the version to serve (default: the newest in the history that loads)")
    add = commands.add_parser("add", help="add a checkpoint file (from training.train --out) as a candidate")
    add.add_argument("checkpoint", type=Path)
    return parser


def guard(candidate: dict, serving: dict, dry_run: bool, population_gate: bool = True) -> list[str]:
    """Why ``candidate`` (test-split metrics) must not replace ``serving``; empty when it may."""
    reasons = []
    if dry_run:
        reasons.append("it is a dry-run model (a few batches, for checking the pipeline)")
    if not population_gate:
        reasons.append("it has no population gate: adults' films and lateral views would get a diagnosis")
    if candidate["sensitivity"] < MIN_SENSITIVITY:
        reasons.append(f"sensitivity {candidate['sensitivity']:.3f} < {MIN_SENSITIVITY}")
    if candidate["false_positive_rate"] > MAX_FALSE_POSITIVE_RATE:
        reasons.append(f"false-positive rate {candidate['false_positive_rate']:.3f} > {MAX_FALSE_POSITIVE_RATE}")
    if not candidate["auc"] >= MIN_AUC:  # NaN fails too
        reasons.append(f"AUC {candidate['auc']:.4f} < {MIN_AUC}")
    if candidate["auc"] < serving["auc"] - MAX_AUC_DROP:
        reasons.append(f"AUC {candidate['auc']:.4f} is more than {MAX_AUC_DROP} below "
                       f"the serving model's {serving['auc']:.4f}")
    flagged = candidate.get("ood_flagged")
    if flagged is None or flagged > MAX_OOD_FLAGGED:
        shown = "no gate" if flagged is None else f"{flagged:.1%}"
        reasons.append(f"the population gate flags {shown} of the test split (at most {MAX_OOD_FLAGGED:.0%})")
    return reasons


def site_guard(candidate: dict, serving: dict, leaks: int) -> list[str]:
    """Why a site candidate must not serve, from ``training.site.scored`` figures of both models on the
    site's held-out slice; empty when it may."""
    reasons = []
    if leaks:
        reasons.append(f"it was fitted on {leaks} films of its own held-out slice: the slice cannot judge it")
    sensitivity = sensitivity_on_slice(candidate)
    if sensitivity["refuse"]:
        reasons.append(f"sensitivity on the site's held-out films {sensitivity['text']}")
    if not candidate["false_positive_rate"] <= serving["false_positive_rate"]:
        reasons.append(f"false-positive rate on the site's held-out films {candidate['false_positive_rate']:.3f} is "
                       f"above the serving model's {serving['false_positive_rate']:.3f}")
    if not candidate["auc"] >= serving["auc"] - MAX_AUC_DROP:
        reasons.append(f"AUC on the site's held-out films {candidate['auc']:.4f} is more than {MAX_AUC_DROP} below "
                       f"the serving model's {serving['auc']:.4f}")
    refused = round(candidate["refused"] * candidate["films"])
    low, high = wilson(refused, candidate["films"]) or (0.0, 0.0)
    if low > MAX_OOD_FLAGGED:  # the slice is small: refuse on evidence that the share is above the limit
        reasons.append(f"its gates refuse {candidate['refused']:.1%} of the site's held-out films (95%: "
                       f"{low:.1%}-{high:.1%}, wholly above {MAX_OOD_FLAGGED:.0%})")
    return reasons


def sensitivity_on_slice(figures: dict) -> dict:
    """The site floor judged as the slice allows (see the limits above): {"refuse", "caution", "text"}."""
    value, pneumonia = figures["sensitivity"], figures.get("pneumonia")
    if value is None or not pneumonia:
        return {"refuse": True, "caution": False, "text": "cannot be measured: the slice holds no pneumonia film"}
    caught = round(value * pneumonia)
    low, high = wilson(caught, pneumonia)
    below = not value >= SITE_MIN_SENSITIVITY
    text = f"{value:.3f} ({caught} of {pneumonia}; 95%: {low:.3f}-{high:.3f})"
    if below and (high < SITE_MIN_SENSITIVITY or pneumonia >= TRUST_PER_CLASS):
        return {"refuse": True, "caution": False, "text": f"{text} < {SITE_MIN_SENSITIVITY}"}
    if below:
        return {"refuse": False, "caution": True,
                "text": f"{text} is below {SITE_MIN_SENSITIVITY} on a slice too small to show it either way: "
                        "watch the site's overreads on /monitor"}
    return {"refuse": False, "caution": False, "text": text}


def side_by_side(candidate: tuple[str, dict], serving: tuple[str, dict], title: str = "test split") -> str:
    rows = [("AUC", "auc", "{:.4f}"), ("sensitivity", "sensitivity", "{:.3f}"),
            ("false-positive rate", "false_positive_rate", "{:.3f}"), ("threshold", "threshold", "{:.4f}"),
            ("gate flags (test)", "ood_flagged", "{:.1%}"), ("gates refuse", "refused", "{:.1%}")]
    width = max(len(candidate[0]), len(serving[0]), 12)
    lines = [title, f"{'':<22}{'candidate':>{width + 2}}{'serving':>{width + 2}}",
             f"{'':<22}{candidate[0]:>{width + 2}}{serving[0]:>{width + 2}}"]
    for label, key, fmt in rows:
        values = [fmt.format(m[key]) if m.get(key) is not None else "-" for m in (candidate[1], serving[1])]
        lines.append(f"{label:<22}{values[0]:>{width + 2}}{values[1]:>{width + 2}}")
    return "\n".join(lines)


def cmd_list(store: ModelStore, as_json: bool) -> int:
    try:
        pointer, broken = store.read_pointer(), None
    except StoreError as exc:
        pointer, broken = None, str(exc)
    promoted = {entry["version"]: entry["at"] for entry in pointer.history} if pointer else {}  # latest time each
    rows = [{**row, "serving": pointer is not None and row["version"] == pointer.serving,
             "promoted_at": promoted.get(row["version"]), "damage": store.problem(row["version"]),
             "onnx_problem": store.graph_problem(row["version"])}
            for row in store.versions()]
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if broken:
        print(f"! {broken}")
    print(f"{'':2}{'version':<28}{'trained':<22}{'promoted (UTC)':<22}{'AUC':>7}{'sens':>7}{'FPR':>7}{'gate':>7}"
          "  figures on the test split; note")
    for row in rows:
        test, basis = figures_of(row)
        figures = "".join(f"{test[k]:>7.3f}" if k in test else f"{'-':>7}"
                          for k in ("auc", "sensitivity", "false_positive_rate"))
        gate = f"{test['ood_flagged']:>7.1%}" if "ood_flagged" in test else f"{'-':>7}"
        note = row["damage"] or row.get("problem") or row.get("source", "")
        if row["onnx_problem"] and not row["damage"]:
            note += f"; serves only on PyTorch: {row['onnx_problem']}"
        print(f"{'*' if row['serving'] else ' ':2}{row['version']:<28}{str(row.get('trained_at', '-'))[:19]:<22}"
              f"{str(row['promoted_at'] or '-')[:19]:<22}{figures}{gate}  {basis}; {note}")
    print("* serving")
    return 0


def figures_of(row: dict) -> tuple[dict, str]:
    """The test-split figures to show for a version, and what they rest on: the guard's own
    measurement when a promotion made one, else what training recorded (a dry run's on a
    few dozen films, which say nothing of the model)."""
    if row.get("guard"):
        return row["guard"], f"measured by the guard on {row['guard']['test_films']} films"
    films = row.get("test_films")
    on = f"{films} films" if films else "the test split"
    if row.get("dry_run"):
        return row.get("metrics", {}).get("test", {}), f"DRY RUN, from training on {on}: not a model's figures"
    return row.get("metrics", {}).get("test", {}), f"from training, on {on}"


def cmd_promote(store: ModelStore, args) -> int:
    if args.force and not (args.reason or "").strip():
        log.error("--force needs --reason TEXT: the override is recorded with it")
        return 2
    with store.lock("promote"):
        serving_version = store.serving_version()
        if args.version == serving_version:
            print(f"{args.version} is already serving")
            return 0
        candidate = store.load(args.version)  # a damaged file is refused here (exit 2)
        if candidate.training_data.get("dry_run"):
            print(f"refused: {args.version} is a dry-run model (a few batches, to check the pipeline); "
                  "it can never serve (--force cannot override this)")
            return 1
        serving = store.load(serving_version)
        if candidate.preprocess != PreprocessParams():
            print(f"refused: {args.version} was made with preprocessing {candidate.preprocess.to_dict()}, "
                  f"which this code does not use; no server could load it (--force cannot override this)")
            return 1
        site = candidate.training_data.get("site")
        if site and args.site_films is None:
            raise DatasetError(f"{args.version} was adapted to site {site['name']}: the guard judges it on the "
                               "site's held-out films; give their folder with --site-films DIR")
        site_reasons, site_report = [], None
        candidate_predictor, serving_predictor = Predictor(candidate), Predictor(serving)  # both judgements share them
        if site:
            held = held_out_films(site, args.site_films, candidate.preprocess, args.workers)
            site_report = {"name": site["name"], "films": len(held), "candidate": scored(candidate_predictor, held),
                           "serving": scored(serving_predictor, held)}
            print(side_by_side((args.version, site_report["candidate"]), (serving_version, site_report["serving"]),
                               f"site {site['name']}, {len(held)} held-out films"))
            site_reasons = site_guard(site_report["candidate"], site_report["serving"], leaked(site))
            caution = sensitivity_on_slice(site_report["candidate"])
            if caution["caution"]:
                site_report["caution"] = f"sensitivity on the site's held-out films {caution['text']}"
                print(f"caution: {site_report['caution']}")
        test = load_split(args.data, "test", candidate.preprocess, args.cache_dir, args.workers, progress=False)
        candidate_metrics = evaluate(candidate_predictor, test)
        serving_metrics = evaluate(serving_predictor, test)
        for version, figures in ((args.version, candidate_metrics), (serving_version, serving_metrics)):
            store.record_guard(version, figures, len(test))
        print(side_by_side((args.version, candidate_metrics), (serving_version, serving_metrics)))
        reasons = site_reasons + guard(candidate_metrics, serving_metrics, bool(candidate.training_data.get("dry_run")),
                                       candidate.population_gate is not None)
        if reasons and not args.force:
            print(f"refused: {'; '.join(reasons)}")
            return 1
        if reasons:
            print(f"forced past the guard ({'; '.join(reasons)}): {args.reason}")
        store.set_serving(args.version, "promote", forced=bool(reasons), reason=args.reason, site=site_report)
    print(f"promoted {args.version} (was {serving_version}); running servers switch within seconds")
    return 0


def cmd_rollback(store: ModelStore) -> int:
    with store.lock("promote"):
        pointer = store.read_pointer()
        if pointer.previous is None:
            log.error("nothing to roll back to: %s is the only version ever served", pointer.serving)
            return 2
        store.set_serving(pointer.previous, "rollback")
    print(f"rolled back to {pointer.previous} (was {pointer.serving}); running servers switch within seconds")
    return 0


def cmd_repair(store: ModelStore, version: str | None) -> int:
    with store.lock("promote"):
        repaired = store.repair(version)
    if repaired is None:
        print(f"nothing to repair: the pointer is readable and {store.serving_version()} loads")
        return 0
    pointer, wrong = repaired
    print(f"repaired: {wrong}\nnow serving {pointer.serving}; running servers switch within seconds")
    return 0


def cmd_add(store: ModelStore, path: Path) -> int:
    checkpoint = load_checkpoint(path)
    add_to_store(store, checkpoint, source=f"added from {path.name}")
    print(f"version {checkpoint.version}\nNothing served has changed. To serve it: "
          f"python -m training.store promote {checkpoint.version}")
    return 0


def seed(store: ModelStore, required: bool) -> None:
    try:
        if store.ensure_seeded(DEFAULT_CHECKPOINT, DEFAULT_TSNE_ARTIFACT):
            log.info("seeded the model store %s with the bundled model", store.root)
    except StoreError as exc:
        if required:
            raise
        log.warning("%s", exc)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    store = ModelStore(args.store)
    try:
        if args.command != "repair":
            seed(store, required=args.command != "list")  # a read-only store still lists
        if args.command == "list":
            return cmd_list(store, args.json)
        if args.command == "promote":
            return cmd_promote(store, args)
        if args.command == "add":
            return cmd_add(store, args.checkpoint)
        if args.command == "repair":
            return cmd_repair(store, args.version)
        return cmd_rollback(store)
    except (StoreError, CheckpointError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # a read-only or full store, a file that vanished
        log.error("could not %s: %s%s", args.command, exc.strerror or type(exc).__name__,
                  f" ({exc.filename})" if exc.filename else "")
        return 2


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
