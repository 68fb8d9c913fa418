"""flows/cli.py: `parclean run` stops promptly on SIGTERM and Ctrl-C, and leaves no Prefect server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def processes_with_home(home: Path) -> list[int]:
    """Pids of processes whose environment has PREFECT_HOME=home (a temporary server started for a run)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT_HOME={home}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


# Where the run is when the signal comes: cleaning (the flow's own thread) or generating (shard tasks in worker
# threads, which signals never reach: they stop at their next batch).
PHASES = {"cleaning": ("cleaning.train: par on", ["clean.steps=100000"]),
          "generating": ("images/s", ["generate.num_samples=20000", "generate.shard_size=20000"])}


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_run_stops_within_seconds_of_a_signal_and_leaves_no_server(signum: int, phase: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from bench.e2e_prefect import write_pipeline_config

    config = write_pipeline_config(tmp_path)
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "run.log"
    started, settings = PHASES[phase]
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--set", f"out={tmp_path / 'out'}",
               "--set", "out_per_run=false", *(arg for setting in settings for arg in ("--set", setting))]
    with log.open("w") as out:
        run = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while started not in log.read_text():
        assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(2)
    sent = time.monotonic()
    run.send_signal(signum)
    code = run.wait(timeout=30)
    seconds = time.monotonic() - sent
    text = log.read_text()
    assert seconds < 10, f"still running {seconds:.1f} s after the signal"
    assert code == 128 + signum, text[-2000:]
    assert "stopped by" in text.splitlines()[-1] and "Traceback" not in text
    time.sleep(1)
    assert processes_with_home(home) == []  # the run's temporary Prefect server stopped with it
