"""Class-conditional sampling with classifier-free guidance, on any compatible diffusers scheduler.

>>> pipe = ConditionalDiffusionPipeline.from_pretrained("runs/quickstart/pipeline")
>>> pipe.scheduler = make_sampler("dpmsolver++", pipe.scheduler.config)
>>> images = pipe(class_labels=[3, "7"], guidance_scale=2.0, num_inference_steps=20).images
>>> images = pipe(class_labels=[3], guidance_scale=3.0, guidance_interval=(0.3, 5.0), guidance_ramp="increasing").images

Self-contained (torch and diffusers, and its relative imports): exports ship this file with the modules it
imports, so that plain diffusers opens them (``pipeline.export``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from .guidance import check_guidance_settings, guidance_weights
from .sampler_checks import check_sampler
from .saving import stored_dtype, write_code

# This package's U-Net (module, class), which ``load_config`` puts in place of an export's shipped copy. Named, not
# imported: an export ships this file with every module it imports relatively, and diffusers' loader copies each
# relative import line it reads in the text (even one under TYPE_CHECKING), so an import would ship the U-Net's
# code a second time beside ``unet/unet.py``. tests/test_export.py pins the name to ``pipeline.ConditionalUNet``.
PROJECT_UNET = ("pipeline.models.unet", "ConditionalUNet")

# ``mixed_precision`` of a call: "auto" (bf16 autocast for a float32 model where the hardware runs bf16 natively), "no"
# (the model's own dtype), "bf16". pipeline.names.SAMPLING_PRECISIONS is the torch-free copy (tests/test_pipeline.py).
PRECISIONS = ("auto", "no", "bf16")

Labels = int | str | Sequence[Any] | torch.Tensor
StepCallback = Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | PipelineCallback | MultiPipelineCallbacks


@dataclass
class ConditionalPipelineOutput(ImagePipelineOutput):
    """``images`` as requested (``"latent"``: the final (N, C, H, W) sample in the model's [-1, 1] range);
    ``class_labels`` (N,) the label of each; ``intermediates`` a list of the predicted x_0 at each step, in
    ``output_type`` (only with ``return_intermediates=True``)."""

    class_labels: torch.Tensor | None = None
    intermediates: list | None = None


class ConditionalDiffusionPipeline(DiffusionPipeline):
    """Generate images of given classes with a ``ConditionalUNet`` and a scheduler.

    ``guidance_scale`` s follows diffusers: ``eps = eps_null + s * (eps_cond - eps_null)``; s = 1 is the
    plain conditional model, s > 1 strengthens the class. The seed paper and TeaPearce's
    Conditional_Diffusion_MNIST write ``eps = (1 + w) * eps_cond - w * eps_null``, so ``s = 1 + w``.
    ``guidance_interval`` and ``guidance_ramp`` vary the weight over the steps (``guidance.guidance_weights``).

    Args:
        unet: a ``ConditionalUNet`` (typed ``ModelMixin``: plain diffusers loads the copy an export ships in
            ``unet/unet.py``, a class of its own).
        scheduler: the training (DDPM) scheduler, or any inference scheduler built from its config.

    ``enable_attention_slicing`` does nothing here: the U-Net's attention runs on PyTorch's
    ``scaled_dot_product_attention`` (memory-efficient kernels), which diffusers advises against slicing.
    Devices follow diffusers' offloading conventions (``_execution_device``, ``maybe_free_model_hooks``);
    ``enable_model_cpu_offload`` is checked on a CPU, ``enable_sequential_cpu_offload`` there fails inside accelerate.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> dict | tuple:
        """``model_index.json`` as this class reads it. An export names the code it ships (``_class_name``
        ``["pipeline_conditional", "ConditionalDiffusionPipeline"]``, ``unet`` ``["unet", "ConditionalUNet"]``) for
        plain diffusers, which loads it with ``trust_remote_code=True``; this class and its own U-Net module
        are used instead, so ``from_pretrained`` on this class needs no ``trust_remote_code``."""
        importlib.import_module(PROJECT_UNET[0])  # diffusers loads a component's class only from an imported module
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = cls.__name__
            config["unet"] = list(PROJECT_UNET)
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, weights_dtype: torch.dtype | None = None,
                        **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` (so also ``push_to_hub``, which calls it), writing a self-contained folder:
        this pipeline's code beside a ``model_index.json`` that names it (``save_config``), whether the pipeline was
        loaded through this package or through plain diffusers' ``trust_remote_code``, so the folder opens again with
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.

        The U-Net's weights are stored in ``weights_dtype``; by default in the dtype of the file they were loaded from
        (a float16 export, which ``from_pretrained`` computes in float32, is saved in float16 again), else in the
        model's own dtype."""
        dtype = weights_dtype or stored_dtype(self.unet.config.get("_name_or_path")) or self.unet.dtype
        unet = self.unet
        if dtype != unet.dtype:  # cast a copy: casting the model down and back would round the weights it samples with
            self.register_modules(unet=copy.deepcopy(unet).to(dtype))
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.register_modules(unet=unet)

    def save_config(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """``model_index.json``, and the code it names (``saving.write_code``): diffusers' ``save_pretrained`` writes
        it last, before any upload."""
        super().save_config(save_directory, *args, **kwargs)
        write_code(Path(save_directory), type(self), type(self.unet))

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale s requested of the running (or last) call, as in diffusers. With a
        ``guidance_interval`` or ``guidance_ramp`` a step's weight differs from s (``guidance.guidance_weights``); a step
        callback may change s, and the remaining steps then take their weights from the new s."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the running (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` from a step callback to skip the remaining steps."""
        return self._interrupt

    @property
    def class_names(self) -> list[str]:
        names = self.unet.config.class_names
        return list(names) if names is not None else [str(i) for i in range(self.unet.config.num_classes)]

    def label_tensor(self, class_labels: Labels, num_images_per_label: int = 1) -> torch.Tensor:
        """Labels given as ints, names, a mix, (nested) lists of them, or a tensor -> (N * num_images_per_label,)
        int64, validated. Nested lists are flattened, as DiT does: diffusers' batch tests pass ``[[1], [1]]``."""
        items = _flatten(class_labels)
        if not items:
            raise ValueError("class_labels is empty; pass at least one label")
        names = self.class_names
        num_classes = self.unet.config.num_classes
        ids = []
        for item in items:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"unknown class name {item!r}; valid names: {', '.join(names)}")
                ids.append(names.index(item))
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                if not 0 <= item < num_classes:
                    raise ValueError(f"class label {item} out of range; valid labels are 0..{num_classes - 1}")
                ids.append(int(item))
            else:
                raise ValueError(f"class label {item!r} must be an int in 0..{num_classes - 1} or one of {names}")
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be >= 1, got {num_images_per_label}")
        return torch.tensor(ids, dtype=torch.long).repeat_interleave(num_images_per_label)

    def check_guidance(self, guidance_scale: float, interval: tuple[float, float] | None = None, ramp: str = "constant") -> None:
        """Raise ValueError unless this model can be sampled at ``guidance_scale``: 1 (no guidance) unless the model
        has a null class, and the settings valid by ``guidance.check_guidance_settings`` (the one guidance rule).
        ``__call__`` checks it once, before the first step."""
        if guidance_scale != 1.0:
            self._null_class(guidance_scale)
        check_guidance_settings(guidance_scale, interval, ramp)

    def _null_class(self, guidance_scale: float) -> int:
        """The label that guidance at ``guidance_scale`` contrasts with; ValueError for a model trained without one."""
        if self.unet.null_class is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a null class, but this model was trained without one "
                "(diffusion.p_uncond = 0); use guidance_scale=1.0 or retrain with p_uncond > 0"
            )
        return self.unet.null_class

    def check_scheduler(self) -> None:
        """Raise ValueError for a scheduler that is broken upstream or does not fit this model's output."""
        check_sampler(self.scheduler)
        variance_type = self.scheduler.config.get("variance_type")
        if isinstance(self.scheduler, DDPMScheduler) and variance_type in ("learned", "learned_range"):
            if not self.unet.config.learned_variance:
                raise ValueError(
                    f"the scheduler's variance_type={variance_type!r} needs a model trained with model.learned_variance=true; "
                    "this one predicts no variance: use DDPMScheduler.from_config(config, variance_type='fixed_small')"
                )
            if variance_type == "learned":
                raise ValueError(
                    "the model's variance channels interpolate the log variance (Improved DDPM); "
                    "use variance_type='learned_range', not 'learned'"
                )

    @property
    def is_student(self) -> bool:
        """Whether the U-Net is a distilled student (``unet.config.guidance_embedding``): it takes the guidance scale as
        an input, one forward per step at any scale, where a guided teacher runs two."""
        return bool(self.unet.config.get("guidance_embedding", False))

    def predict_noise(self, sample: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The guided model output at one step, in float32; cond and null share one batched forward, and a distilled
        student (``is_student``) takes the scale as an input: one forward of B rows.

        (B, C, H, W), scalar t, (B,) labels -> (B, C, H, W), or (B, 2C, H, W) with a learned variance
        (the variance channels taken from the conditional half, as in GLIDE).
        """
        sample = sample.to(self.unet.dtype)
        if self.is_student:
            return self.unet(sample, t, labels, guidance=torch.full((len(sample),), guidance_scale, device=sample.device)).sample.float()
        if guidance_scale == 1.0:
            return self.unet(sample, t, labels).sample.float()
        null = torch.full_like(labels, self._null_class(guidance_scale))
        output = self.unet(torch.cat([sample, sample]), t, torch.cat([labels, null])).sample.float()
        cond, uncond = output.chunk(2)
        channels = sample.shape[1]
        guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([guided, cond[:, channels:]], dim=1)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Labels,
        num_images_per_label: int = 1,
        guidance_scale: float = 1.0,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_intermediates: bool = False,
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guidance_interval: tuple[float, float] | None = None,
        guidance_ramp: str = "constant",
        mixed_precision: str = "auto",
    ) -> ConditionalPipelineOutput | tuple:
        """Sample one image per (label, repeat).

        Args:
            class_labels: int, class name, (nested) list of either, or a tensor of ints.
            num_images_per_label: images for each entry of ``class_labels``.
            guidance_scale: classifier-free guidance s (1.0 = none; needs a model trained with label dropout). A
                distilled student takes s as an input and runs one forward per step at any s it was trained for.
            num_inference_steps: denoising steps (default: 1000 for DDPMScheduler, 50 for the others).
            generator: makes sampling deterministic (a list: one generator per image).
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (N, H, W, C) float in [0, 1], ``"pt"`` (N, C, H, W),
                ``"latent"`` (N, C, H, W) the final sample in the model's [-1, 1] range.
            return_intermediates: also return the predicted x_0 after every step.
            latents: (N, C, H, W) initial noise to start from instead of drawing it from ``generator``
                (N = number of labels x ``num_images_per_label``).
            callback_on_step_end: called after every step as ``callback(pipe, i, t, callback_kwargs)`` with
                ``callback_kwargs`` the tensors named in ``callback_on_step_end_tensor_inputs``; the dict it returns
                replaces them (``"latents"``: the (N, C, H, W) sample x_t).
            callback_on_step_end_tensor_inputs: a subset of ``_callback_tensor_inputs``.
            guidance_interval: (lo, hi): guide only the steps whose noise level sigma_t = sqrt((1 - alpha_bar_t) /
                alpha_bar_t) lies in (lo, hi], 0 <= lo < hi (hi may be ``math.inf``), as in Kynkaanniemi et al. 2024
                (the EDM sigma); the other steps run the conditional model alone (weight 1, one forward of N images).
                None: every step.
            guidance_ramp: ``"constant"`` (weight s at every step), ``"increasing"`` (1 + (s - 1) 2p at progress
                p = i / (n - 1) of step i of n: little guidance at high noise, most at the end) or ``"decreasing"``
                (1 + (s - 1) 2(1 - p)); both ramps average s over the steps (Wang et al. 2024). With an interval,
                the ramp's weight applies inside it and 1 outside. ``guidance.guidance_weights`` gives every step's weight.
            mixed_precision: the U-Net's arithmetic: ``"auto"`` runs a float32 model under bf16 autocast where the
                hardware computes bf16 natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX: about 2x faster at the
                same accuracy and FID, docs/performance.md) and in float32 elsewhere; ``"bf16"`` forces the autocast,
                ``"no"`` the model's own dtype (bit-exact comparisons). The sampler's state and the outputs are float32.
        """
        labels = self.label_tensor(class_labels, num_images_per_label)
        self.check_guidance(guidance_scale, guidance_interval, guidance_ramp)
        if num_inference_steps is None:
            num_inference_steps = 1000 if isinstance(self.scheduler, DDPMScheduler) else 50
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type {output_type!r} unknown; use 'pil', 'np', 'pt' or 'latent'")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if unknown := [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} unknown; choose from {self._callback_tensor_inputs}")
        self.check_scheduler()

        config = self.unet.config
        device = self._execution_device
        autocast = sampling_autocast(mixed_precision, device, self.unet.dtype)
        labels = labels.to(device)
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            # the sampler's state stays float32 whatever the model's dtype; only the model input is cast
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; {len(labels)} images of this model need {shape}")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sample = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, len(self.scheduler.timesteps), False
        # only DDPMScheduler(variance_type="learned_range") reads the variance channels; the others get the mean's
        keeps_variance = isinstance(self.scheduler, DDPMScheduler) and self.scheduler.config.variance_type == "learned_range"
        step_kwargs = self._step_kwargs(generator)
        sigmas = noise_levels(self.scheduler)
        planned, weights = None, []
        intermediates = []
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            if self.guidance_scale != planned:  # the first step, or a step callback changed s: the rest follow it
                planned = self.guidance_scale
                weights = guidance_weights(planned, sigmas, guidance_interval, guidance_ramp)
            model_input = self.scheduler.scale_model_input(sample, t)
            with autocast:
                output = self.predict_noise(model_input, t, labels, weights[i])
            if not keeps_variance:
                output = output[:, : config.in_channels]
            step = self.scheduler.step(output, t, sample, **step_kwargs)
            sample = step.prev_sample
            if return_intermediates:
                predicted = getattr(step, "pred_original_sample", None)
                if predicted is None:  # DPM-Solver and UniPC do not return it
                    predicted = self._predict_original(model_input, output[:, : config.in_channels], t)
                intermediates.append(self._convert(predicted, output_type))
            if callback_on_step_end is not None:
                tensors = {"latents": sample}
                returned = callback_on_step_end(self, i, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs})
                sample = returned.pop("latents", sample)
        images = self._convert(sample, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ConditionalPipelineOutput(images=images, class_labels=labels.cpu(), intermediates=intermediates or None)

    def _step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None) -> dict:
        """Keyword arguments of ``scheduler.step``: the generator where it takes one (UniPC does not), and for
        DDIM the epsilon re-derived from the clipped x_0 (as GLIDE and guided-diffusion do): with the raw
        epsilon, clipping drags MNIST's black background towards grey at every step (class accuracy of a
        trained model drops from 0.40 to chance, docs/samplers.md)."""
        parameters = inspect.signature(self.scheduler.step).parameters
        kwargs: dict = {"generator": generator} if "generator" in parameters else {}
        if "use_clipped_model_output" in parameters:
            kwargs["use_clipped_model_output"] = True
        return kwargs

    def _predict_original(self, sample: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 from the (variance-preserving) model input and the epsilon or v prediction at integer step t."""
        alpha_bar = self.scheduler.alphas_cumprod.to(sample.device)[t.long()]
        if self.scheduler.config.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * output
        return (sample - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()

    def _convert(self, sample: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
        """(N, C, H, W) in the model's [-1, 1] range -> ``output_type``."""
        if output_type == "latent":
            return sample
        images = (sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images.cpu()
        array = images.cpu().permute(0, 2, 3, 1).numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix arithmetic in hardware (CUDA with bf16, CPUs with AVX-512 BF16 or AMX);
    elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def sampling_autocast(mixed_precision: str, device: torch.device, model_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The autocast a call runs its U-Net under (``__call__``'s ``mixed_precision``): bf16 for ``"bf16"``, and for
    ``"auto"`` on a float32 model where ``native_bf16(device)``; else none. ValueError for another value."""
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision {mixed_precision!r} unknown; use {', '.join(map(repr, PRECISIONS))}")
    bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and model_dtype == torch.float32 and native_bf16(device))
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def noise_levels(scheduler: SchedulerMixin) -> list[float]:
    """The noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of each of ``scheduler.timesteps`` (after
    ``set_timesteps``), from the training schedule's ``alphas_cumprod``, the same sigma for every sampler: the
    Euler samplers' timesteps are floats (fractional with Karras sigmas), so each is rounded to its training step."""
    alphas_cumprod = scheduler.alphas_cumprod.double().cpu()
    steps = scheduler.timesteps.double().cpu().round().long().clamp(0, len(alphas_cumprod) - 1)
    alpha_bar = alphas_cumprod[steps]
    return ((1 - alpha_bar) / alpha_bar).sqrt().tolist()


def _flatten(class_labels: Labels) -> list:
    """The labels of ``class_labels`` in order: a tensor or array flattened, nested lists and tuples unpacked."""
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        return class_labels.reshape(-1).tolist()
    if isinstance(class_labels, (list, tuple)):
        return [item for entry in class_labels for item in _flatten(entry)]
    return [class_labels]
