"""The pages a clinician uses, on a phone (390 x 844) and a laptop (1280 x 800), in headless
Chromium: nothing scrolls sideways, no word breaks mid-letter, and axe-core (the npm package,
injected by the test) finds no violation of impact serious or critical."""
import os
import time
from pathlib import Path

import numpy as np
import pytest

from harness.images import encode
from model.settings import REPO_ROOT

pytestmark = pytest.mark.browser

AXE = REPO_ROOT / "node_modules" / "axe-core" / "axe.min.js"
VIEWPORTS = {"phone": (390, 844), "laptop": (1280, 800)}
PAGES = ("upload", "result", "refusal", "batch of 8", "model card", "analysis", "cases", "monitor", "case",
         "refused case, read")


@pytest.fixture(scope="module")
def axe_source() -> str:
    if not AXE.is_file():
        message = f"axe-core not installed at {AXE} (make test runs npm ci)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    return AXE.read_text()


@pytest.fixture(scope="module")
def films(real_data, tmp_path_factory) -> dict[str, list[Path]]:
    noise = tmp_path_factory.mktemp("films") / "noise.png"
    noise.write_bytes(encode(np.random.default_rng(31).integers(0, 256, (400, 400), dtype=np.uint8), ".png"))
    test = real_data / "test"
    batch = sorted((test / "PNEUMONIA").iterdir())[:4] + sorted((test / "NORMAL").iterdir())[:3] + [noise]
    return {"result": [sorted((test / "PNEUMONIA").iterdir())[0]], "refusal": [noise], "batch of 8": batch}


def open_page(browser, base: str, page: str, films: dict) -> None:
    from selenium.webdriver.common.by import By

    paths = {"upload": "/", "model card": "/model", "analysis": "/analysis", "cases": "/cases", "monitor": "/monitor"}
    if page in paths:
        browser.get(base + paths[page])
        return
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    if page in ("case", "refused case, read"):  # a case page, with a read and its note for the refused film
        open_page(browser, base, "result" if page == "case" else "refusal", films)
        if page == "case":
            browser.find_element(By.CSS_SELECTOR, "#case-id a").click()
        else:
            browser.find_element(By.ID, "overread-note").send_keys("Reviewed with the radiologist on call")
            browser.find_element(By.ID, "read-normal").click()
        WebDriverWait(browser, 30).until(EC.presence_of_element_located((By.ID, "case-facts")))
        return
    browser.get(base + "/")
    field, button = ("images", "submit-batch") if page == "batch of 8" else ("image", "submit")
    browser.find_element(By.ID, field).send_keys("\n".join(str(p) for p in films[page]))
    upload_page = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.ID, button).click()
    WebDriverWait(browser, 60).until(EC.staleness_of(upload_page))  # the answer replaced the upload page


