"""The typed configuration: YAML, command-line overrides, parsing of each type, and the errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Config, GuidanceRamp, load_config, options_help
from pipeline.data import resolve_dataset_path
from pipeline.errors import ConfigError
from pipeline.guidance import GUIDANCE_RAMPS
from pipeline.names import PROJECT_ROOT

STOP = {"train.max_steps": 10}


def write_yaml(path: Path, content: Any) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", {
        "model": {"base_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [14]},
        "diffusion": {"schedule": "cosine", "prediction_type": "v_prediction"},
        "train": {"lr": 1.0e-3, "max_steps": 100, "batch_size": 64},
    })
    cfg = load_config(path, ["--train.lr", "2e-4", "--model.channel_mult=1,2,2", "--model.attention_resolutions", "7",
                             "--train.max_grad_norm", "none", "--data.max_samples=512", "--sample.sampler", "ddim"])
    assert cfg.model.base_channels == 32 and cfg.model.channel_mult == (1, 2, 2) and cfg.model.attention_resolutions == (7,)
    assert cfg.diffusion.schedule == "cosine" and cfg.diffusion.prediction_type == "v_prediction"
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float) and cfg.train.batch_size == 64
    assert cfg.train.max_grad_norm is None and cfg.data.max_samples == 512 and cfg.sample.sampler == "ddim"
    assert load_config(path, {"train.lr": 5e-4}).train.lr == 5e-4


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model.learned_variance", "true", True),
        ("model.learned_variance", "False", False),
        ("model.learned_variance", "yes", True),
        ("model.learned_variance", "0", False),
        ("model.learned_variance", True, True),
        ("model.channel_mult", "1, 2,4", (1, 2, 4)),
        ("model.channel_mult", [1, 2], (1, 2)),
        ("model.attention_resolutions", "", ()),
        ("model.attention_resolutions", 7, (7,)),
        ("train.max_grad_norm", "none", None),
        ("train.max_grad_norm", None, None),
        ("data.image_column", "null", None),
        ("train.lr", "1e-3", 1e-3),
        ("train.batch_size", 32.0, 32),
        ("data.split", 2017, "2017"),
        ("model.channel_mult", "[1, 2]", (1, 2)),
        ("sample.guidance_interval", "0.3,5", (0.3, 5.0)),
        ("sample.guidance_interval", "[0.3, 5.0]", (0.3, 5.0)),
        ("sample.guidance_interval", [0, "inf"], (0.0, math.inf)),
        ("sample.guidance_interval", "none", None),
        ("sample.guidance_ramp", "increasing", "increasing"),
    ],
)
def test_values_are_parsed_to_the_declared_type(key: str, value: Any, expected: Any) -> None:
    section, name = key.split(".")
    parsed = getattr(getattr(load_config(overrides=STOP | {key: value}), section), name)
    assert parsed == expected and type(parsed) is type(expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.lrr": 1}, r"unknown config key 'train.lrr'; did you mean train.lr"),
        ({"trian.lr": 1}, r"unknown config section 'trian'; did you mean train"),
        ({"lr": 1}, r"override 'lr' must be section.key, e.g. train.lr"),
        ({"diffusion.schedule": "cosin"}, r"diffusion.schedule: 'cosin' is not allowed; did you mean cosine"),
        ({"sample.sampler": "eulr"}, r"sample.sampler: 'eulr' is not allowed; did you mean euler, euler_a"),
        ({"model.learned_variance": "maybe"}, r"model.learned_variance: expected true or false, got 'maybe'"),
        ({"train.batch_size": "abc"}, r"train.batch_size: expected int, got 'abc'"),
        ({"train.batch_size": 2.5}, r"train.batch_size: expected an integer, got 2.5"),
        ({"train.batch_size": True}, r"train.batch_size: expected int, got True"),
        ({"train.lr": "none"}, r"train.lr: expected float, got 'none'"),
        ({"model.channel_mult": "1,x"}, r"model.channel_mult: expected int, got 'x'"),
        ({"model.dropout": 1.0}, r"model.dropout must be in \[0, 1\)"),
        ({"model.conditioning": "scale_shift", "model.embed_after_norm": True}, r"model.embed_after_norm applies to multiply and add"),
        ({"diffusion.p_uncond": 1.0}, r"diffusion.p_uncond must be in \[0, 1\)"),
        ({"train.max_steps": 0}, r"train.max_steps must be >= 1"),
        ({"train.max_steps": "none"}, r"no stop condition: set train.max_steps, train.max_epochs or train.max_minutes"),
        ({"diffusion.schedule": "cosine", "sample.sampler": "euler"}, r"sample.sampler euler is refused .* use dpmsolver\+\+"),
        ({"train.max_grad_norm": "nan"}, r"train.max_grad_norm must be > 0 and finite, or none"),
        ({"train.max_grad_norm": -1}, r"train.max_grad_norm must be > 0 and finite, or none"),  # clipping would ascend
        ({"train.lr": "inf"}, r"train.lr must be > 0 and finite"),
        ({"train.weight_decay": -0.1}, r"train.weight_decay must be >= 0 and finite"),
        ({"train.adam_beta1": 1.0}, r"train.adam_beta1 and train.adam_beta2 must be in \[0, 1\)"),
        ({"train.adam_beta2": -0.5}, r"train.adam_beta1 and train.adam_beta2 must be in \[0, 1\)"),
        ({"train.ema_power": 0}, r"train.ema_power must be > 0 and finite"),
        ({"data.max_samples": 0}, r"data.max_samples must be >= 1 or none"),
        ({"data.num_classes": 0}, r"data.num_classes must be >= 1 or none"),
        ({"data.translate": -1}, r"data.translate must be >= 0 pixels \(0 = off\)"),
        ({"data.cutout": -8}, r"data.cutout must be >= 0 pixels \(0 = off\)"),
        ({"train.seed": -1}, r"train.seed must be >= 0"),
        ({"sample.guidance_scale": "nan"}, r"sample.guidance_scale must be finite, got nan"),
        ({"sample.guidance_scale": "inf"}, r"sample.guidance_scale must be finite, got inf"),
        ({"sample.guidance_interval": "5,0.3"}, r"sample.guidance_interval \(lo, hi\) needs 0 <= lo < hi"),
        ({"sample.guidance_interval": "nan,1"}, r"sample.guidance_interval \(lo, hi\) needs 0 <= lo < hi"),
        ({"sample.guidance_interval": "-1,1"}, r"sample.guidance_interval \(lo, hi\) needs 0 <= lo < hi"),
        ({"sample.guidance_interval": "0.3"}, r"sample.guidance_interval: expected 2 values, got 1"),
        ({"sample.guidance_interval": [0.3, 1, 5]}, r"sample.guidance_interval: expected 2 values, got 3"),
        ({"sample.guidance_interval": "0.3,x"}, r"sample.guidance_interval: expected float, got 'x'"),
        ({"sample.guidance_ramp": "up"}, r"sample.guidance_ramp: 'up' is not allowed; valid: constant, increasing, decreasing"),
        ({"sample.guidance_ramp": "increasing", "sample.guidance_scale": 0.2},
         r"sample.guidance_ramp 'increasing' at guidance_scale 0.2 gives steps the negative weight .*use guidance_scale >= 0.5"),
        ({"sample.sampler": "dpm"}, r"sample.sampler: 'dpm' is not allowed; did you mean dpmsolver\+\+, ddpm"),
        ({"sample.guidance_ramp": "inc"}, r"sample.guidance_ramp: 'inc' is not allowed; did you mean increasing\?"),
        ({"train.max": 1},
         r"unknown config key 'train.max'; did you mean train.max_grad_norm, train.max_steps, train.max_epochs, train.max_minutes\?"),
    ],
    ids=["key", "section", "not-dotted", "literal", "sampler", "bool", "int", "float-for-int", "bool-for-int", "none",
         "list-item", "dropout", "after-norm-scale-shift", "p_uncond", "max_steps", "no-stop", "refused-sampler", "grad-norm-nan",
         "grad-norm-negative",
         "lr-inf", "weight-decay", "beta1", "beta2", "ema-power", "max-samples", "num-classes", "translate", "cutout", "seed",
         "guidance-nan",
         "guidance-inf", "interval-reversed", "interval-nan", "interval-negative", "interval-one-value", "interval-three-values",
         "interval-not-a-number", "ramp", "ramp-negative-weight", "sampler-prefix", "ramp-prefix", "key-prefix"],
)
def test_bad_values_are_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=STOP | overrides)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.lr", "1e-4"], r"unexpected argument 'train.lr'; overrides look like --train.lr 1e-4"),
        (["--train.lr"], r"override --train.lr needs a value"),
        (["--train.lr", "--train.seed", "1"], r"override --train.lr needs a value"),
    ],
)
def test_malformed_command_line_is_a_clear_error(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=args)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"not found; pass a YAML file"),
        (["a", "list"], r"expected a mapping of sections, got list"),
        ({"train": 5}, r"section 'train' must be a mapping of key: value"),
        ({"train": {"max_step": 5}}, r"unknown config key 'train.max_step'; did you mean train.max_steps"),
    ],
    ids=["missing", "not-a-mapping", "section-not-a-mapping", "unknown-key"],
)
def test_bad_yaml_is_a_clear_error(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "run.yaml" if content is None else write_yaml(tmp_path / "run.yaml", content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_config_builds_on_its_base_key_by_key(tmp_path: Path) -> None:
    """``base: OTHER.yaml`` (relative to the file; a chain of them): the base's sections underneath, the file's keys
    replacing the base's one by one; overrides on top. configs/cifar10-cpu-long.yaml is the 90-minute recipe so."""
    write_yaml(tmp_path / "base.yaml", {"model": {"base_channels": 24, "dropout": 0.1}, "train": {"lr": 1e-3, "max_steps": 10}})
    (tmp_path / "more").mkdir()
    write_yaml(tmp_path / "more" / "mid.yaml", {"base": "../base.yaml", "train": {"max_steps": 20}})
    write_yaml(tmp_path / "top.yaml", {"base": "more/mid.yaml", "model": {"dropout": 0.0}})
    cfg = load_config(tmp_path / "top.yaml", ["--train.lr", "5e-4"])
    assert (cfg.model.base_channels, cfg.model.dropout, cfg.train.max_steps, cfg.train.lr) == (24, 0.0, 20, 5e-4)
    configs = PROJECT_ROOT / "configs"
    long, short = load_config(configs / "cifar10-cpu-long.yaml"), load_config(configs / "cifar10-cpu.yaml")
    assert (long.model, long.diffusion, long.data, long.sample) == (short.model, short.diffusion, short.data, short.sample)
    assert long.train.max_steps > 4 * short.train.max_steps


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"top.yaml": {"base": "absent.yaml"}}, r"config file '.*absent.yaml' not found"),
        ({"top.yaml": {"base": ["a.yaml"]}}, r"top.yaml: base must name another config file"),
        ({"top.yaml": {"base": "top.yaml"}}, r"top.yaml: base top.yaml leads back to .*top.yaml"),
        ({"top.yaml": {"base": "b.yaml"}, "b.yaml": {"base": "top.yaml"}}, r"b.yaml: base top.yaml leads back to"),
        ({"top.yaml": {"base": "b.yaml"}, "b.yaml": {"train": {"max_step": 5}}}, r"b.yaml: unknown config key 'train.max_step'"),
    ],
    ids=["missing", "not-a-path", "itself", "cycle", "bad-key-in-base"],
)
def test_a_bad_base_is_a_clear_error(tmp_path: Path, files: dict, message: str) -> None:
    for name, content in files.items():
        write_yaml(tmp_path / name, content)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "top.yaml")


