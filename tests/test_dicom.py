import io
import logging
import re
import tracemalloc

import numpy as np
import pydicom
import pytest

from harness.dicom_files import PATIENT_ID, PATIENT_NAME, deflate_bomb, make_dicom, twelve_bit
from harness.images import encode, synthetic_xray
from model import ImageTooLargeError, InvalidImageError, decode_image, preprocess
from tests.client import network_probability

XRAY = synthetic_xray(320, 280)


def test_monochrome2_twelve_bit_matches_the_png_path():
    decoded = preprocess(make_dicom(twelve_bit(XRAY)))
    np.testing.assert_allclose(decoded, preprocess(XRAY), atol=0.02)


def test_monochrome1_is_inverted():
    inverted = twelve_bit(255 - XRAY)
    np.testing.assert_allclose(preprocess(make_dicom(inverted, photometric="MONOCHROME1")), preprocess(XRAY), atol=0.02)


def test_voi_window_is_applied():
    pixels = twelve_bit(XRAY)
    windowed = decode_image(make_dicom(pixels, window=(1600, 800)))
    plain = decode_image(make_dicom(pixels))
    # the window clips everything outside 1200..2000: more pixels pinned at the ends
    assert np.mean((windowed == 0) | (windowed == 1)) > np.mean((plain == 0) | (plain == 1)) + 0.1


def test_sixteen_bit_data():
    pixels = (XRAY.astype(np.uint16) * 257).astype(np.uint16)
    np.testing.assert_allclose(preprocess(make_dicom(pixels, bits_stored=16)), preprocess(XRAY), atol=0.02)


def test_rle_compressed_dicom_decodes():
    np.testing.assert_allclose(preprocess(make_dicom(twelve_bit(XRAY), compress=True)), preprocess(XRAY), atol=0.02)


@pytest.mark.parametrize(
    "kwargs, words",
    [({"pixel_data": False}, "no pixel data"), ({"modality": "CT"}, "CT study"), ({"modality": "MR"}, "MR study"),
     ({"frames": 3}, "3 frames")],
)
def test_refusals(kwargs, words):
    with pytest.raises(InvalidImageError, match=words):
        decode_image(make_dicom(twelve_bit(XRAY), **kwargs))


def test_deflated_and_preambleless_files_read_as_the_plain_file():
    plain = decode_image(make_dicom(twelve_bit(XRAY)))
    for kwargs in ({"deflate": True}, {"preamble": False}, {"deflate": True, "preamble": False}):
        np.testing.assert_array_equal(decode_image(make_dicom(twelve_bit(XRAY), **kwargs)), plain)


def test_a_deflate_bomb_is_refused_before_it_inflates():
    bomb = deflate_bomb(3)  # about 3 GB inflated
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match="inflates to more than 77 MB"):
            decode_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 300 * 2**20, f"{peak / 2**20:.0f} MB allocated"


@pytest.mark.parametrize("samples, bits", [(94, 16), (1, 32), (1, 15120)])
def test_implausible_sample_layouts_are_refused_before_the_pixels(samples, bits):
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(twelve_bit(XRAY))))
    dataset.SamplesPerPixel, dataset.BitsAllocated = samples, bits
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    with pytest.raises(InvalidImageError, match="a radiograph has one sample"):
        decode_image(buffer.getvalue())


def test_truncated_dicom_is_refused():
    data = make_dicom(twelve_bit(XRAY))
    with pytest.raises(InvalidImageError):
        decode_image(data[: len(data) // 2])


def test_refusal_messages_name_no_patient():
    for kwargs in ({"pixel_data": False}, {"modality": "CT"}, {"frames": 2}):
        with pytest.raises(InvalidImageError) as error:
            decode_image(make_dicom(twelve_bit(XRAY), **kwargs))
        assert PATIENT_NAME not in str(error.value) and PATIENT_ID not in str(error.value)


# ---- through the app ------------------------------------------------------------


def test_dicom_through_the_api_and_the_form_without_patient_data(uploads, caplog):
    dicom = make_dicom(twelve_bit(synthetic_xray(400, 320)))
    with caplog.at_level(logging.DEBUG):
        response = uploads.api(dicom, "study.dcm")
        page = uploads.form(dicom, "study.dcm")
    assert response.status_code == 200 and page.status_code == 200
    expected = network_probability(uploads.api(encode(synthetic_xray(400, 320), ".png")).get_json())
    assert network_probability(response.get_json()) == pytest.approx(expected, abs=0.05)
    page_text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page.get_data(as_text=True))
    for text in (response.get_data(as_text=True), page_text, caplog.text):
        assert "Doe" not in text and PATIENT_ID not in text and PATIENT_NAME not in text


def test_non_radiograph_dicom_is_refused(uploads):
    ct = make_dicom(twelve_bit(synthetic_xray(300, 300)), modality="CT")
    response = uploads.api(ct, "ct.dcm")
    assert response.status_code == 400 and "CT study" in response.get_json()["error"]
