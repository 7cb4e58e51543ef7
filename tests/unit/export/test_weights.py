"""--weights: tags, local checkpoints (sha256 tag), bad files, and the offline fast failure."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest
import torch

from musc_edge.core.errors import InputError, ModelError
from musc_edge.export import backbones
from musc_edge.export.weights import fetch_clip_checkpoint, load_state_dict, resolve_weights, sha256_file

def test_resolve_tags_and_random():
    spec = backbones.get_spec("vit_b16")
    assert resolve_weights(spec, None).kind == "pretrained"
    assert resolve_weights(spec, None).tag == "openai"
    assert resolve_weights(spec, "openai").tag == "openai"
    r = resolve_weights(spec, "random")
    assert r.is_random and r.tag == "random"
    assert resolve_weights(backbones.get_spec("efficientnet_lite0"), None).tag == "imagenet"


def test_local_checkpoint_is_tagged_with_its_sha256(tmp_path):
    ckpt = tmp_path / "w.pt"
    torch.save({"a": torch.arange(5.0)}, ckpt)
    choice = resolve_weights(backbones.get_spec("vit_b16"), str(ckpt))
    assert choice.kind == "file" and choice.path == ckpt
    assert choice.tag == "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert sha256_file(ckpt, chunk=3) == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_unknown_weights_value_names_the_fix(tmp_path):
    spec = backbones.get_spec("vit_b16")
    with pytest.raises(InputError, match="--weights PATH"):
        resolve_weights(spec, str(tmp_path / "missing.pt"))
    with pytest.raises(InputError, match="not a file"):
        resolve_weights(spec, str(tmp_path))
    with pytest.raises(InputError):
        resolve_weights(backbones.get_spec("efficientnet_lite0"), "openai")  # not this backbone's tag


def test_load_state_dict_formats(tmp_path):
    sd = {"x.weight": torch.ones(2, 2), "x.bias": torch.zeros(2)}
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "train.pt")
    got = load_state_dict(tmp_path / "train.pt")
    assert set(got) == set(sd) and torch.equal(got["x.weight"], sd["x.weight"])
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "w.safetensors"))
    assert set(load_state_dict(tmp_path / "w.safetensors")) == set(sd)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_garbage_checkpoint_is_one_clear_line(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(ModelError) as e:
        load_state_dict(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_non_tensor_checkpoint_is_refused(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(ModelError, match="no state dict of tensors"):
        load_state_dict(tmp_path / "meta.pt")


def test_unreachable_hub_fails_fast_with_the_fix(tmp_path, monkeypatch):
    """The real fetch path: empty cache, hub endpoint refusing connections -> one line, in seconds."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    import huggingface_hub

    real = huggingface_hub.try_to_load_from_cache
    # Look only in an empty cache under tmp_path (the user's real cache may hold the weights).
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, **kw: real(repo_id, filename, cache_dir=tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ModelError) as e:
        fetch_clip_checkpoint(backbones.get_spec("vit_b16"), "openai", timeout=5)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "--weights PATH" in msg and "unreachable" in msg and "\n" not in msg


def test_offline_openai_export_fails_within_60s_naming_weights_path(tmp_path):
    """End to end through the CLI with HF_HUB_OFFLINE=1 and an empty HF cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "musc_edge", "export", "--backbone", "vit_b16",
                           "--weights", "openai", "--out", str(tmp_path / "m.onnx")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert elapsed < 60
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--weights PATH" in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_cached_weights_are_used_without_network(tmp_path, monkeypatch):
    """A file in the Hugging Face cache layout is found before any connection is tried."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rev = "0" * 40
    repo = tmp_path / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    import huggingface_hub

    real = huggingface_hub.try_to_load_from_cache
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, **kw: real(repo_id, filename, cache_dir=tmp_path))
    got = fetch_clip_checkpoint(backbones.get_spec("vit_b16"), "openai")
    assert got == snap / "open_clip_pytorch_model.bin"
