"""End-to-end check of the flows against a real Prefect server (not the test harness).

    OMP_NUM_THREADS=1 .venv/bin/python bench/e2e_prefect.py [--work DIR] [--keep] [--demo]

1. `prefect server start` on 127.0.0.1 at a free port, PREFECT_HOME in a temporary folder; wait for /api/health.
2. `parclean run` in a child process (PREFECT_API_URL set for it): a tiny data_free_clean (random tiny SD,
   12 images, a random tiny CLIP, 2 cleaning steps).
3. `parclean serve` in a child process, on an every-minute cron: the server's own scheduler must create a flow run
   and the serving process must complete it; then the server restarts, and the same serving process must complete
   the next scheduled run; then the deployment is paused and `parclean serve` must exit within 10 s of SIGTERM.
4. `prefect deploy --name nightly` from this repository's prefect.yaml to a process work pool: the deployment
   is registered with its schedule (not run: it needs the trained toy models).
5. Read back through the API (get_client): every flow run that started COMPLETED, the report and sample artifacts
   exist. With --demo, `parclean demo` itself (the toy SD, the BadNet organism) also runs against the server first.
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
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# bench/ holds scripts named after the packages they measure (bench/cleaning.py): run as a script, this folder
# would come first on sys.path and shadow those packages.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
SERVED_CRON = "* * * * *"  # every minute: the scheduler must fire during the check
# `parclean run --config pipeline.yaml` names its artifacts after the config, the served runs after the deployment.
PER_PIPELINE = ("cleaning-report", "cleaning-report-table", "cleaning-progress", "generated-samples")
EXPECTED_ARTIFACTS = {f"{prefix}-{kind}" for prefix in ("pipeline", "e2e") for kind in PER_PIPELINE}
EXPECTED_ARTIFACTS |= {"pipeline-generation-progress", "pipeline-shard-set"}


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
    server = Server(port, env, work)
    started = time.perf_counter()
    try:
        server.start()
        step(f"server healthy on port {port} after {time.perf_counter() - started:.0f} s")
        config = write_pipeline_config(work)
        child(["run", "--config", str(config)], env, work / "run.log")
        step("parclean run: finished")
        serve_on_schedule(config, env, work / "serve.log", server)
        deploy_nightly(env, work / "deploy.log")
        step("prefect deploy --name nightly: registered")
        if args.demo:
            child(["demo", "--out", str(work / "demo")], env, work / "demo.log", timeout=1200)
            step("parclean demo: finished")
        problems = asyncio.run(check_api(env["PREFECT_API_URL"], demo=args.demo))
    finally:
        server.stop()
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


class Server:
    """`prefect server start` on 127.0.0.1:port with the given PREFECT_HOME; restartable on the same database."""

    def __init__(self, port: int, env: dict, work: Path) -> None:
        self.port, self.env, self.work, self.process, self.starts = port, env, work, None, 0

    def start(self, timeout: float = 180) -> None:
        prefect = Path(sys.executable).with_name("prefect")
        command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.starts += 1
        log = (self.work / f"server-{self.starts}.log").open("w")
        # Its own session, so that stop() can end the server and the processes it started, and nothing else.
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_healthy(self.port, self.process, timeout)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def scheduler_errors(self) -> list[str]:
        """Lines of the server logs where a scheduler loop failed."""
        lines = []
        for log in sorted(self.work.glob("server-*.log")):
            lines += [line for line in log.read_text().splitlines() if "| ERROR" in line and "schedul" in line]
        return lines


def wait_healthy(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"e2e: FAILED: prefect server exited with {server.returncode} (see server-N.log)")
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
    from parclean.models import create_model, save_model

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
        "schedule": {"cron": SERVED_CRON, "timezone": "UTC", "deployment": "e2e"},
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


def serve_on_schedule(config: Path, env: dict, log: Path, server: Server) -> None:
    """`parclean serve`; the server's scheduler must start its runs, across a server restart; SIGTERM ends it."""
    command = [sys.executable, "-m", "flows.cli", "serve", "--config", str(config)]
    serving = subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deployment_id = asyncio.run(wait_for_deployment(serving))
        first = asyncio.run(wait_for_scheduled_run(deployment_id, serving, after=None))
        step(f"parclean serve: the scheduler created run {first.name}, the served process completed it")
        server.stop()
        restarted = datetime.now(timezone.utc)
        server.start()
        second = asyncio.run(wait_for_scheduled_run(deployment_id, serving, after=restarted))
        step(f"parclean serve: after a server restart, scheduled run {second.name} completed")
        asyncio.run(pause_and_drain(deployment_id))
        seconds = terminate(serving, grace=10)
        step(f"parclean serve: stopped {seconds:.1f} s after SIGTERM (exit {serving.returncode})")
    except SystemExit:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        stop(serving)
    if errors := server.scheduler_errors():
        raise SystemExit(f"e2e: FAILED: the server's scheduler failed: {errors[0]}")


