"""Pictures that are not chest X-rays: photos, documents, other modalities, synthetic patterns.

scikit-image's bundled samples (no download) and a few made here; what the
population gate must refuse.
"""
from __future__ import annotations

import cv2
import numpy as np


def non_xray_images() -> list[tuple[str, np.ndarray]]:
    """Natural photos, documents, other modalities (scikit-image's bundled samples) and synthetic pictures."""
    from skimage import data

    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "text", "page", "moon", "horse", "clock",
             "hubble_deep_field", "immunohistochemistry", "logo", "retina", "cat", "brick", "grass", "gravel",
             "checkerboard", "binary_blobs", "colorwheel", "shepp_logan_phantom", "cell", "microaneurysms"]
    images = []
    for name in names:
        image = np.asarray(getattr(data, name)())
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.dtype.kind == "f":
            image = np.uint8(np.clip(image, 0, 1) * 255)
        images.append((name, image))
    rng = np.random.default_rng(0)
    document = np.full((400, 300), 245, np.uint8)
    for i, line in enumerate(["DISCHARGE SUMMARY", "Patient seen in clinic", "Temp 38.2 C, cough 3 days",
                              "Plan: chest film, review", "Signed: Dr. A. Example"]):
        cv2.putText(document, line, (12, 40 + 40 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.55, 20, 1)
    yy, xx = np.mgrid[0:256, 0:256]
    images += [
        ("uniform-noise", rng.integers(0, 256, (256, 256), dtype=np.uint8)),
        ("gaussian-noise", np.uint8(np.clip(rng.normal(128, 40, (256, 256)), 0, 255))),
        ("gradient", np.uint8(xx)),
        ("black", np.zeros((256, 256), np.uint8)),
        ("white", np.full((256, 256), 255, np.uint8)),
        ("stripes", np.uint8((xx // 16 % 2) * 255)),
        ("circle", np.uint8(((xx - 128) ** 2 + (yy - 128) ** 2 < 80**2) * 255)),
        ("document", document),
    ]
    return images
