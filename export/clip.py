"""CLIP ViT backbones through open_clip: build, load weights, tap the residual stream.

:class:`ClipTaps` is the graph we export (MUSC_SPEC 1): ``tokens_i`` is the residual stream after
the i-th tapped transformer block (1-indexed; CLS first, no final LayerNorm, no projection) and
``embedding`` is ``ln_post(CLS) @ proj``, L2-normalised.

Pruning: blocks after the last tapped layer are dropped from the graph. With the default layers
(the last block is tapped) nothing is dropped and ``embedding`` is CLIP's own image embedding.
With earlier last layers (``--layers 3,6``) the embedding is taken from the CLS token of the last
kept block through the same ``ln_post`` and ``proj``; the metadata records the block it came from
(``embedding_layer``). ``keep_all_blocks=True`` keeps every block so that the embedding stays
CLIP's own, at the cost of running the unused blocks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from musc_edge.core.errors import InputError, ModelError

from .backbones import BackboneSpec, BuiltBackbone
from .weights import WeightsChoice, fetch_clip_checkpoint, load_state_dict

#: Seed of ``--weights random``: the same random model every time.
RANDOM_SEED = 0


class ExportBlock(nn.Module):
    """An open_clip ``ResidualAttentionBlock`` with its attention written out in plain ops.

    Same weights (shared, not copied), same arithmetic as ``nn.MultiheadAttention``; but the
    token count and head layout are constants, so the traced graph has a few Reshape/Transpose
    nodes per block instead of the shape arithmetic of the generic module, and no fused fast path
    (which the exporter cannot translate) can be taken.
    """

    def __init__(self, block: nn.Module, tokens: int) -> None:
        super().__init__()
        attn = block.attn
        self.ln_1, self.ln_2, self.mlp = block.ln_1, block.ln_2, block.mlp
        self.ls_1, self.ls_2 = block.ls_1, block.ls_2
        self.in_proj_weight, self.in_proj_bias, self.out_proj = attn.in_proj_weight, attn.in_proj_bias, attn.out_proj
        self.heads, self.head_dim, self.tokens = attn.num_heads, attn.head_dim, tokens
        self.scale = float(attn.head_dim) ** -0.5

    @staticmethod
    def supports(block: nn.Module) -> bool:
        """Plain self-attention blocks (the OpenAI CLIP ViTs); others keep open_clip's module."""
        attn = getattr(block, "attn", None)
        return (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.batch_first
                and attn.in_proj_bias is not None and not hasattr(block, "ln_1_kv"))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(-1, self.tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                       # (B, H, L, d)
        a = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        y = (a @ v).transpose(1, 2).reshape(-1, self.tokens, self.heads * self.head_dim)
        return self.out_proj(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attention(self.ln_1(x)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class ClipTaps(nn.Module):
    """open_clip ``VisionTransformer`` -> (tokens after the tapped blocks..., embedding).

    ``for_export=True`` swaps each block for an :class:`ExportBlock` sharing its weights; the
    default runs open_clip's own blocks (with torch's fused attention), the reference the export
    is checked against.
    """

    def __init__(self, visual: nn.Module, layers: tuple[int, ...], keep_all_blocks: bool = False,
                 for_export: bool = False) -> None:
        super().__init__()
        blocks = visual.transformer.resblocks
        n_keep = len(blocks) if keep_all_blocks else max(layers)
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        tokens = int(visual.positional_embedding.shape[0])
        kept = list(blocks[:n_keep])
        if for_export:
            kept = [ExportBlock(b, tokens) if ExportBlock.supports(b) else b for b in kept]
        self.blocks = nn.ModuleList(kept)
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.taps = tuple(layers)

    @property
    def embedding_layer(self) -> int:
        return len(self.blocks)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.conv1(image)                                  # (B, C, G, G)
        x = x.flatten(2).transpose(1, 2)                       # (B, G*G, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        taps = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in self.taps:
                taps.append(x)
        emb = self.ln_post(x[:, 0]) @ self.proj
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return (*taps, emb)


def build_visual(spec: BackboneSpec, image_size: int) -> nn.Module:
    """An open_clip vision tower of ``spec.arch`` for input side ``image_size`` (random init)."""
    import open_clip
    from open_clip.model import CLIP

    cfg = copy.deepcopy(dict(spec.arch_cfg) if spec.arch_cfg is not None else open_clip.get_model_config(spec.arch))
    if cfg is None:
        raise ModelError(f"open_clip {open_clip.__version__} has no model config {spec.arch!r} (backbone {spec.name})")
    cfg["vision_cfg"]["image_size"] = image_size
    cfg.pop("custom_text", None)
    return CLIP(**cfg).visual


def visual_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision-tower part of a CLIP checkpoint (full ``visual.*`` or vision-only), as float32."""
    if any(k.startswith("visual.") for k in state_dict):
        sd = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    else:
        sd = dict(state_dict)
    return {k: v.float() for k, v in sd.items()}


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resize of a (1 + g*g, C) position embedding to (1 + grid*grid, C) (MUSC_SPEC 1).

    The CLS slot is kept; the g x g part is interpolated like open_clip does it when it loads
    a checkpoint at another size (bicubic, antialias, align_corners=False).
    """
    old = int(round((pos.shape[0] - 1) ** 0.5))
    if old * old != pos.shape[0] - 1:
        raise ModelError(f"position embedding of {pos.shape[0]} tokens is not 1 + a square grid")
    if old == grid:
        return pos
    img = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = torch.nn.functional.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


def load_visual_weights(visual: nn.Module, state_dict: dict[str, torch.Tensor], spec: BackboneSpec, source: str) -> None:
    """Load a checkpoint into the vision tower strictly; a misfit is one clear line."""
    sd = visual_state_dict(state_dict)
    if "positional_embedding" in sd:
        sd["positional_embedding"] = resize_pos_embed(sd["positional_embedding"], visual.grid_size[0])
    own = visual.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise ModelError(f"{source} does not fit {spec.name} ({spec.arch}): {'; '.join(parts)}; "
                         f"give an open_clip {spec.arch} checkpoint")
    visual.load_state_dict(sd, strict=True)


def build(spec: BackboneSpec, weights: WeightsChoice, image_size: int, layers: tuple[int, ...],
          keep_all_blocks: bool = False) -> BuiltBackbone:
    """Build the tapped CLIP ViT of ``spec`` with ``weights`` at ``image_size``."""
    if image_size % spec.patch_size:
        raise InputError(f"--image-size {image_size} is not a multiple of {spec.name}'s patch size {spec.patch_size}")
    # Find (or fail to find) the checkpoint before spending seconds on building the model.
    if weights.kind == "pretrained":
        path, source = fetch_clip_checkpoint(spec, weights.tag), f"the {weights.tag} checkpoint"
    else:
        path, source = weights.path, "checkpoint"
    state_dict = load_state_dict(path) if path is not None else None
    if weights.kind == "random":
        torch.manual_seed(RANDOM_SEED)
    visual = build_visual(spec, image_size)
    if state_dict is not None:
        load_visual_weights(visual, state_dict, spec, f"{source} {path}")
    visual.eval()
    module = ClipTaps(visual, layers, keep_all_blocks).eval()
    width = int(visual.conv1.out_channels)
    return BuiltBackbone(
        spec=spec, module=module, weights_tag=weights.tag, image_size=image_size, layers=layers,
        token_dims=(width,) * len(layers), embed_dim=int(visual.proj.shape[1]),
        embedding_layer=module.embedding_layer,
        export_module=ClipTaps(visual, layers, keep_all_blocks, for_export=True).eval())
