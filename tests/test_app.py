"""``demo/app.py`` served on 127.0.0.1 with a tiny referring model: a ``gradio_client`` call gives
the masks ``demo/demo.py`` writes for the same input, and a real headless Chromium (Debian's
``chromium`` + ``chromium-driver``) uploads an image, types two expressions and gets the overlay;
bad input shows its message in the page and the next request still works."""

import json
import os
import shutil
import socket
import time
import urllib.request

import cv2
import numpy as np
import pytest
from flowseg.utils.visualize import FILL_ALPHA
from PIL import Image
from pycocotools import mask as mask_utils
from repo_scripts import load_script
from test_demo import CONFIG, _image, env  # noqa: F401 - the tiny model fixture

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
app_script = load_script("demo/app.py")
demo_script = load_script("demo/demo.py")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(env):  # noqa: F811
    return demo_script.load_demo(CONFIG, env["weights"], env["opts"])


@pytest.fixture(scope="module")
def server(env, model):  # noqa: F811
    out_root = env["tmp"] / "app_out"
    out_root.mkdir()
    app = app_script.build_app(model, str(out_root))
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "app": app}
    app.close()


def _json_masks(path):
    with open(path, encoding="utf-8") as f:
        answers = json.load(f)["answers"]
    return [a["expression"] for a in answers], [mask_utils.decode(a["segmentation"]) for a in answers]


