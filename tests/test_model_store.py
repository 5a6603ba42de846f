"""The model store and its admin commands: seeding, candidates, the promotion guard, rollback."""
import dataclasses
import getpass
import hashlib
import json
import logging
import subprocess
import sys
import time

import pytest

from harness.images import encode, synthetic_xray
from model import load_checkpoint
from model.atomic import atomic_write
from model.settings import DEFAULT_CHECKPOINT, REPO_ROOT
from model.store import ModelStore, StoreError
from tests.client import Uploads
from training import store as store_command
from training import train

XRAY = encode(synthetic_xray(400, 320), ".png")
BUNDLED = load_checkpoint(DEFAULT_CHECKPOINT).version


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


BUNDLED_DIGEST = digest(DEFAULT_CHECKPOINT)


def run_models(store, *argv) -> int:
    return store_command.main(store_command.get_args_parser().parse_args(["--store", str(store), *argv]))


def listing(store, capsys) -> list[dict]:
    capsys.readouterr()
    assert run_models(store, "list", "--json") == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def candidate_store(tmp_path_factory):
    """A store seeded with the bundled model plus one dry-run candidate trained on a tiny folder."""
    from harness.images import make_dataset

    root = tmp_path_factory.mktemp("store-module")
    data = make_dataset(root / "chest_xray", per_class=10)
    store = root / "store"
    added = []
    for seed in ("0", "1"):
        code = train.main(train.get_args_parser().parse_args(
            ["--data", str(data), "--store", str(store), "--epochs", "1", "--dry-run", "--workers", "1",
             "--cache-dir", str(root / "cache"), "--seed", seed]))
        assert code == 0
        known = {BUNDLED, *added}
        (new,) = [row["version"] for row in ModelStore(store).versions() if row["version"] not in known]
        added.append(new)
    assert BUNDLED not in added and len(set(added)) == 2
    return store, data, added[0], added[1]


@pytest.fixture
def store_copy(candidate_store, tmp_path):
    """A fresh copy of the candidate store for a test that moves its pointer."""
    import shutil

    store, data, candidate, _ = candidate_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy, data, candidate


def test_an_absent_store_is_seeded_with_the_bundled_model_on_first_use(tmp_path, capsys):
    rows = listing(tmp_path / "new-store", capsys)
    assert [(r["version"], r["serving"]) for r in rows] == [(BUNDLED, True)]
    assert rows[0]["source"] == "bundled" and rows[0]["metrics"]["test"]["auc"] > 0.96
    assert digest(DEFAULT_CHECKPOINT) == BUNDLED_DIGEST


def test_training_adds_a_dry_run_candidate_and_changes_nothing_served(candidate_store, capsys):
    store, _, candidate, _ = candidate_store
    rows = {r["version"]: r for r in listing(store, capsys)}
    assert rows[BUNDLED]["serving"] and not rows[candidate]["serving"]
    assert rows[candidate]["dry_run"] is True
    assert ModelStore(store).serving_version() == BUNDLED
    assert digest(DEFAULT_CHECKPOINT) == BUNDLED_DIGEST


def test_training_never_writes_the_bundled_checkpoint(tiny_dataset, caplog):
    code = train.main(train.get_args_parser().parse_args(
        ["--data", str(tiny_dataset), "--out", str(DEFAULT_CHECKPOINT), "--dry-run", "--workers", "1"]))
    assert code == 2 and "bundled checkpoint" in caplog.text
    assert digest(DEFAULT_CHECKPOINT) == BUNDLED_DIGEST


def real_candidate(store, version: str = "stn-cnn-copy-of-bundled") -> str:
    """A candidate that is no dry run: the bundled model under another version."""
    ModelStore(store).add(dataclasses.replace(load_checkpoint(DEFAULT_CHECKPOINT), version=version))
    return version


@pytest.mark.parametrize("force", [[], ["--force", "--reason", "we need it now"]], ids=["guarded", "forced"])
def test_a_dry_run_candidate_can_never_serve(store_copy, capsys, force):
    store, data, candidate = store_copy
    before = (store / "serving.json").read_text()
    capsys.readouterr()
    assert run_models(store, "promote", candidate, "--data", str(data), *force) == 1
    out = capsys.readouterr().out
    refusal = [line for line in out.splitlines() if line.startswith("refused:")]
    assert len(refusal) == 1 and "dry-run" in refusal[0] and "--force cannot override" in refusal[0]
    assert (store / "serving.json").read_text() == before


