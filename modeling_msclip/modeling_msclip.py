"""PyTorch MS-CLIP: a CLIP whose image and text transformers share most parameters.

Layout of the module tree (and of every checkpoint):

* ``text_model``      - token + position embeddings (text-only parts),
* ``vision_model``    - patch embedding or conv stem, class/position embeddings, the pre-LayerNorm, the optional
  efficient parallel branch and its lateral adapters (vision-only parts),
* ``encoder``         - the block stack both towers run through,
* ``projection_head`` - the final LayerNorm of the pooled token and the projection into the joint space,
* ``logit_scale``.

Each component of each block and of the head is held by a `MSClipModalityModules`: one module under the key
``"shared"`` when the config shares it, otherwise one module per modality under ``"text"`` / ``"vision"``. What is
shared is therefore decided in one place (`modality_modules`, read from ``config.shared_components`` for the blocks
and ``config.shared_head_components`` for the head) and every parameter exists once. Checkpoints saved before the
head was built this way (``text_model.final_layer_norm``, ``vision_model.post_layernorm``, ``text_projection``,
``visual_projection``, or ``head_layer_norm`` + ``projection``) still load: see `LEGACY_KEYS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_msclip import MODALITIES, MSClipConfig, MSClipTextConfig, MSClipVisionConfig
from .loss_msclip import (
    NClipHead,
    NClipLoss,
    NClipPrototypes,
    all_reduce_sum_with_grad,
    build_objective,
)

# --------------------------------------------------------------------------------------------------------------------
# Output types
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MSClipOutput(ModelOutput):
    """Output of `MSClipModel.forward`, field-compatible with transformers' ``CLIPOutput``.

    Attributes:
        loss: Symmetric contrastive loss of the (local) batch, when ``return_loss=True``.
        logits_per_image: ``exp(logit_scale) * cos`` similarities, shape ``(image_batch, text_batch)``.
        logits_per_text: Transpose of ``logits_per_image``.
        text_embeds: L2-normalised projected text embeddings.
        image_embeds: L2-normalised projected image embeddings.
        text_model_output: Text tower output (``pooler_output`` = projected, unnormalised embedding).
        vision_model_output: Vision tower output (``pooler_output`` = projected, unnormalised embedding).
        logit_scale: The log temperature used for the logits, returned from inside the forward so that training
            code never reads the parameter outside it (ZeRO-3 only gathers it there).
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    logit_scale: torch.Tensor | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[key].to_tuple() if key in ("text_model_output", "vision_model_output") else self[key]
            for key in self.keys()
        )


# --------------------------------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: softmax(q kᵀ · scaling + mask) v, with an optional causal mask."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if is_causal:
        length = query.shape[-2]
        future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
        attn_weights = attn_weights.masked_fill(future, torch.finfo(attn_weights.dtype).min)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MSClipAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection.

    Causality is a per-call argument, so one shared module attends causally over text and bidirectionally over
    image tokens.
    """

    def __init__(self, config: MSClipTextConfig | MSClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False
        self.qkv_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, attn_weights = self.attend(self.qkv_proj(hidden_states), attention_mask, is_causal, output_attentions)
        return self.out_proj(context), attn_weights

    def attend(
        self,
        qkv: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over already projected ``qkv`` (batch, length, 3 x width); returns the context before
        ``out_proj``."""
        batch, length, _ = qkv.shape
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        implementation = self.config._attn_implementation
        if output_attentions or implementation in (None, "eager"):
            attention_interface: Callable = eager_attention_forward
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scale,
            dropout=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return attn_output.reshape(batch, length, self.embed_dim), (attn_weights if output_attentions else None)


def quick_gelu(hidden_states: torch.Tensor) -> torch.Tensor:
    """QuickGELU, ``x * sigmoid(1.702 x)``, written as ``silu(1.702 x) / 1.702``: the same function, but one fused
    kernel whose backward keeps a single tensor instead of two (less step memory, see docs/benchmarks.md)."""
    return F.silu(hidden_states * 1.702) / 1.702


class MSClipMLP(nn.Module):
    """Two-layer MLP (width → intermediate → width) with the configured activation (QuickGELU for CLIP)."""

    def __init__(self, config: MSClipTextConfig | MSClipVisionConfig) -> None:
        super().__init__()
        self.activation_fn = quick_gelu if config.hidden_act == "quick_gelu" else ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class MSClipModalityModules(nn.ModuleDict):
    """One block or head component: a single module shared by all modalities, or one module per modality.

    The keys are ``"shared"`` or the modality names; `for_modality` hides the difference from the caller.
    ``build(modality)`` makes the module with that modality's settings; a shared one is built once, with the settings
    of ``shared_from`` (``None``: not shared).
    """

    def __init__(
        self, build: Callable[[str], nn.Module], modalities: tuple[str, ...], shared_from: str | None = None
    ) -> None:
        if shared_from is not None:
            super().__init__({"shared": build(shared_from)})
        else:
            super().__init__({modality: build(modality) for modality in modalities})

    @property
    def is_shared(self) -> bool:
        return "shared" in self

    def for_modality(self, modality: str) -> nn.Module:
        """The module that processes ``modality``."""
        if "shared" in self:
            return self["shared"]
        if modality not in self:
            raise ValueError(f"this block has no {modality!r} component (it holds {list(self.keys())})")
        return self[modality]


def modality_modules(
    config: MSClipConfig,
    shared: bool,
    modalities: tuple[str, ...],
    build: Callable[[MSClipTextConfig | MSClipVisionConfig], nn.Module],
) -> MSClipModalityModules:
    """One block or head component for ``modalities``, built by ``build(sub_config)``.

    Shared, it is one module built from the sub-config of ``config.shared_settings_from`` (the settings it computes
    with are equal in both towers, the config checks that); otherwise one module per modality from its own sub-config.
    """
    shared_from = config.shared_settings_from if shared else None
    return MSClipModalityModules(lambda modality: build(config.modality_config(modality)), modalities, shared_from)


