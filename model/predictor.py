"""Image in -> probability, decision, and the pictures the app shows.

Shared by the web app, the training and evaluation scripts and the t-SNE generator:
every one of them runs the network through ``infer_batches`` or ``Predictor``, so
they all see the same preprocessing, calibration, gate and threshold.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from .checkpoint import CLASS_NAMES, Checkpoint, load_checkpoint
from .coalesce import Coalescer
from .decode import DecodeLimits, RequestBudget, decode_film
from .errors import ImageError, ImageTooLargeError, InvalidImageError, UnreadableFileError
from .film_facts import NO_FACTS, FilmFacts
from .intended_use import IMAGE_MESSAGES, Reason, format_years, metadata_reasons, polarity
from .pixels import stretch
from .preprocess import PreprocessParams, preprocess

#: The out-of-population score of a film refused for looking inverted alone (above 1: outside).
INVERTED_SCORE = 2.0


class NetworkOutput(NamedTuple):
    """The network's raw answers as arrays, before calibration and gate."""

    logits: np.ndarray  # (N,) float64
    aligned: np.ndarray  # (N, S, S), the STN's output, standardised
    features: np.ndarray  # (N, C)
    theta: np.ndarray  # (N, 2, 3)
    taps: np.ndarray  # (N, D), what the population head reads (``network.TAPS``)

    @classmethod
    def of(cls, out) -> NetworkOutput:
        """From PyTorch's ``network.Inference``."""
        return cls(
            out.logits.detach().float().cpu().numpy().astype(np.float64),
            out.aligned[:, 0].detach().float().cpu().numpy(),
            out.features.detach().float().cpu().numpy(),
            out.theta.detach().float().cpu().numpy(),
            out.taps.detach().float().cpu().numpy(),
        )


def infer_batches(model, inputs: np.ndarray, batch_size: int = 512, device=None) -> NetworkOutput:
    """Preprocessed (N, S, S) -> raw outputs of a PyTorch ``model``, in eval mode, in chunks that bound memory."""
    import torch

    if model.training:  # (``eval()`` walks every submodule: half a millisecond a call)
        model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            batch = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
            x = torch.from_numpy(batch).unsqueeze(1)
            parts.append(NetworkOutput.of(model.infer(x if device is None else x.to(device))))
    return NetworkOutput(*(np.concatenate(column) for column in zip(*parts)))


def calibrate(logits: np.ndarray, calibration: dict) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / calibration["temperature"] + calibration["bias"]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def prior_shift(probability: float, from_prevalence: float, to_prevalence: float) -> float:
    """The same film's probability where ``to_prevalence`` of films show pneumonia, from one
    calibrated where ``from_prevalence`` did: the film's likelihood ratio stays, the prior odds
    change (Bayes). The decision does not: it stays at the validated threshold."""
    if probability >= 1:
        return 1.0
    ratio = (to_prevalence / (1 - to_prevalence)) / (from_prevalence / (1 - from_prevalence))
    odds = probability / (1 - probability) * ratio
    return odds / (1 + odds)


@dataclass(frozen=True)
class BatchOutput:
    probabilities: np.ndarray  # (N,) calibrated
    aligned: np.ndarray  # (N, S, S) in [0, 1]
    features: np.ndarray  # (N, C)
    ood_scores: np.ndarray | None  # (N,), > 1 is out of population; None without a gate
    theta: np.ndarray  # (N, 2, 3), the spatial transformer's affine transform
    #: (N,) "" in population, else why not: "not_xray", "adult", "lateral", "unlike" or "inverted"
    #: (see ``IMAGE_MESSAGES``)
    outside: np.ndarray | None = None


@dataclass(frozen=True)
class Prediction:
    probability: float  # for research only when the film is outside the intended use
    label: str | None  # "PNEUMONIA" or "NORMAL"; None for a film outside the intended use
    threshold: float
    model_input: np.ndarray  # float32 (S, S) in [0, 1], what the network was given
    aligned: np.ndarray  # float32 (S, S) in [0, 1], after the spatial transformer
    ood_score: float | None = None
    saliency: np.ndarray | None = None  # float32 (S, S) in [0, 1], over ``aligned``
    population_reasons: tuple[Reason, ...] = ()  # empty when the film is in the intended population
    features: np.ndarray | None = None  # (C,) the learned features, for the nearest training films

    @property
    def is_pneumonia(self) -> bool:
        return self.label == CLASS_NAMES[1]

    @property
    def in_distribution(self) -> bool:
        return not self.population_reasons


