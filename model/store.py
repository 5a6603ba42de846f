"""The model store: immutable versioned checkpoints and one pointer naming the serving one.

    STORE/versions/<version>.pt          the checkpoint, never rewritten
    STORE/versions/<version>.onnx        what a server runs (``serving_file``): graph and checkpoint less weights
    STORE/versions/<version>.json        its summary (dates, figures, dry run, the files' sha256)
    STORE/versions/<version>.tsne.npz    the t-SNE map made with that version, if any
    STORE/serving.json                   {"serving": version, "history": [...]}, written atomically
    STORE/serving.backup.json            the same, written after it: what ``repair`` restores from

Training adds candidates; only a promotion, a rollback or a repair moves the pointer,
under a lock, with one atomic rename: a crash at any point leaves the old model serving.
An empty or absent store is seeded with the bundled checkpoint on first use. Servers
watch ``serving.json`` and swap models when it changes (see ``app/serving.py``), and
read a version's ONNX file, never its checkpoint, where they run without PyTorch.
"""
from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from .atomic import atomic_write
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .decode import DecodeLimits
from .serving_file import ServingFile, graph_beside
from .settings import torch_installed

POINTER = "serving.json"
BACKUP = "serving.backup.json"
SUMMARY_SPLITS = ("validation", "test")
SUMMARY_FIGURES = ("auc", "sensitivity", "false_positive_rate", "ood_flagged", "threshold")


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why, in one line."""


def operator() -> str:
    """Who moves the pointer, as the history records it: the operating-system user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no name
        return f"uid {os.getuid()}"


