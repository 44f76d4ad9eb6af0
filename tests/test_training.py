"""The training entry point end to end, as users run it: real processes, real MNIST, real checkpoints.

One uninterrupted run per process count is shared by the resume, DDP-equivalence and output tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import ConditionalDiffusionPipeline
from pipeline.checkpointing import EXIT_STOPPED_EARLY, list_checkpoints
from pipeline.config import load_config
from pipeline.data import cutout_where, load_image_data, to_model_range, translate_where
from pipeline.diffusion import make_train_scheduler
from pipeline.models.unet import ConditionalUNet
from pipeline.training import train
from pipeline.training.batches import EpochShuffle, StepDraws
from tests.conftest import MNIST, REPO, TINY_MODEL

STEPS = 6
# The shipped model.dropout (0.1): resume and process-count equivalence hold with dropout (masks per sample position).
COMMON = [*TINY_MODEL, "--data.dataset", str(MNIST), "--data.max_samples", "256", "--train.batch_size", "8",
          "--train.log_every", "1", "--train.lr", "1e-3", "--train.warmup_steps", "2",
          "--train.checkpoint_every", "3", "--train.sample_every", "none", "--sample.num_inference_steps", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(output_dir: Path, *overrides: str, processes: int = 1) -> list[str]:
    script = str(REPO / "pipeline" / "train.py")
    args = ["--train.output_dir", str(output_dir), *COMMON, *overrides]
    if processes == 1:
        return [sys.executable, script, *args]
    # `--cpu` would start one process only (accelerate's simple launcher); this starts `processes` gloo ranks
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), script, *args]


ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}


def run_train(output_dir: Path, *overrides: str, processes: int = 1, expect: int = 0) -> str:
    result = subprocess.run(train_command(output_dir, *overrides, processes=processes), capture_output=True, text=True,
                            cwd=REPO, timeout=600, env=ENV)
    log = result.stdout + result.stderr
    assert result.returncode == expect, f"exit {result.returncode}, expected {expect}:\n{log[-4000:]}"
    return log


def losses(output_dir: Path) -> dict[int, float]:
    events = EventAccumulator(str(output_dir / "tensorboard" / "train"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(output_dir)[-1] / "model.safetensors")


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Uninterrupted STEPS-step runs with 1 and 2 processes (same global batch), the reference for the rest."""
    runs = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp(f"full{processes}")
        log = run_train(out, "--train.max_steps", str(STEPS), "--train.sample_every", str(STEPS), "--train.eval_every", str(STEPS),
                        "--train.eval_per_class", "2", processes=processes)
        assert f"num_processes={processes} " in log
        runs[processes] = out
    return runs


