"""Write a built backbone to ONNX with musc-edge metadata, then prove ONNX Runtime agrees with torch.

The graph (docs/export.md, "The graph"): input ``image`` (B, 3, S, S) float32 with a dynamic batch axis; outputs
``tokens_0``..``tokens_{k-1}`` (B, 1 + G*G, C) and ``embedding`` (B, D). We use torch's
TorchScript-based exporter (``dynamo=False``): on torch 2.4-2.14 it handles open_clip's ViTs and
the CNN in seconds, and its dynamic axes give a batch-free graph. open_clip's attention would take
``nn.MultiheadAttention``'s fused fast path, which the exporter cannot translate, so the fast path
is switched off while tracing (the parity check runs torch with it on, as users run it).

The file is first written next to the target and only renamed into place when the parity check
passes, so a failed export never leaves a plausible-looking model behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from musc_edge.core.errors import ModelError
from musc_edge.core.meta import PREFIX, ModelMeta

from .backbones import BuiltBackbone

MIN_OPSET = 17
#: Max abs difference torch vs ONNX Runtime allowed per output (docs/export.md, "Parity check").
PARITY_TOL = 1e-3
PARITY_BATCH = 2


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` produced: the file, its metadata and the parity figures."""

    path: Path
    meta: ModelMeta
    max_abs_diff: dict[str, float]


def extra_props(built: BuiltBackbone) -> dict[str, str]:
    """Metadata beyond :class:`ModelMeta` (ignored by ``ModelMeta.from_props``, kept for people).

    ``embedding_layer`` says which block's CLS (ViT) or which stage (CNN) the embedding comes
    from; it equals ``num_blocks`` when the embedding is the network's own (see ``clip.py`` on
    pruning).
    """
    return {
        PREFIX + "embedding_layer": str(built.embedding_layer),
        PREFIX + "num_blocks": str(built.spec.num_blocks),
        PREFIX + "arch": built.spec.arch,
    }


@contextlib.contextmanager
def exportable_attention() -> Iterator[None]:
    """Switch off ``nn.MultiheadAttention``'s fused fast path (untranslatable) while tracing."""
    import torch

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def write_onnx(built: BuiltBackbone, path: Path, opset: int = MIN_OPSET) -> ModelMeta:
    """Trace ``built.traced_module`` to ``path`` with a dynamic batch axis and stamp the metadata."""
    import onnx
    import torch

    if opset < MIN_OPSET:
        raise ModelError(f"--opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    meta = built.meta(opset)
    names = list(meta.output_names)
    dummy = torch.zeros(PARITY_BATCH, 3, built.image_size, built.image_size)
    dynamic = {n: {0: "batch"} for n in [meta.input_name, *names]}
    buf = io.BytesIO()
    with torch.no_grad(), exportable_attention(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings on constant shapes
        torch.onnx.export(built.traced_module, (dummy,), buf, input_names=[meta.input_name], output_names=names,
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    del buf
    props = {**meta.to_props(), **extra_props(built)}
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "musc-edge"
    model.producer_version = meta.version
    onnx.save(model, str(path))  # ONNX Runtime validates the graph when the parity check loads it
    return meta


def ort_session(path: Path, threads: int = 0):
    """A CPU ONNX Runtime session with all graph optimisations (``threads=0``: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity(built: BuiltBackbone, path: Path, meta: ModelMeta, batch: int = PARITY_BATCH,
           seed: int = 0) -> dict[str, float]:
    """Max abs difference per output between torch eager and ONNX Runtime on a random batch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, built.image_size, built.image_size, generator=gen)
    with torch.inference_mode():
        ref = [t.numpy() for t in built.module(x)]
    got = ort_session(path).run(list(meta.output_names), {meta.input_name: x.numpy()})
    diffs = {}
    for name, a, b in zip(meta.output_names, ref, got):
        if a.shape != b.shape:
            raise ModelError(f"exported output {name} has shape {b.shape}, torch gives {a.shape}")
        diffs[name] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return diffs


def export_onnx(built: BuiltBackbone, out: Path, opset: int = MIN_OPSET, tol: float = PARITY_TOL) -> ExportResult:
    """Export, check parity torch vs ONNX Runtime (batch 2), then move the file into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        meta = write_onnx(built, tmp, opset)
        diffs = parity(built, tmp, meta)
        bad = {k: v for k, v in diffs.items() if not v <= tol}
        if bad:
            worst = max(bad, key=bad.get)
            raise ModelError(f"ONNX Runtime disagrees with torch on {', '.join(bad)} (max abs diff "
                             f"{bad[worst]:.3g} on {worst} > {tol:g}); nothing was written to {out}. "
                             "Try another --opset or report the backbone")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportResult(out, meta, diffs)
