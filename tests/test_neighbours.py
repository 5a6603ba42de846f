"""The nearest training films and this film's place on the map: API, page, and without the dataset."""
import re

import numpy as np
import pytest

from harness.images import encode, synthetic_xray
from model import TsneMap
from model.neighbours import NeighbourIndex
from model.settings import DEFAULT_TSNE_ARTIFACT
from tests.client import Uploads

XRAY = encode(synthetic_xray(400, 320), ".png")


@pytest.mark.parametrize("k", ["0", "26", "-1", "two", "2.5"])
def test_k_out_of_range_is_a_400(client, k):
    response = client.post(f"/api/v1/predict?neighbours={k}", data=XRAY, content_type="image/png")
    assert response.status_code == 400 and "1 to 25" in response.get_json()["error"]


def test_the_api_lists_k_neighbours_nearest_first_with_labels_and_the_pneumonia_count(client):
    body = client.post("/api/v1/predict?neighbours=7", data=XRAY, content_type="image/png").get_json()
    neighbours = body["neighbours"]
    assert len(neighbours) == 7 and set(neighbours[0]) == {"id", "label", "distance"}
    distances = [n["distance"] for n in neighbours]
    assert distances == sorted(distances) and all(n["label"] in ("NORMAL", "PNEUMONIA") for n in neighbours)
    assert 0 <= body["pneumonia_among_25_nearest"] <= 25
    assert "neighbours" not in client.post("/api/v1/predict", data=XRAY, content_type="image/png").get_json()


def test_a_training_film_finds_itself_at_distance_zero(client, real_data):
    path = sorted((real_data / "train" / "PNEUMONIA").iterdir())[10]
    body = client.post("/api/v1/predict?neighbours=3", data=path.read_bytes(), content_type="image/jpeg").get_json()
    assert body["neighbours"][0]["id"] == path.stem and body["neighbours"][0]["distance"] < 1e-3
    assert body["neighbours"][1]["distance"] > 0


def test_the_index_counts_pneumonia_among_the_25_nearest():
    index = NeighbourIndex(TsneMap.load(DEFAULT_TSNE_ARTIFACT))
    row = int(np.flatnonzero(index.labels == 1)[0])
    features = index.features[row] * index.std + index.mean
    neighbours, pneumonia, (x, y) = index.nearest(features, 25)
    assert pneumonia == sum(n.label == "PNEUMONIA" for n in neighbours)
    assert (x, y) == pytest.approx(tuple(index.positions[row]))  # placed at its nearest film: itself


def test_the_nearest_films_are_those_of_a_full_sort_of_exact_distances():
    index = NeighbourIndex(TsneMap.load(DEFAULT_TSNE_ARTIFACT))
    rng = np.random.default_rng(0)
    # training films themselves, and points between two of them
    rows = rng.choice(len(index), 6, replace=False)
    queries = [index.features[r] for r in rows]
    queries += [(index.features[a] + index.features[b]) / 2 for a, b in rows.reshape(3, 2)]
    for standardised in queries:
        exact = np.linalg.norm(index.features - standardised, axis=1)
        expected = np.argsort(exact, kind="stable")[:10]
        neighbours, _, _ = index.nearest(standardised * index.std + index.mean, 10)
        assert [n.id for n in neighbours] == [index.ids[i] for i in expected]
        assert [n.distance for n in neighbours] == pytest.approx(exact[expected].tolist(), abs=1e-4)


def test_the_result_page_shows_six_neighbours_and_the_map(uploads, pediatric_film):
    response = uploads.form(pediatric_film)
    html = response.get_data(as_text=True)
    assert html.count('<img src="/analysis/thumbnail/') == 6
    assert 'id="film-map"' in html and 'data-x="' in html and "place.js" in html
    assert "<script>" not in html and "unsafe-eval" not in response.headers["Content-Security-Policy"]
    source = re.search(r'data-src="([^"]+)"', html).group(1)
    item = uploads.client.get(source)
    assert item.status_code == 200 and "public" in item.headers["Cache-Control"]
    assert "film-map-plot" in item.get_data(as_text=True)
    assert uploads.client.get("/analysis/film-map/another-version.json").status_code == 404


def test_without_the_dataset_folder_neighbours_come_without_pictures(make_app, tmp_path, pediatric_film):
    client = make_app(DATASET_DIR=str(tmp_path / "absent")).test_client()
    html = Uploads(client).form(pediatric_film).get_data(as_text=True)
    assert 'id="neighbours"' in html and "/analysis/thumbnail/" not in html and 'id="no-thumbnails"' in html
    body = client.post("/api/v1/predict?neighbours=2", data=pediatric_film, content_type="image/jpeg").get_json()
    assert len(body["neighbours"]) == 2


def test_a_map_of_another_model_gives_no_neighbours_and_says_why(make_app, tmp_path, pediatric_film):
    stale = TsneMap.load(DEFAULT_TSNE_ARTIFACT)
    stale.checkpoint_version = "an-older-model"
    stale.save(tmp_path / "stale.npz")
    client = make_app(TSNE_ARTIFACT=str(tmp_path / "stale.npz")).test_client()
    body = client.post("/api/v1/predict?neighbours=2", data=pediatric_film, content_type="image/jpeg").get_json()
    assert body["neighbours"] is None and "an-older-model" in body["neighbours_unavailable"]
    html = Uploads(client).form(pediatric_film).get_data(as_text=True)
    assert 'id="no-neighbours"' in html and "python -m training.tsne" in html


def test_a_flagged_film_gets_no_similar_films_on_the_page(uploads):
    photo = encode(np.random.default_rng(3).integers(0, 256, (300, 300), dtype=np.uint8), ".png")
    assert 'id="similar"' not in uploads.form(photo).get_data(as_text=True)
