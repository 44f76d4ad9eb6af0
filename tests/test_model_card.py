"""The model card shows what it did not write as written (issue 24: class names went raw into its Markdown, so a data
set's class names could add headings, HTML and links to the card): class names, the data set and the command.

And it reproduces its numbers (issue 25): valid hub metadata with the data set's hub id and no wrong task, the
licenses of weights and data, the chunk command of a chunked run with the config it was launched with, N and the
reference set of every table, and the exact ``evaluate`` command of the measured one."""

from __future__ import annotations

import html
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import DiffusionConfig, SampleConfig, load_config
from pipeline.diffusion import make_train_scheduler
from pipeline.export import main as export_main
from pipeline.model_card import LICENSE, TrainingRecord, evaluation_command, in_training_reference, launched, model_card_text
from pipeline.names import HUB_DATASETS, PROJECT_ROOT
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from pipeline.run_dir import save_start_config
from tests.factories import tiny_unet

markdown_it = pytest.importorskip("markdown_it")  # a CommonMark renderer (Gradio's dependency), as the hub renders a card

HOSTILE_NAMES = ["<script>alert(1)</script>", "[click](https://evil.example)", "x\n# Injected heading", "**bold** _it_ ~~gone~~",
                 "![pixel](https://evil.example/p.png)", "a | b", "&amp; &#x27;", "`code`", "T-shirt/top", "ok"]
HOSTILE_DATASET = "evil\n---\n<b>bold</b> ```[x](https://evil.example)"
HOSTILE_COMMAND = "python pipeline/train.py --data.dataset '``` <img src=x onerror=alert(1)>'"


def without_distill(sections: dict) -> dict:
    """A config's sections as a card of a model that is no distilled student shows them: less ``distill``."""
    return {name: keys for name, keys in sections.items() if name != "distill"}


def test_class_names_data_set_and_command_cannot_inject_markdown_or_html(tmp_path: Path) -> None:
    pipe = ConditionalDiffusionPipeline(unet=tiny_unet(class_names=HOSTILE_NAMES), scheduler=make_train_scheduler(DiffusionConfig()))
    cfg = load_config(overrides={"data.dataset": HOSTILE_DATASET, "train.max_steps": 1})
    record = TrainingRecord(config=cfg, step=0, images_seen=0, run_dir=tmp_path, command=HOSTILE_COMMAND)
    card = model_card_text(pipe, record, {}, ["pipeline_conditional.py"])
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front)["datasets"] == [HOSTILE_DATASET]  # every value on one line: the front matter ends where it should

    renderer = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])
    rendered = renderer.render(body)
    for tag in ("<script", "<a ", "<strong>", "<em>", "<del>", "<b>", "<table>", "<h3>"):
        assert tag not in rendered, tag
    assert re.findall("<img [^>]*>", rendered) == ['<img src="samples.png" alt="samples" />']
    assert re.findall("<h[1-6]>", rendered) == ["<h1>", "<h2>", "<h2>", "<h2>", "<h2>"]  # use, training, evaluation, license
    (heading,) = re.findall("<h1>(.*)</h1>", rendered)
    assert html.unescape(heading) == f"Class-conditional DDPM on {' '.join(HOSTILE_DATASET.split())}"
    (description,) = [line for line in rendered.splitlines() if line.startswith("<p>A class-conditional")]
    assert html.unescape(description).endswith(f"classes: {', '.join(' '.join(name.split()) for name in HOSTILE_NAMES)}.</p>")

    tokens = renderer.parse(body)
    fences = [token for token in tokens if token.type == "fence"]
    assert [fence.info for fence in fences] == ["python", "yaml"]
    assert "class_labels=['<script>alert(1)</script>', '[click](https://evil.example)']" in fences[0].content
    assert yaml.safe_load(fences[1].content) == without_distill(yaml.safe_load(cfg.to_yaml()))
    spans = [child.content for token in tokens if token.type == "inline" for child in token.children if child.type == "code_inline"]
    assert HOSTILE_COMMAND in spans and " ".join(HOSTILE_DATASET.split("\n")) in spans


CIFAR10 = HUB_DATASETS["cifar10"]


