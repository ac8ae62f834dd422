"""The captioning service: a real uvicorn server on 127.0.0.1 serving a tiny random-weight model saved as an
official-layout checkpoint; API requests over HTTP (httpx), batching counted by the server's own counters,
the page driven in headless Chromium, and the ``beit3cap serve`` command."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from beit3cap.captioner import Captioner
from beit3cap.checkpoint import save_checkpoint
from beit3cap.model import create_model
from beit3cap.serve import create_app

MODEL = "beit3_tiny_patch16_32"
MAX_MB = 0.02  # 20 KB: small noise images fit, a 120 px noise PNG does not
MAX_IMAGES = 4
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                                else None)


def noise_png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def as_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_vocab) -> Path:
    torch.manual_seed(0)
    model = create_model(MODEL, vocab_size=tiny_vocab)
    path = tmp_path_factory.mktemp("serve") / "checkpoint.pth"
    save_checkpoint(path, {"model": model.state_dict(), "args": {"model": MODEL, "vocab_size": tiny_vocab}})
    return path


@pytest.fixture(scope="module")
def captioner(checkpoint, spm_path) -> Captioner:
    return Captioner.from_checkpoint(checkpoint, spm_path)


@pytest.fixture(scope="module")
def server(captioner):
    """Base URL of a real uvicorn server (port chosen by the OS) running the app in a thread."""
    app = create_app(captioner, max_upload_mb=MAX_MB, max_images=MAX_IMAGES, max_batch=8, batch_wait_ms=150)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def stats(client: httpx.Client) -> dict[str, int]:
    return client.get("/health").json()["stats"]


def post_files(client: httpx.Client, files: list[tuple[str, bytes]], **settings) -> httpx.Response:
    return client.post("/caption", files=[("files", (name, data, "application/octet-stream")) for name, data in files],
                       data={k: str(v) for k, v in settings.items()})


# ----------------------------------------------------------------------------------------------------
# Page, health, OpenAPI


def test_health_reports_model_device_and_readiness(client):
    health = client.get("/health").json()
    assert health["ready"] is True
    assert health["model"] == MODEL and health["device"] == "cpu" and health["image_size"] == 32
    assert health["max_images"] == MAX_IMAGES and health["max_upload_mb"] == MAX_MB
    assert health["defaults"]["num_beams"] == 3 and health["defaults"]["sample"] is False
    assert set(health["stats"]) >= {"requests", "images", "model_calls", "largest_call"}


def test_page_is_one_self_contained_html_file(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="files"' in html and 'type="file"' in html and "multiple" in html
    for hook in ("num_beams", "max_len", "length_penalty", "sample", "top_p", "temperature", "/caption"):
        assert hook in html
    # Nothing is fetched from elsewhere: no absolute or protocol-relative URLs at all.
    assert "http://" not in html and "https://" not in html and 'src="//' not in html and 'href="//' not in html


def test_openapi_describes_both_request_forms(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/caption"]["post"]["requestBody"]["content"]
    assert "files" in body["multipart/form-data"]["schema"]["properties"]
    assert "images" in body["application/json"]["schema"]["properties"]
    assert {"400", "413", "415", "422"} <= set(spec["paths"]["/caption"]["post"]["responses"])
    assert "/health" in spec["paths"]


# ----------------------------------------------------------------------------------------------------
# Captioning


def test_multipart_captions_match_the_captioner(client, captioner):
    files = [("red.png", noise_png(1)), ("blue.png", noise_png(2))]
    reply = post_files(client, files, num_beams=2, max_len=12)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = captioner.caption([as_image(d) for _, d in files], num_beams=2, max_len=12)
    assert [r["name"] for r in body["results"]] == ["red.png", "blue.png"]
    assert [r["caption"] for r in body["results"]] == expected
    assert expected[0] != expected[1]
    assert body["settings"]["num_beams"] == 2 and body["settings"]["max_len"] == 12
    assert body["elapsed_s"] > 0


def test_json_base64_and_data_urls(client, captioner):
    data = noise_png(3)
    b64 = base64.b64encode(data).decode()
    reply = client.post("/caption", json={"images": [b64, "data:image/png;base64," + b64],
                                          "names": ["plain", "data-url"], "max_len": 10})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    expected = captioner.caption([as_image(data)], max_len=10)[0]
    assert results == [{"name": "plain", "caption": expected}, {"name": "data-url", "caption": expected}]
    unnamed = client.post("/caption", json={"images": [b64], "max_len": 10}).json()["results"]
    assert unnamed == [{"name": "image-0", "caption": expected}]


def test_sampling_settings_reach_the_decoder(client, captioner):
    data = noise_png(4)
    settings = {"sample": "true", "top_p": "0.8", "temperature": "1.5", "seed": "7", "max_len": "12"}
    first = post_files(client, [("a.png", data)], **settings).json()
    again = post_files(client, [("a.png", data)], **settings).json()
    expected = captioner.caption([as_image(data)], strategy="sample", top_p=0.8, temperature=1.5, seed=7,
                                 max_len=12)
    assert first["results"][0]["caption"] == again["results"][0]["caption"] == expected[0]
    assert first["settings"]["sample"] is True and first["settings"]["seed"] == 7


def _image_files(folder: Path) -> list[Path]:
    """Real files in modes that need care: transparency, EXIF rotation, greyscale, palette."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    pixels[:, :25] = 0  # a dark left half, so that rotating matters
    rgb = Image.fromarray(pixels)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (30, 50), dtype=np.uint8)))
    rgba.save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the picture is 30 wide once upright
    rgb.save(folder / "rotated.jpg", quality=90, exif=exif)
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.gif")
    return sorted(folder.iterdir())


