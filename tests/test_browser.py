"""End to end in real headless Chromium (Debian's chromium + chromium-driver)."""
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser


def resource_origins(driver) -> set[str]:
    urls = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href]);"
    )
    return {f"{urlparse(u).scheme}://{urlparse(u).netloc}" for u in urls if not u.startswith("data:")}


def severe_console_messages(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_upload_a_real_xray_through_the_form(browser, live_server, real_data):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    image = sorted((real_data / "test" / "PNEUMONIA").iterdir())[0]
    browser.get(live_server + "/")
    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image))
    browser.find_element(By.ID, "submit").click()
    probability = WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.ID, "probability"))).text
    decision = browser.find_element(By.ID, "decision").text
    assert probability.endswith("%") and 0 <= float(probability[:-1]) <= 100
    assert decision in ("PNEUMONIA suspected", "NORMAL")
    images = browser.find_elements(By.CSS_SELECTOR, ".images img")
    # input, aligned, heat map (each shown at 256)
    assert [img.get_property("naturalWidth") for img in images] == [64, 64, 64]
    assert resource_origins(browser) == {live_server}
    assert severe_console_messages(browser) == []
    browser.back()  # the upload page again, as the history (or the back/forward cache) kept it
    button = WebDriverWait(browser, 10).until(EC.presence_of_element_located((By.ID, "submit")))
    WebDriverWait(browser, 10).until(lambda _: button.is_enabled())
    assert button.text != "Analysing…"


def test_pages_load_nothing_from_another_origin(browser, live_server):
    for path in ("/", "/model", "/analysis"):
        browser.get(live_server + path)
        assert resource_origins(browser) == {live_server}, path
        assert severe_console_messages(browser) == [], path


FIND_CANVASES = """
const found = [];
const walk = (root) => {
  root.querySelectorAll('*').forEach((el) => {
    if (el.tagName === 'CANVAS') found.push([el.width, el.height]);
    if (el.shadowRoot) walk(el.shadowRoot);
  });
};
walk(document);
return found;
"""


def test_analysis_page_renders_the_bokeh_plot(browser, live_server):
    import time

    from model.settings import DEFAULT_TSNE_ARTIFACT

    assert DEFAULT_TSNE_ARTIFACT.is_file(), "the bundled t-SNE artifact is missing"
    browser.get(live_server + "/analysis")
    deadline = time.monotonic() + 30
    canvases = []
    while time.monotonic() < deadline:
        canvases = [c for c in browser.execute_script(FIND_CANVASES) if c[0] > 0 and c[1] > 0]
        if len(canvases) >= 2:
            break
        time.sleep(0.25)
    assert len(canvases) >= 2, canvases  # the training and the test plot
    assert severe_console_messages(browser) == []
    assert resource_origins(browser) == {live_server}


