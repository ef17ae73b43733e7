"""The web page in a real browser: upload a photo, see each model's top predictions (the server's default count)
with bars, the ensemble's answer and latencies; a non-image shows a clear error and the next upload works; drag and
drop; the fusion control is off when one model is chosen.

What the page shows is compared with what POST /v1/classify answers for the same bytes with no top_k (the default).
"""

from __future__ import annotations

import base64
import json
import re
import urllib.request
import uuid
from pathlib import Path

import pytest

TIMEOUT = 20
MODELS = ["fake_a", "fake_b", "fake_c"]  # tests/web/conftest.py's server; ensemble "trio" of all three


def _wait(browser, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, TIMEOUT, poll_frequency=0.05).until(condition, message)


def _api_classify(base_url: str, data: bytes, filename: str, **fields) -> dict:
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields.items())
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{base_url}/v1/classify", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _open(browser, base_url):
    from selenium.webdriver.common.by import By

    browser.get(base_url + "/")
    _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#ensemble-select option"), "the ensembles never listed")
    _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model-list input")) == len(MODELS),
          "the models never listed")


def _upload(browser, path: Path):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "file-input").send_keys(str(path))


def _cards(browser, selector: str, count: int):
    from selenium.webdriver.common.by import By

    _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, selector)) == count,
          f"expected {count} {selector} in the page")
    return browser.find_elements(By.CSS_SELECTOR, selector)


def _rows(card) -> list[tuple[str, float, float]]:
    """(label, bar width %, shown probability %) per prediction row of a card."""
    from selenium.webdriver.common.by import By

    rows = []
    for row in card.find_elements(By.CSS_SELECTOR, ".prediction"):
        label = row.find_element(By.CSS_SELECTOR, ".label").text
        fill = row.find_element(By.CSS_SELECTOR, ".bar-fill")
        bar = float(re.search(r"width:\s*([\d.]+)%", fill.get_attribute("style")).group(1))
        shown = float(row.find_element(By.CSS_SELECTOR, ".prob").text.rstrip("%"))
        assert fill.size["width"] > 0, f"the bar of {label!r} is not drawn"
        rows.append((label, bar, shown))
    return rows


def test_upload_a_photo_shows_the_default_top_k_bars_ensemble_and_latency(browser, base_url, photo, save_screenshot, labels):
    from selenium.webdriver.common.by import By

    _open(browser, base_url)
    assert browser.find_element(By.ID, "ensemble-select").get_attribute("value") == "trio"
    _upload(browser, photo)
    cards = _cards(browser, "#model-results .card.model", 3)
    expected = _api_classify(base_url, photo.read_bytes(), photo.name, ensemble="trio")
    assert all(len(m["predictions"]) == 5 for m in expected["models"])  # the server's default

    preview = browser.find_element(By.ID, "preview")
    assert preview.is_displayed() and browser.execute_script("return arguments[0].naturalWidth", preview) > 0

    assert [c.get_attribute("data-model") for c in cards] == ["fake_a", "fake_b", "fake_c"]
    for card, answer in zip(cards, expected["models"]):
        rows = _rows(card)
        assert [label for label, _, _ in rows] == [p["label"] for p in answer["predictions"]]
        assert all(label in labels for label, _, _ in rows)
        for (_, bar, shown), p in zip(rows, answer["predictions"]):
            assert bar == pytest.approx(p["probability"] * 100, abs=0.01)
            assert shown == pytest.approx(p["probability"] * 100, abs=0.06)
        assert [b for _, b, _ in rows] == sorted((b for _, b, _ in rows), reverse=True)
        latency = card.find_element(By.CSS_SELECTOR, ".latency").text
        assert re.fullmatch(r"\d+(\.\d+)? ms", latency), latency
        assert float(latency.split()[0]) > 0
        assert "compute" in card.find_element(By.CSS_SELECTOR, ".meta").text

    (ensemble,) = _cards(browser, "#ensemble-results .card.ensemble", 1)
    fused = expected["ensembles"][0]
    assert ensemble.get_attribute("data-ensemble") == "trio"
    assert ensemble.find_element(By.CSS_SELECTOR, ".answer-label").text == fused["predictions"][0]["label"]
    assert [label for label, _, _ in _rows(ensemble)] == [p["label"] for p in fused["predictions"]]
    timings = browser.find_element(By.ID, "timings").text
    assert "decode" in timings and "round trip" in timings
    assert not browser.find_element(By.ID, "error").is_displayed()
    shot = save_screenshot("kestrel-web-results")
    assert shot.stat().st_size > 10_000

    # chosen models instead of the ensemble: two models and their ad-hoc fused answer
    browser.find_element(By.ID, "mode-models").click()
    browser.find_element(By.CSS_SELECTOR, "#model-list input[value='fake_c']").click()
    browser.find_element(By.ID, "classify-button").click()
    cards = _cards(browser, "#model-results .card.model", 2)
    assert [c.get_attribute("data-model") for c in cards] == ["fake_a", "fake_b"]
    (ensemble,) = _cards(browser, "#ensemble-results .card.ensemble", 1)
    expected = _api_classify(base_url, photo.read_bytes(), photo.name, models="fake_a,fake_b")
    answer = ensemble.find_element(By.CSS_SELECTOR, ".answer-label").text
    assert answer == expected["ensembles"][0]["predictions"][0]["label"]


