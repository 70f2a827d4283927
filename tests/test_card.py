"""Model cards in every distill folder, and `push` exercised against huggingface_hub with a mock transport."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from lcmkit.app.cli import main

FAKE_TOKEN = "hf_lcmkitFakeToken0123456789abcdef"


def distill(teacher: str, shards: str, out: Path, mode: str, *extra: str) -> Path:
    args = ["distill", "--teacher", teacher, "--data", shards, "--out", str(out), "--mode", mode, "--max-steps", "2",
            "--batch-size", "2", "--resolution", "64", "--lora-rank", "4", "--no-progress", *extra]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_sd, shards, tmp_path_factory) -> Path:
    teacher = tmp_path_factory.mktemp("licensed") / "teacher"
    shutil.copytree(tiny_sd, teacher)
    (teacher / "README.md").write_text("---\nlicense: openrail\n---\n# a teacher\n")
    out = tmp_path_factory.mktemp("runs") / "lora"
    return distill(str(teacher), shards, out, "lora", "--validation-prompts", "a red square", "--checkpoint-every", "1")


def python_block(card: ModelCard) -> str:
    return re.search(r"```python\n(.*?)```", card.text, re.S).group(1)


def test_lora_card(lora_run):
    card = ModelCard.load(lora_run / "README.md")
    record = json.loads((lora_run / "lcmkit_run.json").read_text())
    assert card.data.base_model == record["config"]["model"]["teacher"]
    assert card.data.library_name == "diffusers" and card.data.license == "openrail"
    assert {"lcm", "lora", "text-to-image", "stable-diffusion"} <= set(card.data.tags)
    assert "LCM-LoRA** (rank 4" in card.text and record["command"] in card.text
    assert "![validation grid" in card.text and (lora_run / "validation" / "step-00000002.png").is_file()
    assert "lcmkit export kohya" in card.text  # no kohya file yet: how to make one


def test_the_cards_snippet_draws_an_image(lora_run, tmp_path, monkeypatch):
    code = python_block(ModelCard.load(lora_run / "README.md"))
    assert "load_lora_weights" in code and "LCMScheduler" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"a photo of a cat"', '"a photo of a cat", height=64, width=64'), "card", "exec"), {})
    assert (tmp_path / "cat.png").is_file()


def test_full_card(tiny_sd, shards, tmp_path, monkeypatch):
    out = distill(tiny_sd, shards, tmp_path / "full", "full")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == tiny_sd and "lora" not in card.data.tags and card.data.license is None
    code = python_block(card)
    assert "LatentConsistencyModelPipeline" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"a photo of a cat"', '"a photo of a cat", height=64, width=64'), "card", "exec"), {})
    assert (tmp_path / "cat.png").is_file()
    from lcmkit.outputs.hub import upload_plan

    plan = upload_plan(out)
    assert "model_index.json" in plan and "unet/diffusion_pytorch_model.safetensors" in plan  # pipeline at the top
    assert not any(k.startswith(("unet_online", "checkpoints", "logs")) for k in plan)


class FakeHub:
    """Answers huggingface_hub's requests at the transport level and keeps what a commit would upload."""

    def __init__(self, fail: Exception | None = None):
        self.fail, self.requests, self.files = fail, [], {}

    def __call__(self, request):
        try:
            import httpx2
        except ImportError:  # huggingface_hub < 2 uses httpx
            import httpx as httpx2

        if self.fail is not None:
            raise self.fail
        self.requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/me/tiny-lcm", "name": "me/tiny-lcm"})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})  # fmt: skip
        if "/commit/" in path:
            for line in request.content.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    self.files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/tiny-lcm/commit/abc123",
                                              "commitOid": "abc123" + "0" * 34})  # fmt: skip
        return httpx2.Response(200, json={})


@pytest.fixture()
def fake_hub(monkeypatch):
    try:
        import httpx2
    except ImportError:  # huggingface_hub < 2 uses httpx
        import httpx as httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    hubs: list[FakeHub] = []

    def install(fail: Exception | None = None) -> FakeHub:
        hub = FakeHub(fail)
        hubs.append(hub)
        _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
        _http.close_session()
        return hub

    yield install
    _http.set_client_factory(_http.default_client_factory)
    _http.close_session()


def test_push_uploads_outputs_only_and_never_the_token(lora_run, fake_hub, capsys):
    hub = fake_hub()
    assert main(["push", str(lora_run), "--repo-id", "me/tiny-lcm"]) == 0
    assert "commit/abc123" in capsys.readouterr().out
    sent = set(hub.files)
    assert {"README.md", "lcmkit_run.json", "pytorch_lora_weights.safetensors", "validation/step-00000002.png"} <= sent
    assert not any(p.startswith(("checkpoints/", "logs/")) or p.endswith(".lock") for p in sent), sent
    assert (lora_run / "checkpoints").is_dir()  # they existed and were left out
    assert any(r.headers.get("authorization") == f"Bearer {FAKE_TOKEN}" for r in hub.requests)  # auth was used
    for content in hub.files.values():
        assert FAKE_TOKEN.encode() not in content
    for path in lora_run.rglob("*"):
        assert not path.is_file() or FAKE_TOKEN.encode() not in path.read_bytes()
    card = ModelCard.load(lora_run / "README.md")
    assert 'load_lora_weights("me/tiny-lcm")' in card.text  # the card names the repo it was pushed to


def test_a_failed_push_is_one_line_and_keeps_the_outputs(lora_run, fake_hub, capsys):
    try:
        import httpx2
    except ImportError:  # huggingface_hub < 2 uses httpx
        import httpx as httpx2

    before = sorted(p.relative_to(lora_run) for p in lora_run.rglob("*"))
    fake_hub(fail=httpx2.ConnectError("Name or service not known"))
    assert main(["push", str(lora_run), "--repo-id", "me/tiny-lcm"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "push to me/tiny-lcm failed" in err[0] and "lcmkit push" in err[0]
    assert FAKE_TOKEN not in err[0]
    assert sorted(p.relative_to(lora_run) for p in lora_run.rglob("*")) == before


def test_push_offline_says_so(lora_run, capsys):
    assert main(["push", str(lora_run), "--repo-id", "me/tiny-lcm"]) == 1  # HF_HUB_OFFLINE=1 in the tests
    assert "offline mode is on" in capsys.readouterr().err


def test_distill_push_to_hub_failure_keeps_the_finished_run(tiny_sd, shards, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "distill",
        "--teacher",
        tiny_sd,
        "--data",
        shards,
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--resolution",
        "64",
        "--lora-rank",
        "4",
        "--no-progress",
        "--push-to-hub",
        "--hub-model-id",
        "me/x",
    ]
    assert main(args) == 1  # offline in the tests
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lcmkit: error: push to me/x failed: offline mode is on")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()


def test_the_lora_snippet_samples_on_the_grid_it_was_distilled_on(lora_run):
    from lcmkit.outputs.card import usage_snippet

    record = json.loads((lora_run / "lcmkit_run.json").read_text())
    assert "original_inference_steps" not in usage_snippet(record, "me/lora")  # the default N = 50
    record["config"]["lcd"]["num_ddim_timesteps"] = 8
    assert "LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=8)" in usage_snippet(record, "x")
