"""The CLIP taps module against open_clip's own model (independent reference: forward hooks)."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from musc_edge.core.errors import ModelError
from musc_edge.export.clip import build, build_visual, resize_pos_embed
from musc_edge.export.weights import resolve_weights


def _hooked_reference(visual, x):
    """Residual stream after every block (forward hooks) and open_clip's own image embedding."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in visual.transformer.resblocks]
    try:
        with torch.no_grad():
            emb = visual(x)
    finally:
        for h in hooks:
            h.remove()
    return outs, emb / emb.norm(dim=-1, keepdim=True)


def test_taps_equal_open_clip_residual_stream_and_embedding(tiny_spec):
    built = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (1, 3, 4))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        *tokens, emb = built.module(x)
    blocks, ref_emb = _hooked_reference(_visual_of(built), x)
    for got, layer in zip(tokens, (1, 3, 4)):
        assert got.shape == (3, 1 + 16, 32)
        torch.testing.assert_close(got, blocks[layer - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb, ref_emb, rtol=1e-5, atol=1e-6)
    assert built.token_dims == (32, 32, 32) and built.embed_dim == 16 and built.grid == 4
    assert built.embedding_layer == 4


def _visual_of(built):
    """Rebuild an open_clip visual holding the module's weights (the module shares them)."""
    m = built.module
    visual = build_visual(built.spec, built.image_size)
    sd = {"conv1.weight": m.conv1.weight, "class_embedding": m.class_embedding,
          "positional_embedding": m.positional_embedding, "proj": m.proj}
    sd.update({f"ln_pre.{k}": v for k, v in m.ln_pre.state_dict().items()})
    sd.update({f"ln_post.{k}": v for k, v in m.ln_post.state_dict().items()})
    for i, b in enumerate(m.blocks):
        sd.update({f"transformer.resblocks.{i}.{k}": v for k, v in b.state_dict().items()})
    visual.load_state_dict(sd, strict=len(m.blocks) == len(visual.transformer.resblocks))
    return visual.eval()


def test_random_weights_are_reproducible(tiny_spec):
    a = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (4,))
    b = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (4,))
    assert torch.equal(a.module.proj, b.module.proj)
    assert a.weights_tag == "random"


def test_pruning_drops_blocks_after_the_last_tap(tiny_spec):
    full = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (1, 2), keep_all_blocks=True)
    pruned = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (1, 2))
    assert len(pruned.module.blocks) == 2 and pruned.embedding_layer == 2
    assert len(full.module.blocks) == 4 and full.embedding_layer == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        p, f = pruned.module(x), full.module(x)
    torch.testing.assert_close(p[0], f[0])  # same taps ...
    torch.testing.assert_close(p[1], f[1])
    assert not torch.allclose(p[2], f[2])   # ... but the pruned embedding comes from block 2
    expect = pruned.module.ln_post(p[1][:, 0]) @ pruned.module.proj
    torch.testing.assert_close(p[2], expect / expect.norm(dim=-1, keepdim=True))


def test_pos_embed_resize_matches_open_clip():
    from open_clip.model import resize_pos_embed as oc_resize

    pos = torch.randn(1 + 7 * 7, 24)

    class Fake:  # open_clip's helper only reads model.visual.grid_size
        class visual:
            grid_size = (10, 10)

    sd = {"visual.positional_embedding": pos.clone()}
    oc_resize(sd, Fake)
    ours = resize_pos_embed(pos, 10)
    torch.testing.assert_close(ours, sd["visual.positional_embedding"])
    torch.testing.assert_close(ours[0], pos[0])
    assert resize_pos_embed(pos, 7) is pos


def test_local_checkpoint_loads_and_resizes(tiny_spec, tmp_path):
    """A full open_clip state dict saved at 32 px loads as is, and at 48 px with a resized grid;
    the reference is open_clip's own checkpoint loader."""
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(1)
    model = CLIP(**copy.deepcopy(dict(tiny_spec.arch_cfg))).eval()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 3, 32, 32)
    same = build(tiny_spec, resolve_weights(tiny_spec, str(path)), 32, (2, 4))
    blocks, emb = _hooked_reference(model.visual, x)
    with torch.no_grad():
        t2, t4, e = same.module(x)
    torch.testing.assert_close(t2, blocks[1])
    torch.testing.assert_close(t4, blocks[3])
    torch.testing.assert_close(e, emb)

    cfg = copy.deepcopy(dict(tiny_spec.arch_cfg))
    cfg["vision_cfg"]["image_size"] = 48
    ref = CLIP(**cfg).eval()
    open_clip.load_checkpoint(ref, str(path))
    big = build(tiny_spec, resolve_weights(tiny_spec, str(path)), 48, (4,))
    xb = torch.randn(2, 3, 48, 48)
    blocks, emb = _hooked_reference(ref.visual, xb)
    with torch.no_grad():
        t4, e = big.module(xb)
    assert t4.shape == (2, 1 + 36, 32)
    torch.testing.assert_close(t4, blocks[3])
    torch.testing.assert_close(e, emb)


def test_checkpoint_for_another_model_is_refused(tiny_spec, tmp_path):
    bad = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, bad)
    with pytest.raises(ModelError) as e:
        build(tiny_spec, resolve_weights(tiny_spec, str(bad)), 32, (4,))
    msg = str(e.value)
    assert "does not fit tiny_vit_test" in msg and "missing" in msg and "\n" not in msg


def test_file_weights_tag(tiny_spec, tmp_path):
    ref = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (4,))
    path = tmp_path / "v.pt"
    torch.save({"visual." + k: v for k, v in _visual_of(ref).state_dict().items()}, path)
    got = build(tiny_spec, resolve_weights(tiny_spec, str(path)), 32, (4,))
    assert got.weights_tag == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_module_shares_weights_and_matches(tiny_spec):
    """The export twin (attention written out) equals open_clip's blocks and shares their tensors."""
    from musc_edge.export.clip import ExportBlock

    built = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (2, 4))
    twin = built.traced_module
    assert twin is not built.module and all(isinstance(b, ExportBlock) for b in twin.blocks)
    assert twin.blocks[0].in_proj_weight is built.module.blocks[0].attn.in_proj_weight
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(twin(x), built.module(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
