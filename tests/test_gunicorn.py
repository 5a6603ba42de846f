"""Smoke tests of the real server: gunicorn with the bundled model on a loopback port."""
import subprocess
import sys

import pytest

from tests.support.images import encode, synthetic_xray
from tests.support.server import ROOT, gunicorn, post_image

pytestmark = pytest.mark.slow


def test_gunicorn_serves_predictions():
    xray = encode(synthetic_xray(500, 400), ".jpg")
    with gunicorn(workers=1) as (base, _):
        status, body = post_image(base, xray)
        assert status == 200
        assert body["label"] in ("NORMAL", "PNEUMONIA") and 0 <= body["probability"] <= 1
        status, body = post_image(base, b"not an image")
        assert status == 415 and "error" in body
        status, body = post_image(base, xray)  # still serving after a refusal
        assert status == 200


def test_gunicorn_refuses_to_start_on_a_truncated_checkpoint(tmp_path):
    bundled = (ROOT / "model" / "weights" / "pneumonia_stn.pt").read_bytes()
    broken = tmp_path / "truncated.pt"
    broken.write_bytes(bundled[: len(bundled) // 3])
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "wsgi:app", "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        env={"PNEUMONIA_CHECKPOINT": str(broken), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "cannot start" in result.stderr and "truncated or corrupt" in result.stderr
    assert "Traceback" not in result.stderr