def now() -> str:
    """UTC, to the millisecond: two versions added in one second still list in order."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def summary_of(checkpoint: Checkpoint) -> dict:
    """What ``list`` shows of a version, without loading its weights."""
    return {
        "version": checkpoint.version,
        "trained_at": checkpoint.created_at,
        "dry_run": bool(checkpoint.training_data.get("dry_run", False)),
        "test_films": checkpoint.training_data.get("test", {}).get("images"),  # what its own figures rest on
        "seed": checkpoint.training_data.get("seed"),
        "preprocess": checkpoint.preprocess.to_dict(),
        "metrics": {
            split: {k: checkpoint.metrics[split][k] for k in SUMMARY_FIGURES if k in checkpoint.metrics.get(split, {})}
            for split in SUMMARY_SPLITS if split in checkpoint.metrics
        },
    }


def read_weightless(checkpoint_path: str | os.PathLike) -> Checkpoint:
    """A checkpoint file's contents less its weights: from its serving file beside it (no PyTorch) when
    there is one, else the checkpoint itself."""
    graph = graph_beside(checkpoint_path)
    if graph.is_file() or not torch_installed():
        return ServingFile(graph).checkpoint
    return load_checkpoint(checkpoint_path)


@dataclass(frozen=True)
class Pointer:
    serving: str
    history: tuple[dict, ...]  # oldest first: {"version", "at", "action", "forced", "reason", "by"}

    @property
    def previous(self) -> str | None:
        """The version that served before the current one, as rollback understands it."""
        return self.history[-2]["version"] if len(self.history) >= 2 else None


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class ModelStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.pointer_path = self.root / POINTER
        self.backup_path = self.root / BACKUP

    # ---- reading -------------------------------------------------------------------

    def checkpoint_path(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise StoreError(f"{version!r} is not a model version")
        return self.versions_dir / f"{version}.pt"

    def graph_path(self, version: str) -> Path:
        return self.checkpoint_path(version).with_suffix(".onnx")

    def tsne_path(self, version: str) -> Path:
        return self.versions_dir / f"{version}.tsne.npz"

    def read_pointer(self, path: Path | None = None) -> Pointer:
        path = path or self.pointer_path
        try:
            data = json.loads(path.read_text())
            history = tuple(data.get("history", ()))
            if not all(isinstance(entry, dict) and isinstance(entry.get("version"), str) for entry in history):
                raise TypeError("history")
            return Pointer(str(data["serving"]), history)
        except FileNotFoundError:
            raise StoreError(f"the model store {self.root} has no serving model yet") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"the model store's pointer {path} is unreadable ({type(exc).__name__}): "
                             "python -m training.store repair restores it") from None

    def serving_version(self) -> str:
        return self.read_pointer().serving

    def pointer_stamp(self) -> tuple | None:
        """Changes whenever the pointer is replaced: cheap enough to ask on every request."""
        try:
            stat = self.pointer_path.stat()
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def versions(self) -> list[dict]:
        """Every version's summary, oldest first; a file that cannot be read says so."""
        rows = []
        for path in sorted(self.versions_dir.glob("*.pt")):
            version = path.stem
            try:
                rows.append(json.loads((self.versions_dir / f"{version}.json").read_text()))
            except (OSError, ValueError):
                rows.append({"version": version, "problem": "summary missing or unreadable"})
        return sorted(rows, key=lambda r: (r.get("added_at", ""), r["version"]))

    def problem(self, version: str) -> str | None:
        """Why ``version``'s file cannot serve as stored (missing, or not the file its summary
        describes: truncated, overwritten); None when it checks out or has no checksum to check."""
        path = self.checkpoint_path(version)
        try:
            summary = json.loads((self.versions_dir / f"{version}.json").read_text())
        except (OSError, ValueError):
            summary = {}
        if not path.is_file():
            return "not found in the store (no checkpoint file)"
        expected = summary.get("sha256") if isinstance(summary, dict) else None
        if expected and sha256_of(path) != expected:
            return "damaged: its checkpoint file is not the one stored (checksum differs)"
        return None

    def graph_problem(self, version: str) -> str | None:
        """Why ``version`` has no serving file to run without PyTorch (none made, the export's refusal, or
        not the file its summary describes); None when it has one."""
        summary = self._summary(version)
        graph = summary.get("onnx") if isinstance(summary.get("onnx"), dict) else {}
        if graph.get("refused"):
            return f"its ONNX export was refused: {graph['refused']}"
        path = self.graph_path(version)
        if not path.is_file():
            return f"it has no ONNX serving file (python -m training.onnx_export --version {version})"
        if graph.get("sha256") and sha256_of(path) != graph["sha256"]:
            return "damaged: its ONNX file is not the one stored (checksum differs)"
        return None

    def load_serving(self, version: str, limits: DecodeLimits = DecodeLimits(), **kwargs):
        """A ``Predictor`` of ``version`` on its ONNX file, with no PyTorch; ``CheckpointError`` when it has none
        that serves (``graph_problem``), when the file fails its check, or when the checkpoint it was made from
        is missing or damaged (``problem``): the checkpoint stays the version's source of truth."""
        problem = self.problem(version) or self.graph_problem(version)
        if problem:
            raise CheckpointError(f"version {version}: {problem}")
        served = ServingFile(self.graph_path(version), **kwargs)
        if served.checkpoint.version != version:
            raise CheckpointError(f"{self.graph_path(version).name} holds version {served.checkpoint.version}")
        return served.predictor(limits)

    def loads(self, version: str) -> None:
        """Raise ``CheckpointError`` unless ``version`` can serve here: its checkpoint where PyTorch is
        installed, else its ONNX file."""
        if torch_installed():
            self.load(version)
        else:
            self.load_serving(version)

    def _summary(self, version: str) -> dict:
        try:
            summary = json.loads((self.versions_dir / f"{version}.json").read_text())
        except (OSError, ValueError):
            return {}
        return summary if isinstance(summary, dict) else {}

    def load(self, version: str, **kwargs) -> Checkpoint:
        """The checkpoint of ``version``; ``CheckpointError`` if it is missing, damaged, broken or foreign."""
        problem = self.problem(version)
        if problem:
            raise CheckpointError(f"version {version}: {problem}")
        checkpoint = load_checkpoint(self.checkpoint_path(version), **kwargs)
        if checkpoint.version != version:
            raise CheckpointError(f"{self.checkpoint_path(version)} holds version {checkpoint.version}, not {version}")
        return checkpoint

    # ---- writing -------------------------------------------------------------------

    def add(self, checkpoint: Checkpoint, source: str = "training", graph: bytes | None = None,
            graph_refused: str | None = None) -> Path:
        """Store a new candidate; never changes what is served. Returns its path. ``graph``: its
        serving file (``training.onnx_export.add_to_store`` makes it), or why the export refused one."""
        path = self.checkpoint_path(checkpoint.version)
        if path.exists():
            raise StoreError(f"version {checkpoint.version} is already in the store: this run reproduced it exactly "
                             "(the same weights, calibration, gates and threshold)")
        if graph is not None:  # first: a checkpoint in the store always has its graph beside it
            with atomic_write(self.graph_path(checkpoint.version)) as handle:
                handle.write(graph)
        save_checkpoint(checkpoint, path)
        self._write_summary(checkpoint, source, graph_refused)
        return path

    def record_graph(self, version: str, graph: bytes | None = None, refused: str | None = None) -> Path:
        """Add a stored version's serving file afterwards (or the export's reason for none) to it and its summary."""
        path = self.graph_path(version)
        if graph is not None:
            with atomic_write(path) as handle:
                handle.write(graph)
        summary = self._summary(version)
        if summary:  # one that cannot be read stays so: ``list`` says it is missing
            summary["onnx"] = self._graph_summary(version, refused)
            with atomic_write(self.versions_dir / f"{version}.json") as handle:
                handle.write(json.dumps(summary, indent=1).encode())
        return path

    def ensure_seeded(self, bundled: str | os.PathLike, bundled_tsne: str | os.PathLike | None = None) -> bool:
        """Seed an empty or absent store with the bundled checkpoint as its serving model.

        A store that serves already gets a newer bundled checkpoint (a code update) as a
        candidate only: what serves changes by promotion alone. Returns True when it
        seeded. The bundled files are copied, never written. A store that has both needs
        no lock, so a read-only store serves.
        """
        if self.pointer_path.exists() and self._holds(Path(bundled)):
            return False  # the common start: known by its checksum, without reading the model
        checkpoint = read_weightless(bundled)
        if self.pointer_path.exists() and self.checkpoint_path(checkpoint.version).exists():
            return False
        with self.lock("promote"):
            if not self.checkpoint_path(checkpoint.version).exists():
                if graph_beside(bundled).is_file():
                    self._copy(graph_beside(bundled), self.graph_path(checkpoint.version))
                self._copy(Path(bundled), self.checkpoint_path(checkpoint.version))
                self._write_summary(checkpoint, "bundled")
                if bundled_tsne is not None and Path(bundled_tsne).is_file():
                    self._copy(Path(bundled_tsne), self.tsne_path(checkpoint.version))
            if self.pointer_path.exists():
                return False
            self._write_pointer(Pointer(checkpoint.version, ()), checkpoint.version, "seed")
            return True

    def _holds(self, path: Path) -> bool:
        """Whether a stored version's checkpoint is this very file (its summary's sha256)."""
        digest = sha256_of(path)
        return any(row.get("sha256") == digest and self.checkpoint_path(row["version"]).is_file()
                   for row in self.versions() if "version" in row)

    def set_serving(self, version: str, action: str, forced: bool = False, reason: str | None = None,
                    site: dict | None = None) -> Pointer:
        """Move the pointer (caller holds ``lock("promote")``); the version must load (``loads``). ``site``: for a
        site-adapted version, the site and what the guard measured on its held-out films (kept in the history)."""
        self.loads(version)
        return self._write_pointer(self.read_pointer(), version, action, forced, reason, site)

    def repair(self, version: str | None = None) -> tuple[Pointer, str] | None:
        """A readable pointer naming a version that loads (caller holds ``lock("promote")``).

        ``version``, or else the newest version in the pointer's history (the backup's when
        the pointer cannot be read) that loads. Returns (the new pointer, what was wrong),
        None when nothing was wrong (moving a sound pointer is a promotion's work);
        ``StoreError`` when no version can be found to serve.
        """
        try:
            pointer = self.read_pointer()
            wrong = None
        except StoreError as exc:
            pointer, wrong = None, str(exc)
        if pointer is not None:
            try:
                self.loads(pointer.serving)
                return None
            except CheckpointError as exc:
                wrong = str(exc)
        history = pointer or self._backup()
        choices = [version] if version else [e["version"] for e in reversed(history.history)] if history else []
        for choice in dict.fromkeys(choices):
            try:
                self.loads(choice)
            except (CheckpointError, StoreError):
                continue
            return self._write_pointer(history or Pointer(choice, ()), choice, "repair", reason=wrong), wrong
        named = f"version {version} cannot be loaded" if version else "no version in the history can be loaded"
        raise StoreError(f"{named}; name one that can: python -m training.store repair VERSION")

    def _backup(self) -> Pointer | None:
        try:
            return self.read_pointer(self.backup_path)
        except StoreError:
            return None

    @contextmanager
    def lock(self, name: str, timeout: float = 30) -> Iterator[None]:
        """Serialise promotions (``promote``) or training runs (``train``) across processes."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the model store {self.root}: {exc.strerror}") from None
        try:
            lock = FileLock(str(self.root / f".{name}.lock"))
            lock.acquire(timeout=timeout)
        except Timeout:
            raise StoreError(f"another {name} is in progress on {self.root}; try again when it ends") from None
        except OSError as exc:
            raise StoreError(f"cannot lock the model store {self.root} to change it: {exc.strerror}") from None
        try:
            yield
        finally:
            lock.release()

    def _write_pointer(self, old: Pointer, version: str, action: str, forced: bool = False,
                       reason: str | None = None, site: dict | None = None) -> Pointer:
        entry = {"version": version, "at": now(), "action": action, "forced": forced, "reason": reason,
                 "by": operator(), **({"site": site} if site else {})}
        pointer = Pointer(version, (*old.history, entry))
        text = json.dumps({"serving": pointer.serving, "history": list(pointer.history)}, indent=1).encode()
        for path in (self.pointer_path, self.backup_path):  # the pointer first: it is what serves
            with atomic_write(path) as handle:
                handle.write(text)
        return pointer

    def record_guard(self, version: str, test_figures: dict, films: int) -> None:
        """Keep the figures the guard measured on the whole test split in ``version``'s summary:
        ``list`` shows them in place of the figures training recorded."""
        path = self.versions_dir / f"{version}.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # ``list`` says the summary is missing; the figures are printed all the same
        summary["guard"] = {"at": now(), "test_films": films,
                            **{k: test_figures[k] for k in SUMMARY_FIGURES if k in test_figures}}
        with atomic_write(path) as handle:
            handle.write(json.dumps(summary, indent=1).encode())

    def _graph_summary(self, version: str, refused: str | None = None) -> dict:
        path = self.graph_path(version)
        if refused is not None or not path.is_file():
            return {"refused": refused} if refused else {}
        return {"sha256": sha256_of(path), "bytes": path.stat().st_size}

    def _write_summary(self, checkpoint: Checkpoint, source: str, graph_refused: str | None = None) -> None:
        path = self.checkpoint_path(checkpoint.version)
        summary = {**summary_of(checkpoint), "added_at": now(), "source": source, "sha256": sha256_of(path),
                   "bytes": path.stat().st_size, "onnx": self._graph_summary(checkpoint.version, graph_refused)}
        with atomic_write(self.versions_dir / f"{checkpoint.version}.json") as handle:
            handle.write(json.dumps(summary, indent=1).encode())

    @staticmethod
    def _copy(source: Path, target: Path) -> None:
        with atomic_write(target) as handle, open(source, "rb") as original:
            shutil.copyfileobj(original, handle)
