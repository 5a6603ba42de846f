"""What the spatial transformer did to a film, in words a reader can check by eye.

``theta`` is the sampling transform of ``affine_grid``: it maps each output pixel
(normalised coordinates, -1..1, y pointing down) to where it is read in the input. The
film itself undergoes the inverse, which is what is reported: a rotation
(anticlockwise positive, as seen on screen), a zoom (above 1 magnifies) and a shift
of the film's content (fraction of the side, right and down positive).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

_CORNERS = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1], [0, 0]], dtype=np.float64)


class Alignment(NamedTuple):
    angle_deg: float
    zoom: float
    shift_x: float
    shift_y: float
    #: mean distance, in fractions of the side, that the corners and centre move: one
    #: number to rank films by how much the transformer changed them
    movement: float

    def to_dict(self) -> dict:
        return {key: round(float(value), 4) for key, value in self._asdict().items()}


def describe(theta: np.ndarray) -> Alignment:
    """One (2, 3) transform -> the rotation, zoom and shift applied to the film."""
    theta = np.asarray(theta, dtype=np.float64)
    sample, offset = theta[:, :2], theta[:, 2]
    forward = np.linalg.inv(sample)  # input position -> output position
    # y points down on screen, so an anticlockwise turn has a negative forward[1, 0].
    angle = math.degrees(math.atan2(-forward[1, 0], forward[0, 0]))
    zoom = math.sqrt(abs(np.linalg.det(forward)))
    shift = -forward @ offset / 2  # where the input's centre lands, in fractions of the side
    read_at = _CORNERS @ sample.T + offset  # where each point of the output is read
    movement = float(np.mean(np.linalg.norm(read_at - _CORNERS, axis=1)) / 2)
    return Alignment(angle, zoom, float(shift[0]), float(shift[1]), movement)
