"""What a user sees in the Prefect UI after a run, checked in a real browser (headless Chromium).

    apt-get install chromium                     # Debian's package; the check needs nothing else
    OMP_NUM_THREADS=1 .venv/bin/python bench/ui_check.py [--out docs] [--work DIR]

1. `prefect server start` on 127.0.0.1 (a temporary PREFECT_HOME), then `parclean run` of a tiny pipeline against
   it (bench/e2e_prefect.py's: random tiny SD and CLIP, 2 cleaning steps).
2. Chromium renders the pipeline's own flow run (the run the terminal links to: Completed, its log naming the
   report) and the report artifact on that run; the artifact's rendered DOM (`--dump-dom`) must hold the
   before/after table with the ASR row and the training plot image. Screenshots of both pages go to --out
   (ui-flow-run.png, ui-report.png).
Prints `ui: OK` or exits non-zero naming what is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/cleaning.py would shadow the cleaning package
sys.path.insert(0, str(REPO))

from bench.e2e_prefect import Server, child, free_port, write_pipeline_config  # noqa: E402

WINDOW = "1400,1800"
RENDER_MS = 20000  # virtual time Chromium lets the single-page app load its data and draw


def step(text: str) -> None:
    print(f"ui: {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the screenshots go (default: docs)")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one, removed after)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("ui: FAILED: no chromium on PATH (apt-get install chromium)")
        return 2
    work = (args.work or Path(tempfile.mkdtemp(prefix="parclean-ui-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.environ.update(env)
    server = Server(port, env, work)
    try:
        server.start()
        child(["run", "--config", str(write_pipeline_config(work))], env, work / "run.log")
        step("parclean run: finished")
        run_id, artifact_id = asyncio.run(pipeline_run_and_report(env["PREFECT_API_URL"]))
        base = f"http://127.0.0.1:{port}"
        args.out.mkdir(parents=True, exist_ok=True)
        problems = check_page(browser, f"{base}/runs/flow-run/{run_id}", args.out / "ui-flow-run.png", work,
                              ["data-free-clean", "Completed", "report: "])
        problems += check_page(browser, f"{base}/artifacts/artifact/{artifact_id}", args.out / "ui-report.png", work,
                               ["<table", "clean accuracy (%)", "ASR badnet (%)", "data:image/png;base64,"])
    finally:
        server.stop()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"ui: FAILED: {problem}")
    if problems:
        return 1
    print(f"ui: OK (screenshots in {args.out})")
    return 0


async def pipeline_run_and_report(api_url: str) -> tuple[str, str]:
    """The data-free-clean flow run's id and the id of the report artifact on it."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        flows = {flow.id: flow.name for flow in await client.read_flows()}
        (run,) = [r for r in await client.read_flow_runs() if flows[r.flow_id] == "data-free-clean"]
        reports = [a for a in await client.read_artifacts() if a.flow_run_id == run.id and a.key
                   and a.key.endswith("-cleaning-report")]
    if not reports:
        raise SystemExit("ui: FAILED: the pipeline's flow run has no cleaning-report artifact")
    return str(run.id), str(reports[0].id)


def check_page(browser: str, url: str, png: Path, work: Path, expected: list[str]) -> list[str]:
    """Render `url` in headless Chromium; screenshot it to `png`; the texts of `expected` missing from its DOM."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={WINDOW}",
             f"--virtual-time-budget={RENDER_MS}", f"--user-data-dir={work / 'chromium'}"]
    started = time.perf_counter()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    subprocess.run([browser, *flags, f"--screenshot={png}", url], capture_output=True, timeout=180, check=True)
    step(f"{url}: rendered in {time.perf_counter() - started:.0f} s, {len(dom):,} characters of DOM, {png.name}")
    missing = [text for text in expected if text not in dom]
    return [f"{url}: the rendered page lacks {text!r}" for text in missing]


if __name__ == "__main__":
    sys.exit(main())
