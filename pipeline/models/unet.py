"""The seed paper's class-conditional U-Net, as a diffusers model (``save_pretrained``/``from_pretrained``).

Self-contained (torch and diffusers only): exports ship this file as ``unet/unet.py``.

Shapes: ``x_t`` (B, C, H, W), ``t`` (B,), ``y`` (B,) int64 with the null class ``num_classes`` for
classifier-free guidance -> (B, C, H, W) (or (B, 2C, H, W) with a learned variance). A distilled student
(``guidance_embedding``) also takes the guidance scale ``w`` (B,) as an input, embedded like the timestep.

Residual blocks mix a time embedding t and a class embedding c into the features h in one of three ways:
``multiply`` (the seed, ``h = c*h + t``), ``add`` (``h + c + t``) or ``scale_shift`` (AdaGN,
``norm(h) * (1 + s) + b`` with (s, b) from ``t + c``, as in Improved/Guided Diffusion).

Where: ``multiply`` and ``add`` mix before the block's second GroupNorm (DDPM's place for t) unless
``embed_after_norm``. Before it, the norm removes each group's mean and scale; with one channel per group (widths
up to 32 channels) that erases the per-channel shift t and c entirely and the scale c up to its sign, so the
model is blind to the timestep (docs/study.md measures what that costs). ``scale_shift`` is always after the norm.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

Conditioning = Literal["multiply", "add", "scale_shift"]
# The same names as pipeline.names.CONDITIONING_MODES, kept here because this file ships alone in exports
# (tests/test_model.py pins the two, and this model's refusals to pipeline.names.conditioning_problem).
CONDITIONING_MODES: tuple[str, ...] = typing.get_args(Conditioning)


def _groups(channels: int) -> int:
    """The largest group count <= 32 that divides ``channels`` (GroupNorm needs a divisor)."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sin/cos features, as in the Transformer and DDPM (a zero column pads an odd dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1), (0, dim % 2))


class PositionalDropout(nn.Dropout):
    """Dropout whose mask for a sample is a function of (step seed, layer, the sample's row in the global batch).

    The trainer sets ``rows`` per micro-batch (``ConditionalUNet.set_dropout_rows``): every rank draws the masks of
    the whole global batch from one generator and keeps its rows, so a step does not depend on how the batch is
    split over processes and micro-batches. Without ``rows`` (any other use of the model) it is ``nn.Dropout``.
    """

    def __init__(self, p: float):
        super().__init__(p)
        self.layer = 0
        self.rows: tuple[int, slice, int] | None = None  # (step seed, this micro-batch's rows, global batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return _positional_dropout(self, x)


# Outside torch.compile's graph: the mask comes from its own generator (a graph would use inductor's RNG), and
# the per-step seed in ``rows`` is read here, so it is no guard that recompiles the graph every step.
@torch.compiler.disable
def _positional_dropout(module: PositionalDropout, x: torch.Tensor) -> torch.Tensor:
    if module.rows is None:
        return F.dropout(x, module.p, training=True)
    seed, rows, batch = module.rows
    generator = torch.Generator(x.device).manual_seed(hash((seed, module.layer)) & 0x7FFF_FFFF_FFFF)
    keep = torch.rand((batch, *x.shape[1:]), generator=generator, device=x.device)[rows] >= module.p
    return x * keep / (1 - module.p)


