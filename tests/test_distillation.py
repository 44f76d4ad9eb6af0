"""Guidance-aware few-step distillation (issue 26): the student U-Net's guidance input, the distillation targets
against the samplers that use them, one U-Net forward per sampling step, the ``python -m pipeline.distill`` command
(bad input, resume, the export and its card) and, on real MNIST, a 4-step student as accurate as its teacher."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from safetensors.torch import load_file

from pipeline.checkpointing import list_checkpoints
from pipeline.config import DiffusionConfig, load_config
from pipeline.diffusion import make_sampler, make_train_scheduler, predicted_original, student_sampler
from pipeline.distill import main as distill_main
from pipeline.distillation import (
    consistency_function,
    ddim_step,
    distillation_loss,
    model_target,
    noise_coefficients,
    one_step_x0,
    teacher_solve,
)
from pipeline.export import save_export
from pipeline.guidance import guidance_weights
from pipeline.models.build import parameter_groups
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline, noise_levels
from tests.conftest import MNIST, REPO, TINY_MODEL
from tests.factories import single_threaded, tiny_unet

pytestmark = pytest.mark.usefixtures(single_threaded.__name__)

PREDICTIONS = ("epsilon", "v_prediction")


def student_of(teacher: ConditionalUNet) -> ConditionalUNet:
    """A student as ``models.build.load_teacher`` makes one: the teacher's config with a guidance embedding, its weights."""
    student = ConditionalUNet(**{**teacher.config, "guidance_embedding": True})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("guidance_mlp.") for name in missing)
    return student.eval()


# --- the student U-Net ----------------------------------------------------------------------------------------


def test_without_the_guidance_embedding_the_model_and_its_weights_are_as_before() -> None:
    """Old exports load unchanged: no new weights, and the embedding, built last, changes no other initial weight."""
    torch.manual_seed(0)
    plain = ConditionalUNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(14,), attention_heads=2)
    torch.manual_seed(0)
    guided = ConditionalUNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(14,), attention_heads=2,
                             guidance_embedding=True)
    assert not any(name.startswith("guidance_mlp") for name in plain.state_dict())
    extra = {name: value for name, value in guided.state_dict().items() if name not in plain.state_dict()}
    assert set(extra) == {f"guidance_mlp.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")}
    assert all(torch.equal(value, guided.state_dict()[name]) for name, value in plain.state_dict().items())


def test_a_student_starts_as_its_teachers_conditional_model_at_every_guidance_scale() -> None:
    """The embedding's last layer is zero: before training the student is the teacher without guidance, so training
    starts from the teacher, not from noise."""
    teacher = tiny_unet()
    student = student_of(teacher)
    x, t, labels = torch.randn(3, 1, 28, 28), torch.tensor([999, 500, 3]), torch.tensor([1, 7, 10])
    expected = teacher(x, t, labels).sample
    for w in (1.0, 3.0, torch.tensor([0.0, 2.5, 7.0])):
        assert torch.equal(student(x, t, labels, guidance=w).sample, expected)
    with torch.no_grad():
        student.guidance_mlp[-1].weight.normal_(0.0, 0.1)
    assert not torch.equal(student(x, t, labels, guidance=3.0).sample, student(x, t, labels, guidance=1.0).sample)
    with pytest.raises(ValueError, match="takes the guidance scale as an input"):
        student(x, t, labels)
    with pytest.raises(ValueError, match="has no guidance embedding"):
        teacher(x, t, labels, guidance=3.0)