def test_uploads_are_read_like_beit3cap_caption_reads_files(client, captioner, tmp_path):
    paths = _image_files(tmp_path)
    reply = post_files(client, [(p.name, p.read_bytes()) for p in paths], max_len=12)
    assert reply.status_code == 200, reply.text
    expected = captioner.caption(paths, max_len=12)
    assert reply.json()["results"] == [{"name": p.name, "caption": c} for p, c in zip(paths, expected)]
    # The files are ones where a careless read (no EXIF rotation, alpha dropped) changes the caption.
    naive = captioner.caption([Image.fromarray(np.asarray(Image.open(tmp_path / n).convert("RGB")))
                               for n in ("alpha.png", "rotated.jpg")], max_len=12)
    assert naive[0] != expected[0] and naive[1] != expected[3]


def test_a_non_image_among_images_gets_its_own_error(client, captioner):
    reply = post_files(client, [("photo.png", noise_png(5)), ("notes.txt", b"just some text\n")])
    assert reply.status_code == 200
    ok, bad = reply.json()["results"]
    assert ok == {"name": "photo.png", "caption": captioner.caption([as_image(noise_png(5))])[0]}
    assert bad["name"] == "notes.txt" and "not an image" in bad["error"] and "caption" not in bad


# ----------------------------------------------------------------------------------------------------
# Bad requests: clear 4xx JSON, no model call, server keeps serving


def _oversized_png() -> bytes:
    data = noise_png(6, size=120)
    assert len(data) > MAX_MB * 2**20
    return data