class ResidualBlock(nn.Module):
    """norm-act-conv, mix in (t, c), norm-act-dropout-conv, plus a (1x1 where needed) skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, conditioning: Conditioning, dropout: float,
                 embed_after_norm: bool = False):
        super().__init__()
        self.conditioning, self.embed_after_norm = conditioning, embed_after_norm
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        if conditioning == "scale_shift":
            self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        else:
            self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
            self.class_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = PositionalDropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable deep training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, c_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.conditioning == "scale_shift":
            scale, shift = self.emb_proj(t_emb + c_emb)[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            t = self.time_proj(t_emb)[:, :, None, None]
            c = self.class_proj(c_emb)[:, :, None, None]
            if self.embed_after_norm:
                h = self.norm2(h)
            h = c * h + t if self.conditioning == "multiply" else h + c + t
            if not self.embed_after_norm:
                h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, output projection zero-initialised."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into {heads} heads; change model.attention_heads")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, 3C, H, W) -> 3 x (B, heads, H*W, C/heads)
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, channels // self.heads, height * width)
        q, k, v = qkv.permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(batch, channels, height, width))


class ConditionalUNet(ModelMixin, ConfigMixin):
    """Class-conditional noise-prediction U-Net of the seed paper.

    Args:
        sample_size: image height and width (28 for MNIST, 32 for CIFAR-10).
        in_channels: image channels (1 or 3).
        num_classes: number of real classes; index ``num_classes`` is the null class when ``use_null_class``.
        class_names: display names of the classes (from the data set's ``ClassLabel``).
        use_null_class: whether the model was trained with label dropout, so classifier-free guidance works.
        base_channels, channel_mult, layers_per_block: widths and depth per resolution level.
        attention_resolutions: feature-map sizes with a self-attention block after each residual block.
        attention_heads, dropout, conditioning, embed_after_norm, upsample, learned_variance: see
            ``pipeline.config.ModelConfig``.
        guidance_embedding: take the classifier-free guidance scale w as an input (a distilled student,
            ``pipeline.distillation``): sinusoids of (w - 1) * 1000 (LCM's scaling) through an MLP whose last layer
            starts at zero, added to the time embedding. Without it the model and its weights are as before.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        use_null_class: bool = True,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        layers_per_block: int = 2,
        attention_resolutions: tuple[int, ...] = (7,),
        attention_heads: int = 4,
        dropout: float = 0.1,
        conditioning: Conditioning = "multiply",
        embed_after_norm: bool = False,
        upsample: Literal["transposed", "nearest"] = "transposed",
        learned_variance: bool = False,
        guidance_embedding: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        factor = 2 ** (len(channel_mult) - 1)
        if sample_size % factor:
            raise ValueError(
                f"sample_size {sample_size} cannot be halved {len(channel_mult) - 1} times "
                f"(channel_mult={channel_mult}); use a size divisible by {factor} or fewer levels"
            )
        sizes = [sample_size // 2**i for i in range(len(channel_mult))]
        if unknown := sorted(set(attention_resolutions) - set(sizes)):
            raise ValueError(f"attention_resolutions {unknown} are not feature-map sizes of this U-Net; choose from {sizes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names given for num_classes={num_classes}")
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning {conditioning!r} unknown; use multiply, add or scale_shift")
        if embed_after_norm and conditioning == "scale_shift":
            raise ValueError("embed_after_norm applies to multiply and add conditioning; scale_shift is always after the norm")
        if upsample not in ("transposed", "nearest"):
            raise ValueError(f"upsample {upsample!r} unknown; use transposed or nearest")

        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # The seed's "one-hot -> Linear -> act -> Linear": an embedding row is exactly Linear(one_hot(y)).
        self.class_mlp = nn.Sequential(
            nn.Embedding(num_classes + int(use_null_class), emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, emb_dim, conditioning, dropout, embed_after_norm)

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(layers_per_block):
                self.down.append(block(ch, base_channels * mult))
                ch = base_channels * mult
                if sizes[level] in attention_resolutions:
                    self.down.append(AttentionBlock(ch, attention_heads))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([block(ch, ch), AttentionBlock(ch, attention_heads), block(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(layers_per_block + 1):
                self.up.append(block(ch + skip_channels.pop(), base_channels * mult))
                ch = base_channels * mult
                if sizes[level] in attention_resolutions:
                    self.up.append(AttentionBlock(ch, attention_heads))
            if level > 0:
                if upsample == "transposed":
                    self.up.append(nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1))
                else:
                    self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))

        out_channels = in_channels * (2 if learned_variance else 1)
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        for layer, dropout_module in enumerate(m for m in self.modules() if isinstance(m, PositionalDropout)):
            dropout_module.layer = layer
        if guidance_embedding:  # built last: the layers above draw the same initial weights with or without it
            self.guidance_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            # a zero last layer: a student given a teacher's weights starts as the teacher's conditional model at every w
            nn.init.zeros_(self.guidance_mlp[-1].weight)
            nn.init.zeros_(self.guidance_mlp[-1].bias)

    def set_dropout_rows(self, seed: int, rows: slice, batch: int) -> None:
        """Draw dropout masks per global-batch row (``PositionalDropout``): step seed, this micro-batch's rows, global batch."""
        for module in self.modules():
            if isinstance(module, PositionalDropout):
                module.rows = (seed, rows, batch)

    @property
    def null_class(self) -> int | None:
        """The label that means "no class" (classifier-free guidance), or None if the model has none."""
        return self.config.num_classes if self.config.use_null_class else None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor,
        return_dict: bool = True,
        guidance: torch.Tensor | float | None = None,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """(B, C, H, W) noisy images, (B,) or scalar timesteps, (B,) labels -> (B, C or 2C, H, W); ``guidance``: the
        (B,) or scalar guidance scales of a model with ``guidance_embedding`` (1 = none), which it requires."""
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if sample.shape[-1] % factor or sample.shape[-2] % factor:
            raise ValueError(f"input size {tuple(sample.shape[-2:])} must be divisible by {factor} for this U-Net")
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        timestep = timestep.reshape(-1).expand(sample.shape[0])
        t_emb = self.time_mlp(sinusoidal_embedding(timestep, self.config.base_channels).to(sample.dtype))
        if self.config.guidance_embedding:
            if guidance is None:
                raise ValueError("this U-Net takes the guidance scale as an input (guidance_embedding): pass guidance=w, 1 = none")
            scale = torch.as_tensor(guidance, device=sample.device).reshape(-1).expand(sample.shape[0])
            t_emb = t_emb + self.guidance_mlp(sinusoidal_embedding((scale - 1) * 1000, self.config.base_channels).to(sample.dtype))
        elif guidance is not None:
            raise ValueError("guidance given, but this U-Net has no guidance embedding; guide it with the pipeline's guidance_scale")
        c_emb = self.class_mlp(class_labels)

        h = self.conv_in(sample)
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, t_emb, c_emb)
            if not isinstance(layer, AttentionBlock):
                skips.append(h)
            else:
                skips[-1] = h
        for layer in self.mid:
            h = self._run(layer, h, t_emb, c_emb)
        for layer in self.up:
            if isinstance(layer, ResidualBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layer, h, t_emb, c_emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return UNet2DOutput(sample=out) if return_dict else (out,)

    @staticmethod
    def _run(layer: nn.Module, h: torch.Tensor, t_emb: torch.Tensor, c_emb: torch.Tensor) -> torch.Tensor:
        return layer(h, t_emb, c_emb) if isinstance(layer, ResidualBlock) else layer(h)
