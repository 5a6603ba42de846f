"""The ward's second round: what the result, batch and refusal answers say, and what they leave out."""
import re

import numpy as np
import pytest

from harness.images import encode

NOISE = encode(np.random.default_rng(5).integers(0, 256, (400, 400), dtype=np.uint8), ".png")


@pytest.fixture(scope="module")
def films(real_data) -> dict[str, bytes]:
    test = real_data / "test"
    return {
        "certain": (test / "PNEUMONIA" / "person100_bacteria_477.jpeg").read_bytes(),  # 0.9996 on the bundled model
        "pneumonia": sorted((test / "PNEUMONIA").iterdir())[0].read_bytes(),
        "quiet normal": (test / "NORMAL" / "IM-0001-0001.jpeg").read_bytes(),  # no cell pushes toward pneumonia
    }


def test_a_probability_above_99_9_percent_reads_so_not_100(uploads, films, app):
    assert app.extensions["model"].predictor.predict(films["certain"]).probability > 0.9995
    page = uploads.form(films["certain"]).get_data(as_text=True)
    assert re.search(r'id="probability">&gt; 99\.9%<', page)
    assert "100.0%" not in page


def test_the_entered_age_is_echoed_on_the_result(uploads, films):
    page = uploads.form(films["pneumonia"], age_years="2").get_data(as_text=True)
    assert re.search(r'id="age-given">[^<]*2 years', page)
    assert 'id="age-given"' not in uploads.form(films["pneumonia"]).get_data(as_text=True)


def test_an_empty_heat_map_says_that_nothing_pushed_toward_pneumonia(uploads, films):
    page = uploads.form(films["quiet normal"]).get_data(as_text=True)
    assert 'id="saliency-empty"' in page and "Nothing in this film pushed the score toward pneumonia" in page
    assert 'id="saliency"' not in page  # no grey square passed off as a map
    body = uploads.api(films["quiet normal"], query="?saliency=1").get_json()
    assert body["saliency_empty"] is True
    body = uploads.api(films["pneumonia"], query="?saliency=1").get_json()
    assert body["saliency_empty"] is False and body["saliency_png"]


def test_the_heat_map_caption_states_what_it_measured_on_this_model(uploads, films, app):
    measured = app.extensions["model"].predictor.checkpoint.metrics["saliency"]
    page = uploads.form(films["pneumonia"]).get_data(as_text=True)
    caption = re.search(r'id="saliency-caption">(.*?)</figcaption>', page, re.S).group(1)
    assert f"{100 * measured['pneumonia']['peak_middle']:.0f}%" in caption
    assert "should rest on" not in caption  # no hope stated as a finding


def test_the_batch_footnote_says_what_the_link_opens_and_refused_rows_link_to_their_case(uploads, films):
    page = uploads.batch_form([(films["pneumonia"], "a.jpeg"), (NOISE, "noise.png")]).get_data(as_text=True)
    noise_row = next(row for row in page.split("<tr")[2:] if "noise.png" in row)
    assert 'href="/cases/' in noise_row
    assert "Open a single film for its aligned image" not in page  # the link opens the record, which has no images
    assert "name opens its case record" in page


def test_a_refusal_s_json_has_no_probability_at_the_top_level(uploads, films):
    body = uploads.api(NOISE).get_json()
    assert body["in_distribution"] is False and body["label"] is None
    assert "probability" not in body and "ood_score" not in body
    assert 0 <= body["research"]["probability"] <= 1  # kept for research, out of a client's way
    answered = uploads.api(films["pneumonia"]).get_json()
    assert 0 <= answered["probability"] <= 1 and "research" not in answered
    rows = uploads.batch_api([(NOISE, "noise.png")]).get_json()["results"]
    assert "probability" not in rows[0] and "research" in rows[0]


def numbers_along_x(plot) -> np.ndarray:
    """Every x a figure's glyphs reach (points, steps, and bars' right edges)."""
    found = [np.zeros(0)]
    for renderer in plot.renderers:
        for name in (getattr(renderer.glyph, key, None) for key in ("x", "right")):
            if isinstance(name, str) and name in renderer.data_source.data:
                found.append(np.asarray(renderer.data_source.data[name], float))
    return np.concatenate(found)


def test_the_monitor_histogram_draws_its_top_bin():
    from app.monitor import charts

    found = {"cases_per_day": [("2026-12-01", 3)], "reference_name": "the test split",
             "reference": np.array([0.1, 0.5, 0.97, 0.99]), "probabilities": np.array([0.98, 0.99, 0.2])}
    _, spread = charts(found)
    assert numbers_along_x(spread).max() == pytest.approx(1.0)  # the 0.95-1 bin has its width


def test_the_recent_cases_map_colours_the_training_films_by_label():
    from app.tsne_plot import COLORS, cases_figure
    from model.settings import DEFAULT_TSNE_ARTIFACT
    from model.tsne_map import TsneMap

    tsne_map = TsneMap.load(DEFAULT_TSNE_ARTIFACT)
    plot = cases_figure(tsne_map, np.zeros((2, 2)), ["pneumonia", "awaiting"])
    colours = set()
    for renderer in plot.renderers:
        colour = renderer.glyph.fill_color
        values = renderer.data_source.data.get(colour) if isinstance(colour, str) else None
        colours |= set(values) if values is not None else {colour}
    assert {COLORS["NORMAL"], COLORS["PNEUMONIA"]} <= {str(c) for c in colours}