def card_parts(card: str) -> tuple[dict, str]:
    """(the YAML front matter as the hub reads it, the Markdown body)."""
    _, front, body = card.split("---\n", 2)
    return yaml.safe_load(front), body


def card_for(class_names: list[str], tmp_path: Path, **overrides: object) -> str:
    pipe = ConditionalDiffusionPipeline(unet=tiny_unet(class_names=class_names), scheduler=make_train_scheduler(DiffusionConfig()))
    cfg = load_config(overrides={"train.max_steps": 1, **overrides})
    return model_card_text(pipe, TrainingRecord(config=cfg, step=0, images_seen=0, run_dir=tmp_path), {}, ["pipeline_conditional.py"])


def test_card_names_hub_data_sets_by_their_hub_id_and_the_licenses_of_weights_and_data(tmp_path: Path) -> None:
    """A local Parquet copy (../shared/data/cifar10) is named as on the hub, the local path an aside; the metadata is
    valid hub metadata with no task that misdescribes a class-conditional generator; weights and data have licenses."""
    local = tmp_path / "cifar10"
    local.mkdir()
    metadata, body = card_parts(card_for(list(CIFAR10.class_names), tmp_path, **{"data.dataset": str(local)}))
    assert metadata["datasets"] == ["uoft-cs/cifar10"] and metadata["license"] == LICENSE == "apache-2.0"
    assert "pipeline_tag" not in metadata and {"class-conditional", "image-generation"} <= set(metadata["tags"])
    assert "# Class-conditional DDPM on uoft-cs/cifar10" in body
    assert (f"- Data set: `uoft-cs/cifar10` on the Hugging Face hub, all 50,000 images of the `train` split; trained from a "
            f"local copy at `{local}`") in body
    license_section = body.split("## License")[1]
    assert "Apache License 2.0 (`apache-2.0`), this project's license" in license_section
    assert f"The training data, `uoft-cs/cifar10`: {CIFAR10.license}." in license_section and "`unknown` on the hub" in CIFAR10.license

    digits = [str(digit) for digit in range(10)]
    for dataset in ("data/mnist", "mnist", "ylecun/mnist", str(PROJECT_ROOT / "data" / "mnist")):  # embedded copy, hub alias, hub id
        metadata, body = card_parts(card_for(digits, tmp_path, **{"data.dataset": dataset}))
        assert metadata["datasets"] == ["ylecun/mnist"], dataset
        assert "CC BY-SA 3.0" in body.split("## License")[1]
    # a folder named like a known data set that holds other classes is not that data set: no hub id is claimed
    metadata, body = card_parts(card_for([f"c{i}" for i in range(10)], tmp_path, **{"data.dataset": str(local)}))
    assert "datasets" not in metadata and f"- Data set: the local data set `{local}`" in body
    assert "comes with its own terms" in body.split("## License")[1]


