"""Model metadata: what the runtime needs to know about an exported backbone.

It travels as ONNX ``metadata_props`` (string key/value pairs, all keys prefixed ``musc_edge.``)
and as the JSON sidecar of a TensorRT engine. Export writes it with :meth:`ModelMeta.to_props`;
the runtime reads it back with :meth:`ModelMeta.from_props` and refuses a model without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .errors import ModelError

PREFIX = "musc_edge."
#: Value of ``weights`` for random-init models: their scores mean nothing.
RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class ModelMeta:
    """Everything the runtime and the scorer need to use an exported backbone.

    backbone: registry name (``vit_b16``, ``efficientnet_lite0``, ...).
    weights: weights tag: ``openai``, ``imagenet``, ``sha256:<hex>`` of a local checkpoint, or ``random``.
    image_size: square input side S.
    patch_size: ViT patch size, or the CNN stride of the token grid.
    grid: G, tokens per side (G*G patch tokens per layer).
    layers: tapped layers (1-indexed blocks for ViTs, stage names' indices for CNNs).
    token_dims: channel count C of each tapped layer's output, in output order.
    embed_dim: D, width of the ``embedding`` output.
    mean, std: per-channel normalisation of RGB in [0, 1].
    interpolation: resize filter for preprocessing: ``bicubic`` or ``bilinear``.
    version: musc-edge version that exported the model.
    opset: ONNX opset of the graph.
    input_name: name of the image input.
    """

    backbone: str
    weights: str
    image_size: int
    patch_size: int
    grid: int
    layers: tuple[int, ...]
    token_dims: tuple[int, ...]
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    version: str = ""
    opset: int = 17
    input_name: str = "image"

    @property
    def is_random(self) -> bool:
        """True for random-init weights: scores from such a model mean nothing."""
        return self.weights == RANDOM_WEIGHTS

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(f"tokens_{i}" for i in range(len(self.layers))) + ("embedding",)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("layers", "token_dims", "mean", "std"):
            d[k] = list(d[k])
        return d

    def to_props(self) -> dict[str, str]:
        """Flat string map for ONNX metadata_props (lists as JSON)."""
        return {PREFIX + k: (json.dumps(v) if isinstance(v, list) else str(v)) for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "model") -> "ModelMeta":
        required = {"backbone", "weights", "image_size", "patch_size", "grid", "layers", "token_dims",
                    "embed_dim", "mean", "std"}
        missing = sorted(required - set(d))
        if missing:
            raise ModelError(f"{source} has no musc-edge metadata ({', '.join(missing)} missing); "
                             "export it with `musc-edge export`")
        try:
            return cls(
                backbone=str(d["backbone"]),
                weights=str(d["weights"]),
                image_size=int(d["image_size"]),
                patch_size=int(d["patch_size"]),
                grid=int(d["grid"]),
                layers=tuple(int(x) for x in d["layers"]),
                token_dims=tuple(int(x) for x in d["token_dims"]),
                embed_dim=int(d["embed_dim"]),
                mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
                std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
                interpolation=str(d.get("interpolation", "bicubic")),
                version=str(d.get("version", "")),
                opset=int(d.get("opset", 17)),
                input_name=str(d.get("input_name", "image")),
            )
        except (TypeError, ValueError) as e:
            raise ModelError(f"{source} has malformed musc-edge metadata: {e}") from None

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ModelMeta":
        """Parse ONNX metadata_props written by :meth:`to_props`."""
        d: dict = {}
        for k, v in props.items():
            if not k.startswith(PREFIX):
                continue
            key = k[len(PREFIX):]
            if key in ("layers", "token_dims", "mean", "std"):
                try:
                    d[key] = json.loads(v)
                except json.JSONDecodeError:
                    raise ModelError(f"{source}: metadata {k!r} is not a JSON list: {v!r}") from None
            else:
                d[key] = v
        return cls.from_dict(d, source)

    def compatible_with(self, other: "ModelMeta") -> bool:
        """Same features: tokens from the two models can be scored together."""
        return (self.backbone, self.weights, self.image_size, self.grid, self.layers, self.token_dims) == (
            other.backbone, other.weights, other.image_size, other.grid, other.layers, other.token_dims)
