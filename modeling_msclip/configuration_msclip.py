"""MS-CLIP configuration: text tower, vision tower and the sharing spectrum between them.

One block position `i` exists in both towers (text layer `i`, vision layer `i`). `MSClipConfig.shared_components[i]`
lists which parts of block `i` are one module used by both modalities:

* ``"attention"``   - the fused QKV projection and the output projection,
* ``"mlp"``         - both MLP linears,
* ``"layer_norm1"`` - the LayerNorm before attention,
* ``"layer_norm2"`` - the LayerNorm before the MLP.

The heads after the blocks are shared the same way: `MSClipConfig.shared_head_components` names which of

* ``"final_layer_norm"`` - the LayerNorm on the pooled token (text ``ln_final``, vision ``ln_post``),
* ``"projection"``       - the linear map into the joint embedding space,

are one module for both modalities. Everything else is modality-specific. These lists express the whole spectrum:
vanilla CLIP (nothing shared, the text tower may even be narrower), MS-CLIP (attention + MLP shared in every block),
MS-CLIP-S (shared from block 1 on, a convolutional stem replacing vision block 0 and a parallel CNN branch) and a
single tower (every block component shared, LayerNorms included, and both head components).

A shared module is built from one tower's sub-config, ``MSClipConfig.shared_settings_from``. Every setting its
computation reads (`SHARED_SETTINGS`) must be equal in both towers, which the config checks; the choice therefore only
decides what else the module reads from that tower's sub-config: the attention implementation when the two were given
different ones, and the depth ``num_hidden_layers`` that `_init_weights` reads for the attention initialisation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from importlib import resources
from typing import Any

from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

SHAREABLE_COMPONENTS = ("attention", "mlp", "layer_norm1", "layer_norm2")
SHAREABLE_HEAD_COMPONENTS = ("final_layer_norm", "projection")
# The tower settings each shareable component computes with: one module can serve both towers only where they agree.
SHARED_SETTINGS = {
    "attention": ("hidden_size", "num_attention_heads", "attention_dropout"),
    "mlp": ("hidden_size", "intermediate_size", "hidden_act"),
    "layer_norm1": ("hidden_size", "layer_norm_eps"),
    "layer_norm2": ("hidden_size", "layer_norm_eps"),
    "final_layer_norm": ("hidden_size", "layer_norm_eps"),
    "projection": ("hidden_size",),
}
MODALITIES = ("text", "vision")
VISION_EMBEDDING_TYPES = ("patch", "conv_stem")
PRETRAINING_LOSSES = ("clip", "siglip", "nclip", "xclip")


@dataclass
class MSClipObjectiveConfig:
    """The pre-training objective of `MSClipForPreTraining` (stored in ``MSClipConfig.objective``).

    Every default is a project default, not a value taken from the nCLIP/xCLIP paper (whose full text was not
    available; see docs/losses.md).

    Args:
        loss: ``"clip"`` (symmetric InfoNCE), ``"siglip"`` (sigmoid), ``"nclip"`` (non-contrastive) or ``"xclip"``
            (``clip_weight * CLIP + nclip_weight * nCLIP``).
        local_loss: Each rank scores its own rows against the gathered batch (memory O(B·N) instead of O(N²)).
        gather_with_grad: Gather features across ranks with an autograd all-gather.
        clip_weight: Weight of the CLIP term in xCLIP.
        nclip_weight: Weight of the nCLIP term in xCLIP.
        siglip_logit_bias_init: Initial SigLIP logit bias.
        nclip_head_layers: Linear layers of each nCLIP projection MLP.
        nclip_hidden_dim: Hidden width of the nCLIP MLP.
        nclip_bottleneck_dim: Output width of the nCLIP MLP (L2-normalised before the prototypes).
        nclip_num_prototypes: Number of prototypes K.
        nclip_share_prototypes: One prototype matrix for both modalities.
        nclip_student_temperature: Student softmax temperature.
        nclip_teacher_temperature: Teacher (target) softmax temperature.
        nclip_stop_grad_targets: Detach the targets.
        nclip_center_momentum: DINO-style centring momentum (``None`` disables centring).
        nclip_lambda_sharp: Weight of the per-sample entropy (sharpness) term.
        nclip_lambda_smooth: Weight of the batch-mean entropy (smoothness) term that prevents collapse.
    """

    loss: str = "clip"
    local_loss: bool = True
    gather_with_grad: bool = True
    clip_weight: float = 1.0
    nclip_weight: float = 1.0
    siglip_logit_bias_init: float = -10.0
    nclip_head_layers: int = 3
    nclip_hidden_dim: int = 2048
    nclip_bottleneck_dim: int = 256
    nclip_num_prototypes: int = 65536
    nclip_share_prototypes: bool = True
    nclip_student_temperature: float = 0.1
    nclip_teacher_temperature: float = 0.04
    nclip_stop_grad_targets: bool = True
    nclip_center_momentum: float | None = None
    nclip_lambda_sharp: float = 0.0
    nclip_lambda_smooth: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in PRETRAINING_LOSSES:
            raise ValueError(f"objective loss must be one of {PRETRAINING_LOSSES}, got {self.loss!r}")

    @property
    def uses_nclip(self) -> bool:
        return self.loss in ("nclip", "xclip")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> MSClipObjectiveConfig:
        """Build from a (possibly partial) dict, rejecting unknown keys by name."""
        values = dict(values or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown objective settings {sorted(unknown)}")
        return cls(**values)


TEXT_POOLINGS = ("eos", "argmax")


class MSClipTextConfig(PreTrainedConfig):
    """Configuration of the MS-CLIP text tower.

    Args:
        vocab_size: Size of the BPE vocabulary.
        hidden_size: Width of the text transformer.
        intermediate_size: Hidden size of the MLP.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Number of attention heads.
        max_position_embeddings: Context length (77 for CLIP tokenizers).
        hidden_act: MLP activation (``"quick_gelu"`` in CLIP and MS-CLIP).
        layer_norm_eps: LayerNorm epsilon (the official MS-CLIP code uses 1e-12, OpenAI CLIP 1e-5).
        attention_dropout: Dropout on attention probabilities.
        causal: Causal self-attention (CLIP); ``False`` gives bidirectional text attention (single-tower variants),
            in which case padding is masked with ``attention_mask``.
        trim_padding: Drop right padding past the last end-of-text token of a batch before the blocks run. Exact for
            causal attention and for masked bidirectional attention; turn off to keep static shapes.
        pooling: Which token's state is the text embedding: ``"eos"``, the first ``eos_token_id`` of each row, as
            transformers' CLIP pools (a row without it is an error); ``"argmax"``, the largest id of each row, as the
            official MS-CLIP and OpenAI CLIP code pools (the same token when the end token has the largest id and is
            present; a row whose end token was cut off pools at its largest id). The presets use ``"argmax"``.
        initializer_range: Standard deviation of the normal initialisers.
        initializer_factor: Global multiplier of initialisation scales.
    """

    model_type = "msclip_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 49408,
        hidden_size: int = 512,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        max_position_embeddings: int = 77,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        causal: bool = True,
        trim_padding: bool = True,
        pooling: str = "eos",
        initializer_range: float = 0.02,
        initializer_factor: float = 1.0,
        pad_token_id: int = 0,
        bos_token_id: int = 49406,
        eos_token_id: int = 49407,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.causal = causal
        self.trim_padding = trim_padding
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_config.pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        _check_heads(self, "text_config")


class MSClipVisionConfig(PreTrainedConfig):
    """Configuration of the MS-CLIP vision tower.

    Args:
        hidden_size: Width of the vision transformer.
        intermediate_size: Hidden size of the MLP.
        num_hidden_layers: Number of block positions. With ``embedding_type="conv_stem"`` position 0 is taken by the
            convolutional stem ("early specialization"), so the tower has ``num_hidden_layers - 1`` attention blocks.
        num_attention_heads: Number of attention heads.
        num_channels: Image channels.
        image_size: Input resolution (square).
        patch_size: Patch size of the token grid; for the conv stem it must equal the stem's total stride.
        hidden_act: MLP activation.
        layer_norm_eps: LayerNorm epsilon.
        attention_dropout: Dropout on attention probabilities.
        patch_dropout: Fraction of patch tokens each image drops at random while training (FLIP-style; the class
            token is always kept, nothing is dropped in ``eval()``). 0.5 roughly halves the vision tower's cost per
            pair. Not available with the parallel branch, whose lateral adapters convolve the full token grid.
        embedding_type: ``"patch"`` (a strided patch convolution, as in ViT/CLIP) or ``"conv_stem"`` (MS-CLIP-S).
        conv_stem_strides: Strides of the four residual stem stages after the first stride-2 convolution.
        batch_norm_eps: Epsilon of the BatchNorms in the stem and the lateral adapters.
        parallel_branch_strides: Strides of the five stages of the efficient parallel branch, a CNN on the raw image
            (``None`` disables the branch).
        parallel_branch_lateral_layers: Block positions before which a parallel stage runs and a lateral adapter
            merges it into the tokens (one per stage).
        parallel_branch_lateral_kernels: Kernel (= stride) of each adapter's depthwise convolution that brings the
            branch feature map down to the token grid.
        parallel_branch_batch_norm_eps: Epsilon of the BatchNorms inside the branch's bottleneck blocks.
        parallel_branch_use_cls: Prepend the class token to the branch path as well (the official setting), so the
            class slot receives twice the class token before the adapter's LayerNorm.
        initializer_range: Standard deviation of the normal initialisers.
        initializer_factor: Global multiplier of initialisation scales.
    """

    model_type = "msclip_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 32,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        patch_dropout: float = 0.0,
        embedding_type: str = "patch",
        conv_stem_strides: list[int] | None = None,
        batch_norm_eps: float = 1e-5,
        parallel_branch_strides: list[int] | None = None,
        parallel_branch_lateral_layers: list[int] | None = None,
        parallel_branch_lateral_kernels: list[int] | None = None,
        parallel_branch_batch_norm_eps: float = 1e-6,
        parallel_branch_use_cls: bool = True,
        initializer_range: float = 0.02,
        initializer_factor: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.patch_dropout = patch_dropout
        self.embedding_type = embedding_type
        self.conv_stem_strides = list(conv_stem_strides) if conv_stem_strides is not None else [2, 2, 2, 2]
        self.batch_norm_eps = batch_norm_eps
        self.parallel_branch_strides = list(parallel_branch_strides) if parallel_branch_strides else None
        self.parallel_branch_lateral_layers = list(parallel_branch_lateral_layers or [])
        self.parallel_branch_lateral_kernels = list(parallel_branch_lateral_kernels or [])
        self.parallel_branch_batch_norm_eps = parallel_branch_batch_norm_eps
        self.parallel_branch_use_cls = parallel_branch_use_cls
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        super().__init__(**kwargs)
        self.validate()

    @property
    def first_attention_layer(self) -> int:
        """Block position of the first vision attention block (1 when the conv stem replaces block 0)."""
        return 1 if self.embedding_type == "conv_stem" else 0

    @property
    def grid_size(self) -> int:
        """Side of the square token grid."""
        return self.image_size // self.patch_size

    def validate(self) -> None:
        """Check that the fields fit together (raises ValueError naming the field); runs at construction, when
        transformers saves the config, and after a field is changed in place (e.g. ``--patch_dropout``)."""
        _check_heads(self, "vision_config")
        if self.embedding_type not in VISION_EMBEDDING_TYPES:
            raise ValueError(
                f"vision_config.embedding_type must be one of {VISION_EMBEDDING_TYPES}, got {self.embedding_type!r}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.embedding_type == "conv_stem":
            if len(self.conv_stem_strides) != 4:
                raise ValueError(f"vision_config.conv_stem_strides needs 4 strides, got {self.conv_stem_strides}")
            total_stride = 2 * math.prod(self.conv_stem_strides)
            if total_stride != self.patch_size:
                raise ValueError(
                    f"the conv stem's total stride 2*prod({self.conv_stem_strides}) = {total_stride} "
                    f"must equal vision_config.patch_size ({self.patch_size})"
                )
            if self.hidden_size % 16:
                raise ValueError(
                    f"the conv stem needs vision_config.hidden_size divisible by 16, got {self.hidden_size}"
                )
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"vision_config.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.parallel_branch_strides is None:
            return
        if self.patch_dropout:
            raise ValueError(
                "vision_config.patch_dropout is not available with the parallel branch: its lateral adapters "
                "convolve the full token grid. Set patch_dropout to 0 or parallel_branch_strides to None."
            )
        stages = len(self.parallel_branch_strides)
        if stages != 5:
            raise ValueError(
                f"vision_config.parallel_branch_strides needs 5 stage strides, got {self.parallel_branch_strides}"
            )
        if len(self.parallel_branch_lateral_layers) != stages or len(self.parallel_branch_lateral_kernels) != stages:
            raise ValueError(
                "vision_config.parallel_branch_lateral_layers and parallel_branch_lateral_kernels need one "
                f"entry per parallel stage ({stages})"
            )
        layers = self.parallel_branch_lateral_layers
        if (
            sorted(set(layers)) != layers
            or layers[0] < self.first_attention_layer
            or layers[-1] >= self.num_hidden_layers
        ):
            raise ValueError(
                f"vision_config.parallel_branch_lateral_layers {layers} must be increasing vision block "
                f"positions in [{self.first_attention_layer}, {self.num_hidden_layers})"
            )
        resolution = self.image_size
        for stage, (stride, kernel) in enumerate(
            zip(self.parallel_branch_strides, self.parallel_branch_lateral_kernels, strict=True)
        ):
            resolution = -(-resolution // stride)
            if resolution != kernel * self.grid_size:
                raise ValueError(
                    f"parallel stage {stage} yields a {resolution}px map; its lateral kernel {kernel} "
                    f"must bring it to the {self.grid_size}px token grid"
                )


class MSClipConfig(PreTrainedConfig):
    """Configuration of an MS-CLIP dual encoder (and, by its sharing settings, of CLIP and single-tower models).

    Args:
        text_config: Dict or `MSClipTextConfig` of the text tower.
        vision_config: Dict or `MSClipVisionConfig` of the vision tower.
        projection_dim: Size of the joint embedding space.
        shared_components: One list per block position naming the components shared by both towers, from
            ``("attention", "mlp", "layer_norm1", "layer_norm2")``. ``None`` shares nothing (vanilla CLIP).
        shared_head_components: The head components shared by both towers, from ``("final_layer_norm",
            "projection")`` (single-tower models share both). ``None`` shares neither.
        shared_settings_from: The tower (``"text"`` or ``"vision"``) whose sub-config every shared block or head
            module is built from. The settings a shared module computes with must be equal in both towers
            (`SHARED_SETTINGS`, checked); from this tower it takes the rest: the attention implementation if the
            sub-configs were given different ones, and ``num_hidden_layers``, read by the attention initialisation.
        share_projection_head: Legacy spelling, read from configs saved before ``shared_head_components``: ``True``
            means both head components, ``False`` neither. Not stored; giving it with a different
            ``shared_head_components`` is an error.
        logit_scale_init_value: Initial value of the learnable log temperature (CLIP: ln(1/0.07)).
        logit_scale_max: Upper bound of ``exp(logit_scale)`` enforced by the training losses and after optimizer
            steps (the model's forward reproduces the official, unclamped logits).
        objective: Pre-training objective of `MSClipForPreTraining`, a dict of `MSClipObjectiveConfig` fields.
        initializer_factor: Global multiplier of initialisation scales.
    """

    model_type = "msclip"
    sub_configs = {"text_config": MSClipTextConfig, "vision_config": MSClipVisionConfig}

    def __init__(
        self,
        text_config: dict | MSClipTextConfig | None = None,
        vision_config: dict | MSClipVisionConfig | None = None,
        projection_dim: int = 512,
        shared_components: list[list[str]] | None = None,
        shared_head_components: list[str] | None = None,
        shared_settings_from: str = "text",
        share_projection_head: bool | None = None,
        logit_scale_init_value: float = 2.6592,
        logit_scale_max: float = 100.0,
        objective: dict[str, Any] | None = None,
        initializer_factor: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.objective = asdict(MSClipObjectiveConfig.from_dict(objective))
        self.text_config = _as_sub_config(text_config, MSClipTextConfig)
        self.vision_config = _as_sub_config(vision_config, MSClipVisionConfig)
        self.projection_dim = projection_dim
        num_positions = max(self.text_config.num_hidden_layers, self.vision_config.num_hidden_layers)
        if shared_components is None:
            shared_components = [[] for _ in range(num_positions)]
        self.shared_components = [sorted(set(components)) for components in shared_components]
        self.shared_head_components = _head_components(shared_head_components, share_projection_head)
        self.shared_settings_from = shared_settings_from
        if kwargs.pop("batch_shared_blocks", False):
            logger.warning(
                "batch_shared_blocks is no longer a setting (removed: the same outputs as running the towers in turn, "
                "slower on CPU and without gradient checkpointing); the towers run in turn"
            )
        self.logit_scale_init_value = logit_scale_init_value
        self.logit_scale_max = logit_scale_max
        self.initializer_factor = initializer_factor
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self._validate_sharing()

    @property
    def objective_config(self) -> MSClipObjectiveConfig:
        """The validated pre-training objective."""
        return MSClipObjectiveConfig.from_dict(self.objective)

    @property
    def num_block_positions(self) -> int:
        """Number of block positions of the joint encoder (the longer tower's depth)."""
        return len(self.shared_components)

    def layer_modalities(self, position: int) -> tuple[str, ...]:
        """Modalities that run an attention block at ``position``."""
        modalities = []
        if position < self.text_config.num_hidden_layers:
            modalities.append("text")
        if self.vision_config.first_attention_layer <= position < self.vision_config.num_hidden_layers:
            modalities.append("vision")
        return tuple(modalities)

    def modality_config(self, modality: str) -> MSClipTextConfig | MSClipVisionConfig:
        """The sub-config of ``modality`` (``"text"`` or ``"vision"``)."""
        if modality not in ("text", "vision"):
            raise ValueError(f"modality must be 'text' or 'vision', got {modality!r}")
        return self.text_config if modality == "text" else self.vision_config

    def _validate_sharing(self) -> None:
        text, vision = self.text_config, self.vision_config
        if self.shared_settings_from not in MODALITIES:
            raise ValueError(f"shared_settings_from must be one of {MODALITIES}, got {self.shared_settings_from!r}")
        expected = max(text.num_hidden_layers, vision.num_hidden_layers)
        if len(self.shared_components) != expected:
            raise ValueError(
                f"shared_components needs one entry per block position ({expected}), got {len(self.shared_components)}"
            )
        unknown = set(self.shared_head_components) - set(SHAREABLE_HEAD_COMPONENTS)
        if unknown:
            raise ValueError(
                f"shared_head_components has unknown components {sorted(unknown)}; choose from "
                f"{SHAREABLE_HEAD_COMPONENTS}"
            )
        for component in self.shared_head_components:
            self._check_shareable(component, "the heads")
        for position, components in enumerate(self.shared_components):
            unknown = set(components) - set(SHAREABLE_COMPONENTS)
            if unknown:
                raise ValueError(
                    f"shared_components[{position}] has unknown components {sorted(unknown)}; "
                    f"choose from {SHAREABLE_COMPONENTS}"
                )
            if components and len(self.layer_modalities(position)) != 2:
                raise ValueError(
                    f"shared_components[{position}] = {components}, but only "
                    f"{self.layer_modalities(position)} has an attention block at position {position} "
                    "(the conv stem replaces vision block 0)"
                )
            for component in components:
                self._check_shareable(component, f"block {position}")

    def _check_shareable(self, component: str, where: str) -> None:
        for field in SHARED_SETTINGS[component]:
            text_value, vision_value = getattr(self.text_config, field), getattr(self.vision_config, field)
            if text_value != vision_value:
                raise ValueError(
                    f"sharing {component!r} in {where} needs equal text and vision {field}, got {text_value} and "
                    f"{vision_value}"
                )

    @property
    def shared_block_positions(self) -> list[int]:
        """Block positions where at least one component is shared."""
        return [i for i, components in enumerate(self.shared_components) if components]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MSClipConfig:
        """Build a configuration from a named preset (`available_presets()` lists them).

        Keyword overrides replace top-level fields; ``text_config`` / ``vision_config`` overrides are dicts merged
        into the preset's sub-configs.
        """
        presets = available_presets()
        if name not in presets:
            raise ValueError(f"unknown MS-CLIP preset {name!r}; available: {', '.join(presets)}")
        data = json.loads(_presets_folder().joinpath(f"{name}.json").read_text())
        data.pop("description", None)
        for key in ("text_config", "vision_config"):
            data[key] = {**data.get(key, {}), **overrides.pop(key, {})}
        data.update(overrides)
        return cls(**data)


MSClipConfig.register_for_auto_class()


def available_presets() -> list[str]:
    """Names of the packaged model presets (``modeling_msclip/presets/*.json``)."""
    folder = _presets_folder()
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


def _as_sub_config(value: dict | PreTrainedConfig | None, config_class: type[PreTrainedConfig]) -> PreTrainedConfig:
    if value is None:
        return config_class()
    if isinstance(value, config_class):
        return value
    if isinstance(value, dict):
        return config_class(**value)
    if isinstance(value, PreTrainedConfig):
        return config_class(**value.to_dict())
    raise TypeError(f"expected a dict or {config_class.__name__}, got {type(value).__name__}")


def _head_components(components: list[str] | None, share_projection_head: bool | None) -> list[str]:
    """``shared_head_components``, also from the legacy ``share_projection_head`` flag of older saved configs."""
    legacy = None
    if share_projection_head is not None:
        legacy = list(SHAREABLE_HEAD_COMPONENTS) if share_projection_head else []
    if components is None:
        return legacy or []
    components = sorted(set(components))
    if legacy is not None and components != legacy:
        raise ValueError(
            f"share_projection_head={share_projection_head} (the legacy spelling of shared_head_components="
            f"{legacy}) contradicts shared_head_components={components}; give only shared_head_components"
        )
    return components


def _check_heads(config: MSClipTextConfig | MSClipVisionConfig, name: str) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"{name}.hidden_size ({config.hidden_size}) is not a multiple of num_attention_heads "
            f"({config.num_attention_heads})"
        )


__all__ = [
    "MSClipConfig",
    "MSClipObjectiveConfig",
    "MSClipTextConfig",
    "MSClipVisionConfig",
    "SHAREABLE_COMPONENTS",
    "SHAREABLE_HEAD_COMPONENTS",
    "SHARED_SETTINGS",
    "available_presets",
]


def _presets_folder():  # noqa: ANN202 - an importlib Traversable
    return resources.files(__package__).joinpath("presets")
