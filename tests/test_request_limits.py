"""What one request may cost and what it may leave behind: pixels and seconds across a
batch, a chunked body, nameless parts, the session cookie, server paths in messages."""
import io

from harness.images import encode, synthetic_xray
from tests.client import Uploads, network_probability

FILM = encode(synthetic_xray(400, 320), ".png")  # 128,000 pixels


def test_a_batch_past_its_pixel_budget_refuses_only_the_files_it_cannot_pay_for(make_app):
    client = make_app(MAX_REQUEST_PIXELS=300_000).test_client()
    rows = Uploads(client).batch_api([(FILM, f"{i}.png") for i in range(3)]).get_json()["results"]
    refused = [row for row in rows if "error" in row]
    assert len(refused) == 1 and refused[0]["status"] == 413 and "budget of 0.3 megapixels" in refused[0]["error"]
    assert "another request" in refused[0]["error"]
    assert sum("in_distribution" in row for row in rows) == 2


def test_a_batch_past_its_time_budget_says_so_in_each_row_it_did_not_read(make_app):
    client = make_app(REQUEST_BUDGET_S=0).test_client()
    response = Uploads(client).batch_api([(FILM, "a.png"), (FILM, "b.png")])
    assert response.status_code == 200
    assert [(row["status"], "used up its 0 s" in row["error"]) for row in response.get_json()["results"]] == [
        (413, True), (413, True)]


def test_a_chunked_body_past_the_limit_is_413_not_cut(make_app):
    client = make_app(MAX_CONTENT_LENGTH=50_000).test_client()
    response = client.post("/api/v1/predict", input_stream=io.BytesIO(FILM[:40_000] + b"\0" * 30_000),
                           content_type="image/png", headers={"Transfer-Encoding": "chunked"},
                           environ_overrides={"wsgi.input_terminated": True})
    assert response.status_code == 413 and "limit" in response.get_json()["error"]
    small = client.post("/api/v1/predict", input_stream=io.BytesIO(b"\xff" * 1000), content_type="image/jpeg",
                        headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True})
    assert small.status_code == 415  # read whole, and refused for what it is


def multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "----boundary7MA4YWxkTrZu0gW"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for name, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_a_batch_part_without_a_file_name_gets_its_row(client):
    body, content_type = multipart([("a.png", FILM), ("", FILM), ("", b"")])
    rows = client.post("/api/v1/predict/batch", data=body, content_type=content_type).get_json()["results"]
    assert [row["filename"] for row in rows] == ["a.png", "file 2"]  # the empty, nameless part is no file
    assert network_probability(rows[0]) == network_probability(rows[1])


def test_no_server_path_in_the_message_when_a_version_has_no_map(make_app, tmp_path):
    client = make_app(TSNE_ARTIFACT=str(tmp_path / "absent.npz")).test_client()
    body = client.post("/api/v1/predict?neighbours=2", data=FILM, content_type="image/png").get_json()
    assert body["neighbours"] is None and "python -m training.tsne" in body["neighbours_unavailable"]
    assert str(tmp_path) not in body["neighbours_unavailable"] and "/" not in body["neighbours_unavailable"]


def test_the_session_cookie_is_same_site_and_secure_over_https(app):
    plain = app.test_client().get("/").headers["Set-Cookie"]
    secure = app.test_client().get("/", base_url="https://localhost").headers["Set-Cookie"]
    assert "SameSite=Lax" in plain and "Secure" not in plain
    assert "SameSite=Lax" in secure and "Secure" in secure
