"""Figures (PNG, non-empty, from a tiny trained run or the schedules alone) and the study runner."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml

from pipeline import figures
from pipeline.config import SampleConfig, load_config
from pipeline.errors import ConfigError
from pipeline.names import PROJECT_ROOT
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.study import report, runner, sets, statistics
from pipeline.study.__main__ import main as study_main
from tests.conftest import TINY_MODEL
from tests.test_evaluation import private_cache  # noqa: F401  (the evaluation tests' autouse cache fixture)

FAST = SampleConfig(sampler="dpmsolver++", num_inference_steps=3, guidance_scale=2.0)


def assert_picture(path: Path, min_size: tuple[int, int] = (200, 150)) -> None:
    """A PNG of at least ``min_size`` pixels that is not one flat colour."""
    assert path.is_file() and path.stat().st_size > 5_000
    image = np.asarray(PIL.Image.open(path).convert("L"))
    assert image.shape[1] >= min_size[0] and image.shape[0] >= min_size[1]
    assert image.std() > 10


@pytest.fixture(scope="module")
def pipe(tiny_run: Path) -> ConditionalDiffusionPipeline:
    return ConditionalDiffusionPipeline.from_pretrained(str(tiny_run / "pipeline"))


def test_forward_noising_from_the_schedules_alone(tmp_path: Path, mnist_path: Path) -> None:
    assert figures.main(["forward", "--dataset", str(mnist_path), "--out", str(tmp_path / "forward.png")]) == 0
    assert_picture(tmp_path / "forward.png", (800, 300))


@pytest.mark.parametrize(("flags", "message"), [(["--guidance-interval", "5,0.3"], r"guidance_interval \(lo, hi\) needs 0 <= lo < hi"),
                                                (["--steps", "0"], r"num_inference_steps must be >= 1, got 0"),
                                                (["--sampler", "dpm"], r"sampler: 'dpm' is not allowed")])
def test_a_bad_sampling_flag_is_refused_before_the_pipeline_loads(flags: list[str], message: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Decoded by ``pipeline.sample_flags`` as ``evaluate`` decodes them; the pipeline folder is never opened."""
    with pytest.raises(SystemExit) as exit_:
        figures.main(["grid", "--pipeline", str(tmp_path / "absent"), "--out", str(tmp_path / "grid.png"), *flags])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err.splitlines()[-1])


def test_sampling_figures(pipe: ConditionalDiffusionPipeline, tmp_path: Path) -> None:
    assert_picture(figures.reverse_process(pipe, tmp_path / "reverse.png", FAST, columns=3))
    assert_picture(figures.class_grid(pipe, tmp_path / "grid.png", per_class=3, sample=FAST))
    assert_picture(figures.guidance_sweep(pipe, tmp_path / "guidance.png", scales=(1.0, 3.0), per_class=2, sample=FAST))


def test_loss_curve_from_tensorboard(tiny_run: Path, tmp_path: Path) -> None:  # noqa: F811
    steps, values = figures.read_scalars(tiny_run, "train/loss")
    assert steps == [2, 4, 6, 8, 10, 12] and all(v > 0 for v in values)
    assert figures.main(["loss", "--run", str(tiny_run), "--out", str(tmp_path / "loss.png")]) == 0
    assert_picture(tmp_path / "loss.png")
    with pytest.raises(ValueError, match="no 'train/loss' scalars"):
        figures.loss_curves({"empty": tmp_path}, tmp_path / "none.png")


def test_time_to_fid_draws_the_committed_points(tmp_path: Path) -> None:
    """Issue 22's figure: FID against minutes and images seen, one line per run, from docs/cifar10-cpu/time-to-fid.csv
    (any extra columns are for the reader); a file without the columns is one line, exit 2."""
    points = PROJECT_ROOT / "docs" / "cifar10-cpu" / "time-to-fid.csv"
    assert figures.main(["time-to-fid", "--points", str(points), "--out", str(tmp_path / "ttf.png")]) == 0
    assert_picture(tmp_path / "ttf.png")
    (tmp_path / "bad.csv").write_text("run,minutes,fid\nv1,80,66.7\n")
    with pytest.raises(ValueError, match=r"bad.csv: needs a header with the columns run, minutes, images, fid .*missing: images"):
        figures.time_to_fid(tmp_path / "bad.csv", tmp_path / "bad.png")
    assert figures.main(["time-to-fid", "--points", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "bad.png")]) == 2
    with pytest.raises(SystemExit):  # argparse: time-to-fid needs --points
        figures.main(["time-to-fid", "--out", str(tmp_path / "none.png")])