def test_batch_and_dicom_uploads_through_the_forms(browser, live_server, real_data, tmp_path):
    import cv2
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from harness.dicom_files import make_dicom, twelve_bit

    films = [sorted((real_data / "test" / label).iterdir())[0] for label in ("NORMAL", "PNEUMONIA")]
    dicom = tmp_path / "study.dcm"
    pixels = cv2.imread(str(films[0]), cv2.IMREAD_GRAYSCALE)
    dicom.write_bytes(make_dicom(twelve_bit(pixels), tags={"PatientAge": "004Y"}))
    adult = tmp_path / "adult.dcm"
    adult.write_bytes(make_dicom(twelve_bit(pixels), tags={"PatientAge": "045Y"}))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")

    browser.get(live_server + "/")
    browser.find_element(By.ID, "images").send_keys("\n".join(str(p) for p in [*films, broken, dicom]))
    browser.find_element(By.ID, "submit-batch").click()
    table = WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.ID, "batch-results")))
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    names = [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows]
    assert sorted(names) == sorted([films[0].name, films[1].name, "broken.jpg", "study.dcm"])
    assert names[-1] == "broken.jpg" and "not read" in rows[-1].text
    header = table.find_elements(By.TAG_NAME, "th")[2]
    assert header.get_attribute("aria-sort") == "descending"  # as the server sent it
    header.find_element(By.TAG_NAME, "button").send_keys(Keys.ENTER)  # from the keyboard: ascending
    first = table.find_elements(By.CSS_SELECTOR, "tbody tr")[0].find_elements(By.TAG_NAME, "td")[0].text
    assert first == "broken.jpg" and header.get_attribute("aria-sort") == "ascending"
    assert [th.get_attribute("aria-sort") for th in table.find_elements(By.TAG_NAME, "th")].count(None) == 3
    assert severe_console_messages(browser) == []

    browser.get(live_server + "/")
    browser.find_element(By.ID, "image").send_keys(str(dicom))
    browser.find_element(By.ID, "submit").click()
    probability = WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.ID, "probability"))).text
    assert probability.endswith("%")
    assert "Doe" not in browser.find_element(By.TAG_NAME, "main").text

    browser.get(live_server + "/")  # the same film, but the header says 45 years: reasons, no decision
    browser.find_element(By.ID, "image").send_keys(str(adult))
    browser.find_element(By.ID, "submit").click()
    reasons = WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.ID, "population-reasons"))).text
    assert "45 years" in reasons and browser.find_elements(By.ID, "decision") == []


def test_the_result_page_shows_similar_films_and_places_this_one_on_the_map(browser, live_server, real_data):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from model import Predictor
    from model.settings import DEFAULT_CHECKPOINT

    # a film inside the intended population: a refused one gets neither similar films nor a place on the map
    predictor = Predictor.from_path(DEFAULT_CHECKPOINT)
    image = next(path for path in sorted((real_data / "test" / "NORMAL").iterdir())[3:]
                 if predictor.predict(path.read_bytes()).in_distribution)
    browser.get(live_server + "/")
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "submit").click()
    film_map = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "film-map"))
    WebDriverWait(browser, 20).until(lambda b: film_map.get_attribute("data-placed") == "true")
    placed = browser.execute_script("return Bokeh.documents[0].get_model_by_name('upload').data.x[0];")
    assert placed == pytest.approx(float(film_map.get_attribute("data-x")))
    thumbnails = browser.find_elements(By.CSS_SELECTOR, "#neighbours img")
    WebDriverWait(browser, 20).until(lambda b: all(img.get_property("naturalWidth") > 0 for img in thumbnails))
    assert len(thumbnails) == 6
    assert len(browser.execute_script(FIND_CANVASES)) >= 1
    assert severe_console_messages(browser) == []
    assert resource_origins(browser) == {live_server}


def test_an_overread_in_one_click_shows_on_the_worklist_and_in_the_agreement(browser, live_server, pediatric_film,
                                                                           tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    film = tmp_path / "film.jpeg"
    film.write_bytes(pediatric_film)

    def agreed() -> int:
        browser.get(live_server + "/api/v1/monitor")
        import json

        return json.loads(browser.find_element(By.TAG_NAME, "body").text)["agreement"]["overreads"]

    before = agreed()
    browser.get(live_server + "/")
    browser.find_element(By.ID, "image").send_keys(str(film))
    browser.find_element(By.ID, "submit").click()
    case_link = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, "#case-id a"))
    case_id = case_link.text
    decision = browser.find_element(By.ID, "decision").text
    read = "read-pneumonia" if "PNEUMONIA" in decision else "read-normal"
    browser.find_element(By.ID, read).click()  # the one click: the read is kept, the case page shows it
    history = WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "overread-history"))
    assert read.removeprefix("read-") in history.text
    browser.get(live_server + "/cases")
    row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#cases-table tbody tr") if case_id[:8] in r.text)
    assert read.removeprefix("read-") in row.text
    assert agreed() == before + 1
    browser.get(live_server + "/monitor")
    assert browser.find_element(By.ID, "agreement-table").is_displayed()
    assert severe_console_messages(browser) == []
