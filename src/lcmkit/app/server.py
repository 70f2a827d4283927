"""The server of `lcmkit serve` (app/serve.py): a real-time generation page on the user's own machine.

FastAPI + uvicorn, plain HTTP: the page sends one POST /api/generate per edit and aborts the previous one.
That is all a "follow the prompt as you type" page needs, it is easy to call from scripts and tests, and it
needs no websocket protocol of our own. Gradio would bring a large dependency and its own queue, which is
exactly what must not build up here.

One FewStepGenerator (the code path of `lcmkit generate`) is shared by all clients; an asyncio lock
serializes work on it. Every request carries a client id; a newer request from the same client supersedes
the older ones: a waiting one is answered 409 without running, a running one stops after its current
denoising step. So typing never queues stale work, and the latest prompt is rendered about one generation
after the last keystroke.
"""

from __future__ import annotations

import asyncio
import io
import time
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, Field

from lcmkit.app.common import HOST, LATENCY_REPEATS, MAX_CONNECTIONS, MAX_STEPS, PORT
from lcmkit.infer.generator import FewStepGenerator, Superseded

MAX_BODY_BYTES = 16 * 1024
MAX_PROMPT_CHARS = 1000


class GenerateRequest(BaseModel):
    """One image request; the bounds are what the page offers (steps 1-8 for the LCM)."""

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    steps: int = Field(default=4, ge=1, le=MAX_STEPS, description="LCM steps")
    guidance: float | None = Field(default=None, ge=0, le=20)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    width: int | None = Field(default=None, ge=8, le=2048, multiple_of=8)
    height: int | None = Field(default=None, ge=8, le=2048, multiple_of=8)
    model: Literal["lcm", "teacher"] = "lcm"
    teacher_steps: int = Field(default=25, ge=1, le=100)
    teacher_guidance: float | None = Field(default=None, ge=0, le=30, description="default: the family's")
    client: str = Field(default="default", max_length=64)


class GenerationService:
    """Serializes requests on one generator; newer requests of a client supersede older ones."""

    def __init__(self, generator: FewStepGenerator):
        self.generator = generator
        self.latest: dict[str, int] = {}
        self.counter = 0
        self.lock = asyncio.Lock()
        self.stats = {"started": 0, "completed": 0, "superseded": 0}

    def _stale(self, key: str, ticket: int) -> bool:
        return self.latest.get(key) != ticket

    async def render(self, req: GenerateRequest) -> tuple[bytes, float] | None:
        """PNG bytes and seconds, or None when a newer request of the same client (and model) came first."""
        key = f"{req.client}:{req.model}"
        self.counter += 1
        ticket = self.latest[key] = self.counter
        async with self.lock:
            if self._stale(key, ticket):
                self.stats["superseded"] += 1
                return None
            self.stats["started"] += 1
            try:
                image, seconds = await asyncio.to_thread(self._generate, req, lambda: self._stale(key, ticket))
            except Superseded:
                self.stats["superseded"] += 1
                return None
            self.stats["completed"] += 1
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), seconds

    def _generate(self, req: Any, stale: Any) -> tuple[Any, float]:
        g = self.generator
        start = time.perf_counter()
        if req.model == "teacher":
            image = g.teacher([req.prompt], req.teacher_steps, req.teacher_guidance, req.seed, req.width, req.height,
                              should_stop=stale)[0]  # fmt: skip
        else:
            image = g([req.prompt], req.negative_prompt, req.steps, req.guidance, req.seed, req.width, req.height,
                      should_stop=stale)[0]  # fmt: skip
        return image, time.perf_counter() - start


def create_app(generator: FewStepGenerator, info: dict[str, Any] | None = None) -> Any:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from lcmkit.errors import ConfigError

    service = GenerationService(generator)
    app = FastAPI(title="lcmkit serve", docs_url="/api/docs", redoc_url=None)
    app.state.service = service
    from lcmkit.infer.pipelines import default_size

    page = resources.files("lcmkit.app").joinpath("serve_page.html").read_text()
    size = default_size(generator.pipe)
    model_info = {
        "family": generator.family, "full": generator.full, "teacher": generator.has_teacher,
        "default_guidance": generator.default_guidance, "size": size, **(info or {}),
    }  # fmt: skip

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/api/info")
    async def get_info() -> dict[str, Any]:
        return {**model_info, "stats": service.stats}

    @app.post("/api/generate", responses={200: {"content": {"image/png": {}}}})
    async def post_generate(req: GenerateRequest) -> Response:
        if req.model == "teacher" and not generator.has_teacher:
            raise HTTPException(400, "the teacher comparison needs --base with an LCM-LoRA")
        try:
            result = await service.render(req)
        except ConfigError as e:
            raise HTTPException(400, str(e)) from None
        if result is None:
            return JSONResponse({"detail": "superseded by a newer request"}, status_code=409)
        png, seconds = result
        return Response(png, media_type="image/png", headers={"X-Latency-Ms": f"{seconds * 1000:.1f}"})

    return app


def serve(
    generator: FewStepGenerator, host: str = HOST, port: int = PORT, max_connections: int = MAX_CONNECTIONS,
    info: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    import uvicorn

    app = create_app(generator, info)
    if generator.compiled:  # compile before the first visitor waits for it
        from lcmkit.infer.pipelines import default_size

        print("lcmkit serve: compiling the UNet and VAE decoder (minutes on a CPU) ...", flush=True)
        size = default_size(generator.pipe)
        generator(["warm-up"], steps=1, width=size, height=size)
    print(f"lcmkit serve: open http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, limit_concurrency=max_connections, log_level="warning")


def bench_latency(
    generator: FewStepGenerator, steps_list: list[int], repeats: int = LATENCY_REPEATS, warmup: int = 2,
    prompt: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Prompt-to-image latency through the real server (HTTP on 127.0.0.1, PNG encoding included): per step
    count, the median of `repeats` requests after `warmup`, each with a new prompt as when typing."""
    import json
    import socket
    import statistics
    import threading
    import urllib.request

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(generator), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    base = prompt or "a small red circle at the top left on a white background"
    rows = []
    try:
        for steps in steps_list:
            client, server_ms = [], []
            for i in range(warmup + repeats):
                body = json.dumps({"prompt": f"{base} {i}", "steps": steps, "seed": i, "client": f"bench{steps}"})
                request = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=body.encode(),
                                                 headers={"Content-Type": "application/json"})  # fmt: skip
                start = time.perf_counter()
                with urllib.request.urlopen(request, timeout=600) as r:
                    r.read()
                    latency = float(r.headers["X-Latency-Ms"])
                if i >= warmup:
                    client.append((time.perf_counter() - start) * 1000)
                    server_ms.append(latency)
            rows.append({"steps": steps, "median_ms": statistics.median(client),
                         "median_generation_ms": statistics.median(server_ms), "repeats": repeats})  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return rows
