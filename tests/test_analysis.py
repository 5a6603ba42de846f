"""The t-SNE generator and the dataset-analysis page."""
import re

import numpy as np
import pytest

from app import create_app
from model import TsneMap
from training import train, tsne


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny dataset, a dry-run checkpoint trained on it, and its t-SNE artifact."""
    from harness.images import make_dataset

    root = tmp_path_factory.mktemp("tsne")
    data = make_dataset(root / "chest_xray", per_class=10)
    checkpoint = root / "ck.pt"
    assert train.main(train.get_args_parser().parse_args(
        ["--data", str(data), "--out", str(checkpoint), "--epochs", "1", "--dry-run", "--workers", "1"])) == 0
    artifact = root / "tsne.npz"
    args = tsne.get_args_parser().parse_args(
        ["--data", str(data), "--checkpoint", str(checkpoint), "--out", str(artifact), "--workers", "1",
         "--cache-dir", str(root / "cache")])
    assert tsne.main(args) == 0
    return data, checkpoint, artifact


def test_generator_writes_coordinates_and_metadata_for_every_image(tiny_run):
    data, checkpoint, artifact = tiny_run
    with np.load(artifact) as a:
        n = 40  # 10 per class in train and in test
        assert a["pixel_xy"].shape == a["feature_xy"].shape == (n, 2)
        assert sorted(set(a["split"])) == ["test", "train"] and (a["split"] == "test").sum() == 20
        assert a["label"].sum() == 20 and len(a["files"]) == n and a["files"][0].startswith("train/")
        assert ((a["probability"] >= 0) & (a["probability"] <= 1)).all()
        assert a["correct"].dtype == bool
        from model import load_checkpoint

        assert str(a["checkpoint_version"]) == load_checkpoint(checkpoint).version
        assert not any(k in a.files for k in ("images", "pixels"))  # coordinates only, no images
        assert a["features"].shape == (n, 128) and a["feature_mean"].shape == (128,)  # for the nearest films


@pytest.fixture
def analysis_client(tiny_run):
    data, checkpoint, artifact = tiny_run
    app = create_app({"TESTING": True, "SECRET_KEY": "t", "CHECKPOINT_PATH": str(checkpoint),
                      "TSNE_ARTIFACT": str(artifact), "DATASET_DIR": str(data)})
    return app.test_client()


def test_page_embeds_both_splits_and_both_embeddings_with_every_point(analysis_client, tiny_run):
    response = analysis_client.get("/analysis")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Training split (20 images)" in html and "Test split (20 images)" in html
    assert "Pixels" in html and "Learned features" in html
    with np.load(tiny_run[2]) as a:
        for name in a["files"]:
            assert name in html  # every point's file name travels in the plot data
    assert "model wrong" in html and "id=\"stale\"" not in html


def test_page_loads_no_script_or_stylesheet_from_another_origin(analysis_client):
    response = analysis_client.get("/analysis")
    html = response.get_data(as_text=True)
    sources = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', html)
    assert sources and all(s.startswith("/") and not s.startswith("//") for s in sources)
    assert "cdn.bokeh.org" not in html
    nonce = re.search(r"'nonce-([^']+)'", response.headers["Content-Security-Policy"]).group(1)
    inline = re.findall(r"<script(?![^>]*\bsrc=)([^>]*)>", html)
    assert inline and all(f'nonce="{nonce}"' in attrs for attrs in inline)
    bokeh_js = [s for s in sources if s.startswith("/bokeh/")]
    assert bokeh_js and analysis_client.get(bokeh_js[0].split("?")[0]).status_code == 200


def test_page_says_when_the_artifact_is_from_another_model(tiny_run, tmp_path):
    data, checkpoint, artifact = tiny_run
    stale = TsneMap.load(artifact)
    stale.checkpoint_version = "an-older-model"
    stale.save(tmp_path / "stale.npz")
    app = create_app({"TESTING": True, "SECRET_KEY": "t", "CHECKPOINT_PATH": str(checkpoint),
                      "TSNE_ARTIFACT": str(tmp_path / "stale.npz"), "DATASET_DIR": str(data)})
    html = app.test_client().get("/analysis").get_data(as_text=True)
    assert 'id="stale"' in html and "an-older-model" in html


@pytest.mark.parametrize("content", [None, b"not an npz file"], ids=["missing", "unreadable"])
def test_missing_or_unreadable_artifact_explains_how_to_make_it(tmp_path, content):
    path = tmp_path / "tsne.npz"
    if content is not None:
        path.write_bytes(content)
    app = create_app({"TESTING": True, "SECRET_KEY": "t", "TSNE_ARTIFACT": str(path)})
    response = app.test_client().get("/analysis")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'id="no-artifact"' in html and "python -m training.tsne" in html


def test_thumbnail_serves_dataset_images(analysis_client, tiny_run):
    data = tiny_run[0]
    name = sorted((data / "test" / "NORMAL").iterdir())[0].name
    response = analysis_client.get(f"/analysis/thumbnail/test/NORMAL/{name}")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert response.data[:2] == b"\xff\xd8"


@pytest.mark.parametrize(
    "path",
    ["../ck.pt", "../../../../etc/passwd", "%2e%2e/ck.pt", "test/NORMAL/../../../ck.pt", "/etc/hostname",
     "test/NORMAL/missing.jpeg"],
)
def test_thumbnail_refuses_paths_outside_the_dataset(analysis_client, path):
    response = analysis_client.get(f"/analysis/thumbnail/{path}", follow_redirects=True)
    assert response.status_code == 404 and response.mimetype != "image/jpeg"


def test_thumbnail_refuses_non_images_inside_the_dataset(analysis_client, tiny_run):
    (tiny_run[0] / "notes.txt").write_text("secret")
    assert analysis_client.get("/analysis/thumbnail/notes.txt").status_code == 404
