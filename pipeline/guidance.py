"""The one classifier-free guidance rule: which settings are valid, and the weight each denoising step gets.

>>> check_guidance_settings(3.0, (0.3, 5.0), "increasing")   # ValueError naming the field if not
>>> guidance_weights(3.0, [8.0, 4.0, 1.0, 0.1], (0.3, 5.0), "increasing")
[1.0, 2.333..., 3.666..., 1.0]

Standard library only, and no imports from this package: exports ship this file beside ``pipeline_conditional.py``
(which imports it as ``from .guidance import ...``, ``pipeline.export``), and the torch-free ``pipeline.config`` and
command lines check guidance settings with it before any model is loaded. Whether a given model can be guided at
all (it needs a null class) is the pipeline's part (``ConditionalDiffusionPipeline.check_guidance``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

# how the guidance weight runs over the denoising steps (``guidance_weights``)
GUIDANCE_RAMPS = ("constant", "increasing", "decreasing")


def check_guidance_settings(guidance_scale: float, interval: tuple[float, float] | None = None, ramp: str = "constant") -> None:
    """Raise ValueError, its message starting with the field's name, unless ``guidance_scale`` s is finite and >= 0,
    ``interval`` and ``ramp`` are as ``guidance_weights`` takes them, and a ramp comes with s >= 0.5 (its weights
    reach 2s - 1, and no step's weight may be negative)."""
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    _check_schedule(interval, ramp)
    if ramp != "constant" and guidance_scale < 0.5:
        raise ValueError(f"guidance_ramp {ramp!r} at guidance_scale {guidance_scale} gives steps the negative weight "
                         f"{2 * guidance_scale - 1:g} (2s - 1); use guidance_scale >= 0.5 or guidance_ramp 'constant'")


def guidance_weights(guidance_scale: float, sigmas: Sequence[float], interval: tuple[float, float] | None = None,
                     ramp: str = "constant") -> list[float]:
    """The guidance weight of each of the n steps whose noise levels are ``sigmas`` (in sampling order, as
    ``pipeline_conditional.noise_levels`` gives them): 1 where ``interval`` (lo, hi] excludes sigma, else by ``ramp``
    at progress p = i / (n - 1) (p = 1/2 for a single step, so that every ramp averages s): ``"constant"`` s,
    ``"increasing"`` 1 + (s - 1) 2p, ``"decreasing"`` 1 + (s - 1) 2(1 - p). ValueError for a malformed interval or
    unknown ramp."""
    _check_schedule(interval, ramp)
    last = len(sigmas) - 1
    weights = []
    for i, sigma in enumerate(sigmas):
        progress = i / last if last else 0.5
        if interval is not None and not interval[0] < sigma <= interval[1]:
            weights.append(1.0)
        elif ramp == "constant":
            weights.append(guidance_scale)  # s itself, not 1 + (s - 1): constant guidance stays bit-exact
        else:
            weights.append(1 + (guidance_scale - 1) * 2 * (progress if ramp == "increasing" else 1 - progress))
    return weights


def _check_schedule(interval: tuple[float, float] | None, ramp: str) -> None:
    """ValueError unless ``ramp`` is one of ``GUIDANCE_RAMPS`` and ``interval`` None or two numbers 0 <= lo < hi."""
    if ramp not in GUIDANCE_RAMPS:
        raise ValueError(f"guidance_ramp {ramp!r} unknown; choose one of {', '.join(GUIDANCE_RAMPS)}")
    if interval is None:
        return
    if not (isinstance(interval, (tuple, list)) and len(interval) == 2
            and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in interval)):
        raise ValueError(f"guidance_interval must be two noise levels (lo, hi), e.g. (0.3, 5.0), or None; got {interval!r}")
    lo, hi = interval
    if not 0 <= lo < hi:  # also false for NaN
        raise ValueError(f"guidance_interval (lo, hi) needs 0 <= lo < hi (hi may be inf), got {interval!r}; "
                         "e.g. (0.3, 5.0), or (0, inf) for every step")
