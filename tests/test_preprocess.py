import cv2
import numpy as np
import pytest

from harness.images import encode, synthetic_xray
from model import (
    ImageTooLargeError,
    InvalidImageError,
    PreprocessParams,
    UnsupportedImageError,
    decode_image,
    preprocess,
)
from model.decode import DecodeLimits

SQUASH = PreprocessParams(geometry="squash")
CROP = PreprocessParams(geometry="center_crop")


def test_output_is_64x64_float_in_unit_range():
    out = preprocess(synthetic_xray(500, 300))
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0


def test_center_crop_keeps_only_the_central_square():
    wide = synthetic_xray(100, 300)
    np.testing.assert_array_equal(preprocess(wide, CROP), preprocess(wide[:, 100:200], CROP))
    tall = synthetic_xray(301, 120)
    np.testing.assert_array_equal(preprocess(tall, CROP), preprocess(tall[90:210, :], CROP))


def test_squash_keeps_the_whole_width():
    image = np.full((100, 300), 128, np.uint8)
    image[:, :100] = 0
    image[:, 200:] = 255
    keep = {"frame": "keep"}  # flat bands at the edges would be trimmed as a frame (test_framing.py)
    squashed = preprocess(image, PreprocessParams(geometry="squash", **keep))
    assert squashed[:, :16].mean() < 0.05 and squashed[:, -16:].mean() > 0.95
    # the centre crop sees none of either band: a flat picture
    assert preprocess(image, PreprocessParams(geometry="center_crop", **keep)).max() == 0.0


def test_square_input_is_identical_under_both_geometries():
    image = synthetic_xray(224, 224)
    np.testing.assert_array_equal(preprocess(image, SQUASH), preprocess(image, CROP))


def test_squash_of_a_tall_image_matches_resizing_it_square_first():
    image = synthetic_xray(400, 250)
    direct = preprocess(image, SQUASH)
    resized = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    assert np.abs(direct - preprocess(resized, SQUASH)).max() < 0.05


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_bit_depth_does_not_change_the_result(dtype):
    base = synthetic_xray(256, 200, dtype=np.uint16)
    image = base if dtype == np.uint16 else (base >> 8).astype(np.uint8)
    np.testing.assert_allclose(preprocess(image), preprocess(base), atol=0.02)


def test_sixteen_bit_png_is_decoded_at_full_depth():
    image = (synthetic_xray(200, 200, dtype=np.uint16) >> 4)  # 12-bit data in 16-bit words
    decoded = decode_image(encode(image))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, image)
    assert preprocess(encode(image)).max() == 1.0


def test_rgb_and_rgba_equal_gray():
    gray = synthetic_xray(240, 200)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(gray, 255)[:, :, None]], axis=2)
    expected = preprocess(gray)
    np.testing.assert_allclose(preprocess(rgb), expected, atol=1e-5)
    np.testing.assert_allclose(preprocess(rgba), expected, atol=1e-5)
    np.testing.assert_allclose(preprocess(encode(rgba)), expected, atol=0.02)


def test_exif_orientation_is_applied():
    from io import BytesIO

    from PIL import Image

    image = synthetic_xray(300, 200)  # portrait
    buffer = BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(image).save(buffer, "JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (200, 300)


def test_empty_and_garbage_are_refused():
    with pytest.raises(InvalidImageError):
        decode_image(b"")
    with pytest.raises(UnsupportedImageError):
        decode_image(b"<html><body>not an x-ray</body></html>")


def test_truncated_jpeg_is_refused():
    data = encode(synthetic_xray(300, 300), ".jpg")
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_is_checked_before_decoding():
    data = encode(np.zeros((400, 400), np.uint8))
    with pytest.raises(ImageTooLargeError):
        decode_image(data, DecodeLimits(max_pixels=100_000))


@pytest.mark.parametrize("shape", [(10, 10), (1000, 100)])
def test_too_small_or_elongated_is_refused(shape):
    with pytest.raises(InvalidImageError):
        decode_image(encode(np.zeros(shape, np.uint8)))


def test_params_round_trip_and_validation():
    params = PreprocessParams(geometry="center_crop", prefilter_size=None)
    assert PreprocessParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError):
        PreprocessParams(geometry="stretch")
    with pytest.raises(ValueError):
        PreprocessParams(equalize="gamma")
    with pytest.raises(ValueError):
        PreprocessParams.from_dict({**params.to_dict(), "version": 99})
    with pytest.raises(ValueError):
        PreprocessParams.from_dict({**params.to_dict(), "clahe": True})