@pytest.mark.parametrize("name", ["mnist", "cifar10-cpu", "cifar10", "datasets"])
def test_every_set_builds_valid_configs(name: str, tmp_path: Path) -> None:
    study_set = sets.load_set(name)
    for run in study_set.runs:
        cfg = runner.run_config(study_set, run, seed=3, runs_dir=tmp_path)
        assert cfg.train.max_steps == study_set.budget.steps and cfg.train.seed == 3
        assert cfg.train.output_dir == str(tmp_path / f"{run}-s3")


def test_overlays_change_one_thing() -> None:
    mnist = sets.load_set("mnist")
    base = runner.run_config(mnist, "baseline", 0, Path("r")).to_dict()
    for run, (section, key, value) in {
        "cosine": ("diffusion", "schedule", "cosine"),
        "cond-scale-shift": ("model", "conditioning", "scale_shift"),
        "after-norm": ("model", "embed_after_norm", True),
        "no-attention": ("model", "attention_resolutions", ()),
        "epsilon": ("diffusion", "prediction_type", "epsilon"),
        "learned-variance": ("model", "learned_variance", True),
        "translate": ("data", "translate", 2),
    }.items():
        changed = runner.run_config(mnist, run, 0, Path("r")).to_dict()
        assert changed[section][key] == value != base[section][key]
        differing = {(s, k) for s in base for k in base[s] if base[s][k] != changed[s][k] and k != "output_dir"}
        assert differing == {(section, key)}
    assert runner.run_config(sets.load_set("cifar10"), "wide", 0, Path("r")).model.base_channels == 128  # inline overlay


@pytest.mark.parametrize(("overlay", "key", "value"),
                         [("translate", "translate", 2), ("cutout", "cutout", 14), ("flip", "random_flip", True)])
def test_augmentation_overlays_change_one_data_key(overlay: str, key: str, value: object) -> None:
    base_config = PROJECT_ROOT / "configs" / "experiments" / "mnist-cpu-base.yaml"
    base = load_config(base_config).to_dict()
    changed = load_config(base_config, sets.load_overlay(overlay, "test")).to_dict()
    assert changed["data"][key] == value != base["data"][key]
    assert {(s, k) for s in base for k in base[s] if base[s][k] != changed[s][k]} == {("data", key)}