# --- targets ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_segment_target_makes_one_ddim_step_land_on_the_teachers_endpoint(prediction: str) -> None:
    """Salimans & Ho's target, for every step of DDIM's 4-step trailing grid (the last one ends at the clean image):
    the student output it asks for takes diffusers' DDIMScheduler from x_t exactly to the teacher's x_t'."""
    config = make_train_scheduler(DiffusionConfig(prediction_type=prediction)).config
    ddim = DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False)
    ddim.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    for t in ddim.timesteps:
        x_t, x_end = torch.randn(2, 1, 8, 8, generator=generator), torch.randn(2, 1, 8, 8, generator=generator) * 0.5
        start = torch.full((2,), int(t))
        end = (start - 1000 // 4).clamp(min=-1)
        x0 = one_step_x0(x_t, x_end, noise_coefficients(ddim, start), noise_coefficients(ddim, end))
        output = model_target(x0, x_t, *noise_coefficients(ddim, start), prediction)
        torch.testing.assert_close(predicted_original(output, x_t, *noise_coefficients(ddim, start), prediction), x0)
        landed = ddim.step(output, t, x_t).prev_sample
        torch.testing.assert_close(landed, x_end, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ddim_step(x_t, x0, noise_coefficients(ddim, start), noise_coefficients(ddim, end)), x_end,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_segment_teacher_solves_as_the_dpm_solver_it_is_scored_with(prediction: str) -> None:
    """The teacher's trajectory the segment targets come from: solved from t = T - 1 to the clean end in 20 steps it
    is the guided 20-step DPM-Solver++ sample of the pipeline (the teacher's bar), not the coarser DDIM one."""
    teacher = tiny_unet(dropout=0.0)
    config = make_train_scheduler(DiffusionConfig(prediction_type=prediction)).config
    ddim = make_sampler("ddim", config)
    latents, labels = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 4, 9])
    pipe = ConditionalDiffusionPipeline(unet=teacher, scheduler=make_sampler("dpmsolver++", config))
    expected = pipe(class_labels=labels, guidance_scale=3.0, num_inference_steps=20, latents=latents, output_type="latent",
                    mixed_precision="no").images
    with torch.no_grad():
        solved = teacher_solve(teacher, latents, torch.full((3,), 999), torch.full((3,), -1), 20, labels,
                               torch.full((3,), 3.0), ddim)
        first_order = teacher_solve(teacher, latents, torch.full((3,), 999), torch.full((3,), -1), 1, labels,
                                    torch.full((3,), 3.0), ddim)
    torch.testing.assert_close(solved, expected, atol=2e-4, rtol=2e-4)
    assert (first_order - expected).abs().max() > 1e-2  # the test can tell solvers apart


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_consistency_function_is_lcms_denoised_and_the_identity_at_t_0(prediction: str) -> None:
    """The boundary condition f(x, 0) = x, and at a grid time the student's f is what LCMScheduler's step samples."""
    lcm = make_sampler("lcm", make_train_scheduler(DiffusionConfig(prediction_type=prediction)).config | {"clip_sample": False})
    x, output = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    assert torch.equal(consistency_function(output, x, torch.zeros(2, dtype=torch.long), lcm), x)
    lcm.set_timesteps(4)
    t = lcm.timesteps[1]
    denoised = lcm.step(output, t, x, generator=torch.Generator().manual_seed(0)).denoised
    torch.testing.assert_close(consistency_function(output, x, torch.full((2,), int(t)), lcm), denoised)


@pytest.mark.parametrize("method", ["consistency", "segment"])
def test_each_loss_trains_the_guidance_embedding(method: str) -> None:
    """From the teacher's weights the losses are finite and their gradient reaches the zero-initialised embedding, the
    only part of the student that can tell the scales apart."""
    teacher = tiny_unet(dropout=0.0)
    student = student_of(teacher).train()
    cfg = load_config(None, {"train.max_steps": 1, "distill.teacher": "t", "distill.method": method,
                             "sample.sampler": "lcm" if method == "consistency" else "ddim", "sample.num_inference_steps": 4})
    sampler = student_sampler(cfg.sample, cfg.distill, make_train_scheduler(cfg.diffusion).config)
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 1, 28, 28, generator=generator) * 2 - 1
    loss = distillation_loss(student, teacher, clean, torch.tensor([0, 3, 5, 9]), torch.randn(4, 1, 28, 28, generator=generator),
                             torch.tensor([0, 400, 750, 999]), torch.tensor([0.0, 0.3, 0.6, 0.9]), sampler, cfg)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert student.guidance_mlp[-1].weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_the_guidance_embedding_can_learn_at_its_own_rate() -> None:
    """``distill.embedding_lr_scale``: the zero-initialised embedding in a group of its own at that multiple of
    train.lr, every other parameter once in the first group at train.lr; one group for a teacher or at scale 1."""
    student = student_of(tiny_unet())
    cfg = load_config(None, {"train.lr": 1e-3, "train.max_steps": 1, "distill.teacher": "t", "distill.embedding_lr_scale": 10,
                             "sample.sampler": "ddim",
                             "sample.num_inference_steps": 4})
    rest, embedding = parameter_groups(student, cfg)
    assert (rest["lr"], embedding["lr"], embedding["lr_scale"]) == (1e-3, pytest.approx(1e-2), 10)
    assert [id(p) for p in embedding["params"]] == [id(p) for p in student.guidance_mlp.parameters()]
    assert sorted(map(id, rest["params"] + embedding["params"])) == sorted(map(id, student.parameters()))
    assert len(parameter_groups(tiny_unet(), cfg)) == 1
    assert len(parameter_groups(student, load_config(None, {"train.max_steps": 1, "distill.teacher": "t", "sample.sampler": "ddim",
                                                            "sample.num_inference_steps": 4}))) == 1


# --- sampling ---------------------------------------------------------------------------------------------------