def test_project_license_is_the_one_cards_declare() -> None:
    """The card says apache-2.0: the project carries the license's full text and declares it in its metadata."""
    text = (PROJECT_ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text
    assert "9. Accepting Warranty or Additional Liability." in text and "APPENDIX: How to apply the Apache License" in text
    declared = subprocess.run([sys.executable, "setup.py", "--license"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert declared.returncode == 0 and declared.stdout.split()[-1] == "Apache-2.0" and LICENSE == "apache-2.0"


def test_in_training_reference_is_what_training_measures_against(mnist_path: Path) -> None:
    """The card's reference set of the in-training table is the one the training's evaluator really uses."""
    from accelerate import PartialState

    from pipeline.training.hooks import make_evaluator

    for max_samples in (None, 256):
        cfg = load_config(overrides={"data.dataset": str(mnist_path), "data.max_samples": max_samples, "train.max_steps": 1,
                                     "train.eval_every": 1, "train.eval_metrics": ["accuracy"]})
        evaluator = make_evaluator(PartialState(), cfg)
        assert evaluator.reference == in_training_reference(cfg.data)
    assert in_training_reference(cfg.data).max_samples == 256


def test_every_table_states_its_n_and_reference_set(tmp_path: Path) -> None:
    """The in-training table (N = 100) and the measured one (N = 5,000) each say their N, sampling and reference set."""
    local = tmp_path / "cifar10"
    local.mkdir()
    pipe = ConditionalDiffusionPipeline(unet=tiny_unet(class_names=list(CIFAR10.class_names)),
                                        scheduler=make_train_scheduler(DiffusionConfig()))
    cfg = load_config(overrides={"data.dataset": str(local), "train.max_steps": 6000, "train.eval_every": 1000, "train.eval_per_class": 10,
                                 "sample.guidance_scale": 3.0})
    record = TrainingRecord(config=cfg, step=6000, images_seen=384000, run_dir=tmp_path, eval_sample=SampleConfig(guidance_scale=2.0))
    measured = {"dataset": str(local), "reference": {"split": "test", "max_samples": None}, "per_class": 500, "seed": 0,
                "sample": {"sampler": "dpmsolver++", "num_inference_steps": 20, "guidance_scale": 3.0}, "metrics": ["accuracy", "fid"],
                "rows": [{"name": "model", "n": 5000, "accuracy": 0.79, "fid": 66.7}], "pipeline": "runs/x/pipeline", "hardware": "CPU"}
    card = model_card_text(pipe, record, {"eval/fid": (6000, 180.1), "eval/accuracy": (6000, 0.66)}, ["pipeline_conditional.py"], measured)
    _, body = card_parts(card)
    blocks = body.split("\n\n")
    tables = [i for i, block in enumerate(blocks) if block.startswith("| ")]
    assert len(tables) == 2
    for i in tables:  # the paragraph before each table (the command's fence in between for the measured one)
        intro = next(block for block in reversed(blocks[:i]) if not block.startswith("```"))
        assert re.search(r"N = [\d,]+ samples \(\d+ per class; ", intro) and "reference set (for the distances): " in intro, intro
    evaluation, measured_text = body.split("## Evaluation")[1].split("## Measured")
    assert "N = 100 samples (10 per class; dpmsolver++, 20 steps, guidance scale 2.0, seed 0)" in evaluation
    assert "the first 10,000 images of the `train` split" in evaluation
    assert "N = 5,000 samples (500 per class; dpmsolver++, 20 steps, guidance scale 3.0, seed 0) of `runs/x/pipeline`" in measured_text
    assert "all 10,000 images of the `test` split" in measured_text


@pytest.fixture(scope="module")
def chunked_publication(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(a copy of the tiny run made a chunked run, its evaluation JSON, its published copy): the first start launched
    with train.max_minutes 30, the second resumed with 0.5 minutes left (the run's config.yaml is then the second's),
    evaluated with non-default flags, and published with ``python -m pipeline.export RUN --out DIR --evaluation``."""
    from pipeline.evaluation.__main__ import main as evaluation_main

    root = tmp_path_factory.mktemp("chunked")
    run = root / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "configs")
    cfg = load_config(run / "config.yaml")
    cfg.train.max_minutes = 30.0
    save_start_config(cfg, run, 0)
    cfg.train.max_minutes = 0.5
    save_start_config(cfg, run, 6)
    evaluation = root / "evaluation.json"
    assert evaluation_main(["evaluate", "--pipeline", str(run / "pipeline"), "--per-class", "1", "--steps", "2", "--guidance", "1.5",
                            "--metrics", "accuracy", "--no-baselines", "--ref-split", "test", "--ref-samples", "100", "--seed", "3",
                            "--mixed-precision", "no", "--out", str(evaluation)]) == 0
    out = root / "published"
    assert export_main([str(run), "--out", str(out), "--evaluation", str(evaluation), "--command", "python pipeline/train.py"]) == 0
    return run, evaluation, out


def test_a_chunked_run_ships_the_config_it_was_launched_with_and_the_chunk_command(chunked_publication: tuple[Path, Path, Path]) -> None:
    """The shipped config.yaml carries each chunk's train.max_minutes (here a tie of one start each, so the first's), not
    the last chunk's leftover, and the card says the run was chunked and gives the chunk command that repeats it."""
    run, _, out = chunked_publication
    assert load_config(run / "config.yaml").train.max_minutes == 0.5  # the resumed process's config
    assert load_config(out / "config.yaml").train.max_minutes == 30.0
    _, body = card_parts((out / "README.md").read_text())
    assert "each start stops after `train.max_minutes` (30 minutes) with a checkpoint and exit status 75" in body
    assert "The run took 2 starts." in body
    assert ("```bash\npython pipeline/train.py --config config.yaml\npython pipeline/train.py --config config.yaml --resume latest"
            "  # each further chunk\n```") in body
    shown = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert shown == without_distill(yaml.safe_load((out / "config.yaml").read_text()))

    live = load_config(run / "config.yaml")  # a training process's own config is read, never changed
    live.train.output_dir = str(run)
    record = TrainingRecord.of_this_process(live, 12, 192)
    assert record.config.train.max_minutes == 30.0 and record.starts == 2 and live.train.max_minutes == 0.5


def test_the_chunk_length_shipped_is_the_one_most_starts_were_launched_with(tmp_path: Path) -> None:
    """A run whose first start was cut short (11 minutes left in a working session), then chunks of 30 and a last start
    of 9: the card's chunk length is 30, which the first start's 11 was not (the long CIFAR-10 run's own history)."""
    cfg = load_config(PROJECT_ROOT / "configs" / "cifar10-cpu-long.yaml")
    for step, minutes in enumerate([11.0, 30.0, 30.0, 9.0]):
        cfg.train.max_minutes = minutes
        save_start_config(cfg, tmp_path, step * 100)
    config, starts = launched(cfg, tmp_path)
    assert config.train.max_minutes == 30.0 and starts == 4 and cfg.train.max_minutes == 9.0


def test_the_measured_section_gives_the_exact_evaluate_command(chunked_publication: tuple[Path, Path, Path]) -> None:
    """The card's command, run again, is the evaluation that was run: every recorded flag as given, the data set and
    sampling as resolved. A file from before commands were recorded gets one rebuilt from its settings, and says so."""
    from pipeline.evaluation.__main__ import _parser

    _, evaluation, out = chunked_publication
    result = json.loads(evaluation.read_text())
    command, rebuilt = evaluation_command(result)
    assert not rebuilt and f"```bash\n{command}\n```" in (out / "README.md").read_text().split("## Measured")[1]
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "pipeline.evaluation", "evaluate"]
    parsed = vars(_parser().parse_args(words[3:]))
    resolved = {"dataset": result["dataset"], "sampler": result["sample"]["sampler"], "num_inference_steps": 2, "guidance_scale": 1.5,
                "guidance_interval": None, "guidance_ramp": "constant"}
    assert parsed == result["arguments"] | resolved
    assert (parsed["mixed_precision"], parsed["ref_samples"], parsed["seed"], parsed["no_baselines"]) == ("no", "100", 3, True)

    older = {key: value for key, value in result.items() if key != "arguments"}
    command, rebuilt = evaluation_command(older)
    parsed = vars(_parser().parse_args(shlex.split(command)[3:]))
    assert rebuilt and parsed["mixed_precision"] == "auto"  # not recorded: the default, as the card says
    for key in ("pipeline", "per_class", "metrics", "ref_split", "ref_samples", "no_baselines", "seed", *resolved):
        assert parsed[key] == (result["arguments"] | resolved)[key], key


def test_rewrite_card_writes_a_published_card_again_from_its_folder(chunked_publication: tuple[Path, Path, Path],
                                                                     tmp_path: Path, tiny_run: Path) -> None:
    """``python -m pipeline.export --rewrite-card DIR``: the card that publishing wrote, from the folder's own files
    (config.yaml, training.json, metrics.json, weights); every other file byte for byte."""
    _, _, out = chunked_publication
    folder = tmp_path / "published"
    shutil.copytree(out, folder)
    (folder / "README.md").write_text("---\npipeline_tag: unconditional-image-generation\n---\nan older card\n")

    def others() -> dict[Path, bytes]:
        return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file() and path.name != "README.md"}

    kept = others()
    assert export_main(["--rewrite-card", str(folder)]) == 0
    assert (folder / "README.md").read_text() == (out / "README.md").read_text() and others() == kept
    assert export_main(["--rewrite-card", str(tiny_run / "pipeline")]) == 2  # a run's own export: no config.yaml inside
    assert export_main(["--rewrite-card", str(folder), "--half"]) == 2