def test_client_call_equals_the_command_line_demo(env, server, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file

    image = _image(tmp_path / "scene.png", 72, 96, 3)
    expressions = ["the red box", "<p>the grey floor</p> and <p>the top left corner</p>"]
    client = Client(server["url"], verbose=False)
    overlay, files, status = client.predict(
        handle_file(image), "\n".join(expressions), "referring", api_name="/segment"
    )
    assert status.startswith("3 answer(s)"), status
    (json_file,) = [f for f in files if str(f).endswith(".json")]
    texts, masks = _json_masks(json_file)

    out = tmp_path / "cli"
    argv = ["--config-file", CONFIG, "--weights", env["weights"], "--input", image, "--output", str(out)]
    argv += [a for e in expressions for a in ("--expression", e)] + ["--opts", *env["opts"]]
    assert demo_script.main(argv) == 0
    (cli_json,) = [f for f in os.listdir(out) if f.endswith(".json")]
    cli_texts, cli_masks = _json_masks(out / cli_json)
    assert texts == cli_texts == ["the red box", "the grey floor", "the top left corner"]
    for a, b in zip(masks, cli_masks):
        np.testing.assert_array_equal(a, b)
    assert cv2.imread(overlay).shape == cv2.imread(str(out / cli_json.replace(".json", ".png"))).shape

    # bad input: the message comes back, and the server still answers the next request
    _, _, status = client.predict(handle_file(image), "  \n ", "referring", api_name="/segment")
    assert status.startswith("error: the expression is empty")
    _, _, status = client.predict(handle_file(image), "<p>the red box", "referring", api_name="/segment")
    assert status.startswith("error:") and "unbalanced phrase markers" in status
    _, _, status = client.predict(handle_file(image), "the red box", "referring", api_name="/segment")
    assert status.startswith("1 answer(s)")


def _browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium / chromedriver on PATH (Debian packages chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1400",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _wait(driver, predicate, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate(driver)
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out waiting for the page")


def _status(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value")


def _submit(driver, text):
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, "#expressions textarea")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "segment").click()


def test_browser_uploads_an_image_and_shows_two_expressions(env, server, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    image_path = _image(tmp_path / "upload.png", 64, 64, 5)
    driver = _browser(tmp_path)
    try:
        driver.get(server["url"])
        upload = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        upload[0].send_keys(image_path)
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))

        # an error case first: its message is shown in the page
        _submit(driver, "<p>the red box")
        _wait(driver, lambda d: _status(d).startswith("error:"))
        assert "unbalanced phrase markers" in _status(driver)
        driver.save_screenshot(str(tmp_path / "error.png"))

        _submit(driver, "the red box\nthe grey floor")
        _wait(driver, lambda d: _status(d).startswith("2 answer(s)"))
        src = _wait(
            driver,
            lambda d: [e.get_attribute("src") for e in d.find_elements(By.CSS_SELECTOR, "#overlay img")],
        )
        driver.save_screenshot(str(tmp_path / "result.png"))
        links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#files a")]
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    finally:
        driver.quit()

    # nothing fetched from outside the server (fonts, themes, analytics)
    outside = [u for u in loaded if not u.startswith((server["url"], "data:", "blob:"))]
    assert loaded and not outside, outside

    with urllib.request.urlopen(src[0]) as r:
        shown = cv2.cvtColor(
            cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
        )
    (json_link,) = [u for u in links if u.split("?")[0].endswith(".json")]
    with urllib.request.urlopen(json_link) as r:
        answers = json.loads(r.read())["answers"]
    assert [a["expression"] for a in answers] == ["the red box", "the grey floor"]

    # the overlay the page shows: each mask's pixels drawn in its colour, the rest the image itself
    original = cv2.cvtColor(cv2.imread(image_path), cv2.COLOR_BGR2RGB).astype(float)
    scale = shown.shape[1] // original.shape[1]
    big = cv2.resize(original, (shown.shape[1], original.shape[0] * scale), interpolation=cv2.INTER_LINEAR)
    body = shown[: big.shape[0]].astype(float)
    union = np.zeros(original.shape[:2], bool)
    for i, a in enumerate(answers):
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        later = np.any(
            [mask_utils.decode(b["segmentation"]) for b in answers[i + 1 :]] or [np.zeros_like(m)], axis=0
        )
        only = cv2.resize(
            (m & ~later).astype(np.uint8), (big.shape[1], big.shape[0]), interpolation=cv2.INTER_NEAREST
        )
        sel = only.astype(bool)
        if sel.any():
            fill = (1 - FILL_ALPHA) * big[sel] + FILL_ALPHA * np.array(a["color_rgb"], float)
            ok = (np.abs(body[sel] - fill).max(axis=1) <= 3) | (
                np.abs(body[sel] - a["color_rgb"]).max(axis=1) <= 1
            )
            assert ok.mean() > 0.3
            assert (np.abs(body[sel] - big[sel]).max(axis=1) > 10).mean() > 0.9
        union |= m
    far = cv2.dilate(union.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    far = cv2.resize(
        far.astype(np.uint8), (big.shape[1], big.shape[0]), interpolation=cv2.INTER_NEAREST
    ).astype(bool)
    assert np.abs(body[far] - big[far]).max() <= 3  # outside the masks: untouched


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


def test_odd_images_are_converted_or_refused_with_a_message(model, tmp_path):
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[10:30, 10:30] = (200, 30, 30)
    cases = {
        "grey.png": _save(tmp_path / "grey.png", rgb[..., 0]),
        "rgba.png": _save(tmp_path / "rgba.png", np.dstack([rgb, np.full((40, 50), 128, np.uint8)])),
        "sixteen.png": _save(tmp_path / "sixteen.png", (rgb[..., 0].astype(np.uint16) * 257)),
        "tiny.png": _save(tmp_path / "tiny.png", rgb[:1, :1]),
    }
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    cases["cmyk.jpg"] = str(tmp_path / "cmyk.jpg")
    for name, path in cases.items():
        overlay, files, status = app_script.segment(model, str(tmp_path), path, "the red box", "referring")
        assert status.startswith("1 answer(s)"), (name, status)
        assert overlay.ndim == 3 and overlay.shape[2] == 3 and len(files) == 3

    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    too_long = "the red box " * 2000
    for path, text, message in [
        (None, "the red box", "error: no image"),
        (str(tmp_path / "broken.png"), "the red box", "error: cannot read image"),
        (cases["grey.png"], too_long, "error: "),  # longer than MODEL.LLM.MAX_LENGTH
    ]:
        overlay, files, status = app_script.segment(model, str(tmp_path), path, text, "referring")
        assert overlay is None and files is None and status.startswith(message), status
        assert text != too_long or "> MODEL.LLM.MAX_LENGTH" in status
    big = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(app_script.DemoError, match="too large"):
        app_script.check_image_array(big, max_pixels=99)


def test_example_images_come_from_the_synthetic_data(tmp_path):
    paths = app_script.example_images(str(tmp_path), n=2)
    assert len(paths) == 2 and all(np.asarray(Image.open(p)).std() > 5 for p in paths)


def test_app_without_the_main_jobs_model_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert app_script.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "output/main/config.yaml" in err and "tools/run_main.sh" in err


def test_old_request_folders_are_pruned(tmp_path):
    for i in range(5):
        (tmp_path / f"request_{i}").mkdir()
        os.utime(tmp_path / f"request_{i}", (1000 + i, 1000 + i))
    (tmp_path / "examples").mkdir()
    app_script.prune_old_requests(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["examples", "request_3", "request_4"]
