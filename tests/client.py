"""Form and API uploads through Flask's test client, CSRF token included."""
from __future__ import annotations

import io
import re

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Uploads:
    """What a clinician's browser and an API client send (like flaskr's ``auth`` fixture)."""

    def __init__(self, client):
        self.client = client

    def csrf_token(self) -> str:
        return CSRF.search(self.client.get("/").get_data(as_text=True)).group(1)

    def form(self, data: bytes, filename: str = "xray.png", field: str = "image", **fields):
        payload = {"csrf_token": self.csrf_token(), field: (io.BytesIO(data), filename), **fields}
        return self.client.post("/predict", data=payload, content_type="multipart/form-data")

    def api(self, data: bytes | None, filename: str = "xray.png", field: str = "image", query: str = "", **fields):
        payload = {} if data is None else {field: (io.BytesIO(data), filename)}
        return self.client.post(f"/api/v1/predict{query}", data={**payload, **fields},
                                content_type="multipart/form-data")

    def batch_form(self, files: list[tuple[bytes, str]], **fields):
        payload = {"csrf_token": self.csrf_token(), "images": [(io.BytesIO(d), n) for d, n in files], **fields}
        return self.client.post("/predict/batch", data=payload, content_type="multipart/form-data")

    def batch_api(self, files: list[tuple[bytes, str]], **fields):
        payload = {"images": [(io.BytesIO(d), n) for d, n in files], **fields}
        return self.client.post("/api/v1/predict/batch", data=payload, content_type="multipart/form-data")


def network_probability(body: dict) -> float:
    """The network's probability in an API answer: at the top for a film within the intended
    use, under ``research`` for a refused one (which has no ``probability`` of its own)."""
    return body["probability"] if body["in_distribution"] else body["research"]["probability"]