def tower_layer_norm(config: MSClipTextConfig | MSClipVisionConfig) -> nn.LayerNorm:
    """A LayerNorm over the tower width with the tower's epsilon."""
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class MSClipEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN transformer block at one position of the joint encoder: x + attn(ln1(x)), then x + mlp(ln2(x)).

    Each of its four components is built once if ``config.shared_components[position]`` names it, otherwise once
    per modality that has a block at this position.
    """

    def __init__(self, config: MSClipConfig, position: int, modalities: tuple[str, ...] | None = None) -> None:
        super().__init__()
        present = config.layer_modalities(position)
        modalities = tuple(m for m in present if modalities is None or m in modalities)
        shared = set(config.shared_components[position])
        self.layer_norm1 = modality_modules(config, "layer_norm1" in shared, modalities, tower_layer_norm)
        self.self_attn = modality_modules(config, "attention" in shared, modalities, MSClipAttention)
        self.layer_norm2 = modality_modules(config, "layer_norm2" in shared, modalities, tower_layer_norm)
        self.mlp = modality_modules(config, "mlp" in shared, modalities, MSClipMLP)

    def forward(
        self,
        hidden_states: torch.Tensor,
        modality: str,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        hidden_states = self.layer_norm1.for_modality(modality)(hidden_states)
        hidden_states, attn_weights = self.self_attn.for_modality(modality)(
            hidden_states, attention_mask=attention_mask, is_causal=is_causal, output_attentions=output_attentions
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.layer_norm2.for_modality(modality)(hidden_states)
        hidden_states = residual + self.mlp.for_modality(modality)(hidden_states)
        return hidden_states, attn_weights


class MSClipEncoder(nn.Module):
    """The block stack both towers run through, one `MSClipEncoderLayer` per block position."""

    def __init__(self, config: MSClipConfig, modalities: tuple[str, ...] = MODALITIES) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            [MSClipEncoderLayer(config, position, modalities) for position in range(config.num_block_positions)]
        )
        # Fixed by the depths the layers were built with; looked up once because transformers 5 config attribute
        # reads are slow enough to show in batch-1 inference latency.
        self._layer_modalities = [config.layer_modalities(i) for i in range(len(self.layers))]

    def positions(self, modality: str) -> list[int]:
        """Block positions that ``modality`` runs, in order."""
        return [i for i, present in enumerate(self._layer_modalities) if modality in present]

    def forward(
        self,
        hidden_states: torch.Tensor,
        modality: str,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Run ``modality``'s blocks. ``before_layer(position, hidden_states)`` may rewrite the tokens before a block
        (the vision tower's lateral adapters use it).

        Returns the last hidden state, the hidden states (the encoder input, then each block's output, as in
        transformers' CLIP) and the attention maps, the latter two only when requested.
        """
        all_hidden_states = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for position in self.positions(modality):
            if before_layer is not None:
                hidden_states = before_layer(position, hidden_states)
            hidden_states, attn_weights = self.layers[position](
                hidden_states, modality, attention_mask, is_causal, output_attentions
            )
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            if all_attentions is not None:
                all_attentions.append(attn_weights)
        return (
            hidden_states,
            tuple(all_hidden_states) if all_hidden_states is not None else None,
            tuple(all_attentions) if all_attentions is not None else None,
        )


@dataclass
class EncoderInput:
    """What one modality brings to `MSClipEncoder`: its embedded tokens, attention and per-layer hook."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None
    is_causal: bool = False
    before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None


# --------------------------------------------------------------------------------------------------------------------
# Convolutional parts of the vision tower (MS-CLIP-S)
# --------------------------------------------------------------------------------------------------------------------


class MSClipBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch of all data-parallel ranks.

    In one process it is `nn.BatchNorm2d`. Under torch.distributed in training mode it all-reduces (with autograd)
    the per-channel count, sum and sum of squares, so a 2-rank run normalises, and updates its running statistics,
    exactly like one process on the concatenated batch. Unlike `nn.SyncBatchNorm` it also runs on CPU (gloo).
    In eval mode it uses the running statistics, as the official model does at inference.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(features)
        local = torch.stack(
            [
                torch.full_like(features[0, :, 0, 0], features[:, 0].numel(), dtype=torch.float32),
                features.float().sum(dim=(0, 2, 3)),
                features.float().square().sum(dim=(0, 2, 3)),
            ]
        )
        count, total, total_square = all_reduce_sum_with_grad(local).unbind(0)
        mean = total / count
        variance = (total_square / count - mean.square()).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = variance * count / (count - 1).clamp_min(1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        scale = self.weight.float() * torch.rsqrt(variance + self.eps)
        shift = self.bias.float() - mean * scale
        return (features.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(features.dtype)


def conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int, eps: float, groups: int = 1
) -> nn.Sequential:
    """Bias-free convolution ("same" padding for odd kernels, none for even ones) followed by BatchNorm."""
    padding = kernel // 2 if kernel % 2 else 0
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        MSClipBatchNorm2d(out_channels, eps=eps),
    )


class MSClipStemBlock(nn.Module):
    """Residual stem stage: ReLU(BN(conv3x3, stride s)(x) + BN(conv1x1, stride s)(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, eps: float) -> None:
        super().__init__()
        self.conv = conv_bn(in_channels, out_channels, 3, stride, eps)
        self.shortcut = conv_bn(in_channels, out_channels, 1, stride, eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(pixels) + self.shortcut(pixels))


class MSClipConvStem(nn.Module):
    """Early specialization: the convolutional stem that replaces vision block 0 and the patch embedding.

    3x3/2 conv to W/16 + BN + ReLU, four residual stages W/16 → W/8 → W/4 → W/2 → W, then a 1x1 conv W → W.
    """

    def __init__(self, config: MSClipVisionConfig) -> None:
        super().__init__()
        width, eps = config.hidden_size, config.batch_norm_eps
        channels = [width // 16, width // 8, width // 4, width // 2, width]
        self.first_conv = conv_bn(config.num_channels, channels[0], 3, 2, eps)
        self.stages = nn.ModuleList(
            MSClipStemBlock(channels[i], channels[i + 1], stride, eps)
            for i, stride in enumerate(config.conv_stem_strides)
        )
        self.last_conv = nn.Conv2d(width, width, 1, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.first_conv(pixel_values))
        for stage in self.stages:
            features = stage(features)
        return self.last_conv(features)


class MSClipBottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 stride s, 1x1; middle width = out/2) with a projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, eps: float) -> None:
        super().__init__()
        middle = out_channels // 2
        self.reduce = conv_bn(in_channels, middle, 1, 1, eps)
        self.spatial = conv_bn(middle, middle, 3, stride, eps)
        self.expand = conv_bn(middle, out_channels, 1, 1, eps)
        self.shortcut = conv_bn(in_channels, out_channels, 1, stride, eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.reduce(features))
        hidden = F.relu(self.spatial(hidden))
        return F.relu(self.expand(hidden) + self.shortcut(features))