def settle(browser) -> None:
    """Wait until the page has loaded and its scripts (BokehJS) have laid it out."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(lambda b: b.execute_script("return document.readyState") == "complete")
    time.sleep(0.8)


#: Words (letters only: no ids, hashes or numbers) whose letters the browser laid out on more
#: than one line: "Sensitivi / ty", "Whe / n". Code and hidden text are left out.
BROKEN_WORDS = """
const broken = [];
const walker = document.createTreeWalker(document.querySelector('main'), NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const parent = node.parentElement;
  if (!parent || parent.closest('code, pre, .visually-hidden') || !parent.getClientRects().length) continue;
  for (const token of node.textContent.matchAll(/\\S+/g)) {
    if (/\\d/.test(token[0])) continue;
    for (const run of token[0].matchAll(/\\p{L}{2,}/gu)) {  // a line may break at a hyphen or slash, not in letters
      const range = document.createRange();
      range.setStart(node, token.index + run.index);
      range.setEnd(node, token.index + run.index + run[0].length);
      const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
      if (tops.size > 1) broken.push(run[0]);
    }
  }
}
return broken;
"""


@pytest.mark.parametrize("viewport", VIEWPORTS)
@pytest.mark.parametrize("page", PAGES)
def test_no_page_scrolls_sideways_and_axe_finds_nothing_serious(browser, live_server, films, axe_source,
                                                                page, viewport):
    width, height = VIEWPORTS[viewport]
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": viewport == "phone"})
    try:
        open_page(browser, live_server, page, films)
        settle(browser)
        scroll, inner = browser.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth];")
        assert scroll <= inner, f"{page} is {scroll} px wide on a {inner} px screen"
        assert browser.execute_script(BROKEN_WORDS) == [], f"{page}: words broken across lines"
        browser.execute_script(axe_source)
        violations = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations));")
        serious = [f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']][:3]}"
                   for v in violations if v["impact"] in ("serious", "critical")]
        assert serious == []
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


#: The focused element (inside shadow roots too) and whether it, or the shadow host around it
#: that takes its outline (a Bokeh canvas), shows an outline of at least 2 px.
FOCUSED = """
let element = document.activeElement;
while (element && element.shadowRoot && element.shadowRoot.activeElement) {
  element = element.shadowRoot.activeElement;
}
const marked = (e) => {
  const s = getComputedStyle(e);
  return s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2;
};
let visible = marked(element), host = element.getRootNode().host;
while (!visible && host) { visible = marked(host); host = host.getRootNode().host; }
return [element.tagName + (element.id ? '#' + element.id : '') + '.' + element.className, visible];
"""


@pytest.mark.parametrize("page", ["upload", "batch of 8", "analysis"])
def test_the_keyboard_reaches_a_skip_link_first_and_every_stop_shows_its_focus(browser, live_server, films, page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(browser, live_server, page, films)
    settle(browser)
    browser.execute_script("document.activeElement.blur(); window.focus();")
    stops = []
    for _ in range(25):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        stops.append(browser.execute_script(FOCUSED))
    assert stops[0][0].startswith("A.skip-link")
    unmarked = [name for name, visible in stops if not visible and not name.startswith("BODY")]
    assert unmarked == [], stops
    if page == "batch of 8":  # the sort buttons are among the stops
        assert any(name.startswith("BUTTON.sort") for name, _ in stops)


def test_the_skip_link_moves_the_focus_to_the_content(browser, live_server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.get(live_server + "/")
    browser.execute_script("document.activeElement.blur();")
    ActionChains(browser).send_keys(Keys.TAB).send_keys(Keys.ENTER).perform()
    assert browser.execute_script("return document.activeElement.id") == "main"


def test_without_javascript_script_only_parts_say_so_or_are_absent(browser_without_javascript, live_server, films):
    from selenium.webdriver.common.by import By

    browser = browser_without_javascript
    browser.get(live_server + "/analysis")
    assert browser.find_element(By.ID, "needs-javascript").is_displayed()
    assert not browser.find_element(By.CSS_SELECTOR, ".tsne").is_displayed()
    open_page(browser, live_server, "batch of 8", films)
    assert "heading button sorts" not in browser.find_element(By.TAG_NAME, "main").text
    assert browser.find_elements(By.CSS_SELECTOR, "th button") == []  # plain headings, the server's order
    open_page(browser, live_server, "result", films)
    assert browser.find_element(By.ID, "probability").is_displayed()
    assert not browser.find_element(By.ID, "film-map").is_displayed()  # the film is in population: it has a map
    assert "needs JavaScript" in browser.find_element(By.ID, "similar").text


def on_screen(browser, viewport: str) -> None:
    width, height = VIEWPORTS[viewport]
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": viewport == "phone"})


#: The largest font among the elements of <main> that hold text of their own, other than ``#id``.
LARGEST_OTHER_TEXT = """
let largest = 0;
for (const e of document.querySelectorAll('main *')) {
  if (e.closest('#' + arguments[0]) || !e.getClientRects().length) continue;
  const own = [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
  if (own) largest = Math.max(largest, parseFloat(getComputedStyle(e).fontSize));
}
return [largest, parseFloat(getComputedStyle(document.getElementById(arguments[0])).fontSize)];
"""


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_the_decision_is_the_largest_text_and_the_image_cards_keep_their_shape(browser, live_server, films,
                                                                               viewport):
    from selenium.webdriver.common.by import By

    on_screen(browser, viewport)
    try:
        open_page(browser, live_server, "result", films)
        settle(browser)
        others, decision = browser.execute_script(LARGEST_OTHER_TEXT, "decision")
        assert decision > others, f"the decision is {decision} px, other text up to {others} px"
        for card in browser.find_elements(By.CSS_SELECTOR, ".images figure"):
            image = card.find_element(By.TAG_NAME, "img").rect
            caption = card.find_element(By.TAG_NAME, "figcaption").rect
            assert abs(image["width"] - image["height"]) <= 1  # square films stay square
            assert card.rect["height"] <= image["height"] + caption["height"] + 40, "the card is stretched"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def drawn_canvases(browser) -> list[list[int]]:
    from tests.test_browser import FIND_CANVASES

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        canvases = [c for c in browser.execute_script(FIND_CANVASES) if min(c) > 40]  # not the toolbar's icons
        if canvases:
            time.sleep(0.5)  # let the layout settle
            return [c for c in browser.execute_script(FIND_CANVASES) if min(c) > 40]
        time.sleep(0.25)
    return []


@pytest.mark.parametrize("path", ["/monitor", "/analysis"])
def test_charts_and_maps_take_the_phone_s_width(browser, live_server, path):
    on_screen(browser, "phone")
    try:
        browser.get(live_server + path)
        settle(browser)
        canvases = drawn_canvases(browser)
        content = browser.execute_script("return document.querySelector('main').clientWidth")
        assert canvases, "nothing drawn"
        small = [c for c in canvases if c[0] < 0.8 * (content - 40) or c[1] < 200]
        assert small == [], f"charts of {small} px on a {content} px wide page"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_refused_film_is_read_in_one_click_and_counts_in_the_site_report(browser, live_server, films):
    import re

    from selenium.webdriver.common.by import By

    def films_read() -> int:
        browser.get(live_server + "/monitor")
        return int(re.search(r"Films (\d+)", browser.find_element(By.ID, "site-report-table").text).group(1))

    before = films_read()
    open_page(browser, live_server, "refusal", films)
    assert browser.find_elements(By.ID, "probability") == []  # no AI answer for it
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "read-pneumonia").click()
    history = WebDriverWait(browser, 30).until(EC.presence_of_element_located((By.ID, "overread-history"))).text
    assert "pneumonia" in history
    assert films_read() == before + 1
