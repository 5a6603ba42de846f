"""ONNX Runtime against PyTorch for the bundled model (issue 46).

    python -m bench.onnx

The bundled version's serving file (``model/weights/pneumonia_stn.onnx``, what a worker
reads; made and checked by ``training.onnx_export``) against its checkpoint. Prints:
- same answers: on the 624 test films through the whole path (decode, framing,
  preprocessing, network, calibration, gates, Grad-CAM) and on the test films under every
  change of the site-shift suite (inputs straight to ``predict_many``): decisions and
  refusals that differ, the largest probability difference (goal: none, <= 1e-4);
- speed, interleaved in one process, one thread: the network on one film, and a whole
  prediction of a JPEG, each against a plain ``cv2.imdecode`` of the same file;
- memory: the resident size of a fresh process that loads the serving file and predicts
  (no torch imported), against one that loads the checkpoint with torch.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from model import Predictor, load_checkpoint
from model.serving_file import ServingFile, graph_beside
from model.settings import DEFAULT_CHECKPOINT, data_dir
from training.data import scan_split
from training.site_shift import CHANGES, model_inputs

MEMORY = {
    "onnxruntime": "import numpy as np; from model.serving_file import ServingFile; "
                   "p = ServingFile(sys.argv[1]).predictor(); p.predict_many(np.zeros((1, 64, 64), np.float32)); "
                   "assert 'torch' not in sys.modules; ",
    "torch": "import numpy as np, torch; from model import Predictor; "
             "p = Predictor.from_path(sys.argv[2]); p.predict_many(np.zeros((1, 64, 64), np.float32)); ",
}


def resident_mb(kind: str, graph: Path) -> float:
    # the resident size now (ru_maxrss would count the forked bench's pages before exec)
    code = "import sys, psutil; " + MEMORY[kind] + "print(psutil.Process().memory_info().rss / 2**20)"
    out = subprocess.run([sys.executable, "-c", code, str(graph), str(DEFAULT_CHECKPOINT)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(DEFAULT_CHECKPOINT)
    graph = graph_beside(DEFAULT_CHECKPOINT)
    eager, onnx = Predictor(checkpoint), ServingFile(graph).predictor()
    assert onnx.version == eager.version

    files = [data_dir() / f for f, _ in scan_split(data_dir(), "test")]
    differ, worst, worst_map = 0, 0.0, 0.0
    for path in files:
        data = path.read_bytes()
        a, b = eager.predict(data, saliency=True), onnx.predict(data, saliency=True)
        differ += (a.label, a.in_distribution, [r.check for r in a.population_reasons]) != (
            b.label, b.in_distribution, [r.check for r in b.population_reasons])
        worst = max(worst, abs(a.probability - b.probability))
        if a.saliency is not None and b.saliency is not None:
            worst_map = max(worst_map, float(np.abs(a.saliency - b.saliency).max()))
    print(f"test films, whole path: {len(files)} films, {differ} answers differ, probability within "
          f"{worst:.1e}, Grad-CAM map within {worst_map:.1e}")

    names = list(CHANGES)
    inputs, _ = model_inputs(files, checkpoint.preprocess, names, workers=2)
    differ, worst, total = 0, 0.0, 0
    for i, _ in enumerate(names):
        a, b = eager.predict_many(inputs[i]), onnx.predict_many(inputs[i])
        differ += int(np.sum((a.probabilities >= checkpoint.threshold) != (b.probabilities >= checkpoint.threshold)))
        differ += int(np.sum((a.ood_scores > 1) != (b.ood_scores > 1)))
        worst = max(worst, float(np.abs(a.probabilities - b.probabilities).max()))
        total += len(inputs[i])
    print(f"site-shift suite: {len(names)} changes x {len(files)} films ({total}), {differ} decisions or refusals "
          f"differ, probability within {worst:.1e}")

    data = files[0].read_bytes()
    one = eager.preprocess(data)
    timings = {name: [] for name in ("decode", "torch network", "onnx network", "torch predict", "onnx predict")}
    calls = {"decode": lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE),
             "torch network": lambda: eager.predict_many(one[None]),
             "onnx network": lambda: onnx.predict_many(one[None]),
             "torch predict": lambda: eager.predict(data), "onnx predict": lambda: onnx.predict(data)}
    for round_ in range(320):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if round_ >= 20:
                timings[name].append((time.perf_counter() - started) * 1000)
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"one film, medians of 300 interleaved rounds: decode {median['decode']:.2f} ms; network torch "
          f"{median['torch network']:.2f} ms, onnx {median['onnx network']:.2f} ms "
          f"({median['onnx network'] / median['torch network']:.2f}x); whole prediction torch "
          f"{median['torch predict'] / median['decode']:.2f}x the decode, "
          f"onnx {median['onnx predict'] / median['decode']:.2f}x")

    print(f"a fresh process that loads the version and predicts: from its serving file (no torch) "
          f"{resident_mb('onnxruntime', graph):.0f} MB resident, from its checkpoint with torch "
          f"{resident_mb('torch', graph):.0f} MB; serving file {graph.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