@pytest.mark.multiprocess
def test_two_process_run_writes_events_checkpoint_and_sampling_pipeline(full_runs: dict[int, Path]) -> None:
    out = full_runs[2]
    events = EventAccumulator(str(out / "tensorboard" / "train"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/images_per_s", "train/epoch", "train/grad_norm", "eval/accuracy", "eval/cfid"} <= set(
        tags["scalars"])
    assert 0 <= events.Scalars("eval/accuracy")[0].value <= 1
    assert "samples" in tags["images"], tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    assert (out / "config.yaml").exists() and (out / "samples" / f"step_{STEPS:08d}.png").exists()
    assert json.loads((out / "status.json").read_text()) == {"status": "finished", "step": STEPS}

    pipe = ConditionalDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.class_names == [str(i) for i in range(10)]
    images = pipe(class_labels=[0, "9"], num_inference_steps=2, guidance_scale=2.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 28, 28, 1) and images.min() >= 0 and images.max() <= 1


def assert_same_training(one: Path, two: Path) -> None:
    """Same per-step losses and final weights up to fp32 reduction order."""
    first, second = losses(one), losses(two)
    assert first.keys() == second.keys()
    for step in first:
        assert first[step] == pytest.approx(second[step], rel=1e-4, abs=1e-6), step
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise can flip the step's sign, so a few
    # entries may differ by up to one step (lr); nearly all agree to fp32 round-off.
    one_w, two_w = final_weights(one), final_weights(two)
    diffs = torch.cat([(one_w[k] - two_w[k]).abs().flatten() for k in one_w])
    assert diffs.max() < 1e-3, diffs.max()
    assert (diffs < 1e-5).float().mean() > 0.99


@pytest.mark.multiprocess
def test_two_processes_take_the_same_step_as_one_with_the_whole_batch(full_runs: dict[int, Path]) -> None:
    assert_same_training(full_runs[1], full_runs[2])


@pytest.mark.slow
def test_gradient_accumulation_takes_the_same_step_as_the_whole_batch(full_runs: dict[int, Path], tmp_path: Path) -> None:
    run_train(tmp_path, "--train.max_steps", str(STEPS), "--train.gradient_accumulation_steps", "2")
    assert_same_training(full_runs[1], tmp_path)


@pytest.mark.slow
def test_compile_and_channels_last_train_on_cpu_like_eager(tmp_path: Path) -> None:
    # dropout 0: each dropout layer draws its mask outside the graph (exact, but a graph break per layer: minutes to compile)
    run_train(tmp_path, "--train.max_steps", str(STEPS), "--train.compile", "true", "--train.channels_last", "true",
              "--model.dropout", "0")
    run_train(tmp_path / "eager", "--train.max_steps", str(STEPS), "--model.dropout", "0")
    compiled, eager = losses(tmp_path), losses(tmp_path / "eager")
    assert compiled.keys() == eager.keys()
    assert all(compiled[step] == pytest.approx(eager[step], rel=1e-3) for step in eager)  # fused kernels round differently
    assert (tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("processes", [1, 2])
def test_resume_repeats_the_uninterrupted_run_bit_for_bit(full_runs: dict[int, Path], tmp_path: Path, processes: int) -> None:
    half = STEPS // 2
    run_train(tmp_path, "--train.max_steps", str(half), processes=processes)
    log = run_train(tmp_path, "--train.max_steps", str(STEPS), "--resume", "latest", processes=processes)
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{half:08d}'} at step {half}" in log
    assert losses(tmp_path) == losses(full_runs[processes])
    reference = final_weights(full_runs[processes])
    resumed = final_weights(tmp_path)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert load_file(tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").keys() == \
        load_file(full_runs[processes] / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").keys()


@pytest.mark.multiprocess
def test_resume_on_another_process_count_continues_the_same_run(full_runs: dict[int, Path], tmp_path: Path) -> None:
    """Stopped on 2 processes, resumed on 1: the steps of the uninterrupted 1-process run, dropout included."""
    run_train(tmp_path, "--train.max_steps", str(STEPS // 2), processes=2)
    run_train(tmp_path, "--train.max_steps", str(STEPS), "--resume", "latest")
    assert_same_training(full_runs[1], tmp_path)


def test_signal_stops_with_a_checkpoint_and_exit_75(tmp_path: Path) -> None:
    process = subprocess.Popen(train_command(tmp_path, "--train.max_steps", "100000", "--train.checkpoint_every", "none"),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.time() + 120
    while not (tmp_path / "tensorboard").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # some steps in
    process.send_signal(signal.SIGUSR1)
    log, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED_EARLY, log[-3000:]
    assert "stopping early at step" in log and "(SIGUSR1)" in log
    stopped_at = int(log.split("stopping early at step ")[1].split()[0])
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{stopped_at:08d}"]
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "stopped_early", "step": stopped_at}


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_leaves_the_previous_one(tmp_path: Path) -> None:
    """SIGKILL while a checkpoint is being written; the previous complete one stays and `--resume latest` takes it."""
    big = ["--model.base_channels", "64", "--model.channel_mult", "1,2,2", "--model.layers_per_block", "2",
           "--model.attention_resolutions", "7", "--train.checkpoint_every", "2", "--train.max_steps", "40"]
    process = subprocess.Popen(train_command(tmp_path, *big), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 240
    killed_mid_write = False
    while time.time() < deadline and process.poll() is None:
        writing = list(checkpoints.glob(".tmp-step_*")) if checkpoints.exists() else []
        if writing and list_checkpoints(tmp_path):  # a second checkpoint is being written
            os.kill(process.pid, signal.SIGKILL)
            killed_mid_write = True
            break
        time.sleep(0.005)
    process.wait(timeout=30)
    assert killed_mid_write, "never caught a checkpoint write in progress"
    complete = list_checkpoints(tmp_path)
    assert complete and list(checkpoints.glob(".tmp-step_*"))
    latest_step = int(complete[-1].name.split("_")[1])
    log = run_train(tmp_path, *big[:-1], str(latest_step + 2), "--resume", "latest")
    assert f"resumed from {complete[-1]} at step {latest_step}" in log
    assert not list(checkpoints.glob(".tmp-step_*")), "stale partial checkpoint not cleaned up"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.lrr", "1e-3"], "unknown config key 'train.lrr'; did you mean train.lr"),
        (["--diffusion.schedule", "cosin"], "diffusion.schedule: 'cosin' is not allowed; did you mean cosine?"),
        (["--train.batch_size", "eight"], "train.batch_size: expected int, got 'eight'"),
        (["--data.dataset", "/nonexistent/mnist"], "data.dataset '/nonexistent/mnist' is neither a local path nor"),
        (["--data.image_column", "label"], "data.image_column 'label' is not an image column"),
        (["--model.channel_mult", "1,2,2,2"], "sample_size 28 cannot be halved 3 times"),
        (["--train.batch_size", "1024"], "fewer than train.batch_size 1024"),
        (["--data.translate", "14"], "data.translate 14 must be less than half the image size (28 px); use at most 13"),
        (["--data.cutout", "29"], "data.cutout 29 must be at most the image size (28 px); use at most 28"),
    ],
)
def test_bad_input_gives_one_clear_error(tmp_path: Path, overrides: list[str], message: str) -> None:
    result = subprocess.run(train_command(tmp_path, "--train.max_steps", "1", *overrides), capture_output=True, text=True,
                            cwd=REPO, timeout=300, env=ENV)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.multiprocess
def test_global_batch_must_split_over_processes(tmp_path: Path) -> None:
    result = subprocess.run(train_command(tmp_path, "--train.max_steps", "1", "--train.batch_size", "7", processes=2),
                            capture_output=True, text=True, cwd=REPO, timeout=300, env=ENV)
    assert result.returncode != 0
    assert "train.batch_size 7 must be divisible by processes x accumulation steps = 2" in result.stderr
    assert result.stderr.count("must be divisible") == 1, "printed once, by rank 0"


def test_step_draws_keep_the_draws_from_before_augmentation_and_add_shifts_and_centres() -> None:
    seed, step, batch, shape, cpu = 3, 7, 64, torch.Size((1, 28, 28)), torch.device("cpu")
    # The draws as they were before translations and Cutout centres existed: same generator, same order.
    g = torch.Generator().manual_seed(hash((seed, step)) & 0x7FFF_FFFF_FFFF)
    before = [torch.randn((batch, *shape), generator=g), torch.randint(0, 1000, (batch,), generator=g),
              torch.rand(batch, generator=g) < 0.1, torch.rand(batch, generator=g) < 0.5]
    for translate in (0, 3):
        draws = StepDraws.draw(seed, step, batch, shape, 1000, 0.1, cpu, translate)
        assert all(torch.equal(now, then) for now, then in zip([draws.noise, draws.timesteps, draws.drop, draws.flip], before, strict=True))
        assert draws.dropout_seed == hash((seed, step, 1))
        assert draws.shifts.shape == draws.centers.shape == (batch, 2)
        assert set(draws.shifts.unique().tolist()) == set(range(-translate, translate + 1))  # the whole range, nothing outside
        assert 0 <= draws.centers.min() and draws.centers.max() <= 27 and len(draws.centers.unique()) > 20
        again = StepDraws.draw(seed, step, batch, shape, 1000, 0.1, cpu, translate)
        assert torch.equal(again.shifts, draws.shifts) and torch.equal(again.centers, draws.centers)
    following = StepDraws.draw(seed, step + 1, batch, shape, 1000, 0.1, cpu, translate)
    assert not torch.equal(following.shifts, draws.shifts) and not torch.equal(following.centers, draws.centers)


@pytest.mark.slow
def test_training_feeds_the_model_translated_and_cutout_images(tmp_path: Path) -> None:
    """2 steps of real training with both on: the U-Net's input at every step is the noised batch translated by
    that step's shifts with a black border and blanked in its Cutout squares, nothing else."""
    batch, steps = 8, 2
    cfg = load_config(None, [*TINY_MODEL, "--data.dataset", str(MNIST), "--data.max_samples", "64", "--data.translate", "2",
                             "--data.cutout", "14", "--train.batch_size", str(batch), "--train.max_steps", str(steps),
                             "--train.sample_every", "none", "--train.output_dir", str(tmp_path)])
    inputs: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, ConditionalUNet) and module.training:
            inputs.append(args[0].detach().clone())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        assert train(cfg) == 0
    finally:
        hook.remove()
    assert len(inputs) == steps
    assert load_config(tmp_path / "config.yaml").data == cfg.data  # saved for resume

    data = load_image_data(cfg.data)
    order = list(EpochShuffle(len(data), cfg.train.seed, batch))  # the data order of epoch 0
    scheduler = make_train_scheduler(cfg.diffusion, cfg.model.learned_variance)
    for step, seen in enumerate(inputs):
        draws = StepDraws.draw(cfg.train.seed, step, batch, data.images.shape[1:], scheduler.config.num_train_timesteps,
                               cfg.diffusion.p_uncond, seen.device, 2)
        images = to_model_range(data.images[order[step * batch : (step + 1) * batch]]).to(seen.device)
        augmented = cutout_where(translate_where(images, draws.shifts, 2, -1.0), draws.centers, 14)
        assert torch.allclose(seen, scheduler.add_noise(augmented, draws.noise, draws.timesteps), atol=1e-6), step
        assert not torch.allclose(seen, scheduler.add_noise(images, draws.noise, draws.timesteps), atol=1e-3), step
        # The clean images recovered from the model's input hold each Cutout square at 0 (no pixel of a uint8 image
        # is 0 in [-1, 1]): 14 x 14 where the centre is 7 px from the border, clipped there otherwise.
        alpha_bar = scheduler.alphas_cumprod.to(seen.device)[draws.timesteps][:, None, None, None]
        clean = (seen - (1 - alpha_bar).sqrt() * draws.noise) / alpha_bar.sqrt()
        sides = draws.centers.clamp(max=28 - 7) - (draws.centers - 7).clamp(min=0) + 7  # (B, 2): rows, columns kept
        assert torch.equal((clean.abs() < 1e-3).flatten(1).sum(1), sides.prod(1)), step
