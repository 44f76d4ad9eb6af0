"""Exports open in plain diffusers (a subprocess where this package cannot be imported) and carry a model card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline

import pipeline.models.unet
import pipeline.pipeline_conditional
import pipeline.sampler_checks
from pipeline.config import DiffusionConfig, load_config
from pipeline.diffusion import make_sampler, make_train_scheduler
from pipeline.export import ExportError, local_imports, save_export, shipped_files, update_code
from pipeline.export import main as export_main
from pipeline.model_card import TrainingRecord, code_sentence, model_card_text, shipped_code
from pipeline.models.unet import ConditionalUNet
from pipeline.pipeline_conditional import PROJECT_UNET, ConditionalDiffusionPipeline
from pipeline.saving import stored_dtype
from tests.factories import tiny_unet
from tests.test_model_card import without_distill

# Loads an export with plain diffusers in a process where this package (and einops, which it once needed)
# cannot be imported, samples it and saves the images.
PLAIN_DIFFUSERS = """
import importlib.abc, sys

class Unavailable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("pipeline", "einops"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Unavailable())
try:
    import pipeline
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the project is importable")

import torch
from diffusers import DiffusionPipeline

def load(folder):
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe)
    assert type(pipe.unet).__module__.startswith("diffusers_modules."), type(pipe.unet)
    return pipe