class ForwardLog:
    """Wraps ``unet.forward``, recording each call's batch size and guidance scales."""

    def __init__(self, unet: ConditionalUNet, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forward, self.calls = unet.forward, []
        monkeypatch.setattr(unet, "forward", self)

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        guidance = kwargs.get("guidance")
        self.calls.append((len(sample), None if guidance is None else guidance.tolist()))
        return self.forward(sample, *args, **kwargs)


def test_a_student_runs_one_forward_of_n_images_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of it all: the teacher runs 2N rows per guided step, the student N, with the scale as an input;
    a guidance ramp feeds each step its own scale."""
    teacher = tiny_unet()
    config = make_train_scheduler(DiffusionConfig()).config
    teacher_pipe = ConditionalDiffusionPipeline(unet=teacher, scheduler=make_sampler("dpmsolver++", config))
    student_pipe = ConditionalDiffusionPipeline(unet=student_of(teacher), scheduler=make_sampler("lcm", config))
    for pipe in (teacher_pipe, student_pipe):
        pipe.set_progress_bar_config(disable=True)
    teacher_log, student_log = ForwardLog(teacher, monkeypatch), ForwardLog(student_pipe.unet, monkeypatch)
    teacher_pipe(class_labels=[1, 7, 9], guidance_scale=3.0, num_inference_steps=4, output_type="pt")
    images = student_pipe(class_labels=[1, 7, 9], guidance_scale=3.0, num_inference_steps=4, output_type="pt").images
    assert teacher_log.calls == [(6, None)] * 4
    assert student_log.calls == [(3, [3.0] * 3)] * 4 and torch.isfinite(images).all()
    student_log.calls.clear()
    student_pipe(class_labels=[1, 7, 9], guidance_scale=3.0, num_inference_steps=4, guidance_ramp="increasing", output_type="pt")
    weights = guidance_weights(3.0, noise_levels(student_pipe.scheduler), None, "increasing")
    assert [call[1] for call in student_log.calls] == [[pytest.approx(w)] * 3 for w in weights]


# --- the command line -------------------------------------------------------------------------------------------


def test_a_missing_teacher_is_one_line_and_exit_2_before_torch() -> None:
    result = subprocess.run([sys.executable, "-c", "import sys; from pipeline.distill import main; status = main(sys.argv[1:]); "
                             "print(status, 'torch' in sys.modules)", "--teacher", "/nonexistent", "--out", "/tmp/x"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr.splitlines()[0] == (
        "error: --teacher /nonexistent: no exported pipeline there (no model_index.json); pass a trained pipeline's folder, "
        "e.g. runs/quickstart/pipeline or data/pretrained/cifar10-cpu")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "error: --teacher and --out are required"),
        (["--distill.method", "consistncy"], "distill.method: 'consistncy' is not allowed; did you mean consistency"),
        (["--sample.guidance_scale", "7"], "sample.guidance_scale 7 is outside distill.guidance_range 1,5"),
        (["--sample.num_inference_steps", "3"], "distill.teacher_steps 20 must be a multiple"),
        (["--sample.sampler", "lcm"], "distill.method segment samples with sample.sampler ddim, not lcm"),
    ],
    ids=["no-teacher-flags", "method", "guidance", "segment-grid", "sampler"],
)
def test_bad_distillation_settings_are_one_line_and_exit_2(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           flags: list[str], message: str) -> None:
    given = ["--teacher", str(tiny_run / "pipeline"), "--out", str(tmp_path / "student")] if flags else []
    assert distill_main([*given, *flags]) == 2
    assert message in capsys.readouterr().err.splitlines()[0]
    assert not (tmp_path / "student").exists()


def test_a_teacher_without_a_null_class_is_refused_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    teacher = tmp_path / "teacher"
    cfg = load_config(None, [*TINY_MODEL, "--diffusion.p_uncond", "0", "--sample.guidance_scale", "1", "--train.max_steps", "2",
                             "--data.dataset", str(MNIST), "--data.max_samples", "64", "--train.batch_size", "8"])
    unet = ConditionalUNet(sample_size=28, num_classes=10, class_names=list("0123456789"), use_null_class=False,
                           **{key: value for key, value in vars(cfg.model).items()})
    save_export(ConditionalDiffusionPipeline(unet=unet, scheduler=make_train_scheduler(cfg.diffusion)), teacher)
    cfg.save(teacher / "config.yaml")
    assert distill_main(["--teacher", str(teacher), "--out", str(tmp_path / "student")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: distill.teacher {teacher} was trained without a null class (diffusion.p_uncond 0), so it cannot be guided; "
        "distil a teacher trained with label dropout")
    assert not (tmp_path / "student").exists()


# --- a distillation run: resume, export, card --------------------------------------------------------------------

RUN = ["--train.batch_size", "8", "--train.log_every", "1", "--train.checkpoint_every", "2", "--train.sample_every", "none",
       "--train.lr", "1e-3", "--train.lr_schedule", "constant", "--train.warmup_steps", "0"]


@pytest.mark.parametrize("method", ["consistency", "segment"])
def test_a_resumed_distillation_repeats_an_uninterrupted_one_and_exports_a_student(tiny_run: Path, tmp_path: Path,
                                                                                    method: str) -> None:
    """4 steps at once, and 2 + 2 with ``--resume latest``, give the same weights bit for bit (the guidance embedding
    at its own learning rate across the resume too); the export samples with its method's scheduler in one forward per
    step, and its card names the teacher, method and cost."""
    teacher = str(tiny_run / "pipeline")
    flags = [*RUN, "--distill.method", method, "--distill.teacher_steps", "8", "--distill.embedding_lr_scale", "10"]
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    assert distill_main(["--teacher", teacher, "--out", str(whole), *flags, "--train.max_steps", "4"]) == 0
    assert distill_main(["--teacher", teacher, "--out", str(chunked), *flags, "--train.max_steps", "2"]) == 0
    assert distill_main(["--teacher", teacher, "--out", str(chunked), *flags, "--train.max_steps", "4", "--resume", "latest"]) == 0
    final = [load_file(list_checkpoints(run)[-1] / "model.safetensors") for run in (whole, chunked)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert any(not torch.equal(final[0][k], value) for k, value in load_file(list_checkpoints(whole)[0] / "model.safetensors").items())

    pipe = ConditionalDiffusionPipeline.from_pretrained(whole / "pipeline")
    assert pipe.unet.config.guidance_embedding
    assert type(pipe.scheduler) is (LCMScheduler if method == "consistency" else DDIMScheduler)
    card = (whole / "pipeline" / "README.md").read_text()
    assert "## Distillation" in card and f"`{teacher}`" in card and f"distill.method {method}" in card
    assert "4 U-Net evaluations per image at 4 steps" in card and "teacher U-Net evaluations per training image" in card
    images = pipe(class_labels=["3", "7"], guidance_scale=3, num_inference_steps=4, output_type="pt").images
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


# --- issue 26, item 5: a 4-step student as accurate as its teacher --------------------------------------------------


@pytest.mark.slow
def test_a_4_step_student_of_an_mnist_teacher_is_as_accurate_as_the_teacher(tmp_path: Path) -> None:
    """The quickstart recipe's command on a tiny model: a teacher trained here on the embedded MNIST, distilled by
    ``python -m pipeline.distill`` (the default method); at 4 DDIM steps (4 U-Net evaluations) the student's
    conditional accuracy (the committed classifier) is within 3 binomial standard errors of the teacher's at its own
    sampling, DPM-Solver++ 20 steps at guidance 3 (40)."""
    from pipeline.evaluation import Evaluator
    from pipeline.sampling import generate

    def command(*args: str) -> None:  # its own process, as a user runs it (bf16: one Accelerator setting per process)
        result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]

    tiny = ["--model.base_channels", "16", "--model.channel_mult", "1,2,2", "--model.layers_per_block", "1",
            "--model.attention_resolutions", "7", "--model.attention_heads", "2", "--train.batch_size", "32",
            "--train.sample_every", "none", "--train.checkpoint_every", "none"]
    run = tmp_path / "teacher"
    command("pipeline/train.py", "--config", "configs/quickstart-cpu.yaml", *tiny, "--train.output_dir", str(run),
            "--train.max_steps", "300", "--train.warmup_steps", "30")
    student = tmp_path / "student"
    command("-m", "pipeline.distill", "--teacher", str(run / "pipeline"), "--out", str(student), *tiny, "--train.max_steps", "40",
            "--train.lr", "1e-4", "--train.lr_schedule", "constant", "--train.warmup_steps", "0", "--distill.teacher_steps", "8")
    evaluator = Evaluator(str(REPO / "data" / "mnist"), metrics=("accuracy",))
    accuracy = {}
    for name, folder in (("teacher", run / "pipeline"), ("student", student / "pipeline")):
        pipe = ConditionalDiffusionPipeline.from_pretrained(folder)
        sample = load_config(folder.parent / "config.yaml").sample
        accuracy[name] = evaluator.score(generate(pipe, per_class=20, sample=sample, seed=1))["accuracy"]
    n = 200
    error = math.sqrt(sum(p * (1 - p) / n for p in accuracy.values()))
    assert accuracy["teacher"] > 0.5, accuracy  # a teacher worth distilling
    assert accuracy["student"] >= accuracy["teacher"] - 3 * error, (accuracy, error)
