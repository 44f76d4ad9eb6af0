"""Evaluation of trained pipelines: conditional accuracy, classifier-feature FID, FID, Inception Score.

    python -m pipeline.evaluation classifier train --dataset ../shared/data/mnist --out data/classifiers/mnist
    python -m pipeline.evaluation evaluate --pipeline runs/x/pipeline --per-class 100 --out results.json

See docs/evaluation.md for the metrics' definitions, conventions and costs.
"""

from pipeline.evaluation.classifier import ImageClassifier, load_classifier, train_classifier
from pipeline.evaluation.fid import FeatureStats, InceptionFeatures, frechet_distance
from pipeline.evaluation.inception_score import InceptionScoreUnavailable, inception_score
from pipeline.evaluation.metrics import Evaluator, evaluate, evaluate_for_training, markdown_table

__all__ = [
    "Evaluator",
    "FeatureStats",
    "ImageClassifier",
    "InceptionFeatures",
    "InceptionScoreUnavailable",
    "evaluate",
    "evaluate_for_training",
    "frechet_distance",
    "inception_score",
    "load_classifier",
    "markdown_table",
    "train_classifier",
]
