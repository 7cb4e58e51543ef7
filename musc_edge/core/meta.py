"""Model metadata: what the runtime needs to know about an exported backbone.

It travels as ONNX ``metadata_props`` (string key/value pairs, all keys prefixed ``musc_edge.``)
and as the JSON sidecar of a TensorRT engine. Export writes it with :meth:`ModelMeta.to_props`;
the runtime reads it back with :meth:`ModelMeta.from_props` and refuses a model without it.

The layout is versioned (``schema``, docs/export.md "Metadata"), as anomalib versions its
metadata: a file of an older schema is migrated on read, one of a newer schema is refused with a
line naming both versions, since its keys may mean what this release cannot know.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import ClassVar

from .errors import ModelError

PREFIX = "musc_edge."
#: Value of ``weights`` for random-init models: their scores mean nothing.
RANDOM_WEIGHTS = "random"

#: The metadata layout this release writes and the newest it reads. 1: the first release
#: (no ``schema`` key, no ``family``); 2: adds ``schema`` and ``family``.
SCHEMA = 2
#: Values of ``ModelMeta.family``: what kind of network made the tokens. Code that must treat
#: ViT-style token models and CNNs differently (the INT8 recipe) asks this, never the backbone name.
FAMILIES = ("vit", "cnn")

#: Keys every schema carries (schema 2 adds ``family``, which :func:`migrate_v1` derives).
_REQUIRED = frozenset({"backbone", "weights", "image_size", "patch_size", "grid", "layers", "token_dims",
                       "embed_dim", "mean", "std"})
#: Schema 1 only: registry-name prefix -> family, for the names the first release registered.
_V1_NAME_FAMILIES = (("vit_", "vit"), ("efficientnet", "cnn"))


@dataclass(frozen=True)
class ModelMeta:
    """Everything the runtime and the scorer need to use an exported backbone.

    backbone: registry name (``vit_b16``, ``efficientnet_lite0``, ...): an identity, never a
        switch; ask ``family`` what kind of model it is.
    family: what kind of network it is, one of :data:`FAMILIES`: ``vit`` for ViT-style token
        models (CLIP, DINO), ``cnn`` for convolutional ones (EfficientNet).
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

    ``schema`` is a class constant, not a field: a ModelMeta in memory is always the current
    layout (older files are migrated by :meth:`from_dict`), and :meth:`to_dict` writes it.
    """

    schema: ClassVar[int] = SCHEMA

    backbone: str
    family: str
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

    def __post_init__(self) -> None:
        check_family(self.family, f"backbone {self.backbone!r}")

    @property
    def is_random(self) -> bool:
        """True for random-init weights: scores from such a model mean nothing."""
        return self.weights == RANDOM_WEIGHTS

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(f"tokens_{i}" for i in range(len(self.layers))) + ("embedding",)

    def to_dict(self) -> dict:
        """JSON-ready dict of the current schema (the engine sidecar, saved watch state)."""
        d = {"schema": self.schema, **asdict(self)}
        for k in ("layers", "token_dims", "mean", "std"):
            d[k] = list(d[k])
        return d

    def to_props(self) -> dict[str, str]:
        """Flat string map for ONNX metadata_props (lists as JSON)."""
        return {PREFIX + k: (json.dumps(v) if isinstance(v, list) else str(v)) for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "model") -> "ModelMeta":
        """Read any schema up to :data:`SCHEMA` (older ones migrated); ModelError otherwise."""
        schema = read_schema(d, source)
        missing = sorted(_REQUIRED - set(d))
        if missing:
            raise ModelError(f"{source} has no musc-edge metadata ({', '.join(missing)} missing); "
                             "export it with `musc-edge export`")
        if schema == 1:
            d = migrate_v1(d, source)
        if "family" not in d:
            raise ModelError(f"{source}: musc-edge metadata schema {schema} has no 'family' entry; "
                             "re-export it with `musc-edge export`")
        check_family(d["family"], source)
        try:
            return cls(
                backbone=str(d["backbone"]),
                family=str(d["family"]),
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


def check_family(family: object, source: str) -> None:
    """Refuse a family this release has no code for (a wrong one would pick the wrong INT8 recipe)."""
    if family not in FAMILIES:
        raise ModelError(f"{source}: unknown model family {family!r}; musc-edge knows {', '.join(FAMILIES)}")


def read_schema(d: dict, source: str) -> int:
    """The metadata's schema (1 when the key is absent: the first release wrote none).

    A newer schema than :data:`SCHEMA` is refused: its keys may mean things this release
    cannot know, so reading it as ours could silently misuse the model.
    """
    raw = d.get("schema", 1)
    try:
        schema = int(raw)
    except (TypeError, ValueError):
        raise ModelError(f"{source} has malformed musc-edge metadata: schema {raw!r} is not an integer") from None
    if schema > SCHEMA:
        raise ModelError(f"{source} has musc-edge metadata schema {schema}, but this musc-edge reads schema "
                         f"{SCHEMA} at most; upgrade musc-edge")
    if schema < 1:
        raise ModelError(f"{source} has malformed musc-edge metadata: schema {schema} (schemas start at 1)")
    return schema


def migrate_v1(d: dict, source: str) -> dict:
    """Schema 1 -> 2: ``d`` with ``family`` derived from the backbone's registry name.

    This is the ONE place in musc-edge where a backbone's name decides what the model is, and it
    is allowed only because schema 1 holds nothing better: the first release wrote no family, and
    its registry named every ViT ``vit_*`` (CLIP) and its CNN ``efficientnet_*``. Any other name
    (a backbone someone registered by hand) is refused rather than guessed, since the family picks
    the INT8 recipe and a wrong guess would quantize the model badly without a word
    (docs/export.md "Metadata": re-exporting writes schema 2).
    """
    if "family" in d:  # not written by the first release, but unambiguous: keep it
        return dict(d)
    name = str(d["backbone"])
    for prefix, family in _V1_NAME_FAMILIES:
        if name.startswith(prefix):
            return {**d, "family": family}
    raise ModelError(f"{source}: metadata schema 1 does not say the model family, and backbone {name!r} is not "
                     "a vit_* or efficientnet_* backbone of the first release; re-export the model with "
                     "`musc-edge export` (schema 2 records the family)")
