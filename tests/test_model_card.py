"""The model card shows what it did not write as written (issue 24: class names went raw into its Markdown, so a data
set's class names could add headings, HTML and links to the card): class names, the data set and the command."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import DiffusionConfig, load_config
from pipeline.diffusion import make_train_scheduler
from pipeline.model_card import TrainingRecord, model_card_text
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from tests.factories import tiny_unet

markdown_it = pytest.importorskip("markdown_it")  # a CommonMark renderer (Gradio's dependency), as the hub renders a card

HOSTILE_NAMES = ["<script>alert(1)</script>", "[click](https://evil.example)", "x\n# Injected heading", "**bold** _it_ ~~gone~~",
                 "![pixel](https://evil.example/p.png)", "a | b", "&amp; &#x27;", "`code`", "T-shirt/top", "ok"]
HOSTILE_DATASET = "evil\n---\n<b>bold</b> ```[x](https://evil.example)"
HOSTILE_COMMAND = "python pipeline/train.py --data.dataset '``` <img src=x onerror=alert(1)>'"


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
    assert re.findall("<h[1-6]>", rendered) == ["<h1>", "<h2>", "<h2>", "<h2>"]
    (heading,) = re.findall("<h1>(.*)</h1>", rendered)
    assert html.unescape(heading) == f"Class-conditional DDPM on {' '.join(HOSTILE_DATASET.split())}"
    (description,) = [line for line in rendered.splitlines() if line.startswith("<p>A class-conditional")]
    assert html.unescape(description).endswith(f"classes: {', '.join(' '.join(name.split()) for name in HOSTILE_NAMES)}.</p>")

    tokens = renderer.parse(body)
    fences = [token for token in tokens if token.type == "fence"]
    assert [fence.info for fence in fences] == ["python", "yaml"]
    assert "class_labels=['<script>alert(1)</script>', '[click](https://evil.example)']" in fences[0].content
    assert yaml.safe_load(fences[1].content) == yaml.safe_load(cfg.to_yaml())
    spans = [child.content for token in tokens if token.type == "inline" for child in token.children if child.type == "code_inline"]
    assert HOSTILE_COMMAND in spans and " ".join(HOSTILE_DATASET.split("\n")) in spans
