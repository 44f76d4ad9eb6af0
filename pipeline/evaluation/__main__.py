"""Evaluation command line.

    python -m pipeline.evaluation classifier train --dataset ../shared/data/mnist --out data/classifiers/mnist
    python -m pipeline.evaluation classifier test --classifier mnist --dataset ../shared/data/mnist
    python -m pipeline.evaluation evaluate --pipeline runs/x/pipeline --per-class 100 --sampler dpmsolver++ \\
        --steps 20 --guidance 2.0 --metrics accuracy,cfid,fid --out results.json
    python -m pipeline.evaluation evaluate --pipeline runs/x/pipeline --guidance 3.0 --guidance-interval 0.3,5.0 \\
        --guidance-ramp increasing --out results.json   # guidance only at noise levels in (0.3, 5], rising weight
    accelerate launch --num_processes 4 -m pipeline.evaluation evaluate ...   # sampling split over processes

``evaluate`` takes its defaults from the run's ``config.yaml`` (next to ``pipeline/``, or ``--config``):
the data set (``data.dataset``) and the sampler, steps and guidance (``sample.*``). Without
``--pipeline`` it scores only the baselines (pure noise, real images): with ``--ref-split test --real-split
train --metrics fid`` that is the train-vs-test FID sanity check. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.config_decoding import choice_flag
from pipeline.errors import ConfigError
from pipeline.names import SAMPLING_PRECISIONS
from pipeline.sample_flags import add_sample_flags, add_score_flags, check_positive, flagged_settings, pipeline_location, score_reference


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    classifier = commands.add_parser("classifier", help="train or test the project classifier of a data set")
    actions = classifier.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train on the train split, report test accuracy, save")
    train.add_argument("--dataset", required=True, help="path or hub id (../shared/data/mnist)")
    train.add_argument("--out", required=True, help="output directory (data/classifiers/<name> to commit it)")
    train.add_argument("--arch", **choice_flag(["small_cnn", "airbench"]), help="default: small_cnn for 1 channel, airbench for 3")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--max-samples", type=int, help="train on the first N rows only (quick checks)")
    train.add_argument("--device", help="default: cuda if available, else cpu")
    test = actions.add_parser("test", help="test accuracy of a classifier")
    test.add_argument("--classifier", default="mnist", help="committed name or directory")
    test.add_argument("--dataset", required=True)
    test.add_argument("--split", default="test")

    ev = commands.add_parser("evaluate", help="sample a pipeline and score it (JSON + Markdown)")
    ev.add_argument("--pipeline", help="exported pipeline directory (omit for the baselines alone)")
    ev.add_argument("--config", help="a run's config.yaml (default: the one beside --pipeline, if any)")
    ev.add_argument("--dataset", help="data set the model was trained on (default: the config's data.dataset)")
    ev.add_argument("--per-class", type=int, default=100, help="samples per class (default 100)")
    add_sample_flags(ev)
    add_score_flags(ev)
    ev.add_argument("--classifier", help="committed name or directory (default: named like the data set)")
    ev.add_argument("--real-split", default="test", help="split of the 'real' baseline row (default test)")
    ev.add_argument("--no-baselines", action="store_true", help="skip the pure-noise and real-data rows")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, help="images per sampling chunk and process (default: the device's fastest)")
    ev.add_argument("--mixed-precision", **choice_flag(SAMPLING_PRECISIONS), default="auto",
                    help="bf16 autocast while sampling (default auto: where the hardware runs bf16 natively)")
    ev.add_argument("--out", help="write the result JSON here (and a .md table beside it)")
    return parser


def _classifier(args: argparse.Namespace) -> int:
    from pipeline.data import load_image_data
    from pipeline.evaluation.classifier import accuracy, load_classifier, train_classifier

    if args.action == "test":
        data = load_image_data(DataConfig(dataset=args.dataset, split=args.split))
        print(f"{args.split} accuracy: {accuracy(load_classifier(args.classifier), data):.4f} on {len(data)} images")
        return 0
    check_positive({"--epochs": args.epochs, "--batch-size": args.batch_size, "--max-samples": args.max_samples, "--lr": args.lr})
    metrics = train_classifier(DataConfig(dataset=args.dataset, max_samples=args.max_samples), args.out, args.device,
                               arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    print(json.dumps(metrics, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from pipeline.evaluation.metrics import Evaluator, evaluate, hardware, markdown_table, parse_metrics
    from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
    from pipeline.sampling import saved_run_config

    check_positive({"--steps": args.num_inference_steps, "--batch-size": args.batch_size, "--per-class": args.per_class})
    if args.pipeline:  # no such folder, or no export in it: one line (not the hub client's id check)
        args.pipeline = pipeline_location(args.pipeline)
    cfg = saved_run_config(args.pipeline, args.config)
    dataset = args.dataset or cfg.data.dataset
    sample = flagged_settings(cfg.sample, args)  # a malformed or invalid flag fails here, before anything is loaded
    reference = score_reference(args, dataset)
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU ranks (gloo) when launched without GPUs
    pipe = ConditionalDiffusionPipeline.from_pretrained(args.pipeline).to(state.device) if args.pipeline else None
    if pipe is not None:  # a model without a null class fails now, not after the reference statistics
        try:
            pipe.check_guidance(sample.guidance_scale, sample.guidance_interval, sample.guidance_ramp)
        except ValueError as error:  # the shipped pipeline's own check (it cannot import ConfigError): bad flags
            raise ConfigError(str(error)) from None
    evaluator = Evaluator(
        dataset, parse_metrics(args.metrics), args.classifier, reference, device=state.device,
    )
    if pipe is not None and evaluator.classifier is not None and pipe.class_names != evaluator.classifier.config.class_names:
        raise ConfigError(f"the pipeline's classes {pipe.class_names} differ from the classifier's "
                         f"{evaluator.classifier.config.class_names}; pass the matching --dataset/--classifier")
    result = evaluate(pipe, evaluator, args.per_class, sample, args.seed, args.batch_size, args.mixed_precision,
                      not args.no_baselines, args.real_split, state)
    if not state.is_main_process:
        return 0
    result.update(pipeline=args.pipeline, processes=state.num_processes, device=str(state.device), hardware=hardware(),
                  arguments=vars(args))  # every flag as parsed: model cards rebuild the exact command (model_card.evaluation_command)
    table = markdown_table(result["rows"])
    notes = "".join(f"\n{metric}: {reason}\n" for metric, reason in result["unavailable"].items())
    print(table + notes)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(table + notes)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """0 when done; 2 with one line for bad input (``ConfigError``); anything else is a bug and keeps its traceback."""
    args = _parser().parse_args(argv)
    try:
        return _classifier(args) if args.command == "classifier" else _evaluate(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