BAD_REQUESTS = {
    "non-image": (lambda c: post_files(c, [("notes.txt", b"hello")]), 415, ["notes.txt", "not an image"]),
    "truncated image": (lambda c: post_files(c, [("cut.png", noise_png(7)[:60])]), 415, ["cut.png"]),
    "oversized file": (lambda c: post_files(c, [("ok.png", noise_png(8)), ("huge.png", _oversized_png())]), 413,
                       ["huge.png", "limit"]),
    "oversized base64": (lambda c: c.post("/caption", json={
        "images": [base64.b64encode(_oversized_png()).decode()], "names": ["huge"]}), 413, ["huge", "limit"]),
    "body over the limit": (lambda c: c.post("/caption", content=b"0" * (3 << 20),
                                             headers={"content-type": "application/json"}), 413, ["request body"]),
    "chunked body over the limit": (lambda c: c.post("/caption", content=iter([b"0" * (1 << 16)] * 48),
                                                     headers={"content-type": "application/json"}), 413,
                                    ["request body"]),
    "too many images": (lambda c: post_files(c, [(f"{i}.png", noise_png(i)) for i in range(MAX_IMAGES + 1)]), 400,
                        ["too many images", str(MAX_IMAGES)]),
    "no images": (lambda c: c.post("/caption", json={"images": []}), 400, ["no images"]),
    "bad base64": (lambda c: c.post("/caption", json={"images": ["not base64!"]}), 400, ["images[0]", "base64"]),
    "bad data url": (lambda c: c.post("/caption", json={"images": ["data:image/png,abc"]}), 400, ["base64"]),
    "not json": (lambda c: c.post("/caption", content=b"{oops", headers={"content-type": "application/json"}),
                 400, ["not valid JSON"]),
    "json not an object": (lambda c: c.post("/caption", json=["x"]), 400, ["object"]),
    "images not strings": (lambda c: c.post("/caption", json={"images": [1, 2]}), 400, ["base64 strings"]),
    "wrong content type": (lambda c: c.post("/caption", content=b"x", headers={"content-type": "text/plain"}),
                           415, ["text/plain"]),
    "wrong file field": (lambda c: c.post("/caption", files=[("image", ("a.png", noise_png(9)))]), 400,
                         ["'image'", "files"]),
    "beams out of range": (lambda c: post_files(c, [("a.png", noise_png(9))], num_beams=0), 422, ["num_beams"]),
    "not a number": (lambda c: post_files(c, [("a.png", noise_png(9))], temperature="hot"), 422, ["temperature"]),
    "nan": (lambda c: post_files(c, [("a.png", noise_png(9))], top_p="nan"), 422, ["top_p"]),
    "unknown setting": (lambda c: c.post("/caption", json={"images": [base64.b64encode(noise_png(9)).decode()],
                                                           "beams": 3}), 422, ["beams", "unknown setting"]),
    "max_len too long": (lambda c: post_files(c, [("a.png", noise_png(9))], max_len=100000), 422, ["max_len"]),
    "bad boolean": (lambda c: post_files(c, [("a.png", noise_png(9))], sample="maybe"), 422, ["sample"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_json_4xx(client, case):
    send, status, words = BAD_REQUESTS[case]
    before = stats(client)["model_calls"]
    reply = send(client)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert list(body) == ["error"]
    for word in words:
        assert word in body["error"]
    assert stats(client)["model_calls"] == before  # refused before the model
    assert client.get("/health").json()["ready"] is True


def test_unknown_paths_and_methods_answer_in_json(client):
    assert client.get("/nothing-here").json() == {"error": "Not Found"}
    reply = client.get("/caption")
    assert reply.status_code == 405 and "error" in reply.json()


# ----------------------------------------------------------------------------------------------------
# Batching


async def _concurrent(base: str, requests: list[tuple[bytes, dict]]) -> list[dict]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        replies = await asyncio.gather(*(
            c.post("/caption", files=[("files", (f"{i}.png", data))], data={k: str(v) for k, v in s.items()})
            for i, (data, s) in enumerate(requests)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    return [r.json()["results"][0]["caption"] for r in replies]


def test_concurrent_requests_share_model_calls(server, client, captioner):
    images = [noise_png(100 + i) for i in range(6)]
    before = stats(client)
    captions = asyncio.run(_concurrent(server, [(d, {"max_len": 12}) for d in images]))
    after = stats(client)
    assert after["requests"] - before["requests"] == 6
    calls = after["model_calls"] - before["model_calls"]
    assert 1 <= calls < 6
    assert after["largest_call"] >= 2
    # Batching does not change any caption.
    assert captions == [captioner.caption([as_image(d)], max_len=12)[0] for d in images]


def test_batches_are_grouped_by_settings(server, client, captioner):
    images = [noise_png(200 + i) for i in range(4)]
    settings = [{"num_beams": 1, "max_len": 12}, {"num_beams": 3, "max_len": 12}] * 2
    before = stats(client)["model_calls"]
    captions = asyncio.run(_concurrent(server, list(zip(images, settings))))
    calls = stats(client)["model_calls"] - before
    assert 2 <= calls < 4  # one call per settings group when the four arrive together
    assert captions == [captioner.caption([as_image(d)], **s)[0] for d, s in zip(images, settings)]


# ----------------------------------------------------------------------------------------------------
# The command and the page in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beit3cap", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_refuses_to_start_without_a_model_or_with_bad_defaults(tmp_path, checkpoint, spm_path):
    missing = _run_cli()
    assert missing.returncode == 2 and "--checkpoint" in missing.stderr and "--demo" in missing.stderr
    bad = _run_cli("--checkpoint", str(tmp_path / "nope.pth"), "--sentencepiece_model", str(tmp_path / "x.spm"))
    assert bad.returncode == 2 and "nope.pth" in bad.stderr
    settings = _run_cli("--checkpoint", str(checkpoint), "--sentencepiece_model", str(spm_path), "--num_beams", "0",
                        "--length_penalty", "nan")
    assert settings.returncode == 2
    assert "--num_beams: " in settings.stderr and "--length_penalty: " in settings.stderr
    assert "Traceback" not in settings.stderr


@contextlib.contextmanager
def _serving(*args: str) -> Iterator[str]:
    """`beit3cap serve ARGS` in a subprocess on a free 127.0.0.1 port; yields its base URL once ready."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "beit3cap", "serve", *args, "--port", str(port),
                             "--log_level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, f"beit3cap serve exited early:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "beit3cap serve did not become ready"
            try:
                if httpx.get(f"{base}/health", timeout=2).json()["ready"]:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cli_demo_without_a_demo_run_says_to_run_the_demo(tmp_path):
    reply = _run_cli("--demo", "--demo_dir", str(tmp_path / "nothing"))
    assert reply.returncode == 2
    assert f"run `beit3cap demo --out {tmp_path / 'nothing'}` first" in reply.stderr


def test_cli_demo_serves_the_model_of_a_demo_run(tmp_path, checkpoint, spm_path, captioner):
    """The layout `beit3cap demo --out DIR` leaves: data/demo.spm, run/checkpoint-best.pth, demo.json."""
    demo = tmp_path / "demo"
    (demo / "run").mkdir(parents=True)
    (demo / "data").mkdir()
    shutil.copy(checkpoint, demo / "run" / "checkpoint-best.pth")
    shutil.copy(spm_path, demo / "data" / "demo.spm")
    (demo / "demo.json").write_text(json.dumps({"plan": {"max_tokens": 14}}))
    with _serving("--demo", "--demo_dir", str(demo)) as base, httpx.Client(base_url=base, timeout=60) as api:
        health = api.get("/health").json()
        assert health["model"] == MODEL and health["defaults"]["max_len"] == 14  # the demo's text length
        reply = post_files(api, [("a.png", noise_png(400))]).json()
    assert reply["results"][0]["caption"] == captioner.caption([as_image(noise_png(400))], max_len=14)[0]


@pytest.fixture
def served_cli(checkpoint, spm_path):
    with _serving("--checkpoint", str(checkpoint), "--sentencepiece_model", str(spm_path), "--max_len", "12") as base:
        yield base


def _chrome(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1100,800"):
        options.add_argument(flag)
    # An explicit driver path: selenium must not look for (or download) a driver or a browser.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_page_in_headless_chromium_captions_an_uploaded_png(served_cli, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    picture = tmp_path / "shapes.png"
    picture.write_bytes(noise_png(300, size=40))
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with httpx.Client(base_url=served_cli, timeout=60) as api:
        expected = post_files(api, [("shapes.png", picture.read_bytes())]).json()["results"][0]["caption"]
        short = post_files(api, [("shapes.png", picture.read_bytes())], max_len=5).json()["results"][0]["caption"]
    assert expected and short != expected

    driver = _chrome(tmp_path / "profile")
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(served_cli + "/")
        wait.until(lambda d: "ready" in d.find_element(By.ID, "model").get_attribute("class"))
        assert MODEL in driver.find_element(By.ID, "model").text
        assert driver.find_element(By.ID, "max_len").get_attribute("value") == "12"  # server default shown

        driver.find_element(By.ID, "files").send_keys(str(picture))
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".card[data-state=done]"))
        assert card.find_element(By.CSS_SELECTOR, ".caption").get_property("textContent") == expected
        assert card.find_element(By.CSS_SELECTOR, ".name").text == "shapes.png"
        preview = card.find_element(By.TAG_NAME, "img")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview) == 40
        assert "Captioned 1 image" in driver.find_element(By.ID, "status").text

        # New settings re-caption the same image.
        max_len = driver.find_element(By.ID, "max_len")
        max_len.clear()
        max_len.send_keys("5")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".card").get_attribute("data-state") == "done"
                   and d.find_element(By.CSS_SELECTOR, ".card .caption").get_property("textContent") == short)

        # A file that is not an image shows the server's error on its own card.
        driver.find_element(By.ID, "files").send_keys(str(notes))
        bad = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".card[data-state=error]"))
        assert "not an image" in bad.find_element(By.CSS_SELECTOR, ".caption").text
        status = driver.find_element(By.ID, "status")
        assert "notes.txt" in status.text and "bad" in status.get_attribute("class")
        assert driver.find_element(By.CSS_SELECTOR, ".card[data-state=done] .caption").get_property(
            "textContent") == short  # the first card keeps its caption
        if os.environ.get("BEIT3CAP_SCREENSHOT"):
            driver.save_screenshot(os.environ["BEIT3CAP_SCREENSHOT"])
    finally:
        driver.quit()
