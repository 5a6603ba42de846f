"""The film inside its frame: borders and letterboxing found, anatomy left alone."""
import cv2
import numpy as np
import pytest

from harness.images import synthetic_xray
from model.framing import MAX_EDGE, film_bounds

FILM = synthetic_xray(300, 420)  # uint8, (300, 420), no frame


def framed(film, top, bottom, left, right, value):
    return cv2.copyMakeBorder(film, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)


def test_a_film_without_a_frame_keeps_every_pixel():
    assert film_bounds(FILM) == (0, 300, 0, 420)


@pytest.mark.parametrize("value", [0, 128, 255])
@pytest.mark.parametrize("width", [3, 15, 40])
def test_a_uniform_frame_is_found_to_the_pixel(value, width):
    assert film_bounds(framed(FILM, width, width, width, width, value)) == (width, width + 300, width, width + 420)


def test_letterboxing_to_a_square_is_found():
    square = framed(FILM, 60, 60, 0, 0, 0)  # (420, 420): bars above and below
    assert film_bounds(square) == (60, 360, 0, 420)


def test_a_letterbox_inside_a_frame_is_found_too():
    boxed = framed(framed(FILM, 0, 0, 30, 30, 0), 10, 10, 10, 10, 255)
    assert film_bounds(boxed) == (10, 310, 40, 460)


def test_noise_and_compression_inside_the_frame_stay_frame():
    noisy = framed(FILM, 20, 20, 20, 20, 0).astype(np.int16)
    noisy[:20] += np.random.default_rng(0).integers(0, 6, noisy[:20].shape, dtype=np.int16)  # sensor noise
    ok, data = cv2.imencode(".jpg", np.clip(noisy, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 60])
    top, bottom, left, right = film_bounds(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE))
    assert abs(top - 20) <= 2 and abs(left - 20) <= 2 and abs(bottom - 320) <= 2 and abs(right - 440) <= 2


def test_no_edge_gives_up_more_than_its_share():
    dark = FILM.copy()
    dark[:, :250] = 0  # a film black over most of its width is not cut to a sliver
    top, bottom, left, right = film_bounds(dark)
    assert left <= MAX_EDGE * 420 + 1 and right == 420


def test_text_in_the_frame_stops_the_cut_at_the_text():
    film = framed(FILM, 30, 0, 0, 0, 0)
    cv2.putText(film, "R", (5, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    top, *_ = film_bounds(film)
    assert top < 10  # the marker's rows are not flat: the frame ends above it


def test_a_flat_image_is_left_whole():
    assert film_bounds(np.full((100, 80), 7, np.uint8)) == (0, 100, 0, 80)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_any_pixel_type(dtype):
    scale = 257 if dtype == np.uint16 else 1 / 255
    film = (framed(FILM, 12, 12, 12, 12, 0).astype(np.float64) * scale).astype(dtype)
    assert film_bounds(film) == (12, 312, 12, 432)
