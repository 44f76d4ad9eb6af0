"""slurm/cifar.sh on a real SLURM cluster: slurmctld + two slurmd "nodes" on this machine (../shared/slurm).

Two jobs run side by side with the same tiny CIFAR-10 run on 2 nodes x 1 CPU process (gloo): one runs
through; the other gets the batch shell's time-limit warning (SIGUSR1, as `#SBATCH --signal=B:USR1@...`
sends it) mid-run, checkpoints, requeues itself and resumes. The two must log the same loss at every step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import CIFAR10, REPO, TINY_MODEL

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

RECIPE = REPO.parent / "shared" / "slurm"
STEPS = 30
SIGNAL_AFTER = 10  # checkpoint step that shows the preempted job is mid-run
OVERRIDES = [*TINY_MODEL, "--model.attention_resolutions", "16", "--data.dataset", str(CIFAR10), "--data.max_samples", "256",
             "--train.batch_size", "16", "--train.max_steps", str(STEPS), "--train.log_every", "1", "--train.warmup_steps", "5",
             "--train.checkpoint_every", str(SIGNAL_AFTER), "--train.sample_every", "none", "--train.mixed_precision", "no"]


@dataclass
class Job:
    id: str
    dir: Path  # holds run/ (the output dir), logs/ (one log per start) and sbatch's own log

    @property
    def run(self) -> Path:
        return self.dir / "run"

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.dir.glob("*.out"))


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """Start the local cluster (installing SLURM via apt if needed); the environment sbatch needs."""
    script = str(RECIPE / "start-local-slurm.sh")
    conf = subprocess.run([script, "env"], capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip()
    env = {**os.environ, "SLURM_CONF": conf}
    was_up = subprocess.run(["sinfo"], env=env, capture_output=True).returncode == 0 if shutil.which("sinfo") else False
    started = subprocess.run([script, "start"], capture_output=True, text=True)
    if started.returncode != 0:
        if not shutil.which("sbatch"):
            pytest.skip(f"the SLURM packages could not be installed:\n{started.stderr[-2000:]}")
        pytest.fail(f"the local SLURM cluster did not start:\n{started.stderr[-2000:]}")
    # Jobs inherit this environment: this interpreter's accelerate/python, CPU mode, one thread per process.
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", CPU="1", OMP_NUM_THREADS="1")
    yield env
    if not was_up:
        subprocess.run([script, "stop"], capture_output=True)


def submit(env: dict[str, str], job_dir: Path, overrides: list[str] = OVERRIDES) -> Job:
    """sbatch slurm/cifar.sh as a user would, with the resources cut to what the local cluster has."""
    job_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={job_dir}/%x-%j.out",
           "slurm/cifar.sh", *overrides]
    job_env = {**env, "OUTPUT_DIR": str(job_dir / "run"), "LOG_DIR": str(job_dir / "logs")}
    out = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, check=True).stdout
    return Job(out.strip().split(";")[0], job_dir)


def job_state(env: dict[str, str], job: Job) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job.id], env=env, capture_output=True, text=True).stdout
    return out.split("JobState=", 1)[1].split()[0] if "JobState=" in out else "UNKNOWN"


def wait(env: dict[str, str], job: Job, timeout: int = 300) -> str:
    """The job's final state (polling every 0.5 s with the recipe's wait_job)."""
    waiter = f". {RECIPE}/wait_job.sh; wait_job {job.id} {timeout}"
    return subprocess.run(["bash", "-c", waiter], env=env, capture_output=True, text=True).stdout.strip()


def losses_per_start(run: Path) -> list[list[tuple[int, float]]]:
    """(step, train/loss) from each TensorBoard event file, in the order the trainer started."""
    files = sorted((run / "tensorboard").rglob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
    starts = []
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        starts.append([(e.step, e.value) for e in events.Scalars("train/loss")])
    return starts


@pytest.fixture(scope="module")
def jobs(slurm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    base = tmp_path_factory.mktemp("slurm")
    t0 = time.monotonic()
    through, preempted = submit(slurm_env, base / "through"), submit(slurm_env, base / "preempted")
    try:
        mid_run = preempted.run / "checkpoints" / f"step_{SIGNAL_AFTER:08d}"
        while not mid_run.is_dir():
            running = job_state(slurm_env, preempted) in ("PENDING", "CONFIGURING", "RUNNING")
            assert running and time.monotonic() - t0 < 240, f"no checkpoint {mid_run.name}:\n{preempted.log()[-3000:]}"
            time.sleep(0.3)
        subprocess.run(["scancel", "--signal=USR1", "--batch", preempted.id], env=slurm_env, check=True)
        for job in (through, preempted):
            final = wait(slurm_env, job)
            assert final == "COMPLETED", f"job {job.id}: {final}\n{job.log()[-5000:]}"
    except BaseException:
        subprocess.run(["scancel", through.id, preempted.id], env=slurm_env)
        raise
    print(f"both jobs done in {time.monotonic() - t0:.0f} s")
    return {"through": through, "preempted": preempted}


def test_two_nodes_train_and_export_a_pipeline(jobs: dict[str, Job]) -> None:
    from pipeline import ConditionalDiffusionPipeline

    job = jobs["through"]
    log = job.log()
    for rank in (0, 1):  # each node evaluated its own SLURM_NODEID
        assert f"[node {rank} of 2: 1 process(es) here, 2 in all] accelerate launch" in log
        assert f"--machine_rank {rank} " in log
    assert "num_processes=2" in log, "accelerate did not form a 2-process group"
    assert "[slurm] training finished" in log and "requeueing" not in log
    assert (job.run / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    [steps] = [[s for s, _ in start] for start in losses_per_start(job.run)]
    assert steps == list(range(1, STEPS + 1))

    pipe = ConditionalDiffusionPipeline.from_pretrained(job.run / "pipeline")
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_preempted_job_requeues_and_resumes_without_losing_a_step(jobs: dict[str, Job]) -> None:
    job, reference = jobs["preempted"], jobs["through"]
    log = job.log()
    assert "SIGUSR1" in log and "requeueing job" in log, log[-3000:]
    assert "SLURM_RESTART_COUNT=1" in log and "[slurm] training finished" in log
    assert sorted(p.name for p in (job.dir / "logs").iterdir()) == [
        f"ddpm-cifar10-{job.id}-restart0.log", f"ddpm-cifar10-{job.id}-restart1.log"]

    first, second = losses_per_start(job.run)
    stopped_at = first[-1][0]
    assert SIGNAL_AFTER <= stopped_at < STEPS, "the signal did not land mid-run"
    assert (job.run / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    assert [s for s, _ in first + second] == list(range(1, STEPS + 1)), "a step was lost or repeated"
    [uninterrupted] = losses_per_start(reference.run)
    assert [loss for _, loss in first + second] == pytest.approx([loss for _, loss in uninterrupted], rel=1e-6)
    assert (job.run / "checkpoints" / f"step_{STEPS:08d}").is_dir()


def test_a_crash_on_start_is_not_requeued(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """The previous start stopped early (its status.json says so); this one crashes while loading the data. The
    old job script read the stale status as a clean stop and requeued forever."""
    broken = tmp_path / "broken-data"
    broken.mkdir()
    (broken / "train.parquet").write_bytes(b"not a parquet file")
    job_dir = tmp_path / "job"
    (job_dir / "run").mkdir(parents=True)
    (job_dir / "run" / "status.json").write_text('{"status": "stopped_early", "step": 10}\n')
    job = submit(slurm_env, job_dir, [*OVERRIDES, "--data.dataset", str(broken)])
    try:
        final = wait(slurm_env, job, timeout=240)
    finally:
        subprocess.run(["scancel", job.id], env=slurm_env)
    log = job.log()
    assert final == "FAILED", f"{final}\n{log[-3000:]}"
    assert "requeueing job" not in log and "SLURM_RESTART_COUNT" not in log and "[slurm] trainer failed" in log, log[-3000:]