def sample(pipe):
    labels = [1, "7"] if len(pipe.class_names) == 10 and pipe.class_names[7] == "7" else [1, 7]
    return pipe(class_labels=labels, guidance_scale=2.0, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images

folder, out, *copy = sys.argv[1:]
pipe = load(folder)
images = sample(pipe)
if copy:  # load -> save -> load -> sample: the saved copy samples the same
    pipe.save_pretrained(copy[0])
    again = sample(load(copy[0]))
    assert torch.equal(again, images), (again - images).abs().max()
torch.save(images, out)
"""


def project_samples(folder: Path) -> torch.Tensor:
    pipe = ConditionalDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=[1, "7"], guidance_scale=2.0, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images


def plain_diffusers(folder: Path, tmp_path: Path, *copy: Path) -> torch.Tensor:
    """The samples of ``folder`` loaded by plain diffusers in a subprocess (PLAIN_DIFFUSERS); with ``copy``, the script
    also saves the loaded pipeline there, loads that and checks it samples the same."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # the same thread count as this process: CPU kernels split their sums by thread, so bits match only then
    env |= {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    script = tmp_path / "load.py"
    script.write_text(PLAIN_DIFFUSERS)
    result = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "images.pt"), *map(str, copy)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Expected types" not in result.stderr  # diffusers' component type check passes
    return torch.load(tmp_path / "images.pt")


def test_export_opens_in_plain_diffusers_and_samples_the_same(tiny_run: Path, tmp_path: Path) -> None:
    folder = tiny_run / "pipeline"
    assert torch.equal(plain_diffusers(folder, tmp_path), project_samples(folder))


def test_a_distilled_student_opens_in_plain_diffusers_and_samples_the_same(tmp_path: Path) -> None:
    """Issue 26: a student (guidance embedding, LCMScheduler) is an ordinary export; plain diffusers samples it with the
    shipped code, the guidance scale an input of its one forward per step, as this package does."""
    teacher = tiny_unet()
    student = ConditionalUNet(**{**teacher.config, "guidance_embedding": True})
    student.load_state_dict(teacher.state_dict(), strict=False)
    with torch.no_grad():
        student.guidance_mlp[-1].weight.normal_(0.0, 0.05)  # trained, the scale matters
    folder = tmp_path / "student"
    scheduler = make_sampler("lcm", make_train_scheduler(DiffusionConfig()).config)
    save_export(ConditionalDiffusionPipeline(unet=student.eval(), scheduler=scheduler), folder)
    assert torch.equal(plain_diffusers(folder, tmp_path), project_samples(folder))


def test_a_copy_saved_by_plain_diffusers_opens_again_and_keeps_float16(tmp_path: Path) -> None:
    """Issue 25: ``from_pretrained(export, trust_remote_code=True).save_pretrained(out)`` wrote no code, named
    ``diffusers_modules.local.unet`` and stored the float16 weights as float32; ``out`` then failed to load."""
    export = Path(__file__).parents[1] / "data" / "pretrained" / "cifar10-cpu"
    copy = tmp_path / "copy"
    plain_diffusers(export, tmp_path, copy)  # load -> save -> load -> sample, identical samples (asserted in the script)
    index = json.loads((copy / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_conditional", "ConditionalDiffusionPipeline"] and index["unet"] == ["unet", "ConditionalUNet"]
    assert sorted(shipped_code(copy)) == sorted(shipped_code(export))
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert stored_dtype(copy / "unet") == stored_dtype(export / "unet") == torch.float16
    assert (copy / weights).stat().st_size == pytest.approx((export / weights).stat().st_size, rel=0.01)


def test_a_copy_saved_by_the_package_opens_in_plain_diffusers(tiny_run: Path, tmp_path: Path) -> None:
    """Saving from this package's class wrote ``pipeline.models.unet`` into model_index.json, which plain diffusers
    cannot import; now the copy is an export, in the dtype it was loaded in unless told otherwise."""
    folder = tiny_run / "pipeline"
    pipe = ConditionalDiffusionPipeline.from_pretrained(folder)
    pipe.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "unet" / "unet.py").read_bytes() == Path(pipeline.models.unet.__file__).read_bytes()
    assert torch.equal(plain_diffusers(tmp_path / "copy", tmp_path), project_samples(folder))
    pipe.save_pretrained(tmp_path / "half", weights_dtype=torch.float16)
    assert stored_dtype(tmp_path / "half" / "unet") == torch.float16 and pipe.unet.dtype == torch.float32
    assert stored_dtype(tmp_path / "copy" / "unet") == torch.float32


def test_push_to_hub_uploads_a_self_contained_folder(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As far as it can run offline: ``push_to_hub`` and ``save_pretrained(push_to_hub=True)`` go through diffusers'
    own code up to the upload; the hub calls (``create_repo``, the upload, the card's download) are replaced by
    recorders, and the folder each would upload opens in plain diffusers."""
    from diffusers.pipelines import pipeline_utils
    from diffusers.utils import hub_utils
    from huggingface_hub import ModelCard
    from huggingface_hub.hf_api import RepoUrl

    uploaded = []

    def upload(self: DiffusionPipeline, folder: str, repo_id: str, **kwargs: object) -> None:
        shutil.copytree(folder, tmp_path / f"upload{len(uploaded)}")
        uploaded.append(repo_id)

    def create_repo(repo_id: str, **kwargs: object) -> RepoUrl:
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def hub_card(*args: object, **kwargs: object) -> ModelCard:  # what the hub has for a new repository: no card
        return ModelCard("---\nlibrary_name: diffusers\n---\n")

    for module in (pipeline_utils, hub_utils):
        monkeypatch.setattr(module, "create_repo", create_repo)
        monkeypatch.setattr(module, "load_or_create_model_card", hub_card)
    monkeypatch.setattr(DiffusionPipeline, "_upload_folder", upload)
    pipe = ConditionalDiffusionPipeline.from_pretrained(tiny_run / "pipeline")
    pipe.push_to_hub("someone/digits")
    pipe.save_pretrained(str(tmp_path / "saved"), push_to_hub=True, repo_id="someone/digits-2")  # diffusers splits a str
    assert uploaded == ["someone/digits", "someone/digits-2"]
    for folder in (tmp_path / "upload0", tmp_path / "upload1"):
        assert torch.equal(plain_diffusers(folder, tmp_path), project_samples(tiny_run / "pipeline"))


def test_export_ships_the_project_modules_and_names_them(tiny_run: Path) -> None:
    folder = tiny_run / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_conditional", "ConditionalDiffusionPipeline"]
    assert index["unet"] == ["unet", "ConditionalUNet"]
    copies = {
        "pipeline_conditional.py": pipeline.pipeline_conditional,
        "sampler_checks.py": pipeline.sampler_checks,
        "unet/unet.py": pipeline.models.unet,
    }
    for relative, module in copies.items():
        assert (folder / relative).read_bytes() == Path(module.__file__).read_bytes(), relative
    # exactly the pipeline's module, the modules it imports and ONE copy of the U-Net's code, in unet/ for diffusers
    imported = {str(path) for path in local_imports(Path(pipeline.pipeline_conditional.__file__))}
    assert set(shipped_code(folder)) == {"pipeline_conditional.py", "unet/unet.py"} | imported
    assert not (folder / "models").exists()


def test_the_pipeline_module_names_the_project_unet_without_importing_it() -> None:
    """``load_config`` swaps in this package's U-Net by name, so the pipeline's module imports no U-Net module."""
    assert PROJECT_UNET == (ConditionalUNet.__module__, ConditionalUNet.__name__)
    assert not any("unet" in str(path) for path in local_imports(Path(pipeline.pipeline_conditional.__file__)))


def test_project_class_loads_an_export_with_its_own_code(tiny_run: Path) -> None:
    """No trust_remote_code: this package's classes, not the shipped copies; plain diffusers refuses without it."""
    pipe = ConditionalDiffusionPipeline.from_pretrained(tiny_run / "pipeline")
    assert type(pipe) is ConditionalDiffusionPipeline and type(pipe.unet) is ConditionalUNet
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tiny_run / "pipeline")


def test_model_card(tiny_run: Path) -> None:
    folder = tiny_run / "pipeline"
    card = (folder / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)
    assert metadata["library_name"] == "diffusers" and "pipeline_tag" not in metadata
    assert metadata["datasets"] == ["ylecun/mnist"] and metadata["license"] and "class-conditional" in metadata["tags"]
    assert (folder / "samples.png").stat().st_size > 0 and "![samples](samples.png)" in body
    assert 'DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)' in body
    assert "DPMSolverMultistepScheduler.from_config(pipe.scheduler.config" in body
    assert "Steps: 12 optimizer steps, 192 images seen (global batch 16)" in body
    config = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert config == without_distill(yaml.safe_load((tiny_run / "config.yaml").read_text()))  # no student: no distill section
    assert "Command: `" in body and "No in-training evaluation" in body
    assert code_sentence(shipped_code(folder)) in body.splitlines()  # the card names the code the folder ships


def test_model_card_names_a_guidance_schedule_and_its_snippet_runs(tmp_path: Path) -> None:
    pipe = ConditionalDiffusionPipeline(unet=tiny_unet(), scheduler=make_train_scheduler(DiffusionConfig()))
    pipe.set_progress_bar_config(disable=True)
    cfg = load_config(overrides={"train.max_steps": 1, "sample.num_inference_steps": 2, "sample.guidance_scale": 3.0})
    plain = model_card_text(pipe, TrainingRecord(config=cfg, step=0, images_seen=0, run_dir=tmp_path), {}, ["pipeline_conditional.py"])
    assert "guidance scale 3.0, seed 0." in plain and "ramp" not in plain.split("```yaml")[0]
    cfg.sample.guidance_interval, cfg.sample.guidance_ramp = (0.3, float("inf")), "increasing"
    card = model_card_text(pipe, TrainingRecord(config=cfg, step=0, images_seen=0, run_dir=tmp_path), {}, ["pipeline_conditional.py"])
    assert "guidance scale 3.0, increasing ramp, only at noise levels sigma in (0.3, inf], seed 0." in card
    (snippet,) = [line for line in card.splitlines() if line.startswith("images = pipe(")]
    assert 'guidance_interval=(0.3, float("inf")), guidance_ramp=\'increasing\'' in snippet
    namespace = {"pipe": pipe, "torch": torch}
    exec(snippet, namespace)  # the card's own call, as a reader would paste it
    assert len(namespace["images"]) == 8


def test_modules_that_plain_diffusers_cannot_import_are_refused(tmp_path: Path) -> None:
    module = tmp_path / "pipeline_x.py"
    module.write_text("import torch\nfrom pipeline.config import Config\n")
    with pytest.raises(ExportError, match=r"pipeline_x\.py imports pipeline\.config, which plain diffusers does not provide"):
        local_imports(module)
    module.write_text("from .helpers import f\n")
    (tmp_path / "helpers.py").write_text("from .more import g\n")
    with pytest.raises(ExportError, match=r"helpers\.py imports modules beside it"):
        shipped_files(module)
    module.write_text("from ..up import f\n")
    with pytest.raises(ExportError, match=r"relative import \.\.up cannot be shipped"):
        local_imports(module)


def test_export_without_a_training_record_has_code_and_no_card(tmp_path: Path) -> None:
    pipe = ConditionalDiffusionPipeline(unet=tiny_unet(), scheduler=make_train_scheduler(DiffusionConfig()))
    save_export(pipe, tmp_path)
    assert not (tmp_path / "README.md").exists() and (tmp_path / "unet" / "unet.py").is_file()
    loaded = ConditionalDiffusionPipeline.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in pipe.unet.state_dict().items())


def test_publish_a_half_precision_copy_with_its_measured_numbers(tiny_run: Path, tmp_path: Path) -> None:
    """``python -m pipeline.export RUN --out DIR --half --evaluation JSON``: what data/pretrained/ holds."""
    from safetensors import safe_open

    from pipeline.evaluation.__main__ import main as evaluation_main

    evaluation = tmp_path / "evaluation.json"
    assert evaluation_main(["evaluate", "--pipeline", str(tiny_run / "pipeline"), "--per-class", "1", "--steps", "2",
                            "--guidance", "1.5", "--guidance-interval", "0.3,inf", "--guidance-ramp", "increasing",
                            "--metrics", "accuracy", "--no-baselines", "--out", str(evaluation)]) == 0
    recorded = json.loads(evaluation.read_text())["sample"]
    assert recorded["guidance_interval"] == [0.3, float("inf")] and recorded["guidance_ramp"] == "increasing"
    out = tmp_path / "published"
    assert export_main([str(tiny_run), "--out", str(out), "--half", "--evaluation", str(evaluation), "--command", "python x.py"]) == 0
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as stored:
        assert {stored.get_slice(name).get_dtype() for name in stored.keys()} == {"F16"}
    pipe = ConditionalDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.dtype == torch.float32
    assert json.loads((out / "metrics.json").read_text()) == json.loads(evaluation.read_text())
    card = (out / "README.md").read_text()
    assert "## Measured" in card and "| model | 10 |" in card and "`python x.py`" in card
    assert (out / "config.yaml").is_file() and (tiny_run / "pipeline" / "model_index.json").is_file()  # the run is untouched
    # what was measured is what ships: the card, its grid and config.yaml sample as the evaluation did
    shipped = load_config(out / "config.yaml").sample
    assert (shipped.guidance_scale, shipped.num_inference_steps) == (1.5, 2) and "guidance scale 1.5" in card
    assert (shipped.guidance_interval, shipped.guidance_ramp) == ((0.3, float("inf")), "increasing")
    assert "increasing ramp, only at noise levels sigma in (0.3, inf]" in card.split("## Measured")[1]
    assert load_config(tiny_run / "config.yaml").sample.guidance_scale != 1.5
    assert export_main([str(tiny_run), "--half"]) == 2  # --half without --out would rewrite the run's own export


def test_publish_ships_a_figure_in_the_cards_evaluation_and_a_rewrite_keeps_it(tiny_run: Path, tmp_path: Path) -> None:
    """``--figure PNG`` (issue 22: the long run's card shows its curve): copied as curve.png and shown after the
    evaluation; ``--rewrite-card`` keeps it; a file that is no PNG is one line and exit 2, nothing written."""
    from pipeline import figures

    picture = figures.loss_curves({"tiny": tiny_run}, tmp_path / "loss.png")
    out = tmp_path / "published"
    assert export_main([str(tiny_run), "--out", str(out), "--figure", str(picture)]) == 0
    assert (out / "curve.png").read_bytes() == picture.read_bytes()
    card = (out / "README.md").read_text()
    evaluation = card.split("## Evaluation")[1].split("## License")[0]
    assert "![quality against training time and images seen](curve.png)" in evaluation
    assert export_main(["--rewrite-card", str(out)]) == 0
    assert (out / "README.md").read_text() == card
    (tmp_path / "notes.txt").write_text("not a picture")
    assert export_main([str(tiny_run), "--out", str(tmp_path / "other"), "--figure", str(tmp_path / "notes.txt")]) == 2
    assert not (tmp_path / "other").exists()
    assert export_main([str(tiny_run), "--figure", str(picture)]) == 2  # only a published copy takes one


def test_update_code_replaces_only_the_code_of_an_older_export(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m pipeline.export --update-code DIR`` (how data/pretrained/ gets new code): this checkout's code, a
    stale module dropped, the card's list of files rewritten; weights, configs, grid, metrics and the rest of the card
    byte for byte; the new folder flushed to disk before it is swapped in."""
    folder = tmp_path / "published"
    shutil.copytree(tiny_run / "pipeline", folder)
    old_list = code_sentence(["pipeline_conditional.py", "sampler_checks.py", "models/unet.py", "unet/unet.py"])
    card = (folder / "README.md").read_text()
    older_card = card.replace(code_sentence(shipped_code(folder)), old_list)
    assert older_card != card
    (folder / "README.md").write_text(older_card)
    (folder / "models").mkdir()
    (folder / "models" / "unet.py").write_text("# an older copy of the U-Net\n")
    (folder / "pipeline_conditional.py").write_text("# an older pipeline\n")
    (folder / "metrics.json").write_text('{"rows": []}\n')
    kept = {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*")
            if path.is_file() and path.suffix != ".py" and path.name != "README.md"}
    synced, fsync = [], os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert export_main(["--update-code", str(folder)]) == 0
    assert str(tmp_path / ".tmp-published" / "unet" / "diffusion_pytorch_model.safetensors") in synced
    assert {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*")
            if path.is_file() and path.suffix != ".py" and path.name != "README.md"} == kept
    fresh = tmp_path / "fresh"
    save_export(ConditionalDiffusionPipeline.from_pretrained(tiny_run / "pipeline"), fresh)
    assert {name: (folder / name).read_bytes() for name in shipped_code(folder)} == {name: (fresh / name).read_bytes()
                                                                                      for name in shipped_code(fresh)}
    assert not (folder / "models").exists() and not list(tmp_path.glob(".tmp-*"))
    assert (folder / "README.md").read_text() == card  # the card as the current export writes it
    ConditionalDiffusionPipeline.from_pretrained(folder)

    assert export_main(["--update-code", str(folder), "--half"]) == 2  # it keeps the weights as they are
    assert export_main(["--update-code", str(tmp_path / "nothing")]) == 2
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # weights the code cannot open: the folder stays
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    with pytest.raises(OSError):
        update_code(folder)
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    assert not list(tmp_path.glob(".tmp-*"))


def test_export_out_refuses_a_directory_that_is_not_an_export(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--out DIR`` where DIR holds the user's files: exit 2, one line naming DIR and the fix, DIR as it was (the old
    code replaced DIR with the export, exit 0). Nothing, an empty directory or an export there may be replaced."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    assert export_main([str(tiny_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err
    assert line.startswith(f"error: {out} exists and is not an export (no model_index.json)"), line
    assert "give --out a new or empty directory" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes\n"
    assert not list(tmp_path.glob(".tmp-*"))
    (tmp_path / "a-file").write_text("mine too\n")
    assert export_main([str(tiny_run), "--out", str(tmp_path / "a-file")]) == 2
    assert (tmp_path / "a-file").read_text() == "mine too\n"
    from pipeline.atomic import replace_problem

    (tmp_path / "empty").mkdir()
    assert replace_problem(tmp_path / "empty") is None and replace_problem(tmp_path / "absent") is None
    exported = tmp_path / "exported"
    shutil.copytree(tiny_run / "pipeline", exported)
    (exported / "training.json").unlink()
    assert export_main([str(tiny_run), "--out", str(exported)]) == 0  # an export: replaced
    assert json.loads((exported / "training.json").read_text()).items() >= {"step": 12, "images_seen": 192}.items()


@pytest.mark.parametrize("error", [ValueError("a bug in the export"), ExportError("unet.py imports einops")], ids=["bug", "export-error"])
def test_the_export_cli_lets_errors_that_are_not_bad_input_through(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     error: Exception) -> None:
    """Only ConfigError is "bad input" (one line, exit 2); a ValueError from a bug, or an ExportError (this checkout's
    code cannot be shipped: a fault of the code, not of the command), keeps its traceback (the old code turned every
    ValueError into exit 2)."""
    import pipeline.export

    def fails(*args: object) -> None:
        raise error

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr(pipeline.export, "export_pipeline", fails)
    with pytest.raises(type(error), match=str(error)):
        export_main([str(run)])
    assert export_main([str(tmp_path / "no-run")]) == 2  # bad input is still one line, exit 2
    assert export_main([str(run), "--out", str(tmp_path / "out"), "--evaluation", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "out").exists()
