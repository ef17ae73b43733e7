"""Take docs/img/web.png: the web page of a running Kestrel server after classifying a photo.

    python docs/img/make_web_png.py --repository models --models mobilenet_v2,mobilenet_v2_int8 \
        --photo ../shared/photos/parrot.jpg

Starts a server in this process (gRPC and HTTP on free ports, the models as an ensemble "imagenet"),
opens the page in headless Debian Chromium (apt-get install chromium chromium-driver; selenium from the
dev extra, given both paths so it downloads nothing), uploads the photo, waits for every model's card
and the ensemble's answer, classifies again --warmup times (the latencies shown are warm ones; take it on a
quiet machine), and saves the screenshot. Without --models: every model in the repository.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--models", help="comma-separated (default: all)")
    p.add_argument("--photo", type=Path, default=ROOT.parent / "shared" / "photos" / "parrot.jpg")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "img" / "web.png")
    p.add_argument("--size", default="1280,900", help="window WIDTH,HEIGHT (default 1280,900)")
    p.add_argument("--warmup", type=int, default=3, help="classify this many more times before the picture")
    args = p.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from serve import console, create_server

    console.quiet_native_logs()
    models = [m for m in (args.models or "").split(",") if m] or None
    server, _ = create_server(args.repository, models=models, port=0, http_port=0, metrics_port=None,
                              ensembles=[f"imagenet={','.join(models)}"] if models and len(models) > 1 else [])
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={args.size}", "--hide-scrollbars"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(f"http://127.0.0.1:{server.http_port}/")
        wait = WebDriverWait(browser, 120, poll_frequency=0.1)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model-list input"), "the models never listed")
        browser.find_element(By.ID, "file-input").send_keys(str(args.photo.resolve()))
        count = len(models) if models else len(server.hub.models)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model-results .card.model")) == count,
                   "the model cards never appeared")
        if models and len(models) > 1:
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#ensemble-results .card.ensemble"),
                       "the ensemble's answer never appeared")
        for _ in range(args.warmup):  # classify again: the picture shows warm latencies, not the first call's
            before = browser.find_element(By.ID, "timings").text
            browser.find_element(By.ID, "classify-button").click()
            wait.until(lambda b: b.find_element(By.ID, "timings").text not in ("", before), "no new answer")
        height = browser.execute_script("return document.documentElement.scrollHeight")
        width = int(args.size.split(",")[0])
        browser.set_window_size(width, min(max(height, 600), 1600))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        if not browser.save_screenshot(str(args.output)):
            print("error: Chromium did not write the screenshot", file=sys.stderr)
            return 1
    finally:
        browser.quit()
        server.stop(grace=1)
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