def test_non_image_upload_shows_a_clear_error_then_a_photo_works(browser, base_url, photo, tmp_path, save_screenshot):
    from selenium.webdriver.common.by import By

    _open(browser, base_url)
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a photo\n")
    _upload(browser, notes)
    error = browser.find_element(By.ID, "error")
    _wait(browser, lambda b: error.is_displayed() and error.text, "no error shown for a text file")
    assert "notes.txt" in error.text and "HTTP 400" in error.text and "cannot decode image" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#model-results .card")
    save_screenshot("kestrel-web-error")

    _upload(browser, photo)  # the server kept serving
    _cards(browser, "#model-results .card.model", 3)
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_drag_and_drop_a_png(browser, base_url):
    import io

    from PIL import Image
    from selenium.webdriver.common.by import By

    _open(browser, base_url)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, "PNG")
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const file = new File([bytes], "dropped.png", {type: "image/png"});
        const data = new DataTransfer();
        data.items.add(file);
        const zone = document.getElementById("dropzone");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: data, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        """, base64.b64encode(buffer.getvalue()).decode())
    cards = _cards(browser, "#model-results .card.model", 3)
    assert "dropped.png" in browser.find_element(By.ID, "file-name").text
    expected = _api_classify(base_url, buffer.getvalue(), "dropped.png", ensemble="trio")
    assert [label for label, _, _ in _rows(cards[0])] == [p["label"] for p in expected["models"][0]["predictions"]]


def test_a_server_with_tokens_asks_the_page_for_one(browser, photo, tmp_path, save_screenshot):
    """With --auth-tokens the page's files load without a token, the page asks for one, and every call it
    makes then carries it: a wrong token is asked for again, a token with the infer role classifies."""
    from selenium.webdriver.common.by import By

    from serve import create_server
    from serve.backends.fake import write_fake_model

    LABELS = ["tabby cat", "Egyptian cat", "golden retriever"]  # noqa: N806

    write_fake_model(tmp_path / "repo", "guarded", classes=len(LABELS), labels=LABELS, seed=1)
    (tmp_path / "tokens").write_text("page-token-123 infer\ncontrol-only-9 control\n")
    server, _ = create_server(tmp_path / "repo", port=0, http_port=0, auth_tokens=tmp_path / "tokens")
    try:
        browser.execute_script("sessionStorage.clear()")
        browser.get(f"http://127.0.0.1:{server.http_port}/")
        box = _wait(browser, lambda b: b.find_element(By.ID, "token-box").is_displayed() and
                    b.find_element(By.ID, "token-box"), "the page never asked for a token")
        assert "needs a token" in box.text
        browser.find_element(By.ID, "token-input").send_keys("control-only-9")  # a token without the infer role
        browser.find_element(By.ID, "token-save").click()
        _wait(browser, lambda b: "lacks the infer role" in b.find_element(By.ID, "token-reason").text,
              "a token without the role was not reported")
        browser.find_element(By.ID, "token-input").send_keys("page-token-123")
        browser.find_element(By.ID, "token-save").click()
        _wait(browser, lambda b: not b.find_element(By.ID, "token-box").is_displayed(), "the token box stayed open")
        _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model-list input")) == 1,
              "the models never listed with the token")
        browser.find_element(By.ID, "mode-models").click()
        _upload(browser, photo)
        cards = _cards(browser, "#model-results .card.model", 1)
        assert "guarded" in cards[0].text
        save_screenshot("token-page")
    finally:
        browser.execute_script("sessionStorage.clear()")
        server.stop(grace=1)


def test_the_fusion_control_is_off_with_one_chosen_model(browser, base_url, photo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, base_url)
    fusion = browser.find_element(By.ID, "fusion-select")
    assert fusion.is_enabled()  # an ensemble: a fusion may override its own
    browser.find_element(By.ID, "mode-models").click()
    assert fusion.is_enabled()  # three models chosen
    Select(fusion).select_by_value("majority")
    for name in ("fake_b", "fake_c"):
        browser.find_element(By.CSS_SELECTOR, f"#model-list input[value='{name}']").click()
    _wait(browser, lambda b: not fusion.is_enabled(), "the fusion control stayed on with one model chosen")
    assert "choose two or more" in fusion.get_attribute("title")
    _upload(browser, photo)  # one model, a fusion still selected but off: classified, no HTTP 400
    (card,) = _cards(browser, "#model-results .card.model", 1)
    assert card.get_attribute("data-model") == "fake_a"
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, "#ensemble-results .card")
    browser.find_element(By.CSS_SELECTOR, "#model-list input[value='fake_b']").click()
    _wait(browser, lambda b: fusion.is_enabled(), "the fusion control stayed off with two models chosen")
