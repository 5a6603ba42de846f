"""A seeded DICOM mutation fuzz through the API: every file gets an answer or a message,
never a 500, and a batch holding bad files still returns the good files' results."""
import logging

import pytest

from harness.dicom_files import PATIENT_ID, fuzz_bases, mutations
from tests.client import network_probability

FILES = 5000
BATCH = 20


@pytest.fixture(scope="module")
def mutated() -> list[bytes]:
    return list(mutations(FILES, seed=30))


def test_every_mutated_file_gets_a_result_or_a_message(uploads, mutated, caplog):
    statuses = {}
    with caplog.at_level(logging.INFO):
        for start in range(0, FILES, BATCH):
            files = [(data, f"m{start + i}.dcm") for i, data in enumerate(mutated[start : start + BATCH])]
            response = uploads.batch_api(files)
            assert response.status_code == 200, response.get_data(as_text=True)[:300]
            for row in response.get_json()["results"]:
                if "error" in row:
                    assert 400 <= row["status"] < 500 and row["error"]
                else:
                    assert 0 <= network_probability(row) <= 1
                statuses[row.get("status", 200)] = statuses.get(row.get("status", 200), 0) + 1
    assert sum(statuses.values()) == FILES
    assert statuses.get(200, 0) > FILES // 10 and len(statuses) > 2  # the mutations reach both outcomes
    assert PATIENT_ID not in caplog.text and "Traceback" not in caplog.text


def test_the_single_file_api_answers_each_mutation(uploads, mutated):
    for data in mutated[:500]:
        response = uploads.api(data, "m.dcm")
        assert response.status_code in (200, 400, 413, 415), response.status_code
        body = response.get_json()
        assert "in_distribution" in body if response.status_code == 200 else body["error"]


def test_a_batch_with_bad_files_keeps_the_good_files_results(uploads, mutated):
    good = fuzz_bases()[0]
    alone = network_probability(uploads.api(good, "good.dcm").get_json())
    unreadable = [data for data in mutated[:400] if uploads.api(data, "m.dcm").status_code == 400][:5]
    files = [(good, "a.dcm"), *[(data, f"bad{i}.dcm") for i, data in enumerate(unreadable)], (good, "b.dcm")]
    results = uploads.batch_api(files).get_json()["results"]
    assert [row["filename"] for row in results] == ["a.dcm", *[f"bad{i}.dcm" for i in range(5)], "b.dcm"]
    assert network_probability(results[0]) == pytest.approx(alone, abs=1e-5) == network_probability(results[-1])
    assert all(row["status"] == 400 and row["error"] for row in results[1:-1])
