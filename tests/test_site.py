"""A new site: the local validation's figures, the report from a folder and from the case record,
the site-adapted candidate and the guard that judges it on the site's held-out films."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from harness.dicom_files import make_dicom
from model import Predictor, load_checkpoint
from model.settings import DEFAULT_CHECKPOINT
from model.store import ModelStore
from model.validation import auc, bootstrap_auc, calibration, local_validation, trust, wilson
from training import site as site_command
from training import store as store_command
from training.store import sensitivity_on_slice, site_guard

BUNDLED = load_checkpoint(DEFAULT_CHECKPOINT)


def run_site(*argv) -> int:
    return site_command.main(site_command.get_args_parser().parse_args([str(a) for a in argv]))


def run_store(store, *argv) -> int:
    return store_command.main(store_command.get_args_parser().parse_args(["--store", str(store), *map(str, argv)]))


# ---- the figures ----------------------------------------------------------------------


def test_wilson_intervals_match_known_values():
    low, high = wilson(23, 100)  # the example: an FPR of 0.23 over 100 normal films
    assert (round(low, 3), round(high, 3)) == (0.158, 0.322)
    low, high = wilson(0, 20)
    assert low == 0 and round(high, 3) == 0.161
    assert wilson(0, 0) is None


def test_auc_is_the_mann_whitney_statistic_ties_counted_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(auc(np.ones(5), np.arange(5)))


def test_the_bootstrap_interval_holds_the_auc_and_narrows_with_more_films():
    rng = np.random.default_rng(1)

    def films(n):
        labels = np.r_[np.ones(n), np.zeros(n)]
        return labels, rng.normal(labels * 1.5, 1.0)

    small, large = films(50), films(800)
    low, high = bootstrap_auc(*small)
    assert low < auc(*small) < high
    low_large, high_large = bootstrap_auc(*large)
    assert low_large < auc(*large) < high_large
    assert high_large - low_large < (high - low) / 2.5  # about 1/sqrt(16) as wide
    assert bootstrap_auc(np.ones(4), np.arange(4)) is None


def test_the_bootstrap_interval_is_as_wide_as_hanley_and_mcneil_say():
    rng = np.random.default_rng(3)
    positives, negatives = 300, 400
    labels = np.r_[np.ones(positives), np.zeros(negatives)]
    scores = rng.normal(labels * 1.2, 1.0)
    a = auc(labels, scores)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a))
                 / (positives * negatives))
    low, high = bootstrap_auc(labels, scores)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_above_the_bootstrap_s_limit_the_interval_is_hanley_and_mcneil_s_and_agrees(monkeypatch):
    from model import validation

    rng = np.random.default_rng(4)
    labels = np.r_[np.ones(3000), np.zeros(3000)]
    scores = rng.normal(labels * 1.2, 1.0)
    assert len(labels) > validation.BOOTSTRAP_MAX_FILMS
    analytic = bootstrap_auc(labels, scores)
    assert analytic == validation.hanley_mcneil(auc(labels, scores), 3000, 3000)
    monkeypatch.setattr(validation, "BOOTSTRAP_MAX_FILMS", 10**9)
    resampled = bootstrap_auc(labels, scores, draws=400)
    assert analytic == pytest.approx(resampled, abs=0.002)


def test_calibration_slope_is_one_when_calibrated_and_below_when_overconfident():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.02, 0.98, 20000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    found = calibration(y, p)
    assert found["slope"] == pytest.approx(1.0, abs=0.08) and found["intercept"] == pytest.approx(0.0, abs=0.08)
    logit = np.log(p / (1 - p))
    overconfident = 1 / (1 + np.exp(-2 * logit))
    assert calibration(y, overconfident)["slope"] == pytest.approx(0.5, abs=0.05)
    assert all(abs(b["observed"] - b["predicted"]) < 0.03 for b in found["bins"])
    assert calibration(np.ones(5), np.full(5, 0.9))["slope"] is None  # one class: no slope


def test_the_trust_verdict_follows_the_rule_of_a_hundred_of_each():
    assert not trust(99, 150)["enough"] and trust(99, 150)["missing"] == {"pneumonia": 1, "normal": 0}
    assert "not yet enough to trust" in trust(99, 150)["text"]
    assert trust(100, 100)["enough"] and trust(100, 100)["text"].startswith("enough to trust")


def test_local_validation_measures_the_answered_films_and_counts_the_refused():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    probabilities = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.3, 0.99, 0.95])
    refusals = ["", "", "", "", "", "", "image:adult", "age,image:lateral"]
    found = local_validation(labels, probabilities, 0.5, refusals)
    assert found["films"] == 8 and found["refused"]["successes"] == 2
    assert found["refused"]["why"] == {"image:adult": 1, "age": 1, "image:lateral": 1}
    assert (found["refused"]["pneumonia"], found["refused"]["normal"]) == (1, 1)
    assert found["sensitivity"]["successes"] == 2 and found["sensitivity"]["n"] == 3
    assert found["false_positive_rate"]["successes"] == 1 and found["false_positive_rate"]["n"] == 3
    assert found["false_positive_rate"]["interval"] == pytest.approx(list(wilson(1, 3)))
    assert not found["trust"]["enough"]


# ---- the guard's rules for a site candidate ----------------------------------------------

SERVING = {"films": 100, "pneumonia": 50, "sensitivity": 1.0, "false_positive_rate": 0.5, "auc": 0.97, "refused": 0.2}
GOOD = {"films": 100, "pneumonia": 50, "sensitivity": 0.98, "false_positive_rate": 0.2, "auc": 0.975, "refused": 0.02}


@pytest.mark.parametrize("change, leaks, words", [
    ({}, 0, None),
    ({"false_positive_rate": 0.55}, 0, "false-positive rate on the site's held-out films 0.550 is above"),
    # the floor judged as the slice allows: 48 of 50 (95%: 0.865-0.989) cannot show it is below 0.97,
    # 44 of 50 (0.762-0.944) does, and 190 of 200 is enough films to hold the point to it
    ({"sensitivity": 48 / 50}, 0, None),
    ({"sensitivity": 44 / 50}, 0, "sensitivity on the site's held-out films 0.880 (44 of 50; 95%: 0.762-0.944) < 0.97"),
    ({"films": 400, "pneumonia": 200, "sensitivity": 0.95}, 0, "(190 of 200; 95%: 0.910-0.973) < 0.97"),
    ({"sensitivity": 0.0}, 0, "sensitivity on the site's held-out films 0.000"),  # flipped labels
    ({"auc": 0.96}, 0, "AUC on the site's held-out films"),
    ({"refused": 0.12}, 0, "its gates refuse 12.0%"),  # 95%: 7.0-19.8%, wholly above 5%
    ({"refused": 0.08}, 0, None),  # 95%: 4.1-15.0%: no evidence of more than 5%
    ({"films": 17, "refused": 1 / 17}, 0, None),  # one of a small slice
    ({}, 3, "fitted on 3 films of its own held-out slice"),
])
def test_the_site_guard_s_rules(change, leaks, words):
    reasons = site_guard({**GOOD, **change}, SERVING, leaks)
    assert (reasons == []) if words is None else any(words in r for r in reasons)


def test_a_point_below_the_floor_on_a_small_slice_is_a_caution_and_says_so():
    judged = sensitivity_on_slice({**GOOD, "sensitivity": 48 / 50})
    assert judged["caution"] and not judged["refuse"] and "too small to show it" in judged["text"]
    assert not sensitivity_on_slice(GOOD)["caution"]


# ---- the commands on real films ----------------------------------------------------------


def site_folder(real_data, root, per_class=20, flipped=False, offset=0):
    """``per_class`` films of each class of the test split, copied as a site's folder (labels swapped
    when ``flipped``)."""
    for label in ("NORMAL", "PNEUMONIA"):
        target = root / (label if not flipped else {"NORMAL": "PNEUMONIA", "PNEUMONIA": "NORMAL"}[label])
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted((real_data / "test" / label).iterdir())[offset : offset + per_class]:
            shutil.copy(path, target / path.name)
    return root


def test_report_reads_a_site_folder_through_the_product_path(real_data, tmp_path, capsys):
    folder = site_folder(real_data, tmp_path / "site", per_class=6)
    film = sorted((folder / "PNEUMONIA").iterdir())[0]
    # The same film as a DICOM of an adult: refused by its header's age, whatever its pixels say.
    import cv2

    pixels = cv2.imread(str(film), cv2.IMREAD_GRAYSCALE)
    (folder / "PNEUMONIA" / "adult.dcm").write_bytes(make_dicom(pixels, bits_stored=8, tags={"PatientAge": "045Y"}))
    (folder / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8 not a film")
    out = tmp_path / "report.json"
    assert run_site("report", "--films", folder, "--json", out) == 0
    printed = capsys.readouterr().out
    found = json.loads(out.read_text())
    site = found["site"]
    assert site["films"] == 13 and (site["pneumonia"], site["normal"]) == (7, 6)
    assert list(found["unreadable"]) == ["NORMAL/broken.jpeg"]
    assert site["refused"]["why"].get("age") == 1
    # The figures are the app's own answers to the same files.
    predictor = Predictor(BUNDLED)
    answers = {p.name: predictor.predict(p.read_bytes()) for p in folder.rglob("*")
               if p.is_file() and p.name != "broken.jpeg"}
    answered = {name: a for name, a in answers.items() if a.in_distribution}
    flagged_pneumonia = sum(a.is_pneumonia for name, a in answered.items() if (folder / "PNEUMONIA" / name).exists())
    assert site["sensitivity"]["successes"] == flagged_pneumonia
    assert site["refused"]["successes"] == len(answers) - len(answered)
    assert site["trust"]["enough"] is False and "not yet enough to trust" in printed
    assert found["model_card"]["sensitivity"]["value"] == BUNDLED.metrics["test"]["sensitivity"]
    assert "model card (test split)" in printed and "calibration slope" in printed


def test_report_from_the_case_record_labels_films_by_their_overreads(real_data, tmp_path, client, case_database,
                                                                     capsys):
    folder = site_folder(real_data, tmp_path / "site", per_class=2, offset=40)
    export = tmp_path / "export"
    export.mkdir()
    reads = ["pneumonia", "uncertain", "normal", "normal"]
    for index, (path, read) in enumerate(zip(sorted(folder.rglob("*.jpeg")), reads)):
        answer = client.post("/api/v1/predict", data={"image": (path.open("rb"), "film.jpeg")}).get_json()
        assert client.post(f"/api/v1/cases/{answer['case_id']}/overread", json={"read": read}).status_code == 200
        shutil.copy(path, export / f"export-{index}.jpeg")  # the exported name need not be the upload's
    shutil.copy(sorted((real_data / "test" / "NORMAL").iterdir())[60], export / "never-read.jpeg")
    out = tmp_path / "record.json"
    assert run_site("report", "--cases", "--films", export, "--database", case_database, "--json", out) == 0
    found = json.loads(out.read_text())
    assert found["site"]["films"] == 3 and found["site"]["pneumonia"] == 1
    assert found["left_out"]["uncertain"] == 1 and found["left_out"]["no_overread"] == 1
    assert "1 uncertain reads left out" in capsys.readouterr().out


def test_report_without_the_layout_is_a_clear_error(tmp_path, caplog):
    (tmp_path / "NORMAL").mkdir()
    assert run_site("report", "--films", tmp_path) == 2
    assert "has no PNEUMONIA/ folder" in caplog.text


@pytest.fixture(scope="module")
def adapted(real_data, tmp_path_factory):
    """A store with the bundled model and a site candidate adapted (briefly) to 40 real films."""
    root = tmp_path_factory.mktemp("site-store")
    store = root / "store"
    folder = site_folder(real_data, root / "site")
    code = run_site("--store", store, "adapt", "--films", folder, "--site", "General", "--steps", "4",
                    "--replay-limit", "256")
    assert code == 0
    (row,) = [r for r in ModelStore(store).versions() if r["version"] != BUNDLED.version]
    return store, folder, row["version"]


def copy_store(adapted, tmp_path):
    store, folder, version = adapted
    shutil.copytree(store, tmp_path / "store")
    return tmp_path / "store", folder, version


def test_adapt_adds_a_candidate_recording_its_parent_site_and_a_disjoint_held_out_slice(adapted, capsys):
    store, folder, version = adapted
    checkpoint = ModelStore(store).load(version)
    site = checkpoint.training_data["site"]
    assert site["name"] == "General" and site["parent"] == BUNDLED.version and site["films"] == 40
    held = site["held_out"]
    assert 8 <= len(held["sha256"]) <= 16 and held["pneumonia"] >= 2 and held["normal"] >= 2
    assert not set(held["sha256"]) & set(site["fit"]["sha256"])
    assert len(held["sha256"]) + len(site["fit"]["sha256"]) == 40
    assert ModelStore(store).serving_version() == BUNDLED.version  # nothing served has changed
    assert checkpoint.metrics["site"]["held_out"]["films"] == len(held["sha256"])
    assert checkpoint.state_dicts[0]["head.1.weight"].ne(BUNDLED.state_dicts[0]["head.1.weight"]).any()


def test_promote_needs_the_site_s_films_and_records_the_site_in_the_history(adapted, tmp_path, capsys, caplog):
    store, folder, version = copy_store(adapted, tmp_path)
    assert run_store(store, "promote", version) == 2
    assert "give their folder with --site-films" in caplog.text
    code = run_store(store, "promote", version, "--site-films", folder, "--force", "--reason", "pilot")
    assert code == 0
    printed = capsys.readouterr().out
    assert "site General" in printed and "held-out films" in printed
    entry = ModelStore(store).read_pointer().history[-1]
    assert entry["version"] == version and entry["site"]["name"] == "General"
    assert set(entry["site"]["candidate"]) >= {"sensitivity", "false_positive_rate", "auc", "refused"}
    assert entry["site"]["films"] == len(ModelStore(store).load(version).training_data["site"]["held_out"]["sha256"])


def test_the_guard_refuses_a_candidate_fitted_on_its_own_held_out_slice(adapted, tmp_path, capsys):
    store, folder, version = copy_store(adapted, tmp_path)
    models = ModelStore(store)
    leaky = models.load(version)
    site = leaky.training_data["site"]
    site["fit"]["sha256"] = [*site["fit"]["sha256"], site["held_out"]["sha256"][0]]
    leaky = dataclasses.replace(leaky, version="stn-cnn-20261207-leaky000")
    models.add(leaky)
    assert run_store(store, "promote", leaky.version, "--site-films", folder) == 1
    assert "fitted on 1 films of its own held-out slice" in capsys.readouterr().out
    assert models.serving_version() == BUNDLED.version


def test_the_guard_refuses_a_candidate_adapted_on_flipped_labels(real_data, adapted, tmp_path, capsys):
    store, folder, _ = copy_store(adapted, tmp_path)
    flipped = site_folder(real_data, tmp_path / "flipped", flipped=True)
    assert run_site("--store", store, "adapt", "--films", flipped, "--site", "Flipped", "--steps", "150",
                    "--replay-limit", "256") == 0
    version = capsys.readouterr().out.strip().splitlines()[-1].split()[-1]
    # Judged on the same files with their true labels: the site's own slice and the test split refuse it.
    assert run_store(store, "promote", version, "--site-films", folder) == 1
    printed = capsys.readouterr().out
    assert "refused:" in printed and "false-positive rate on the site's held-out films" in printed
    # Judged on the flipped folder it was given, the test split still catches what it unlearned.
    assert run_store(store, "promote", version, "--site-films", flipped) == 1
    assert "false-positive rate" in capsys.readouterr().out.split("refused:")[-1]
    assert ModelStore(store).serving_version() == BUNDLED.version


def test_a_refused_film_is_no_dead_end_its_read_counts_as_site_evidence(app, uploads, pediatric_film):
    from app.monitor import current_figures
    from tests.client import CSRF

    def evidence() -> dict:
        with app.test_request_context():
            return current_figures()["site_report"]

    before = evidence()
    page = uploads.form(pediatric_film, age_years="40").get_data(as_text=True)  # an adult's age: refused
    assert 'id="ood-warning"' in page and 'id="probability"' not in page
    assert 'id="overread"' in page and "record your read below" in page
    case_id = re.search(r'id="case-id">Case <a href="/cases/([\w-]+)"', page).group(1)
    answer = uploads.client.post(f"/cases/{case_id}/overread",
                                 data={"csrf_token": CSRF.search(page).group(1), "read": "pneumonia"})
    assert answer.status_code == 302
    case_page = uploads.client.get(f"/cases/{case_id}").get_data(as_text=True)
    assert 'id="refused-read"' in case_page and 'id="overread"' in case_page
    after = evidence()
    assert after["pneumonia"] == before["pneumonia"] + 1
    assert after["refused"]["successes"] == before["refused"]["successes"] + 1
    assert after["refused"]["why"].get("age", 0) == before["refused"]["why"].get("age", 0) + 1