def test_bad_sets_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known sets: .*mnist"):
        sets.load_set("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "configs/experiments/mnist-cpu-base.yaml", "runs": {"x": ["cosine", "cosin"]}}))
    with pytest.raises(ConfigError, match="overlay 'cosin' not found; known: .*cosine"):
        sets.load_set(str(bad))


def test_sets_load_and_bad_sets_are_refused_without_torch() -> None:
    """Set files are decoded torch-free, so ``python -m pipeline.study`` refuses a bad set or flag before loading the
    trainer."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.study.__main__ import main; from pipeline.study.sets import load_set; load_set('mnist'); "
            "status = main(['--set', 'nope']); print(status, [m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout == "2 []\n"
    assert done.stderr == "error: study set 'nope' not found; known sets: cifar10, cifar10-cpu, cifar10-v2-pilots, datasets, mnist\n"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"evaluate": {"per_clas": 5}}, r"unknown config key 'evaluate.per_clas'; did you mean evaluate.per_class"),
        ({"evaluate": {"metrics": ["acuracy"]}}, r"evaluate.metrics: 'acuracy' is not allowed; did you mean accuracy"),
        ({"evaluate": {"ref_samples": "some"}}, r"evaluate.ref_samples: expected int, got 'some'"),
        ({"budget": {"step": 5}}, r"unknown config key 'budget.step'; did you mean budget.steps"),
        ({"sweeps": {"g": {"runs": ["x"], "sample": {"guidance_scale": [1, "a"]}}}}, r"sweeps.g.sample: guidance_scale: expected float"),
        ({"sweeps": {"g": {"runs": ["y"], "sample": {"guidance_scale": [1]}}}}, r"sweeps.g.runs: y not among the runs x"),
        ({"sweeps": {"g": {"runs": ["x"], "sample": {"guidance_scal": [1]}}}}, r"key 'guidance_scal'; did you mean guidance_scale"),
        ({"sweeps": {"g": {"runs": ["x"], "sample": {"guidance_scale": 3}}}}, r"sweeps.g.sample: give each sampling key a non-empty list"),
        ({"sweeps": {"g": {"runs": ["x"], "sample": {"guidance_scale": [1]}, "reference": "y"}}},
         r"sweeps.g.reference: y is not one of the sweep's runs, .*; add it to the sweep's runs"),
        ({"sweeps": {"g": {"runs": ["x"], "sample": {"guidance_scale": [1]}, "reference": "x", "against": {"guidance_scale": 3}}}},
         r"sweeps.g: give `against` .* or `reference` .*, not both"),
        ({"seed": [0]}, r"unknown config key 'seed'; did you mean seeds"),
    ],
)
def test_set_sections_are_typed(tmp_path: Path, section: dict, message: str) -> None:
    cifar10, mnist = sets.load_set("cifar10"), sets.load_set("mnist")
    assert cifar10.evaluate.ref_samples == "all" and cifar10.evaluate.metrics == ("accuracy", "cfid", "fid", "is")
    assert mnist.evaluate.mixed_precision == "bf16" and mnist.seeds == [0, 1, 2] and mnist.evaluate.per_class == 100
    assert mnist.sweeps["guidance"].sample == {"guidance_scale": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "configs/experiments/mnist-cpu-base.yaml", "runs": {"x": []}, **section}))
    with pytest.raises(ConfigError, match=message):
        sets.load_set(str(bad))


def test_study_end_to_end(tmp_path: Path, mnist_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One command: train a tiny run on two seeds for 4 steps, evaluate it at its own settings and two sweeps', write
    the table and figures; a second command resumes without evaluating again, and re-evaluates only what is missing."""
    tiny = dict(zip([k[len("--model."):] for k in TINY_MODEL[::2]], TINY_MODEL[1::2], strict=True))
    spec = {
        "base": "configs/experiments/mnist-cpu-base.yaml",
        "overrides": {"model": tiny, "data": {"dataset": str(mnist_path), "max_samples": 256}},
        "budget": {"steps": 4},
        "seeds": [0, 1],
        "evaluate": {"per_class": 2, "metrics": ["accuracy", "cfid"], "ref_samples": 50},
        "sweeps": {
            "guidance": {"runs": ["baseline"], "sample": {"guidance_scale": [1, 3.0]}},
            "steps": {"runs": ["baseline"], "sample": {"num_inference_steps": [1]}, "against": {"num_inference_steps": 2}},
        },
        "runs": {  # an inline overlay, then a named one
            "baseline": [{"train": {"log_every": 2, "warmup_steps": 1}, "sample": {"num_inference_steps": 2}}, "cosine"],
        },
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    out, runs_dir = tmp_path / "out", tmp_path / "runs"
    argv = ["--set", str(tmp_path / "tiny.yaml"), "--out", str(out), "--runs-dir", str(runs_dir)]
    assert study_main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["launcher"] == "python"  # the default launcher, without this machine's interpreter path
    runs = [(row["run"], row.get("seed"), row.get("variant")) for row in result["rows"]]
    per_seed = ["s=3", "s=1", "dpmsolver++ 1 steps, s=3"]  # its own setting first, then the sweeps' (s=3 only once)
    assert runs == [*[("baseline", seed, v) for seed in (0, 1) for v in per_seed], ("pure noise", None, None),
                    ("real test set", None, None)]
    model_rows = [row for row in result["rows"] if "seed" in row]
    assert all(row["final_loss"] > 0 and row["train_s"] > 0 and 0 <= row["accuracy"] <= 1 for row in model_rows)
    assert [row["sweeps"] for row in model_rows[:3]] == [["guidance"], ["guidance"], ["steps"]]
    table = (out / "results.md").read_text()
    assert "Budget: 4 steps per run; seeds [0, 1]" in table and "| baseline | s=3 | 2 |" in table
    assert result["work_s"] >= sum(row["wall_s"] for row in result["rows"]) > 0 and "of training and scoring in all" in table
    assert "## Sweep `steps`: num_inference_steps [1]; Δ against the same run with num_inference_steps 2" in table
    assert yaml.safe_load((runs_dir / "baseline-s0" / "config.yaml").read_text())["diffusion"]["schedule"] == "cosine"
    for name in ("loss", "samples-baseline", "guidance-guidance", "tradeoff", "reverse", "forward"):
        assert_picture(out / f"{name}.png")

    # Resuming reads every evaluation back; a missing one, and only it, is evaluated again.
    evaluations = sorted((runs_dir / "baseline-s1" / runner.EVALUATIONS).glob("*.json"))
    assert len(evaluations) == 3
    data_rows = list((runs_dir / runner.EVALUATIONS).glob("*.json"))  # pure noise and real images: scored once
    assert len(data_rows) == 1
    written = {path: path.stat().st_mtime_ns for path in [*evaluations, *data_rows]}
    evaluations[0].unlink()
    assert study_main([*argv, "--report-only"]) == 0
    assert [path.stat().st_mtime_ns == when for path, when in written.items()] == [False, True, True, True]
    again = json.loads((out / "results.json").read_text())
    assert [row.get("accuracy") for row in again["rows"][:6]] == [row.get("accuracy") for row in result["rows"][:6]]

    # A report while a seed is not trained yet tabulates the rest and says what it left out.
    (runs_dir / "baseline-s1" / "study-run.json").unlink()
    assert study_main([*argv, "--report-only"]) == 0
    assert "baseline-s1: not trained yet, left out of the report" in capsys.readouterr().out
    assert {row.get("seed") for row in json.loads((out / "results.json").read_text())["rows"]} == {0, None}


@pytest.mark.slow
def test_study_continues_a_run_cut_off_mid_training(tmp_path: Path, mnist_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A study killed mid-run (a session's end) continues that run from its latest checkpoint when started again,
    instead of refusing the directory or training from step 0, and counts both starts' training time."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.checkpointing import checkpoint_step, list_checkpoints

    tiny = dict(zip([k[len("--model."):] for k in TINY_MODEL[::2]], TINY_MODEL[1::2], strict=True))
    spec = {
        "base": "configs/experiments/mnist-cpu-base.yaml",
        "overrides": {"model": tiny, "data": {"dataset": str(mnist_path), "max_samples": 256},
                      "train": {"batch_size": 16, "checkpoint_every": 4, "keep_checkpoints": 2, "log_every": 2}},
        "budget": {"steps": 40},
        "evaluate": {"per_class": 1, "metrics": ["accuracy"], "ref_samples": 50},
        "runs": {"baseline": [{"sample": {"num_inference_steps": 2}}]},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "runs" / "baseline-s0"
    argv = ["--set", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    first = subprocess.Popen([sys.executable, "-m", "pipeline.study", *argv], cwd=PROJECT_ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list_checkpoints(run_dir) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # the study and its training subprocess, as a session's end does
    first.wait()
    assert list_checkpoints(run_dir) and not (run_dir / "pipeline").exists(), "the first start was not cut off mid-run"
    cut_at = checkpoint_step(list_checkpoints(run_dir)[-1])

    assert study_main(argv) == 0
    assert f"resumed from {list_checkpoints(run_dir)[0].parent}" in capfd.readouterr().out
    record = json.loads((run_dir / "study-run.json").read_text())
    assert record["starts"] == 2 and record["train_s"] > 0 and not (run_dir / runner.STUDY_PROGRESS).exists()
    assert json.loads((run_dir / "status.json").read_text()) == {"status": "finished", "step": 40}
    starts = sorted(p.name for p in (run_dir / "configs").glob("start-*.yaml"))
    assert starts == ["start-001-step_00000000.yaml", f"start-002-step_{cut_at:08d}.yaml"]


def test_report_only_leaves_out_a_run_trained_with_another_config_and_scores_replaced_weights_again(
        tmp_path: Path, tiny_run: Path, mnist_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--report-only`` on a set that now says base width 64: the seed recorded at 16 is left out, naming the key, in
    the report and on stderr (the old code reported it under the set's 64). A cached evaluation is keyed on the
    SHA-256 of the U-Net's and the classifier's weights, so weights replaced behind the study's back are scored again
    (the old key was the settings alone)."""
    import shutil

    from safetensors.torch import load_file, save_file

    tiny = dict(zip([k[len("--model."):] for k in TINY_MODEL[::2]], TINY_MODEL[1::2], strict=True))
    spec = {"base": "configs/experiments/mnist-cpu-base.yaml",
            "overrides": {"model": {**tiny, "base_channels": 64}, "data": {"dataset": str(mnist_path), "max_samples": 256}},
            "budget": {"steps": 4}, "seeds": [0, 1], "evaluate": {"per_class": 1, "metrics": ["accuracy"], "ref_samples": 50},
            "runs": {"baseline": [{"sample": {"num_inference_steps": 2}}]}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    out, runs_dir = tmp_path / "out", tmp_path / "runs"
    study_set = sets.load_set(str(tmp_path / "tiny.yaml"))
    for seed, width in ((0, 64), (1, 16)):  # trained runs (the tiny run's outputs), recorded at these widths
        cfg = runner.run_config(study_set, "baseline", seed, runs_dir)
        recorded = json.loads(json.dumps(cfg.to_dict()))
        recorded["model"]["base_channels"] = width
        shutil.copytree(tiny_run, cfg.train.output_dir)
        (Path(cfg.train.output_dir) / "study-run.json").write_text(json.dumps({"config": recorded, "train_s": 3.0, "exit": 0}))
    argv = ["--set", str(tmp_path / "tiny.yaml"), "--out", str(out), "--runs-dir", str(runs_dir), "--report-only"]
    monkeypatch.setattr(runner, "draw_figures", lambda *args: None)  # test_study_end_to_end draws them
    assert study_main(argv) == 0
    reason = "trained with another config than the set's (model.base_channels: trained with 16, the set now says 64)"
    assert f"baseline-s1: {reason}; left out of the report" in capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    assert {row.get("seed") for row in result["rows"]} == {0, None} and result["left_out"] == {"baseline-s1": reason}
    assert f"- `baseline-s1`: {reason}" in (out / "results.md").read_text()

    [evaluation] = (runs_dir / "baseline-s0" / runner.EVALUATIONS).glob("*.json")
    key = json.loads(evaluation.read_text())["key"]
    unet = runs_dir / "baseline-s0" / "pipeline" / "unet"
    assert key["unet_sha256"] == runner.files_digest(unet) and key["classifier_sha256"] == runner.files_digest(
        PROJECT_ROOT / "data" / "classifiers" / "mnist")
    [weights] = unet.glob("*.safetensors")
    save_file({name: t + 0.01 if t.is_floating_point() else t for name, t in load_file(weights).items()}, weights)  # same settings
    assert study_main(argv) == 0
    assert len(list((runs_dir / "baseline-s0" / runner.EVALUATIONS).glob("*.json"))) == 2  # scored again, not read back


def test_a_run_recorded_before_a_config_key_existed_counts_as_trained(tmp_path: Path) -> None:
    """A key added to the config since a run was recorded reads as its default, so the run is not trained again;
    a recorded config that differs in a value is another run, and is trained (here: the launcher ``false`` fails)."""
    cfg = runner.run_config(sets.load_set("mnist"), "baseline", 0, tmp_path)
    out = Path(cfg.train.output_dir)
    (out / "pipeline").mkdir(parents=True)
    recorded = json.loads(json.dumps(cfg.to_dict()))
    del recorded["model"]["embed_after_norm"]
    (out / "study-run.json").write_text(json.dumps({"config": recorded, "train_s": 12.5, "exit": 0}))
    assert runner.train_run(cfg, launcher="false") == 12.5
    recorded["model"]["base_channels"] = 99
    (out / "study-run.json").write_text(json.dumps({"config": recorded, "train_s": 12.5, "exit": 0}))
    with pytest.raises(RuntimeError, match="failed with exit status 1"):
        runner.train_run(cfg, launcher="false")


def test_a_training_that_refuses_its_config_is_bad_input_and_any_other_failure_a_crash(tmp_path: Path) -> None:
    """The trainer's exit 2 (bad input, which it has explained in one line) ends the study with one line, exit 2;
    any other failure (3: diverged, 1: a crash) keeps its traceback. The old code made both a RuntimeError."""
    cfg = runner.run_config(sets.load_set("mnist"), "baseline", 0, tmp_path)
    with pytest.raises(ConfigError, match=r"^training .*baseline-s0 refused its config \(exit status 2, the error above\)"):
        runner.train_run(cfg, launcher="sh -c 'exit 2' sh")
    with pytest.raises(RuntimeError, match="failed with exit status 3") as failed:
        runner.train_run(cfg, launcher="sh -c 'exit 3' sh")
    assert not isinstance(failed.value, ConfigError)


def test_aggregate_means_deviations_and_marked_differences() -> None:
    """Three seeds of a baseline and a run, and a sweep of the baseline against its own setting: the means, standard
    deviations, Welch and paired standard errors, and which differences the report marks as beyond two errors."""
    own = {"guidance_scale": 3.0}
    low = {"guidance_scale": 1.0}
    rows = [{"run": "baseline", "seed": s, "variant": "s=3", "sample": own, "sweeps": [], "accuracy": a} for s, a in
            enumerate([0.90, 0.92, 0.94])]
    rows += [{"run": "other", "seed": s, "variant": "s=3", "sample": own, "sweeps": [], "accuracy": a} for s, a in
             enumerate([0.80, 0.81, 0.82])]
    rows += [{"run": "baseline", "seed": s, "variant": "s=1", "sample": low, "sweeps": ["low"], "accuracy": a} for s, a in
             enumerate([0.89, 0.93, 0.93])]
    result = {"baseline": "baseline", "sweeps": {"low": {"runs": ["baseline"], "sample": {"guidance_scale": [1.0]},
                                                        "against": {"guidance_scale": 3.0}}}, "rows": rows}
    baseline, other, swept = statistics.aggregate(result)
    assert baseline["accuracy"] == pytest.approx((0.92, 0.02)) and "delta_accuracy" not in baseline
    difference, error = other["delta_accuracy"]  # Welch: sqrt(0.01^2/3 + 0.02^2/3)
    assert difference == pytest.approx(-0.11) and error == pytest.approx(np.sqrt((0.01**2 + 0.02**2) / 3))
    difference, error = swept["delta_accuracy"]  # paired over seeds: differences -0.01, +0.01, -0.01
    assert difference == pytest.approx(-0.01 / 3) and error == pytest.approx(np.std([-0.01, 0.01, -0.01], ddof=1) / np.sqrt(3))
    assert swept["reference"] == "baseline (s=3)" and other["reference"] == "baseline (s=3)"
    assert report._delta(other["delta_accuracy"]).startswith("**-0.110") and not report._delta(swept["delta_accuracy"]).startswith("**")


def test_a_sweep_compares_its_runs_with_its_reference_run() -> None:
    """A sweep with ``reference: b`` (e.g. learned against fixed variance on another base than the set's first run):
    its rows are compared with run b sampled the same way, between runs (Welch), and b's own rows with nothing."""
    ddpm = {"sampler": "ddpm"}
    rows = [{"run": run, "seed": s, "variant": "ddpm", "sample": ddpm, "sweeps": ["steps"], "accuracy": a}
            for run, values in (("b", [0.90, 0.92, 0.94]), ("c", [0.80, 0.81, 0.82])) for s, a in enumerate(values)]
    rows += [{"run": "a", "seed": s, "variant": "ddpm", "sample": ddpm, "sweeps": ["other"], "accuracy": 0.5} for s in range(3)]
    result = {"baseline": "a", "sweeps": {"steps": {"runs": ["b", "c"], "sample": {"sampler": ["ddpm"]}, "against": {},
                                                    "reference": "b"},
                                          "other": {"runs": ["a"], "sample": {"sampler": ["ddpm"]}, "against": {}}}, "rows": rows}
    b, c, a = statistics.aggregate(result)
    assert "delta_accuracy" not in b and "reference" not in b
    assert c["reference"] == "b (ddpm)"
    difference, error = c["delta_accuracy"]
    assert difference == pytest.approx(-0.11) and error == pytest.approx(np.sqrt((0.01**2 + 0.02**2) / 3))
    header = {"set": "s", "budget": {}, "seeds": [0, 1, 2], "evaluate": dataclasses.asdict(sets.Evaluation()), "hardware": "cpu",
              "work_s": 0.0}
    assert "## Sweep `steps`: sampler ['ddpm']; Δ against `b` sampled the same way" in report.markdown_report({**result, **header})


def test_the_report_states_its_uncertainty_for_its_own_seed_count() -> None:
    """A one-seed set (cifar10-cpu) has no standard deviations; its report must not describe three seeds' errors."""
    rows = [{"run": run, "seed": 0, "variant": "s=3", "sample": {"guidance_scale": 3.0}, "sweeps": [], "accuracy": a,
             "train_s": 1.0} for run, a in (("a", 0.5), ("b", 0.6))]
    result = {"set": "s", "budget": {}, "evaluate": dataclasses.asdict(sets.Evaluation()), "hardware": "cpu", "work_s": 0.0,
              "baseline": "a", "sweeps": {}, "rows": rows}
    one = report.markdown_report({**result, "seeds": [0]})
    assert "One seed: each cell is a single measurement" in one and "With 3 seeds" not in one and "**" not in one
    assert "With 3 seeds, two standard errors is a screen, not a test at 95 % (that needs ~4.3 SE)." in report.markdown_report(
        {**result, "seeds": [0, 1, 2]})
