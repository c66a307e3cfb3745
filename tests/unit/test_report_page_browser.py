"""index.html in a real browser (headless Chromium): at 1280 px, and narrower, the page itself
never scrolls sideways; a table wider than the page scrolls inside its own box.

Set CVGL_TEST_SCREENSHOT=/path/page.png to keep a full-page screenshot at 1280 px.
"""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

from orchestrator.reporting.page import write_page
from tests.unit.test_figures import make_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = os.environ.get("CVGL_TEST_SCREENSHOT")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs chromium and chromedriver on PATH (apt: chromium chromium-driver)",
)

# Per table: its width, the width of its parent, and whether an ancestor (up to the body) scrolls
# sideways; and every element's right edge that reaches past the viewport outside such a box.
LAYOUT_JS = """
const scrolls = el => ['auto', 'scroll'].includes(getComputedStyle(el).overflowX);
const inScrollBox = el => {
  for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) if (scrolls(p)) return true;
  return false;
};
return {
  pageWidth: document.documentElement.scrollWidth,
  viewport: window.innerWidth,
  tables: [...document.querySelectorAll('table')].map(t => ({
    width: t.getBoundingClientRect().width,
    container: t.parentElement.clientWidth,
    scrollBox: inScrollBox(t),
  })),
  sticking_out: [...document.body.querySelectorAll('*')]
    .filter(el => !inScrollBox(el) && el.getBoundingClientRect().right > window.innerWidth + 0.5)
    .map(el => el.tagName + ' ' + (el.textContent || '').slice(0, 60)),
  images: [...document.images].map(i => i.getBoundingClientRect().right),
};
"""


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _viewport(driver, width: int, height: int = 900) -> None:
    """Resize so that the page's viewport (not the window) is ``width`` wide."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return window.innerWidth")
    driver.set_window_size(2 * width - inner, height)
    assert driver.execute_script("return window.innerWidth") == width


def test_page_with_12_runs_never_scrolls_sideways(browser, tmp_path):
    report = make_report(12)
    # A wide figure (as Figure 5 is) next to the page: it must shrink to the page's width.
    Image.new("RGB", (2400, 600), (40, 90, 200)).save(tmp_path / "figure5_run1.png")
    page = write_page(tmp_path, report, [(tmp_path / "figure5_run1.png", "Figure 5. A wide figure.")])
    browser.get(page.as_uri())
    overflowed = 0
    for width in (1280, 800):
        _viewport(browser, width)
        layout = browser.execute_script(LAYOUT_JS)
        assert layout["pageWidth"] <= layout["viewport"] == width, layout
        assert not layout["sticking_out"], layout["sticking_out"]
        assert len(layout["tables"]) == 6  # Table 1, comparisons, settings, calibration, bias, cost
        for table in layout["tables"]:
            assert table["scrollBox"]
            overflowed += table["width"] > table["container"] + 0.5
        assert layout["images"] and max(layout["images"]) <= width
    assert overflowed  # the narrow window has tables wider than the page: they scroll in their box
    if SCREENSHOT:
        _viewport(browser, 1280)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(browser.get_window_size()["width"], height + 200)
        browser.save_screenshot(SCREENSHOT)