def test_list_says_which_figures_rest_on_a_dry_run_and_shows_the_guards_once_measured(store_copy, capsys):
    store, data, dry = store_copy
    candidate = real_candidate(store)
    capsys.readouterr()
    assert run_models(store, "list") == 0
    lines = {line.split()[0].strip("*"): line for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert "DRY RUN" in lines[dry] and "not a model's figures" in lines[dry] and "20 films" in lines[dry]
    assert "from training, on 624 films" in lines[candidate]
    assert run_models(store, "promote", candidate, "--data", str(data), "--force", "--reason", "drill") == 0
    rows = {row["version"]: row for row in listing(store, capsys)}
    assert rows[candidate]["guard"]["test_films"] == 20 and rows[BUNDLED]["guard"]["test_films"] == 20
    capsys.readouterr()
    assert run_models(store, "list") == 0
    assert "measured by the guard on 20 films" in capsys.readouterr().out


def test_force_needs_a_reason_and_is_recorded_with_its_banner_then_rollback_returns(store_copy, capsys, make_app):
    store, data, _ = store_copy
    candidate = real_candidate(store)
    assert run_models(store, "promote", candidate, "--data", str(data), "--force") == 2
    assert ModelStore(store).serving_version() == BUNDLED
    assert run_models(store, "promote", candidate, "--data", str(data), "--force", "--reason", "pipeline drill") == 0
    pointer = ModelStore(store).read_pointer()
    assert pointer.serving == candidate
    forced = {"action": "promote", "forced": True, "reason": "pipeline drill", "by": getpass.getuser()}
    assert pointer.history[-1] == {**pointer.history[-1], **forced}
    assert {r["version"]: r["serving"] for r in listing(store, capsys)}[candidate] is True
    app = make_app(MODEL_STORE=str(store))
    uploads = Uploads(app.test_client())
    for page in (uploads.client.get("/"), uploads.form(XRAY), uploads.client.get("/model")):
        html = page.get_data(as_text=True)
        assert 'id="forced-banner"' in html and "pipeline drill" in html and getpass.getuser() in html
    assert run_models(store, "rollback") == 0
    assert ModelStore(store).serving_version() == BUNDLED
    app.extensions["model"].refresh()
    assert 'id="forced-banner"' not in uploads.client.get("/").get_data(as_text=True)


def test_rollback_with_no_earlier_version_is_a_clear_error(tmp_path, caplog):
    assert run_models(tmp_path / "store", "rollback") == 2
    assert "nothing to roll back to" in caplog.text


def test_a_corrupt_file_in_the_store_is_listed_refused_and_never_served(store_copy, capsys, caplog):
    store, data, _ = store_copy
    (store / "versions" / "broken-1.pt").write_bytes(b"not a checkpoint" * 100)
    rows = {r["version"]: r for r in listing(store, capsys)}
    assert "unreadable" in rows["broken-1"]["problem"] and not rows["broken-1"]["serving"]
    assert run_models(store, "promote", "broken-1", "--data", str(data), "--force", "--reason", "x") == 2
    assert "truncated or corrupt" in caplog.text
    assert ModelStore(store).serving_version() == BUNDLED


def test_an_unknown_version_is_a_clear_error(store_copy, caplog):
    store, data, _ = store_copy
    assert run_models(store, "promote", "no-such-version", "--data", str(data)) == 2
    assert "not found" in caplog.text


def test_a_corrupt_pointer_stops_the_moving_commands_with_one_line_naming_repair(store_copy, caplog):
    store, data, candidate = store_copy
    (store / "serving.json").write_text("{half a pointer")
    assert run_models(store, "rollback") == 2
    assert run_models(store, "promote", candidate, "--data", str(data)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("unreadable" in e and "training.store repair" in e for e in errors)


def test_two_concurrent_promotions_are_serialised(candidate_store, tmp_path):
    import shutil

    source, data, _, _ = candidate_store
    store = tmp_path / "store"
    shutil.copytree(source, store)
    first, second = real_candidate(store, "stn-cnn-copy-1"), real_candidate(store, "stn-cnn-copy-2")

    def promote(version):
        return subprocess.Popen(
            [sys.executable, "-m", "training.store", "--store", str(store), "promote", version, "--data", str(data),
             "--force", "--reason", "concurrency drill"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    processes = [promote(first), promote(second)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    pointer = ModelStore(store).read_pointer()  # one whole, valid pointer
    promotions = [e["version"] for e in pointer.history if e["action"] == "promote"]
    assert sorted(promotions) == sorted([first, second])  # neither promotion was lost
    assert pointer.serving == promotions[-1]
    assert pointer.previous == promotions[0]
    # The later one was judged against the model the earlier one had just promoted.
    later_output = outputs[[first, second].index(promotions[-1])]
    assert f"promoted {promotions[-1]} (was {promotions[0]})" in later_output


def test_store_refuses_to_overwrite_a_version(candidate_store):
    store, _, candidate, _ = candidate_store
    with pytest.raises(StoreError, match="already"):
        ModelStore(store).add(load_checkpoint(store / "versions" / f"{candidate}.pt"))


# ---- the app ------------------------------------------------------------------------


def wait_for_version(client, version, seconds=5.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if client.get("/healthz").get_json()["model_version"] == version:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"still not serving {version} after {seconds} s")


def test_the_app_swaps_to_a_promoted_model_and_back_without_a_restart(store_copy, make_app):
    store, _, candidate = store_copy
    app = make_app(MODEL_STORE=str(store))
    client = app.test_client()
    uploads = Uploads(client)
    assert uploads.api(XRAY).get_json()["model_version"] == BUNDLED
    with ModelStore(store).lock("promote"):
        ModelStore(store).set_serving(candidate, "promote", forced=True, reason="test")
    assert wait_for_version(client, candidate) < 5
    assert uploads.api(XRAY).get_json()["model_version"] == candidate
    assert candidate in client.get("/model").get_data(as_text=True)
    with ModelStore(store).lock("promote"):
        ModelStore(store).set_serving(BUNDLED, "rollback")
    wait_for_version(client, BUNDLED)
    assert uploads.form(XRAY).get_data(as_text=True).count(BUNDLED) >= 1


def test_a_broken_promoted_checkpoint_never_replaces_the_working_model(store_copy, make_app, caplog):
    store, _, _ = store_copy
    app = make_app(MODEL_STORE=str(store))
    client = app.test_client()
    client.get("/healthz")  # starts the watcher
    (store / "versions" / "broken-2.pt").write_bytes(b"garbage" * 100)
    pointer = json.loads((store / "serving.json").read_text())
    with caplog.at_level(logging.ERROR, logger="app"):
        with atomic_write(store / "serving.json") as handle:
            handle.write(json.dumps({**pointer, "serving": "broken-2"}).encode())
        deadline = time.monotonic() + 5
        while "keeping model" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if "keeping model" in r.getMessage()]
    assert len(lines) == 1 and BUNDLED in lines[0] and "broken-2" in lines[0]
    body = Uploads(client).api(XRAY).get_json()
    assert body["model_version"] == BUNDLED


def test_model_card_shows_the_history_and_the_previous_model_s_figures(store_copy, make_app):
    store, _, candidate = store_copy
    with ModelStore(store).lock("promote"):
        ModelStore(store).set_serving(candidate, "promote", forced=True, reason="drill for the card")
    html = make_app(MODEL_STORE=str(store)).test_client().get("/model").get_data(as_text=True)
    assert 'id="history-table"' in html and "drill for the card" in html and "forced" in html
    assert 'id="versus-previous"' in html and f"Previous: {BUNDLED}" in html


def test_analysis_page_says_when_the_serving_model_has_no_map_of_its_own(store_copy, make_app):
    store, _, candidate = store_copy
    client = make_app(MODEL_STORE=str(store)).test_client()
    assert 'id="stale"' not in client.get("/analysis").get_data(as_text=True)  # the seeded map is the bundled model's
    with ModelStore(store).lock("promote"):
        ModelStore(store).set_serving(candidate, "promote", forced=True, reason="test")
    wait_for_version(client, candidate)
    html = client.get("/analysis").get_data(as_text=True)
    assert 'id="stale"' in html and BUNDLED in html and candidate in html and "python -m training.tsne" in html


GOOD = {"auc": 0.98, "sensitivity": 0.99, "false_positive_rate": 0.25, "ood_flagged": 0.03}


@pytest.mark.parametrize("change, words", [
    ({}, None),
    ({"sensitivity": 0.97}, "sensitivity"),
    ({"false_positive_rate": 0.36}, "false-positive rate"),
    ({"auc": 0.955}, "AUC 0.9550 < 0.96"),
    ({"auc": 0.974}, "below the serving model's"),
    ({"ood_flagged": 0.06}, "population gate flags 6.0%"),
    ({"auc": float("nan")}, "AUC nan"),
])
def test_the_guard_s_rules(change, words):
    reasons = store_command.guard({**GOOD, **change}, {**GOOD, "auc": 0.98}, dry_run=False)
    assert reasons == [] if words is None else len(reasons) >= 1 and words in "; ".join(reasons)


def test_the_guard_refuses_dry_runs_and_models_without_a_population_gate():
    assert "dry-run" in store_command.guard(GOOD, GOOD, dry_run=True)[0]
    assert "no population gate" in store_command.guard(GOOD, GOOD, dry_run=False, population_gate=False)[0]
