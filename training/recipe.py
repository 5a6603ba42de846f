"""The training recipe: every default of a training run, in one place.

``Recipe`` builds ``training.train``'s command-line options from its fields, the
training functions take it instead of argparse's namespace, and the checkpoint records
it (``record``), so a version says how it was made. Why each default is what it is:
docs/model.md (the recipe) and docs/experiments.md (what was tried instead).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


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


#: --bias-field and --consistency: 0 (off) or more.
off_or_amount = number_from(0, float("inf"), "a number, 0 (off) or more")


def option(default, help: str, type=None):
    """A recipe field with its command-line help (and a parser type where float or int will not do)."""
    return field(default=default, metadata={"help": help, "type": type})


@dataclass(frozen=True)
class Recipe:
    """How a network is trained. The defaults are the recipe the bundled model was made with."""

    epochs: int = option(15, "passes over the training films (with --consistency each pass shows every film twice)")
    members: int = option(1, "networks in the ensemble, each from its own seed")
    batch_size: int = option(64, "images a step (with --consistency, two views of half as many films)")
    lr: float = option(3e-3, "peak learning rate of the one-cycle schedule")
    weight_decay: float = option(1e-4, "AdamW's weight decay")
    average_epochs: int = option(3, "keep the mean weights of this many last epochs (BatchNorm statistics recomputed)")
    augment_strength: float = option(1.5, "scales every augmentation's range (training/augment.py)")
    zoom_strength: float = option(2.5, "scales the zoom and aspect ranges alone: squashing a film to a square "
                                       "imprints its aspect ratio, which differs between the classes")
    bias_field: float = option(0.3, "multiply training films by a smooth random exposure field of this strength "
                                    "(0: off): exposure that varies across a film changes no diagnosis",
                               type=off_or_amount)
    consistency: float = option(0.1, "two augmented views of each film a batch and this weight on the squared "
                                     "difference of their logits (0: one view, no penalty): a diagnosis does not "
                                     "depend on how the film was framed or exposed", type=off_or_amount)
    framing_cut: float = option(0.0, "half of the normal films' views cut by up to this share at the top and bottom "
                                     "(half of it at the sides; 0: off): in this dataset a tighter framing goes with "
                                     "pneumonia. Off: it eased tight collimation and cost more under contrast "
                                     "processing (docs/experiments.md)",
                                type=number_from(0, 0.5, "a share from 0 to below 0.5"))
    stn_equivariance: float = option(0.0, "weight on the disagreement of the two views' spatial transforms, each "
                                          "mapped back through its known augmentation (0: off; needs "
                                          "--consistency): the transformer learns to frame the anatomy the same "
                                          "way however the film was framed. Off: it undid a tight "
                                          "collimation's zoom, yet the answer still moved and the films as they "
                                          "are lost (docs/experiments.md)", type=off_or_amount)
    processed_copies: int = option(4, "copies of each training film under random site processing (local contrast "
                                      "enhancement, equalisation, sharpening, curves, re-compression, noise, text; "
                                      "training/processing.py), preprocessed once and cached")
    processed_share: float = option(0.75, "share of the training views drawn from those copies (0: the films as "
                                          "they are only): another hospital's processing changes no diagnosis. "
                                          "Three quarters: fewer answers moved by contrast processing than at half "
                                          "on three seeds (docs/experiments.md)",
                                    type=number_from(0, 1.0000001, "a share from 0 to 1"))
    stn_lr_scale: float = option(0.1, "the spatial transformer's learning rate as a share of --lr (at the full rate "
                                      "its localisation net dies: one fixed warp for every film)")
    channels: tuple[int, ...] = option((16, 32, 64, 128), "the classifier's convolution widths, one block each")
    stn: bool = option(True, "hold the spatial transform at the identity (the ablation that measures it)")
    target_sensitivity: float = option(0.98, "the operating threshold is set for this sensitivity on validation")
    val_fraction: float = option(0.15, "share of train/ patients held out for validation")
    seed: int = option(0, "seeds the validation split, the initialisation and the augmentation")
    dry_run: bool = option(False, "a few films and batches: checks the pipeline (CI); never passes the guard")

    @property
    def views(self) -> int:
        """Views of each film in a batch: two when the consistency penalty compares them."""
        return 2 if self.consistency > 0 else 1

    @property
    def films_per_batch(self) -> int:
        return max(self.batch_size // self.views, 1)

    def record(self) -> dict:
        """What the checkpoint keeps of the recipe (``training_data["recipe"]``)."""
        data = dataclasses.asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One option a field: ``--epochs``, ``--zoom-strength``...; ``--no-stn`` and ``--dry-run`` for the flags."""
        group = parser.add_argument_group("recipe", "how the network is trained (defaults: the bundled model's)")
        for spec in dataclasses.fields(cls):
            help_text = spec.metadata["help"]
            if spec.name == "stn":
                group.add_argument("--no-stn", dest="stn", action="store_false", help=help_text)
            elif isinstance(spec.default, bool):
                group.add_argument(f"--{spec.name.replace('_', '-')}", action="store_true", help=help_text)
            elif isinstance(spec.default, tuple):
                group.add_argument(f"--{spec.name.replace('_', '-')}", type=int, nargs="+", default=list(spec.default),
                                   help=help_text)
            else:
                group.add_argument(f"--{spec.name.replace('_', '-')}", type=spec.metadata["type"] or type(spec.default),
                                   default=spec.default, help=f"{help_text} (default {spec.default:g})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Recipe:
        values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(cls)}
        values["channels"] = tuple(values["channels"])
        return cls(**values)
