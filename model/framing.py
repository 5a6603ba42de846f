"""Find the film inside the uniform frame an X-ray system or a viewer may add around it.

Exports differ by site: a thin black border, a gray or white frame, letterboxing to a
square. Squashed to the model's square with the film, such a frame shrinks the anatomy
and adds edges the training films never had. ``film_bounds`` finds, from each edge
inwards, the lines (rows or columns) that are one flat value, and returns the rectangle
inside them; ``preprocess`` crops to it before the squash, for every film the model sees,
in training and in the app alike.

A line counts as frame when nearly all its pixels lie within a small tolerance of the
edge line's value (JPEG ringing and noise stay inside it; anatomy, text and a gradient do
not). An edge whose own outermost line is not flat has no frame. No edge gives up more
than ``MAX_EDGE`` of the side, so a dark film is never cut to a sliver.
"""
from __future__ import annotations

import numpy as np

#: A pixel belongs to a flat line when it lies within this share of the film's range of the line's value.
TOLERANCE = 0.04
#: The share of a line's pixels that must do so.
SHARE = 0.985
#: At most this share of the side is taken from any one edge.
MAX_EDGE = 0.3


def film_bounds(gray: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the film inside its frame: ``gray[top:bottom, left:right]``.

    ``gray``: a 2-D array of any numeric type. The whole array when it has no frame.
    """
    height, width = gray.shape
    x = np.asarray(gray)  # lines are converted to float only where they are looked at
    low, high = float(x.min()), float(x.max())
    if high - low < 1e-6:
        return 0, height, 0, width
    tolerance = TOLERANCE * (high - low)
    top, bottom, left, right = 0, height, 0, width
    most_rows, most_columns = int(MAX_EDGE * height), int(MAX_EDGE * width)
    for _ in range(2):  # a frame on four sides: rows, columns, and once more for a letterbox inside a frame
        region = x[top:bottom, left:right]
        top_cut = _flat_run(region, tolerance, most_rows - top)
        bottom_cut = _flat_run(region[::-1], tolerance, most_rows - (height - bottom))
        top, bottom = top + top_cut, bottom - bottom_cut
        region = x[top:bottom, left:right].T
        left_cut = _flat_run(region, tolerance, most_columns - left)
        right_cut = _flat_run(region[::-1], tolerance, most_columns - (width - right))
        left, right = left + left_cut, right - right_cut
        if not (top_cut or bottom_cut or left_cut or right_cut):
            break
    if bottom - top < 2 or right - left < 2:
        return 0, height, 0, width
    return top, bottom, left, right


def _flat_run(lines: np.ndarray, tolerance: float, limit: int) -> int:
    """How many of ``lines`` (rows of a 2-D array, the edge first) are flat at the edge line's value."""
    if len(lines) < 2 or limit < 1:
        return 0
    first = lines[0].astype(np.float32)
    value = np.median(first)
    if np.mean(np.abs(first - value) <= tolerance) < SHARE:
        return 0  # most films: no frame, and one line looked at
    edge = lines[: min(limit, len(lines) - 1)].astype(np.float32)
    flat = (np.abs(edge - value) <= tolerance).mean(axis=1) >= SHARE
    return int(np.argmin(flat)) if not flat.all() else len(flat)