class MSClipParallelBranch(nn.Module):
    """Efficient parallel branch: a small CNN on the raw image whose stages feed the lateral adapters.

    Stage 0 is a 3x3 conv + BN + ReLU to W/16; stages 1-4 are one bottleneck each, doubling the channels up to W.
    """

    def __init__(self, config: MSClipVisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        channels = [width // 16, width // 8, width // 4, width // 2, width]
        strides = config.parallel_branch_strides
        self.first_stage = nn.Sequential(
            *conv_bn(config.num_channels, channels[0], 3, strides[0], config.batch_norm_eps), nn.ReLU()
        )
        self.bottlenecks = nn.ModuleList(
            MSClipBottleneck(channels[i], channels[i + 1], strides[i + 1], config.parallel_branch_batch_norm_eps)
            for i in range(len(strides) - 1)
        )
        self.channels = channels

    def run_stage(self, stage: int, features: torch.Tensor) -> torch.Tensor:
        """Stage ``stage`` applied to the previous stage's output (the raw image for stage 0)."""
        if stage == 0:
            return self.first_stage(features)
        return self.bottlenecks[stage - 1](features)


class MSClipLateralAdapter(nn.Module):
    """Merges a parallel-branch feature map into the token sequence; its output replaces the tokens.

    Branch path: depthwise k×k/k conv + BN, 1x1 conv to W. Token path: the grid through a depthwise 3x3 conv + BN.
    Both carry the class token in front (the branch path only with ``parallel_branch_use_cls``), are summed and
    layer-normalised.
    """

    def __init__(self, config: MSClipVisionConfig, branch_channels: int, kernel: int) -> None:
        super().__init__()
        width, eps = config.hidden_size, config.batch_norm_eps
        self.use_cls = config.parallel_branch_use_cls
        self.branch_depthwise = conv_bn(branch_channels, branch_channels, kernel, kernel, eps, groups=branch_channels)
        self.branch_pointwise = nn.Conv2d(branch_channels, width, 1, bias=False)
        self.token_depthwise = conv_bn(width, width, 3, 1, eps, groups=width)
        self.layer_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, branch_features: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        grid = int(round((length - 1) ** 0.5))
        cls_token, patches = hidden_states[:, :1], hidden_states[:, 1:]
        patches = patches.transpose(1, 2).reshape(batch, width, grid, grid)
        token_path = self.token_depthwise(patches).flatten(2).transpose(1, 2)
        branch_path = self.branch_pointwise(self.branch_depthwise(branch_features)).flatten(2).transpose(1, 2)
        branch_cls = cls_token if self.use_cls else torch.zeros_like(cls_token)
        merged = torch.cat([cls_token, token_path], dim=1) + torch.cat([branch_cls, branch_path], dim=1)
        return self.layer_norm(merged)


# --------------------------------------------------------------------------------------------------------------------
# Towers
# --------------------------------------------------------------------------------------------------------------------


def check_text_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_positions: int) -> None:
    """Raise a ValueError naming the argument, the expected and the actual value for malformed text inputs."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have at least one caption and one position, got shape {tuple(input_ids.shape)}"
        )
    if input_ids.shape[1] > max_positions:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} positions but the text tower supports at most {max_positions}"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )


class MSClipTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: MSClipTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Parameter(torch.empty(config.max_position_embeddings, config.hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # MSClipTextTower.prepare has checked the length against max_position_embeddings (and the id range).
        if input_ids.dtype not in (torch.int32, torch.int64):
            input_ids = input_ids.long()  # nn.Embedding indexes with int32/int64 only
        return self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[-1]]


class MSClipTextTower(nn.Module):
    """Text-specific parts: the embeddings. The blocks live in the shared encoder, the final LayerNorm in the head
    (`MSClipProjectionHead`), so that both are shared or not by the same rule."""

    def __init__(self, config: MSClipTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = MSClipTextEmbeddings(config)

    def forward(
        self,
        encoder: MSClipEncoder,
        final_layer_norm: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPooling:
        """Encode ``input_ids`` with ``encoder``'s text blocks; ``pooler_output`` is the end-of-text token after
        ``final_layer_norm`` (before projection)."""
        encoder_input, pool_index = self.prepare(input_ids, attention_mask)
        encoded = encoder(
            encoder_input.hidden_states,
            "text",
            attention_mask=encoder_input.attention_mask,
            is_causal=encoder_input.is_causal,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return self.pool(encoded, pool_index, final_layer_norm)

    def prepare(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[EncoderInput, torch.Tensor]:
        """Check and embed ``input_ids`` (dropping padding no output can see) for the encoder; also the pooling
        positions.

        Shapes and dtypes are checked in Python; the id range, a missing end token and the trimmed length come from
        one small tensor read back to the host together (skipped in a compiled graph, which keeps static shapes).
        """
        check_text_inputs(input_ids, attention_mask, self.config.max_position_embeddings)
        config = self.config
        if config.pooling == "argmax":
            # The official code pools at argmax(input_ids): the end-of-text token when it has the largest id.
            pool_index = input_ids.argmax(dim=-1)
            has_end = None
        else:
            is_end = input_ids == config.eos_token_id
            pool_index = is_end.int().argmax(dim=-1)
            has_end = is_end.any(dim=-1)
        if torch.compiler.is_compiling():
            return self._embed(input_ids, attention_mask), pool_index
        facts = [input_ids.min(), input_ids.max(), pool_index.max()]
        if has_end is not None:
            facts.append(has_end.all())
        smallest, largest, last_pooled, *all_end = torch.stack([fact.long() for fact in facts]).tolist()
        if smallest < 0 or largest >= config.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {config.vocab_size - 1}] (text_config.vocab_size {config.vocab_size}), "
                f"got ids from {smallest} to {largest}: was this batch made by another model's tokenizer?"
            )
        if all_end and not all_end[0]:
            missing = (~has_end).nonzero().flatten().tolist()
            raise ValueError(
                f"input_ids rows {missing} have no end token (eos_token_id {config.eos_token_id}), where "
                "text_config.pooling='eos' pools; tokenize with truncation that keeps the end token (the default "
                "truncation_style='keep_end'), or use pooling='argmax' as the official code does"
            )
        # Later positions cannot reach the pooled token (causal) or are masked out: dropping them is exact.
        if (
            config.trim_padding
            and (config.causal or attention_mask is not None)
            and last_pooled + 1 < input_ids.shape[1]
        ):
            input_ids = input_ids[:, : last_pooled + 1]
            attention_mask = attention_mask[:, : last_pooled + 1] if attention_mask is not None else None
        return self._embed(input_ids, attention_mask), pool_index

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> EncoderInput:
        causal = self.config.causal
        additive_mask = None
        if not causal and attention_mask is not None:
            additive_mask = padding_mask_to_additive(attention_mask, self.embeddings.position_embedding.dtype)
        return EncoderInput(self.embeddings(input_ids), additive_mask, causal)

    def pool(
        self,
        encoded: tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None],
        pool_index: torch.Tensor,
        final_layer_norm: nn.Module,
    ) -> BaseModelOutputWithPooling:
        """The tower output from the encoder's (last hidden state, hidden states, attentions): ``pooler_output`` is
        the token at ``pool_index`` after ``final_layer_norm``."""
        last_hidden_state, hidden_states, attentions = encoded
        rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
        pooled = final_layer_norm(last_hidden_state[rows, pool_index])
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=hidden_states,
            attentions=attentions,
        )


class MSClipVisionEmbeddings(nn.Module):
    """Patch embedding (or conv stem), class token, position embedding and the pre-LayerNorm."""

    def __init__(self, config: MSClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        if config.embedding_type == "conv_stem":
            self.patch_embedding = MSClipConvStem(config)
        else:
            self.patch_embedding = nn.Conv2d(
                config.num_channels, width, config.patch_size, stride=config.patch_size, bias=False
            )
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.position_embedding = nn.Parameter(torch.empty(config.grid_size**2 + 1, width))
        self.pre_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def interpolated_position_embedding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Position embedding for a ``grid_height`` x ``grid_width`` token grid (bicubic resize of the grid part)."""
        grid = self.config.grid_size
        if (grid_height, grid_width) == (grid, grid):
            return self.position_embedding
        cls_position, patch_positions = self.position_embedding[:1], self.position_embedding[1:]
        patch_positions = patch_positions.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_positions = F.interpolate(
            patch_positions.float(), size=(grid_height, grid_width), mode="bicubic", align_corners=False
        ).to(cls_position.dtype)
        return torch.cat([cls_position, patch_positions.permute(0, 2, 3, 1).flatten(1, 2)[0]])

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.dtype.is_floating_point:
            raise ValueError(
                f"pixel_values must be floating point (normalised pixels), got dtype {pixel_values.dtype}: run raw "
                "images through MSClipImageProcessor (or the processor) first"
            )
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels or not len(pixel_values):
            raise ValueError(
                f"pixel_values must have shape (batch, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}"
            )
        size = self.config.image_size
        if not interpolate_pos_encoding and tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} but the model expects {size}x{size}; "
                "resize them or pass interpolate_pos_encoding=True"
            )
        patches = self.patch_embedding(pixel_values.to(self.class_embedding.dtype))
        grid_height, grid_width = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        cls_token = self.class_embedding.expand(patches.shape[0], 1, -1)
        embeddings = torch.cat([cls_token, patches], dim=1)
        embeddings = embeddings + self.interpolated_position_embedding(grid_height, grid_width)
        if self.training and self.config.patch_dropout > 0:
            embeddings = self.drop_patches(embeddings)
        return self.pre_layernorm(embeddings)

    def drop_patches(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Keep the class token and a random ``1 - patch_dropout`` share of each image's patch tokens (in grid order).

        Positions are already added, so the encoder still knows where every kept patch sits. The draw uses the torch
        generator, which gradient caching replays, so its re-forward keeps the same patches.
        """
        batch, length, width = embeddings.shape
        num_patches = length - 1
        keep = max(1, int(num_patches * (1.0 - self.config.patch_dropout)))
        scores = torch.rand(batch, num_patches, device=embeddings.device)
        kept = scores.argsort(dim=1)[:, :keep].sort(dim=1).values + 1
        rows = torch.cat([torch.zeros(batch, 1, dtype=kept.dtype, device=kept.device), kept], dim=1)
        return embeddings.gather(1, rows.unsqueeze(-1).expand(-1, -1, width))


class MSClipVisionTower(nn.Module):
    """Vision-specific parts: embeddings and the optional parallel branch with its lateral adapters. The blocks live
    in the shared encoder, the post-LayerNorm in the head (`MSClipProjectionHead`)."""

    def __init__(self, config: MSClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = MSClipVisionEmbeddings(config)
        self.parallel_branch = None
        self.lateral_adapters = None
        if config.parallel_branch_strides is not None:
            self.parallel_branch = MSClipParallelBranch(config)
            self.lateral_adapters = nn.ModuleList(
                MSClipLateralAdapter(config, channels, kernel)
                for channels, kernel in zip(
                    self.parallel_branch.channels, config.parallel_branch_lateral_kernels, strict=True
                )
            )

    def forward(
        self,
        encoder: MSClipEncoder,
        final_layer_norm: nn.Module,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> BaseModelOutputWithPooling:
        """Encode images with ``encoder``'s vision blocks; ``pooler_output`` is the class token after
        ``final_layer_norm`` (the official ``ln_post``; before projection)."""
        encoder_input = self.prepare(pixel_values, interpolate_pos_encoding)
        encoded = encoder(
            encoder_input.hidden_states,
            "vision",
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            before_layer=encoder_input.before_layer,
        )
        return self.pool(encoded, final_layer_norm)

    def prepare(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> EncoderInput:
        """Embed the images for the encoder; the parallel branch and its adapters run as the ``before_layer`` hook."""
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding)
        if self.parallel_branch is None:
            return EncoderInput(hidden_states)
        stage_at = {position: stage for stage, position in enumerate(self.config.parallel_branch_lateral_layers)}
        branch = {"features": pixel_values.to(hidden_states.dtype)}

        def before_layer(position: int, tokens: torch.Tensor) -> torch.Tensor:
            stage = stage_at.get(position)
            if stage is None:
                return tokens
            branch["features"] = self.parallel_branch.run_stage(stage, branch["features"])
            return self.lateral_adapters[stage](tokens, branch["features"])

        return EncoderInput(hidden_states, before_layer=before_layer)

    def pool(
        self,
        encoded: tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None],
        final_layer_norm: nn.Module,
    ) -> BaseModelOutputWithPooling:
        """The tower output from the encoder's (last hidden state, hidden states, attentions): ``pooler_output`` is
        the class token after ``final_layer_norm``."""
        last_hidden_state, hidden_states, attentions = encoded
        pooled = final_layer_norm(last_hidden_state[:, 0])
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=hidden_states,
            attentions=attentions,
        )


class MSClipProjectionHead(nn.Module):
    """What follows the blocks: the final LayerNorm of the pooled token and the projection into the joint space.

    Each is a `MSClipModalityModules` built by `modality_modules` like a block component, shared when
    ``config.shared_head_components`` names it (``"final_layer_norm"``, ``"projection"``).
    `MSClipForImageClassification` builds it for the vision tower without the projection.
    """

    def __init__(
        self, config: MSClipConfig, modalities: tuple[str, ...] = MODALITIES, with_projection: bool = True
    ) -> None:
        super().__init__()
        shared = set(config.shared_head_components)
        self.final_layer_norm = modality_modules(config, "final_layer_norm" in shared, modalities, tower_layer_norm)
        self.projection = None
        if with_projection:
            projection_dim = config.projection_dim
            self.projection = modality_modules(
                config,
                "projection" in shared,
                modalities,
                lambda tower: nn.Linear(tower.hidden_size, projection_dim, bias=False),
            )

    def layer_norm(self, modality: str) -> nn.Module:
        """The final LayerNorm of ``modality``'s pooled token."""
        return self.final_layer_norm.for_modality(modality)

    def project(self, modality: str, pooled: torch.Tensor) -> torch.Tensor:
        """``modality``'s normalised pooled token in the joint embedding space (unnormalised)."""
        if self.projection is None:
            raise ValueError("this head has no projection (it belongs to an image classifier)")
        return self.projection.for_modality(modality)(pooled)


# Checkpoint keys of earlier layouts and their names now: the head before it was built from `MSClipModalityModules`
# (relative to the model that owns it; an `MSClipForPreTraining` checkpoint holds them under ``msclip.``) and the nCLIP
# centre before the objective became one module (`loss_msclip.build_objective`).
LEGACY_KEYS = {
    "text_model.final_layer_norm.": "projection_head.final_layer_norm.text.",
    "vision_model.post_layernorm.": "projection_head.final_layer_norm.vision.",
    "text_projection.": "projection_head.projection.text.",
    "visual_projection.": "projection_head.projection.vision.",
    "head_layer_norm.": "projection_head.final_layer_norm.shared.",  # share_projection_head=True
    "projection.": "projection_head.projection.shared.",
    "nclip_loss.": "objective.nclip.",  # the nCLIP centre, before the objective became one module
}
# The prefixes under which a checkpoint may hold those keys: the model's own, or MSClipForPreTraining's.
LEGACY_KEY_PREFIXES = ("", "msclip.")


def rename_legacy_keys(state_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Rename, in place, the keys of ``state_dict`` under ``prefix`` that are spelled as in an earlier layout
    (`LEGACY_KEYS`); returns ``state_dict``. Keys in the current layout are left alone."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        relative = key[len(prefix) :]
        for old, new in LEGACY_KEYS.items():
            if relative.startswith(old):
                state_dict[prefix + new + relative[len(old) :]] = state_dict.pop(key)
                break
    return state_dict


def _rename_legacy_keys_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # `load_state_dict` pre-hook of the models that own a head: the old key names load into the new modules.
    rename_legacy_keys(state_dict, prefix)


def legacy_key_mapping() -> dict[str, str]:
    """`LEGACY_KEYS` as the ``key_mapping`` of transformers' ``from_pretrained`` (anchored regexes)."""
    return {
        f"^{re.escape(prefix + old)}": prefix + new
        for prefix in LEGACY_KEY_PREFIXES
        for old, new in LEGACY_KEYS.items()
    }


def padding_mask_to_additive(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, length) 1/0 padding mask → (batch, 1, 1, length) additive mask for bidirectional attention."""
    blocked = attention_mask[:, None, None, :].eq(0)
    return torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        blocked, torch.finfo(dtype).min
    )


# --------------------------------------------------------------------------------------------------------------------
# Pretrained models
# --------------------------------------------------------------------------------------------------------------------


# Written into every saved config so that a checkpoint folder loads with ``trust_remote_code=True`` where this
# package is not installed (transformers copies this file and its sibling imports next to the weights).
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_msclip.MSClipConfig",
    "AutoModel": "modeling_msclip.MSClipModel",
    "AutoModelForZeroShotImageClassification": "modeling_msclip.MSClipModel",
    "AutoModelForImageClassification": "modeling_msclip.MSClipForImageClassification",
    "AutoModelForPreTraining": "modeling_msclip.MSClipForPreTraining",
}


def reject_unknown_kwargs(method: str, kwargs: dict[str, Any], accepted: tuple[str, ...] = ()) -> None:
    """Raise a `TypeError` naming every keyword argument of ``method`` that it would otherwise drop silently."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"{method} got unexpected keyword argument(s) {unknown}")


# What get_text_features / get_image_features read from their keyword arguments (transformers 5 passes these).
FEATURE_KWARGS = ("output_hidden_states", "output_attentions")


class MSClipPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by all MS-CLIP models."""

    config_class = MSClipConfig
    config: MSClipConfig
    base_model_prefix = "msclip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MSClipEncoderLayer", "MSClipTextEmbeddings", "MSClipVisionEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Every loss here is a mean over the pairs or images of the micro-batch, never a sum over the Trainer's
    # `num_items_in_batch`: the Trainer must divide by the gradient-accumulation steps itself (it would not if it
    # believed the forwards took loss keyword arguments, which it infers from `**kwargs`).
    accepts_loss_kwargs = False

    def __init__(self, config: MSClipConfig, *inputs: Any, **kwargs: Any) -> None:
        super().__init__(config, *inputs, **kwargs)
        config.auto_map = {**REMOTE_CODE_AUTO_MAP, **(getattr(config, "auto_map", None) or {})}

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``; a checkpoint with the head's old key names (`LEGACY_KEYS`) loads
        too, and the model then saves the current names."""
        legacy = legacy_key_mapping()
        kwargs["key_mapping"] = {**legacy, **(kwargs.get("key_mapping") or {})}
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # transformers reverts on save the renamings a load used, to keep a checkpoint's layout; these migrate it.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                conversion
                for conversion in conversions
                if not set(getattr(conversion, "_original_source_patterns", ())) & legacy.keys()
            ]
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        factor = self.config.initializer_factor
        if isinstance(module, MSClipTextEmbeddings):
            init.normal_(module.token_embedding.weight, std=0.02 * factor)
            init.normal_(module.position_embedding, std=0.01 * factor)
        elif isinstance(module, MSClipVisionEmbeddings):
            width = module.config.hidden_size
            init.normal_(module.class_embedding, std=width**-0.5 * factor)
            init.normal_(module.position_embedding, std=width**-0.5 * factor)
            if isinstance(module.patch_embedding, nn.Conv2d):
                init.normal_(module.patch_embedding.weight, std=module.config.initializer_range * factor)
        elif isinstance(module, MSClipAttention):
            # A shared attention holds the sub-config of `config.shared_settings_from`: that tower's depth scales it.
            # Not reached at present: for remote-code classes transformers 5 skips modules without parameters of their
            # own (`PreTrainedModel._initialize_weights`), so the Linear branch below initialises these and the MLPs.
            config = module.config
            in_std = module.embed_dim**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * factor
            init.normal_(module.qkv_proj.weight, std=in_std)
            init.zeros_(module.qkv_proj.bias)
            init.normal_(module.out_proj.weight, std=module.embed_dim**-0.5 * factor)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, MSClipMLP):
            width = module.fc1.in_features
            init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
            init.zeros_(module.fc1.bias)
            init.normal_(module.fc2.weight, std=width**-0.5 * factor)
            init.zeros_(module.fc2.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # A module may declare its own init (the nCLIP head: truncated normal), otherwise CLIP's fan-in normal.
            declared_std = getattr(module, "trunc_normal_std", None)
            if declared_std is not None:
                init.trunc_normal_(module.weight, std=declared_std)
            else:
                init.normal_(module.weight, std=module.in_features**-0.5 * factor)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MSClipModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
        elif isinstance(module, NClipPrototypes):
            bound = module.dim**-0.5
            init.uniform_(module.weight, -bound, bound)
            if module.norm is not None:
                init.ones_(module.norm)
        elif isinstance(module, NClipLoss):
            init.zeros_(module.center)
        elif isinstance(module, MSClipForPreTraining) and module.logit_bias is not None:
            init.constant_(module.logit_bias, self.config.objective_config.siglip_logit_bias_init)


class MSClipModel(MSClipPreTrainedModel):
    """MS-CLIP dual encoder with a shared block stack (see the module docstring for the layout)."""

    main_input_name = "input_ids"

    def __init__(self, config: MSClipConfig) -> None:
        super().__init__(config)
        self.text_model = MSClipTextTower(config.text_config)
        self.vision_model = MSClipVisionTower(config.vision_config)
        self.encoder = MSClipEncoder(config)
        self.projection_head = MSClipProjectionHead(config)
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init_value)))
        self.register_load_state_dict_pre_hook(_rename_legacy_keys_hook)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embeddings.token_embedding = value

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPooling:
        """Text tower output whose ``pooler_output`` is the projected, unnormalised text embedding."""
        head = self.projection_head
        output = self.text_model(
            self.encoder, head.layer_norm("text"), input_ids, attention_mask, output_hidden_states, output_attentions
        )
        output.pooler_output = head.project("text", output.pooler_output)
        return output

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> BaseModelOutputWithPooling:
        """Vision tower output whose ``pooler_output`` is the projected, unnormalised image embedding."""
        head = self.projection_head
        output = self.vision_model(
            self.encoder,
            head.layer_norm("vision"),
            pixel_values,
            output_hidden_states,
            output_attentions,
            interpolate_pos_encoding,
        )
        output.pooler_output = head.project("vision", output.pooler_output)
        return output

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """transformers-5 style text features: ``pooler_output`` is the projected, unnormalised embedding."""
        reject_unknown_kwargs("get_text_features", kwargs, FEATURE_KWARGS)
        if position_ids is not None:
            raise ValueError("MS-CLIP uses absolute learned positions 0..L-1; position_ids are not supported")
        return self.encode_text(
            input_ids,
            attention_mask,
            output_hidden_states=bool(kwargs.get("output_hidden_states", False)),
            output_attentions=bool(kwargs.get("output_attentions", False)),
        )

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """transformers-5 style image features: ``pooler_output`` is the projected, unnormalised embedding."""
        reject_unknown_kwargs("get_image_features", kwargs, FEATURE_KWARGS)
        return self.encode_image(
            pixel_values,
            output_hidden_states=bool(kwargs.get("output_hidden_states", False)),
            output_attentions=bool(kwargs.get("output_attentions", False)),
            interpolate_pos_encoding=interpolate_pos_encoding,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MSClipOutput | tuple:
        """Embed both modalities and score every image against every text.

        Returns `MSClipOutput`; the loss (``return_loss=True``) is the symmetric contrastive loss of this batch
        alone. Cross-device negatives, SigLIP and nCLIP live in `loss_msclip` and the trainer.
        """
        reject_unknown_kwargs("MSClipModel.forward", kwargs)
        if input_ids is None or pixel_values is None:
            raise ValueError(
                "MSClipModel.forward needs both input_ids and pixel_values; use get_text_features / "
                "get_image_features for one modality"
            )
        if position_ids is not None:
            raise ValueError("MS-CLIP uses absolute learned positions 0..L-1; position_ids are not supported")
        if return_loss:
            check_paired_batch(input_ids, pixel_values)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        vision_outputs = self.encode_image(
            pixel_values, output_hidden_states, output_attentions, interpolate_pos_encoding
        )
        text_outputs = self.encode_text(input_ids, attention_mask, output_hidden_states, output_attentions)
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        logits_per_image = logits_per_text.t()
        loss = symmetric_contrastive_loss(logits_per_image) if return_loss else None
        output = MSClipOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            logit_scale=self.logit_scale,
        )
        return output if return_dict else output.to_tuple()


