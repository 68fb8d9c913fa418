"""End-to-end check of the flows against a real Prefect server (not the test harness).

    OMP_NUM_THREADS=1 .venv/bin/python bench/e2e_prefect.py [--work DIR] [--keep] [--demo]

1. `prefect server start` on 127.0.0.1 at a free port, PREFECT_HOME in a temporary folder; wait for /api/health.
2. `parclean run` in a child process (PREFECT_API_URL set for it): a tiny data_free_clean (random tiny SD,
   12 images, a random tiny CLIP, 2 cleaning steps).
3. `parclean serve` in a child process: the deployment appears with its cron schedule; one run of it is
   triggered through the API and executed by the serving process (the shard set is reused this time).
4. `prefect deploy --name nightly` from this repository's prefect.yaml to a process work pool: the deployment
   is registered with its schedule (not run: it needs the trained toy models).
5. Read back through the API (get_client): every flow run COMPLETED, the report and sample artifacts exist.
   With --demo, `parclean demo` itself (the toy SD, the BadNet organism) also runs against the server first.
6. Stop the server. Prints `e2e: OK` at the end, or exits non-zero naming the failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# bench/ holds scripts named after the packages they measure (bench/cleaning.py): run as a script, this folder
# would come first on sys.path and shadow those packages.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
EXPECTED_ARTIFACTS = {"cleaning-report", "cleaning-report-table", "generated-samples", "generate-shards-progress",
                      "generate-shards-summary"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--demo", action="store_true",
                        help="also run `parclean demo` against the server (up to 8 min; reuses runs/shard-cache)")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="parclean-e2e-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.environ.update(env)  # this process reads the API back; set before prefect is first imported
    server = start_server(port, env, work / "server.log")
    started = time.perf_counter()
    try:
        wait_healthy(port, server, timeout=180)
        step(f"server healthy on port {port} after {time.perf_counter() - started:.0f} s")
        config = write_pipeline_config(work)
        child(["run", "--config", str(config)], env, work / "run.log")
        step("parclean run: finished")
        serve_and_trigger(config, env, work / "serve.log")
        step("parclean serve: deployment data-free-clean/e2e ran once")
        deploy_nightly(env, work / "deploy.log")
        step("prefect deploy --name nightly: registered")
        if args.demo:
            child(["demo", "--out", str(work / "demo")], env, work / "demo.log", timeout=1200)
            step("parclean demo: finished")
        problems = asyncio.run(check_api(env["PREFECT_API_URL"], demo=args.demo))
    finally:
        stop(server)
    for problem in problems:
        print(f"e2e: FAILED: {problem}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        return 1
    print(f"e2e: OK ({time.perf_counter() - started:.0f} s)")
    return 0


def step(text: str) -> None:
    print(f"e2e: {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, env: dict, log: Path) -> subprocess.Popen:
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    # Its own session, so that stop() can end the server and the processes it started, and nothing else.
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"e2e: FAILED: prefect server exited with {server.returncode} (see server.log)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"e2e: FAILED: /api/health did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen, grace: float = 20) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def write_pipeline_config(work: Path) -> Path:
    """A tiny pipeline: a random tiny SD built on the fly, a random tiny CLIP, a schedule for `serve`."""
    from cleaning.models import create_model, save_model

    clip = save_model(create_model("tiny-test", seed=0), work / "clip" / "model.safetensors")
    config = {
        "model": str(clip),
        "out": str(work / "runs"),
        "out_per_run": True,
        "shard_cache": str(work / "shard-cache"),
        "tiny_sd": {"seed": 0, "size": 32},
        "generate": {"model": str(work / "tiny-sd"), "bank": "toyworld", "seed": 0, "num_samples": 12,
                     "shard_size": 4, "batch_size": 4, "steps": 2, "height": 32, "width": 32, "device": "cpu",
                     "dtype": "fp32", "image_format": "png"},
        "clean": {"steps": 2, "batch_size": 4, "lr": 1e-4, "schedule": "constant", "checkpoint_every": 2,
                  "data": {"shuffle_buffer": 8}},
        "eval": {"data": "toyworld", "count": 40, "target": "moon", "triggers": [{"kind": "badnet", "patch_size": 8}]},
        "runner": {"kind": "local", "retry_delay_seconds": 1},
        "sample_grid": 8,
        "schedule": {"cron": "0 3 * * *", "timezone": "UTC", "deployment": "e2e"},
    }
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def child(arguments: list[str], env: dict, log: Path, timeout: float = 600) -> None:
    command = [sys.executable, "-m", "flows.cli", *arguments]
    with log.open("w") as out:
        result = subprocess.run(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"e2e: FAILED: parclean {' '.join(arguments)} exited with {result.returncode}:\n{tail}")


def serve_and_trigger(config: Path, env: dict, log: Path) -> None:
    """`parclean serve` in the background; once the deployment exists, run it through the API and wait."""
    command = [sys.executable, "-m", "flows.cli", "serve", "--config", str(config)]
    serving = subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        state = asyncio.run(trigger_when_served(env["PREFECT_API_URL"], serving))
    finally:
        stop(serving)
    if state != "COMPLETED":
        raise SystemExit(f"e2e: FAILED: the served deployment's run ended {state}:\n{log.read_text()[-3000:]}")


async def trigger_when_served(api_url: str, serving: subprocess.Popen) -> str:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    async with get_client() as client:
        deadline = time.monotonic() + 180
        while True:
            if serving.poll() is not None:
                raise SystemExit(f"e2e: FAILED: parclean serve exited with {serving.returncode}")
            try:
                deployment = await client.read_deployment_by_name("data-free-clean/e2e")
                break
            except Exception:  # noqa: BLE001 - not registered yet
                if time.monotonic() > deadline:
                    raise SystemExit("e2e: FAILED: the served deployment never appeared") from None
                await asyncio.sleep(1)
        crons = [s.schedule.cron for s in deployment.schedules]
        if crons != ["0 3 * * *"]:
            raise SystemExit(f"e2e: FAILED: served deployment's schedules are {crons}, expected ['0 3 * * *']")
    flow_run = await run_deployment("data-free-clean/e2e", timeout=600)
    return flow_run.state.type.value


def deploy_nightly(env: dict, log: Path) -> None:
    prefect = str(Path(sys.executable).with_name("prefect"))
    deploy_env = {**env, "PARCLEAN_HOME": str(REPO)}
    with log.open("w") as out:
        for command in ([prefect, "work-pool", "create", "parclean-process", "--type", "process"],
                        [prefect, "--no-prompt", "deploy", "--name", "nightly"]):
            result = subprocess.run(command, env=deploy_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=300)
            if result.returncode != 0:
                raise SystemExit(f"e2e: FAILED: {' '.join(command[1:])} exited with {result.returncode}:\n"
                                 f"{log.read_text()[-3000:]}")


async def check_api(api_url: str, demo: bool = False) -> list[str]:
    """Every flow run COMPLETED, the expected flows and artifacts present, the nightly deployment registered."""
    from prefect.client.orchestration import get_client

    problems = []
    async with get_client() as client:  # PREFECT_API_URL: api_url, set in main()
        runs = await client.read_flow_runs()
        flows = {flow.id: flow.name for flow in await client.read_flows()}
        names = sorted(flows[run.flow_id] for run in runs)
        step(f"flow runs: {', '.join(f'{flows[r.flow_id]}={r.state.type.value}' for r in runs)}")
        for run in runs:
            if run.state is None or run.state.type.value != "COMPLETED":
                problems.append(f"flow run {run.name} ({flows[run.flow_id]}) is {run.state}")
        # parclean run: pipeline + generate + clean; the served run: pipeline + clean (the shard set is reused).
        # The demo adds pipeline + clean, and generate unless its shard cache (runs/shard-cache) already holds the set.
        runs_of_each = 3 if demo else 2
        expected = sorted(["data-free-clean"] * runs_of_each + ["clean-model"] * runs_of_each)
        generated = names.count("generate-shards")
        if [name for name in names if name != "generate-shards"] != expected or generated not in ((1, 2) if demo
                                                                                                  else (1,)):
            problems.append(f"flow runs {names}, expected {expected} and one or two generate-shards")
        keys = {artifact.key for artifact in await client.read_artifacts() if artifact.key}
        if not EXPECTED_ARTIFACTS <= keys:
            problems.append(f"artifacts missing: {sorted(EXPECTED_ARTIFACTS - keys)}")
        reports = [a for a in await client.read_artifacts() if a.key == "cleaning-report"]
        if len(reports) != runs_of_each or not all("| clean accuracy (%) |" in a.data for a in reports):
            problems.append(f"{len(reports)} cleaning-report artifacts, expected {runs_of_each} with the table")
        nightly = await client.read_deployment_by_name("data-free-clean/nightly")
        crons = [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules]
        if crons != [("0 2 * * *", "UTC")] or nightly.work_pool_name != "parclean-process":
            problems.append(f"nightly deployment: schedules {crons}, work pool {nightly.work_pool_name}")
        step(f"artifacts: {', '.join(sorted(keys))}; nightly deployment on pool {nightly.work_pool_name}, "
             f"cron {crons}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