def test_histogram_equalisation_undoes_an_exposure_change():
    image = synthetic_xray(300, 260).astype(np.float32) / 255
    params = PreprocessParams(equalize="hist")
    gap = np.abs(preprocess(image**2, params) - preprocess(np.sqrt(image), params)).mean()
    plain_gap = np.abs(preprocess(image**2) - preprocess(np.sqrt(image))).mean()
    assert gap < plain_gap / 4


def test_clahe_changes_local_contrast_within_the_unit_range():
    image = synthetic_xray(300, 260)
    out = preprocess(image, PreprocessParams(equalize="clahe"))
    assert out.min() == 0 and out.max() == 1
    assert np.abs(out - preprocess(image)).mean() > 0.01


def version_1(data: bytes, params=PreprocessParams()) -> np.ndarray:
    """The first version's arithmetic: full decode, float, area to 224, cubic to 64, stretch."""
    from model.pixels import stretch, to_gray_float

    gray = to_gray_float(decode_image(data))
    gray = cv2.resize(gray, (224, 224), interpolation=cv2.INTER_AREA) if gray.shape != (224, 224) else gray
    return stretch(cv2.resize(gray, (64, 64), interpolation=cv2.INTER_CUBIC))


def test_a_224_px_training_copy_gives_exactly_the_first_version_s_input():
    """Why the bundled network (trained on 224 px copies) stays valid under preprocessing version 2."""
    gray = synthetic_xray(224, 224, seed=7)
    rgb_jpeg = encode(np.dstack([gray, gray, gray]), ".jpg")
    for data in (rgb_jpeg, encode(gray, ".jpg"), encode(gray, ".png")):
        np.testing.assert_array_equal(preprocess(data), version_1(data))


def test_a_large_jpeg_decodes_at_a_reduced_scale_and_keeps_its_answer():
    data = encode(synthetic_xray(1500, 1100, seed=3), ".jpg")
    assert decode_image(data).shape == (1500, 1100)
    assert decode_image(data, min_side=224).shape == (375, 275)  # 1/4: both sides still >= 224
    # noise detail the DCT scale drops (the frame is kept: the comparison is of the decode alone)
    assert np.abs(preprocess(data, PreprocessParams(frame="keep")) - version_1(data)).mean() < 0.02


def _drafted(data: bytes, min_side: int | None):
    """The file opened by Pillow, reduced by ``draft`` as ``decode_image`` does; and its full size."""
    from io import BytesIO

    from PIL import Image

    image = Image.open(BytesIO(data))
    full_size = image.size
    if min_side:
        image.draft(image.mode, (min_side, min_side))
    return image, full_size


def _pillow_pixels(data: bytes, min_side: int | None) -> np.ndarray:
    return np.asarray(_drafted(data, min_side)[0].convert("L"))


def _opencv_path(data: bytes, min_side: int | None):
    from model.decode import _decode_gray_jpeg

    return _decode_gray_jpeg(data, *_drafted(data, min_side))


@pytest.mark.parametrize("width, height, scale", [(300, 250, 1), (600, 470, 2), (1000, 913, 4), (1900, 1803, 8)])
def test_a_whole_gray_jpeg_decodes_by_opencv_to_pillow_s_pixels(width, height, scale):
    data = encode(synthetic_xray(height, width, seed=scale), ".jpg")
    for min_side in (224, None):
        fast = _opencv_path(data, min_side)
        assert fast is not None  # the OpenCV path was taken
        expected = _pillow_pixels(data, min_side)
        assert expected.shape == ((-(-height // scale), -(-width // scale)) if min_side else (height, width))
        np.testing.assert_array_equal(fast, expected)
        np.testing.assert_array_equal(decode_image(data, min_side=min_side), expected)


def test_other_jpegs_are_left_to_pillow():
    from io import BytesIO

    from PIL import Image

    gray = synthetic_xray(600, 500, seed=4)

    def saved(image, **options):
        buffer = BytesIO()
        image.save(buffer, "JPEG", **options)
        return buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    whole = encode(gray, ".jpg")
    others = {
        "progressive": saved(Image.fromarray(gray), progressive=True),
        "colour": encode(np.dstack([gray, gray, gray]), ".jpg"),
        "turned by EXIF": saved(Image.fromarray(gray), exif=exif),
        "truncated": whole[: len(whole) // 2],
        "followed by other bytes": whole + b"PK\x03\x04",
    }
    for name, data in others.items():
        assert _opencv_path(data, 224) is None, name
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        decode_image(others["truncated"], min_side=224)
    # cut short with an end marker put back: both decoders fill the missing rows the same way
    mended = whole[: len(whole) // 2] + b"\xff\xd9"
    np.testing.assert_array_equal(decode_image(mended, min_side=224), _pillow_pixels(mended, 224))
