"""Fixtures for the web page's browser tests: a server of fake models with an HTTP port, and headless Chromium.

Chromium and its driver come from Debian (packages chromium and chromium-driver: /usr/bin/chromium,
/usr/bin/chromedriver); KESTREL_CHROMIUM / KESTREL_CHROMEDRIVER point elsewhere. Nothing is
downloaded: selenium is given both paths, so Selenium Manager never runs. Without them the
tests skip with the reason. Screenshots go to the test's tmp dir and to $KESTREL_ARTIFACTS when set.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = (ROOT.parent / "shared" / "photos").resolve()
LABELS = ["tabby cat", "Egyptian cat", "golden retriever", "hotdog", "macaw", "sunflower", "dragonfly", "kite",
          "great grey owl", "potato chips"]
MODELS = {"fake_a": dict(seed=1), "fake_b": dict(seed=2, size=(48, 40)), "fake_c": dict(seed=3)}
ENSEMBLE = "trio=fake_a,fake_b,fake_c"


def _browser_paths() -> tuple[str, str] | str:
    """(chromium, chromedriver), or the reason they cannot be used."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install 'kestrel[dev]')"
    chromium = os.environ.get("KESTREL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = os.environ.get("KESTREL_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.access(p, os.X_OK)]
    if missing:
        return (f"no headless browser: {', '.join(missing)} not found (apt-get install chromium chromium-driver, "
                "or set KESTREL_CHROMIUM and KESTREL_CHROMEDRIVER)")
    return chromium, driver


@pytest.fixture(scope="session")
def web_server(tmp_path_factory):
    """A Kestrel server over three fake models and the ensemble 'trio', with its HTTP port."""
    from serve import create_server
    from serve.backends.fake import write_fake_model

    root = tmp_path_factory.mktemp("web_repo")
    for name, options in MODELS.items():
        write_fake_model(root, name, classes=len(LABELS), labels=LABELS, **options)
    server, _ = create_server(root, ensembles=[ENSEMBLE], port=0, http_port=0)
    yield server
    server.stop(grace=2)


@pytest.fixture(scope="session")
def labels() -> list[str]:
    return list(LABELS)


@pytest.fixture(scope="session")
def base_url(web_server) -> str:
    return f"http://127.0.0.1:{web_server.http_port}"


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Debian Chromium through chromedriver (skips with the reason when absent)."""
    paths = _browser_paths()
    if isinstance(paths, str):
        pytest.skip(paths)
    chromium, driver_path = paths
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium_profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as exc:
        pytest.skip(f"headless Chromium did not start ({chromium}, {driver_path}): {exc.msg}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def save_screenshot(browser, tmp_path):
    """save_screenshot(name) -> the PNG's path (tmp dir, and a copy in $KESTREL_ARTIFACTS when set)."""

    def save(name: str) -> Path:
        path = tmp_path / f"{name}.png"
        assert browser.save_screenshot(str(path)), "Chromium did not write the screenshot"
        artifacts = os.environ.get("KESTREL_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(artifacts) / path.name)
        return path

    return save


@pytest.fixture(scope="session")
def photo(tmp_path_factory) -> Path:
    """A real photo from ../shared/photos when present, else a generated PNG."""
    for name in ("cat_720p.jpg", "hot_dog.jpg", "parrot.jpg"):
        if (PHOTOS / name).is_file():
            return PHOTOS / name
    import numpy as np
    from PIL import Image

    from serve.images import synthetic_images

    path = tmp_path_factory.mktemp("photo") / "generated.png"
    Image.fromarray(synthetic_images(1, (240, 320), seed=5)[0]).save(path)
    assert np.asarray(Image.open(path)).shape == (240, 320, 3)
    return path