class Predictor:
    """Holds one loaded checkpoint; safe to share between threads.

    Single predictions made on several threads at once share forward passes
    (``Coalescer``): a batch costs less per film than films one at a time.
    """

    def __init__(self, checkpoint: Checkpoint, limits: DecodeLimits = DecodeLimits(), network=None):
        """``network``: an ``onnx_network.OnnxNetwork`` of this checkpoint, run instead of PyTorch
        (then PyTorch is never imported: a serving process runs this way)."""
        self.checkpoint = checkpoint
        self.limits = limits
        self.network = network
        self._coalescer = Coalescer(self._predict_prepared)

    @cached_property
    def model(self):
        """The checkpoint's network in PyTorch, for the scripts that train and measure."""
        return self.checkpoint.model.eval()

    @property
    def runtime(self) -> str:
        """What runs the network: "onnxruntime" or "pytorch"."""
        return "pytorch" if self.network is None else "onnxruntime"

    @classmethod
    def from_path(cls, path: str | os.PathLike, limits: DecodeLimits = DecodeLimits()) -> Predictor:
        return cls(load_checkpoint(path, expected_preprocess=PreprocessParams()), limits)

    @property
    def threshold(self) -> float:
        return self.checkpoint.threshold

    @property
    def version(self) -> str:
        return self.checkpoint.version

    def preprocess(self, image: bytes | np.ndarray) -> np.ndarray:
        return preprocess(image, self.checkpoint.preprocess, self.limits)

    @cached_property
    def works(self) -> bool:
        """One forward pass on a flat gray image gives a finite probability (checked once)."""
        side = self.checkpoint.preprocess.size
        return bool(np.isfinite(self.predict_many(np.full((1, side, side), 0.5, np.float32)).probabilities).all())

    def predict_many(self, inputs: np.ndarray, batch_size: int = 512) -> BatchOutput:
        """Preprocessed (N, S, S) -> calibrated probabilities, aligned images, features, gate scores."""
        if self.network is not None:
            return self._finish(self.network.run(inputs, batch_size)[0], inputs)
        return self._finish(infer_batches(self.model, inputs, batch_size), inputs)

    def predict(self, image: bytes | np.ndarray, saliency: bool = False, age_years: float | None = None) -> Prediction:
        """Raises ``model.ImageError`` (with a user-facing message) for unusable input.

        ``age_years``: the patient's age as the person knows it. A film outside the
        intended use (by its DICOM header, that age or its pixels) gets its reasons and
        no label. With ``saliency`` the Grad-CAM map comes from the same forward pass.
        Without it, predictions made on other threads meanwhile share the forward pass.
        """
        model_input, facts = self._prepare(image, age_years)
        if not saliency:
            return self._coalescer.submit((model_input, facts, age_years))
        return self._predict_one(model_input, facts, age_years, saliency=True)

    def _predict_one(self, model_input: np.ndarray, facts: FilmFacts, age_years: float | None,
                     saliency: bool = False) -> Prediction:
        if self.network is not None:
            raw, activations = self.network.run(model_input[None])
            heat = self.network.grad_cam(activations, model_input.shape[-1])[0] if saliency else None
            return self._assemble(self._finish(raw, model_input[None]), 0, model_input, facts, age_years, heat)
        import torch

        from .saliency import grad_cam

        with torch.inference_mode():
            out = self.model.infer(torch.from_numpy(model_input[None, None]))
        heat = grad_cam(self.model, out, model_input.shape[-1])[0] if saliency else None
        raw = NetworkOutput.of(out)
        return self._assemble(self._finish(raw, model_input[None]), 0, model_input, facts, age_years, heat)

    def _predict_prepared(self, items: list[tuple[np.ndarray, FilmFacts, float | None]]) -> list[Prediction]:
        """The ``Coalescer``'s batch: one film alone takes the single-image path (no stacking, no copies)."""
        if len(items) == 1:
            return [self._predict_one(*items[0])]
        inputs = np.stack([model_input for model_input, _, _ in items])
        batch = self.predict_many(inputs)
        return [self._assemble(batch, row, inputs[row], facts, age) for row, (_, facts, age) in enumerate(items)]

    def predict_files(self, files: list[bytes], age_years: float | None = None,
                      budget: RequestBudget | None = None) -> list[Prediction | ImageError]:
        """Several uploads: decoded two at a time (the decoders release the GIL), then one
        batched forward pass. A file that cannot be read, or that the request's ``budget``
        cannot pay for, gets its ``ImageError`` in its place."""
        limits = self.limits if budget is None else dataclasses.replace(self.limits, budget=budget)
        with ThreadPoolExecutor(max_workers=2) as pool:
            prepared = list(pool.map(lambda data: self._try_prepare(data, age_years, limits), files))
        ready = [i for i, item in enumerate(prepared) if not isinstance(item, ImageError)]
        results: list[Prediction | ImageError] = list(prepared)
        if ready:
            inputs = np.stack([prepared[i][0] for i in ready])
            batch = self.predict_many(inputs)
            for row, i in enumerate(ready):
                results[i] = self._assemble(batch, row, inputs[row], prepared[i][1], age_years)
        return results

    def _try_prepare(self, data: bytes, age_years: float | None, limits: DecodeLimits):
        try:
            if limits.budget is not None:
                limits.budget.check_time()
            return self._prepare(data, age_years, limits)
        except ImageError as error:
            return error

    def _prepare(self, image: bytes | np.ndarray, age_years: float | None,
                 limits: DecodeLimits | None = None) -> tuple[np.ndarray, FilmFacts]:
        """Decode, check the ages agree, preprocess. Whatever a reader raises on a malformed
        file becomes that file's ``ImageError``: one bad upload never fails a request."""
        try:
            return self._read(image, age_years, limits or self.limits)
        except ImageError:
            raise
        except MemoryError:
            raise ImageTooLargeError("The image needs more memory to read than the server can give it.") from None
        except Exception as exc:  # a decoder's own failure on a file it half understands
            raise UnreadableFileError("The file could not be read: it is corrupt or malformed.",
                                      type(exc).__name__) from None

    def _read(self, image: bytes | np.ndarray, age_years: float | None,
              limits: DecodeLimits) -> tuple[np.ndarray, FilmFacts]:
        """Decode (a JPEG at reduced scale), check the ages agree, preprocess."""
        facts = NO_FACTS
        if isinstance(image, (bytes, bytearray, memoryview)):
            image, facts = decode_film(bytes(image), limits, self.checkpoint.preprocess.decode_side)
        if age_years is not None and facts.age_years is not None and abs(age_years - facts.age_years) > 1:
            raise InvalidImageError(
                f"The age entered ({format_years(age_years)}) and the DICOM header's age "
                f"({format_years(facts.age_years)}) differ by more than a year: check which is right."
            )
        return self.preprocess(image), facts

    def _assemble(self, batch: BatchOutput, row: int, model_input: np.ndarray, facts: FilmFacts,
                  age_years: float | None, heat: np.ndarray | None = None) -> Prediction:
        probability = float(batch.probabilities[row])
        reasons = metadata_reasons(facts, age_years, self.checkpoint.intended_use)
        if batch.outside is not None and batch.outside[row]:
            reasons.append(Reason("image", IMAGE_MESSAGES[batch.outside[row]]))
        return Prediction(
            probability=probability,
            label=None if reasons else CLASS_NAMES[1] if probability >= self.threshold else CLASS_NAMES[0],
            threshold=self.threshold,
            model_input=model_input,
            aligned=batch.aligned[row],
            ood_score=None if batch.ood_scores is None else float(batch.ood_scores[row]),
            saliency=heat,
            population_reasons=tuple(reasons),
            features=batch.features[row],
        )

    def _finish(self, raw: NetworkOutput, inputs: np.ndarray) -> BatchOutput:
        ood, outside = self._gates(raw, inputs)
        return BatchOutput(
            probabilities=calibrate(raw.logits, self.checkpoint.calibration),
            aligned=np.stack([stretch(a) for a in raw.aligned]) if len(raw.aligned) else raw.aligned,
            features=raw.features,
            ood_scores=ood,
            theta=raw.theta,
            outside=outside,
        )

    def _gates(self, raw: NetworkOutput, inputs: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """One score (> 1 is outside) and one reason per image from both parts of the gate.

        The feature/pixel gate speaks for photos, documents and other modalities; the
        population gate (``population.py``) for adults' films and lateral views. Where both
        refuse an image, neither knows which it is (the population gate has seen no photos,
        and adults' films are far from the training films' features too): the reason says so.
        """
        gate, population = self.checkpoint.gate, self.checkpoint.population_gate
        if gate is None and population is None:
            return None, None
        scores = gate.scores(raw.features, inputs) if gate is not None else np.zeros(len(inputs))
        outside = np.where(scores > 1, "not_xray", "").astype(object)
        if population is not None:
            population_scores, kinds = population.assess(inputs, raw.taps)
            refused = population_scores > 1
            outside = np.where(refused, np.where(outside == "", kinds, "unlike"), outside)
            scores = np.maximum(scores, population_scores)
        # A film the gates pass but that looks inverted is refused too: never scored as it is.
        inverted = (outside == "") & (polarity(inputs) < 0)
        outside = np.where(inverted, "inverted", outside)
        scores = np.where(inverted, np.maximum(scores, INVERTED_SCORE), scores)
        return scores, outside