def check_paired_batch(input_ids: torch.Tensor | None, pixel_values: torch.Tensor | None) -> None:
    """A loss pairs text ``i`` with image ``i``: raise a ValueError naming both batch sizes when they differ."""
    if input_ids is None or pixel_values is None:
        raise ValueError("the loss needs both input_ids and pixel_values (pairs of a caption and an image)")
    if hasattr(input_ids, "shape") and hasattr(pixel_values, "shape") and input_ids.shape[:1] != pixel_values.shape[:1]:
        raise ValueError(
            f"the loss pairs caption i with image i, but input_ids has {input_ids.shape[0]} captions and "
            f"pixel_values {pixel_values.shape[0]} images"
        )


def symmetric_contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Mean of image→text and text→image cross-entropies with matching pairs on the diagonal (computed in fp32)."""
    logits = logits_per_image.float()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@dataclass
class MSClipPreTrainingOutput(ModelOutput):
    """Output of `MSClipForPreTraining`.

    Attributes:
        loss: The configured objective on the global batch (this rank's share under data parallelism).
        logits_per_image: Local-batch logits, as in `MSClipOutput`.
        logits_per_text: Transpose of ``logits_per_image``.
        text_embeds: L2-normalised text embeddings of this rank.
        image_embeds: L2-normalised image embeddings of this rank.
        logit_scale: Log temperature used by the contrastive terms.
        logit_bias: SigLIP logit bias (``loss="siglip"`` only).
        image_prototype_scores: nCLIP prototype scores of the images (``nclip``/``xclip`` only).
        text_prototype_scores: nCLIP prototype scores of the texts.
        loss_terms: Detached scalar terms and diagnostics for logging (``clip``, ``pred``, entropies, ...).
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None
    image_prototype_scores: torch.Tensor | None = None
    text_prototype_scores: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None


class MSClipForPreTraining(MSClipPreTrainedModel):
    """`MSClipModel` plus what only pre-training needs: ``objective``, the module `loss_msclip.build_objective` makes
    of ``config.objective`` (the forward's only loss call), and the parameters it reads: the nCLIP heads and the
    SigLIP bias.

    Its checkpoints hold ``msclip.*`` (loadable by `MSClipModel.from_pretrained`, which drops the prefix and the
    training-only weights) and the heads, so a resumed run continues exactly. The loss works across ranks of the
    default process group (see `loss_msclip`).
    """

    def __init__(self, config: MSClipConfig) -> None:
        super().__init__(config)
        settings = config.objective_config
        self.msclip = MSClipModel(config)
        self.objective = build_objective(config)
        # The parameters the objective reads are the model's, under the keys checkpoints have always had.
        self.logit_bias = None
        self.image_head = self.text_head = None
        if self.objective.uses_logit_bias:
            self.logit_bias = nn.Parameter(torch.full((1,), float(settings.siglip_logit_bias_init)))
        if self.objective.uses_prototype_scores:
            head_kwargs = {
                "in_dim": config.projection_dim,
                "hidden_dim": settings.nclip_hidden_dim,
                "bottleneck_dim": settings.nclip_bottleneck_dim,
                "num_layers": settings.nclip_head_layers,
                "num_prototypes": settings.nclip_num_prototypes,
            }
            self.image_head = NClipHead(**head_kwargs)
            shared_prototypes = self.image_head.prototypes if settings.nclip_share_prototypes else None
            self.text_head = NClipHead(**head_kwargs, prototypes=shared_prototypes)
            if shared_prototypes is not None:
                # One prototype matrix reachable from both heads: declared so checkpoints store it once.
                self._tied_weights_keys = {
                    f"text_head.prototypes.{name}": f"image_head.prototypes.{name}"
                    for name, _ in shared_prototypes.named_parameters()
                }
        if not self.objective.trains_logit_scale:
            # Nothing trains the temperature (pure nCLIP), and DDP (which runs without searching for unused
            # parameters) must not wait for its gradient.
            self.msclip.logit_scale.requires_grad_(False)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys_hook)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.msclip.get_input_embeddings()

    def get_text_features(self, *args: Any, **kwargs: Any) -> BaseModelOutputWithPooling:
        """`MSClipModel.get_text_features` of the wrapped model (for evaluation during pre-training)."""
        return self.msclip.get_text_features(*args, **kwargs)

    def get_image_features(self, *args: Any, **kwargs: Any) -> BaseModelOutputWithPooling:
        """`MSClipModel.get_image_features` of the wrapped model (for evaluation during pre-training)."""
        return self.msclip.get_image_features(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = True,
        **kwargs: Any,
    ) -> MSClipPreTrainingOutput:
        """Embed the pairs and, with ``return_loss`` (the default), compute the configured objective."""
        reject_unknown_kwargs("MSClipForPreTraining.forward", kwargs)
        if return_loss:
            check_paired_batch(input_ids, pixel_values)
        outputs = self.msclip(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        result = MSClipPreTrainingOutput(
            logits_per_image=outputs.logits_per_image,
            logits_per_text=outputs.logits_per_text,
            text_embeds=outputs.text_embeds,
            image_embeds=outputs.image_embeds,
            logit_scale=outputs.logit_scale,
            logit_bias=self.logit_bias,
        )
        if self.image_head is not None:
            result.image_prototype_scores = self.image_head(outputs.vision_model_output.pooler_output)
            result.text_prototype_scores = self.text_head(outputs.text_model_output.pooler_output)
        if not return_loss:
            return result
        loss, terms = self.objective(result)
        result.loss = loss
        result.loss_terms = {key: value.detach().float().reshape(()) for key, value in terms.items()}
        return result


class MSClipForImageClassification(MSClipPreTrainedModel):
    """MS-CLIP vision tower (with its share of the block stack) and a linear head on the class token.

    Parameter names match `MSClipModel`, so ``from_pretrained`` on an MS-CLIP checkpoint loads the vision weights
    (text-only weights are reported as unused) and initialises the classifier.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: MSClipConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = MSClipVisionTower(config.vision_config)
        self.encoder = MSClipEncoder(config, modalities=("vision",))
        # The vision final LayerNorm, shared or not as in MSClipModel and under its name; the projection is not used.
        self.projection_head = MSClipProjectionHead(config, modalities=("vision",), with_projection=False)
        self.classifier = nn.Linear(config.vision_config.hidden_size, config.num_labels)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys_hook)
        self.post_init()

    def pooled_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> BaseModelOutputWithPooling:
        """The vision tower output whose ``pooler_output`` is the input of the classifier: the class token after the
        final LayerNorm (no projection)."""
        return self.vision_model(
            self.encoder,
            self.projection_head.layer_norm("vision"),
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput | tuple:
        """Classify images; with ``labels`` also return the cross-entropy loss."""
        reject_unknown_kwargs("MSClipForImageClassification.forward", kwargs)
        if pixel_values is None:
            raise ValueError("MSClipForImageClassification.forward needs pixel_values")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.pooled_image_features(
            pixel_values,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = F.cross_entropy(logits.float(), labels.to(logits.device)) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


MSClipModel.register_for_auto_class("AutoModel")
MSClipForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MSClipForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "MSClipForImageClassification",
    "MSClipForPreTraining",
    "MSClipPreTrainingOutput",
    "MSClipModel",
    "MSClipOutput",
    "MSClipPreTrainedModel",
]
