"""`tiderl view RUN_DIR`: the page served on this machine (starlette + uvicorn), reading the run directory on every
request, so a run that is still going shows its new steps without a restart (the page polls `api/run`)."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from rl.view.data import run_summary, step_samples, to_json
from rl.view.page import plotly_js, render_page


def create_app(run_dir: Path) -> Starlette:
    page = render_page()
    plotly = plotly_js()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def plotly_script(request: Request) -> Response:
        return Response(plotly, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    async def run(request: Request) -> Response:
        return Response(to_json(run_summary(run_dir)), media_type="application/json")

    async def step(request: Request) -> Response:
        return Response(to_json(step_samples(run_dir, request.path_params["step"])), media_type="application/json")

    return Starlette(
        routes=[
            Route("/", index),
            Route("/plotly.min.js", plotly_script),
            Route("/api/run", run),
            Route("/api/step/{step:int}", step),
        ]
    )


def serve(run_dir: Path, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(run_dir), host=host, port=port, log_level="warning")
