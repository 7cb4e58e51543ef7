"""Runtime throughput, side by side in one process; prints JSON.

1. Resize of real line images to S x S: our PIL-exact resampler vs Pillow itself vs
   ``cv2.resize(INTER_CUBIC)`` (ms per image), with the max difference to Pillow in uint8 levels.
2. Feature extraction over a folder with an exported model: decode-then-infer in one thread
   (serial) vs the prefetching pipeline (decode of batch i+1 overlaps inference of batch i).

    python benchmarks/bench_runtime.py --images ../shared/data/mtd/magnetic_tile/test/good \
        --model effnet.onnx --n 96 --batch 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def bench_resize(paths: list[Path], size: int, interpolation: str) -> dict:
    import cv2
    from PIL import Image

    from musc_edge.runtime.preprocess import decode_image, resize_like_pil

    images = [decode_image(p) for p in paths]
    pil_filter = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    cv_filter = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR}[interpolation]
    ref = [np.asarray(Image.fromarray(im).resize((size, size), pil_filter)) for im in images]
    out: dict = {"images": len(images), "size": size, "interpolation": interpolation,
                 "mean_input_hw": [float(np.mean([im.shape[0] for im in images])),
                                   float(np.mean([im.shape[1] for im in images]))]}
    runs = {
        "musc_edge_pil_exact": lambda im: resize_like_pil(im, size, size, interpolation),
        "pillow": lambda im: np.asarray(Image.fromarray(im).resize((size, size), pil_filter)),
        "cv2": lambda im: cv2.resize(im, (size, size), interpolation=cv_filter),
    }
    for name, fn in runs.items():
        fn(images[0])
        t = time.perf_counter()
        res = [fn(im) for im in images]
        ms = (time.perf_counter() - t) / len(images) * 1000
        diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(res, ref))
        out[name] = {"ms_per_image": round(ms, 3), "max_diff_to_pillow": diff}
    return out


def bench_pipeline(paths: list[Path], model: Path, batch: int) -> dict:
    from musc_edge.runtime.model import load_model
    from musc_edge.runtime.pipeline import iter_features, iter_input_batches

    with load_model(model, device="cpu") as extractor:
        extractor(np.zeros((batch, 3, extractor.meta.image_size, extractor.meta.image_size), np.float32))
        t = time.perf_counter()
        decode = infer = 0.0
        for b in iter_input_batches(paths, extractor.meta, batch):
            decode += b.decode_s
            t1 = time.perf_counter()
            extractor(b.inputs)
            infer += time.perf_counter() - t1
        serial = time.perf_counter() - t
        t = time.perf_counter()
        n = sum(len(b) for b in iter_features(paths, extractor, batch))
        pre = time.perf_counter() - t
        return {"model": model.name, "backend": extractor.description, "images": n, "batch": batch,
                "serial_images_per_s": round(n / serial, 2), "prefetch_images_per_s": round(n / pre, 2),
                "speedup": round(serial / pre, 3), "serial_decode_s": round(decode, 3),
                "serial_infer_s": round(infer, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, required=True, help="folder of images")
    ap.add_argument("--model", type=Path, help="exported .onnx model for the pipeline benchmark")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--interpolation", default="bicubic")
    args = ap.parse_args()
    from musc_edge.datasets import list_images

    paths = list_images(args.images)[: args.n]
    result = {"resize": bench_resize(paths, args.size, args.interpolation)}
    if args.model:
        result["pipeline"] = bench_pipeline(paths, args.model, args.batch)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