def terminate(process: subprocess.Popen, grace: float) -> float:
    """SIGTERM to `process` alone; seconds until it exited. Fails unless it exits within `grace`, with 0 or -15."""
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"e2e: FAILED: still running {grace:.0f} s after SIGTERM") from None
    if process.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
        raise SystemExit(f"e2e: FAILED: exited with {process.returncode} on SIGTERM")
    return time.perf_counter() - start


async def wait_for_deployment(serving: subprocess.Popen, timeout: float = 180):
    """The id of data-free-clean/e2e once `parclean serve` has registered it with SERVED_CRON."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
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
    if crons != [SERVED_CRON]:
        raise SystemExit(f"e2e: FAILED: served deployment's schedules are {crons}, expected [{SERVED_CRON!r}]")
    return deployment.id


async def wait_for_scheduled_run(deployment_id, serving: subprocess.Popen, after: datetime | None,
                                 timeout: float = 300):
    """The first run of the deployment that the server's scheduler created (not started by hand), due after
    `after`, once it is COMPLETED; fails on a run that ends otherwise, or when none completes in time."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    while time.monotonic() < deadline:
        if serving.poll() is not None:
            raise SystemExit(f"e2e: FAILED: parclean serve exited with {serving.returncode}")
        try:
            async with get_client() as client:
                runs = await client.read_flow_runs(deployment_filter=only_this)
        except Exception:  # noqa: BLE001 - the server is still coming back
            runs = []
        runs = [r for r in runs if r.auto_scheduled and (after is None or r.expected_start_time >= after)]
        for run in runs:
            if run.state is not None and run.state.is_final():
                if run.state.is_completed():
                    return run
                raise SystemExit(f"e2e: FAILED: scheduled run {run.name} ended {run.state.type.value}")
        await asyncio.sleep(2)
    raise SystemExit(f"e2e: FAILED: no scheduled run completed within {timeout:.0f} s")


async def pause_and_drain(deployment_id, timeout: float = 300) -> None:
    """Pause the deployment (no new runs) and wait until none of its runs is pending or running."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        await client.pause_deployment(deployment_id)
        while time.monotonic() < deadline:
            runs = await client.read_flow_runs(deployment_filter=only_this)
            if not any(r.state is not None and r.state.type.value in ("PENDING", "RUNNING") for r in runs):
                return
            await asyncio.sleep(2)
    raise SystemExit("e2e: FAILED: a served run was still running after pausing the deployment")


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
        flows = {flow.id: flow.name for flow in await client.read_flows()}
        # Runs the scheduler created for later minutes never started: only the started ones count.
        runs = [r for r in await client.read_flow_runs() if r.state is not None and r.state.type.value != "SCHEDULED"]
        names = sorted(flows[run.flow_id] for run in runs)
        step(f"flow runs: {', '.join(f'{flows[r.flow_id]}={r.state.type.value}' for r in runs)}")
        for run in runs:
            if run.state.type.value != "COMPLETED":
                problems.append(f"flow run {run.name} ({flows[run.flow_id]}) is {run.state}")
        # parclean run: pipeline + generate + clean; each served run: pipeline + clean (the shard set is reused).
        # The demo adds pipeline + clean, and generate unless its shard cache (runs/shard-cache) already holds the set.
        pipelines = names.count("data-free-clean")
        least = 4 if demo else 3  # run, two scheduled runs, the demo
        generated = names.count("generate-shards")
        if pipelines < least or names.count("clean-model") != pipelines or generated not in ((1, 2) if demo
                                                                                             else (1,)):
            problems.append(f"flow runs {names}: expected {least}+ data-free-clean, as many clean-model, and one or "
                            "two generate-shards")
        keys = {artifact.key for artifact in await client.read_artifacts() if artifact.key}
        if not EXPECTED_ARTIFACTS <= keys:
            problems.append(f"artifacts missing: {sorted(EXPECTED_ARTIFACTS - keys)}")
        # The report sits on the run the terminal links to: the data-free-clean run, one per run.
        reports = [a for a in await client.read_artifacts() if a.key and a.key.endswith("-cleaning-report")]
        on = sorted(flows[next(r.flow_id for r in runs if r.id == a.flow_run_id)] for a in reports)
        if on != ["data-free-clean"] * pipelines or not all("| clean accuracy (%) |" in a.data for a in reports):
            problems.append(f"cleaning-report artifacts on {on}, expected one on each of {pipelines} data-free-clean "
                            "runs, with the table")
        nightly = await client.read_deployment_by_name("data-free-clean/nightly")
        crons = [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules]
        if crons != [("0 2 * * *", "UTC")] or nightly.work_pool_name != "parclean-process":
            problems.append(f"nightly deployment: schedules {crons}, work pool {nightly.work_pool_name}")
        step(f"artifacts: {', '.join(sorted(keys))}; nightly deployment on pool {nightly.work_pool_name}, "
             f"cron {crons}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