def test_yaml_no_is_the_string_where_a_string_is_expected(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\n  compile: no\n  channels_last: yes\n  max_steps: 5\n")
    cfg = load_config(path)
    assert (cfg.train.mixed_precision, cfg.train.compile, cfg.train.channels_last) == ("no", False, True)


def test_config_errors_are_value_errors() -> None:
    assert issubclass(ConfigError, ValueError)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(overrides=STOP | {"model.channel_mult": "1,2", "train.max_grad_norm": "none", "data.max_samples": 64})
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_guidance_schedule_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(overrides=STOP | {"sample.guidance_interval": "0.3,inf", "sample.guidance_ramp": "decreasing"})
    cfg.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sample"]["guidance_interval"] == [0.3, math.inf]
    loaded = load_config(tmp_path / "config.yaml")
    assert loaded == cfg and loaded.sample.guidance_interval == (0.3, math.inf) and loaded.sample.guidance_ramp == "decreasing"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--sampler", "dpm"], "sampler: 'dpm' is not allowed; did you mean dpmsolver++, ddpm, ddim?"),
        (["evaluate", "--guidance-ramp", "inc"], "guidance_ramp: 'inc' is not allowed; did you mean increasing?"),
        (["evaluate", "--mixed-precision", "bf"], "argument --mixed-precision: 'bf' is not allowed; did you mean bf16?"),
        (["classifier", "train", "--dataset", "x", "--out", "y", "--arch", "air"],
         "argument --arch: 'air' is not allowed; did you mean airbench?"),
    ],
    ids=["sampler", "ramp", "precision", "arch"],
)
def test_every_choice_on_a_command_line_offers_the_choices_it_is_part_of(argv: list[str], message: str,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """``--sampler dpm`` offers ``dpmsolver++`` (difflib alone offered ``ddpm, ddim``): one "did you mean"
    (``config_decoding.close_matches``) for the config's ``Literal`` values and the command lines' choices alike."""
    from pipeline.evaluation.__main__ import main

    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's refusal of a flag
        status = exit_.code
    assert status == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_guidance_ramp_choices_are_the_pipelines() -> None:
    assert typing.get_args(GuidanceRamp) == GUIDANCE_RAMPS


def test_bad_guidance_interval_exits_2_with_one_line(capsys: pytest.CaptureFixture) -> None:
    from pipeline.train import main

    assert main(["--train.max_steps", "1", "--sample.guidance_interval", "[5.0, 0.3]"]) == 2
    assert capsys.readouterr().err.startswith("error: sample.guidance_interval (lo, hi) needs 0 <= lo < hi")


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_help_lists_every_option_with_its_default() -> None:
    text = options_help()
    cfg = Config()
    for section in dataclasses.fields(cfg):
        for option in dataclasses.fields(getattr(cfg, section.name)):
            assert f"--{section.name}.{option.name} " in text
    assert "--model.channel_mult int,... (default 1,2,2)" in text
    assert "--sample.sampler {ddpm|ddim|dpmsolver++|unipc|euler|euler_a|lcm}" in text
    assert "--sample.guidance_interval float,float|none (default None)" in text
    assert "--sample.guidance_ramp {constant|increasing|decreasing} (default constant)" in text


def test_dataset_paths_resolve_against_the_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_dataset_path("data/mnist") == str(PROJECT_ROOT / "data" / "mnist")
    assert resolve_dataset_path("ylecun/mnist") == "ylecun/mnist"
    (tmp_path / "mine").mkdir()
    assert resolve_dataset_path("mine") == "mine"


def test_command_line_spellings_of_strings_lists_and_unset() -> None:
    cfg = load_config(overrides=["--train.max_steps", "5", "--train.mixed_precision", "no", "--train.eval_metrics", "accuracy,cfid,fid",
                                 "--train.sample_every", "none", "--train.max_grad_norm", "null", "--train.compile", "on"])
    assert cfg.train.mixed_precision == "no" and cfg.train.eval_metrics == ("accuracy", "cfid", "fid")
    assert cfg.train.sample_every is None and cfg.train.max_grad_norm is None and cfg.train.compile is True


def test_a_config_saved_before_augmentation_existed_loads_with_it_off(tmp_path: Path) -> None:
    """Checkpoints written before data.translate and data.cutout existed resume as the same run (both off)."""
    cfg = load_config(overrides=STOP)
    sections = yaml.safe_load(cfg.to_yaml())
    del sections["data"]["translate"], sections["data"]["cutout"]
    old = load_config(write_yaml(tmp_path / "config.yaml", sections))
    assert old == cfg and (old.data.translate, old.data.cutout) == (0, 0)


def test_negative_augmentation_on_the_command_line_is_exit_2(capsys: pytest.CaptureFixture) -> None:
    from pipeline.train import main

    assert main(["--train.max_steps", "1", "--data.cutout", "-1"]) == 2
    assert "error: data.cutout must be >= 0 pixels (0 = off)" in capsys.readouterr().err


def test_saved_yaml_is_the_format_earlier_checkpoints_hold() -> None:
    """Checkpoints hold ``yaml.safe_dump`` of the sections with lists for tuples; resume compares against them."""
    cfg = load_config(overrides=STOP | {"model.channel_mult": "1,2", "train.mixed_precision": "bf16", "data.image_column": "img"})
    assert cfg.to_yaml() == yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)


def test_config_and_resume_flags_anywhere_on_the_command_line(capsys: pytest.CaptureFixture) -> None:
    from pipeline.train import main

    config = str(PROJECT_ROOT / "configs" / "quickstart-cpu.yaml")
    assert main(["--model.base_channels", "2", "--config", config, "--resume=latest", "--train.seed", "1"]) == 2
    assert "error: model.base_channels must be >= 4" in capsys.readouterr().err
