"""`lcmkit serve`: the API against `lcmkit generate`, stale-request supersession, bad input, and the page in a real
headless Chromium (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcmkit.app.cli import main

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_sd, tiny_sd_lora):
    import uvicorn

    from lcmkit.app.server import create_app
    from lcmkit.infer.generator import FewStepGenerator

    app = create_app(FewStepGenerator(tiny_sd, [(tiny_sd_lora, 1.0)]))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", limit_concurrency=16))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield {"url": f"http://127.0.0.1:{port}", "app": app}
    srv.should_exit = True
    thread.join(timeout=10)


def post(url: str, body: dict | bytes, timeout: float = 60) -> tuple[int, bytes, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/api/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_api_png_matches_lcmkit_generate(server, tiny_sd, tiny_sd_lora, tmp_path):
    body = {"prompt": "a red square", "seed": 7, "steps": 2, "width": 64, "height": 64, "client": "match"}
    status, png, headers = post(server["url"], body)
    assert status == 200 and headers["content-type"] == "image/png" and float(headers["x-latency-ms"]) > 0
    args = ["generate", "--base", tiny_sd, "--lora", tiny_sd_lora, "--prompt", "a red square", "--seed", "7",
            "--steps", "2", "--width", "64", "--height", "64", "--out", str(tmp_path / "gen")]  # fmt: skip
    assert main(args) == 0
    (generated,) = (tmp_path / "gen").glob("*.png")
    np.testing.assert_array_equal(pixels(png), np.asarray(Image.open(generated).convert("RGB")))
    status, teacher_png, _ = post(server["url"], {**body, "model": "teacher", "teacher_steps": 4})
    assert status == 200 and np.abs(pixels(teacher_png).astype(int) - pixels(png)).max() > 0


def test_typing_supersedes_stale_requests(server):
    service = server["app"].state.service
    before = dict(service.stats)
    prompts = [f"a red square {'!' * i}" for i in range(10)]  # ten keystrokes

    def send(i: int) -> int:
        time.sleep(0.01 * i)
        body = {"prompt": prompts[i], "steps": 8, "width": 128, "height": 128, "client": "typist"}
        return post(server["url"], body)[0]

    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(send, range(10)))
    # exactly one prompt is rendered: the one the server received last (threads may reorder the last two)
    assert statuses.count(200) == 1 and statuses.count(409) == 9 and 200 in statuses[-3:], statuses
    ran = {k: service.stats[k] - before[k] for k in before}
    assert ran["completed"] == 1 and ran["superseded"] == 9, ran  # no outdated work ran to the end


@pytest.mark.parametrize(
    "change",
    [{"steps": 0}, {"steps": 99}, {"width": -64}, {"seed": "abc"}, {"prompt": None}, {"model": "other"},
     {"guidance": -1}],
)  # fmt: skip
def test_bad_parameters_are_4xx_and_the_server_keeps_serving(server, change):
    body = {"prompt": "a red square", "steps": 2, "width": 64, "height": 64, "client": "bad", **change}
    status, payload, _ = post(server["url"], body)
    assert 400 <= status < 500
    detail = json.loads(payload)["detail"]
    assert detail and json.dumps(detail)
    assert post(server["url"], {"prompt": "ok", "steps": 1, "width": 64, "height": 64, "client": "bad"})[0] == 200


def test_oversized_request_is_413(server):
    status, payload, _ = post(server["url"], json.dumps({"prompt": "x" * 20000}).encode())
    assert status == 413 and b"bytes" in payload


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_in_headless_chromium(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server["url"] + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('LCM-LoRA')")
        page.check("#compare")
        page.fill("#prompt", "a red square")
        page.wait_for_function("document.getElementById('teacher-lat').textContent.includes('ms')", timeout=60_000)
        first = page.get_attribute("#lcm-img", "src")
        assert first and first.startswith("blob:")
        assert "LCM, 4 steps:" in page.inner_text("#lcm-lat")
        page.type("#prompt", " on a blue background", delay=20)
        page.wait_for_function(f"document.getElementById('lcm-img').src !== '{first}'", timeout=60_000)
        page.fill("#seed", "-5")  # invalid: the page shows the API's message, the server keeps serving
        page.wait_for_function("document.getElementById('error').textContent.includes('422')", timeout=60_000)
        page.fill("#seed", "3")
        page.wait_for_function("document.getElementById('error').textContent === ''", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "serve.png"))
        browser.close()
    assert (ARTIFACTS / "serve.png").stat().st_size > 1000


def test_bench_serve_prints_latency_per_step_count(tiny_sd, tiny_sd_lora, tmp_path, capsys):
    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--base", tiny_sd, "--lora", tiny_sd_lora, "--steps", "1", "2", "--repeats", "2",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| 1 |" in printed and "| 2 |" in printed
    rows = json.loads(out.read_text())["serve"]
    assert [r["steps"] for r in rows] == [1, 2]
    assert all(r["median_ms"] >= r["median_generation_ms"] > 0 for r in rows)
    assert main(["bench", "serve", "--base", tiny_sd, "--lora", tiny_sd_lora, "--steps", "9"]) == 2
    capsys.readouterr()
    bad_gamma = ["bench", "serve", "--base", tiny_sd, "--lora", tiny_sd_lora, "--scheduler", "tcd", "--tcd-gamma", "-1"]
    assert main(bad_gamma) == 2
    err = capsys.readouterr().err.strip()
    assert "--tcd-gamma -1" in err and len(err.splitlines()) == 1


def test_without_a_model_it_serves_the_shipped_toy_teacher_and_lcm_lora(capsys):
    import argparse

    from lcmkit.app.serve import serve_generator

    names = ("base", "lora", "lcm", "base_config")
    args = argparse.Namespace(**dict.fromkeys(names), scheduler="lcm", device="cpu", dtype="auto", compile=False,
                              tcd_gamma=0.3)  # fmt: skip
    gen = serve_generator(args)
    assert gen.adapters and gen.pipe.unet.config.sample_size == 16  # the toy teacher, LoRA loaded
    assert main(["bench", "serve", "--steps", "2", "--repeats", "2"]) == 0  # no model arguments at all
    assert "| 2 |" in capsys.readouterr().out


def test_a_compiled_generator_is_warmed_up_before_serving(tiny_sd, monkeypatch):
    """With --compile the first (compiling) call happens before the server listens, at the default size."""
    import uvicorn

    from lcmkit.app.server import serve
    from lcmkit.infer.generator import FewStepGenerator

    generator = FewStepGenerator(base=tiny_sd)
    generator.compiled = True  # the warm-up logic only; compiling itself is tested in test_generate
    events = []

    class Recording(FewStepGenerator):
        def __call__(self, prompts, **kw):
            events.append(("generate", kw.get("width"), kw.get("steps")))
            return []

    generator.__class__ = Recording
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: events.append(("listen",)))
    serve(generator, port=7999)
    size = generator.pipe.unet.config.sample_size * generator.pipe.vae_scale_factor
    assert events == [("generate", size, 1), ("listen",)]
