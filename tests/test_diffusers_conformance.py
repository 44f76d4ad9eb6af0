"""diffusers' own pipeline tests (``PipelineTesterMixin``, tests/diffusers_pipeline_tester.py) run against
``ConditionalDiffusionPipeline``, set up the way diffusers' DiT class-conditional tests use them.

Settings that differ from the mixin's defaults, and why (docs in the class body):

- ``required_optional_params`` without ``num_images_per_prompt`` (this pipeline's is ``num_images_per_label``;
  there is no prompt) and the deprecated ``callback``/``callback_steps`` (``callback_on_step_end`` replaces them),
  as DiT's tests drop them.
- ``test_attention_slicing = False``: the U-Net's attention is SDPA; slicing does nothing (class docstring).
- ``test_xformers_attention = False``: no xFormers processor; SDPA is PyTorch's memory-efficient attention.

- ``test_layerwise_casting = True``, ``test_group_offloading = True`` (off by default upstream): both work.

Tests that need an accelerator (float16, ``enable_model_cpu_offload`` onto a GPU, group offloading, device maps)
skip on a CPU, as upstream marks them; the sequential CPU-offload test runs on a CPU. Four return early because
they do not apply to a class-conditional pixel-space pipeline: ``test_num_images_per_prompt`` (no prompt: the
pipeline's ``num_images_per_label`` is tested in tests/test_pipeline.py), ``test_encode_prompt_works_in_isolation``
(no text encoder), ``test_StableDiffusionMixin_component`` (not a latent Stable Diffusion pipeline: no VAE) and
``test_save_load_optional_components`` (no optional components: a U-Net and a scheduler are both required).
"""

from __future__ import annotations

import unittest

import torch

from pipeline.config import DiffusionConfig
from pipeline.diffusion import make_train_scheduler
from pipeline.pipeline_conditional import ConditionalDiffusionPipeline
from tests.diffusers_pipeline_tester import PipelineTesterMixin
from tests.factories import tiny_unet

# diffusers' tests/pipelines/pipeline_params.py
CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS = frozenset(["class_labels"])
CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS = frozenset(["class_labels"])


class ConditionalDiffusionPipelineFastTests(PipelineTesterMixin, unittest.TestCase):
    pipeline_class = ConditionalDiffusionPipeline
    params = CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS
    batch_params = CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS
    required_optional_params = PipelineTesterMixin.required_optional_params - {"num_images_per_prompt", "callback", "callback_steps"}
    callback_cfg_params = frozenset()
    test_attention_slicing = False
    test_xformers_attention = False
    test_layerwise_casting = True
    test_group_offloading = True

    def setUp(self) -> None:
        super().setUp()
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: as fast as two threads, and no stalls on a loaded CPU

    def tearDown(self) -> None:
        torch.set_num_threads(self.threads)
        super().tearDown()

    def get_dummy_components(self) -> dict:
        return {"unet": tiny_unet(16, 3), "scheduler": make_train_scheduler(DiffusionConfig())}

    def get_dummy_inputs(self, device: str, seed: int = 0) -> dict:
        return {
            "class_labels": [1],
            "generator": torch.Generator(device=device).manual_seed(seed),
            "num_inference_steps": 2,
            "output_type": "np",
            "mixed_precision": "no",  # diffusers' tests compare outputs to 1e-4: the model's own float32
        }

    def test_inference(self) -> None:
        """As DiT's: the shape and range of a 16x16 RGB sample (no reference slice: the weights are ours)."""
        pipe = self.pipeline_class(**self.get_dummy_components())
        pipe.set_progress_bar_config(disable=True)
        image = pipe(**self.get_dummy_inputs("cpu")).images
        self.assertEqual(image.shape, (1, 16, 16, 3))
        self.assertTrue(0 <= image.min() and image.max() <= 1)

    def test_inference_batch_single_identical(self) -> None:
        self._test_inference_batch_single_identical(expected_max_diff=1e-3)
