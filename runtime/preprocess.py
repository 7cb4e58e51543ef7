"""Image decoding and backbone preprocessing with OpenCV and numpy (no torch, no PIL).

Two steps, both driven by the model's metadata (:class:`musc_edge.core.meta.ModelMeta`):

* :func:`decode_image` turns the bytes of a jpg/png/bmp/tiff file into an (H, W, 3) uint8 RGB array:
  gray is replicated, alpha is dropped (as PIL's ``convert("RGB")`` in open_clip does), 16-bit is
  scaled to 8-bit by its bit depth (x * 255 / (2^bits - 1): the depth the file declares, else 12
  bits when every value is below 4096, as 12-bit cameras store them, else 16; the same rule for
  every image so that mutual scoring compares like with like), the EXIF orientation is applied
  (as Pillow's ``ImageOps.exif_transpose``: images, maps and overlays are upright, as every viewer
  shows them), and anything unreadable raises :class:`ImageDecodeError` with a one-line reason.
* :func:`read_image_file` reads a file only after its first bytes look like an image and its size
  is under a limit (docs/watch.md, "What happens when"): a 1 GB ``x.jpg`` of garbage costs 16 bytes
  of reading, not 1 GB of memory. A read that fails for a reason outside the file's content
  (permissions, I/O, a stale network handle) raises :class:`FileReadError`, which a caller that
  can wait retries.
* :func:`preprocess` resizes to a square S x S (the aspect ratio is *not* kept, MUSC_SPEC 1, as
  MuSc's released code does), scales to [0, 1] and normalises with the model's mean/std.
  :func:`load_views` does the same per view of an :class:`~musc_edge.runtime.geometry.InputGeometry`
  (``--resize pad``: aspect kept, padded with the mean; ``--tiles``: one input per tile).

Why a hand-written resampler instead of ``cv2.resize``: MuSc and open_clip resize PIL images, and
PIL's bicubic filter differs from OpenCV's (a = -0.5 against -0.75) and, unlike OpenCV, widens its
kernel when it shrinks an image (antialiasing). Line images are usually shrunk 2-3x to 224, where
``cv2.INTER_CUBIC`` lands 0.1-0.3 away from open_clip's tensor (after normalisation); reproducing
PIL's separable fixed-point resampling here gives the same uint8 pixels as PIL, so the tensors agree
to float rounding (see ``tests/unit/runtime/test_preprocess.py`` and ``docs/runtime.md``).
"""

from __future__ import annotations

import logging
import os
import struct
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from musc_edge.core.errors import ImageDecodeError, InputError
from musc_edge.core.meta import ModelMeta

from .geometry import SQUASH, InputGeometry, View, image_views

log = logging.getLogger(__name__)

#: Largest image (in pixels) we decode; override with MUSC_EDGE_MAX_PIXELS or ``max_pixels=``.
DEFAULT_MAX_PIXELS = 100_000_000

#: Largest file we read (bytes); override with MUSC_EDGE_MAX_FILE_BYTES, ``max_bytes=`` or
#: ``watch --max-file-size``. 256 MiB holds a 60-megapixel 16-bit RGB TIFF, uncompressed.
DEFAULT_MAX_FILE_BYTES = 256 * 2**20

#: Bytes read before the rest of a file: enough for every signature :func:`_sniff_format` knows.
_HEADER_BYTES = 16


class FileReadError(ImageDecodeError):
    """The file could not be read (permissions, I/O error, a stale NFS handle): not its content.

    ``errno`` is the OS error number. Batch tools skip the file like any unreadable image; the
    watch daemon retries it with backoff, because such errors pass (docs/watch.md, "What happens
    when"): a skip keyed on size and mtime would outlive a ``chmod``.
    """

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno

# PIL's fixed-point resampling (libImaging/Resample.c): 8-bit pixels, 22-bit coefficients.
_PRECISION_BITS = 32 - 8 - 2


def max_file_bytes_limit() -> int:
    """The size limit for one file: MUSC_EDGE_MAX_FILE_BYTES if set, else DEFAULT_MAX_FILE_BYTES."""
    text = os.environ.get("MUSC_EDGE_MAX_FILE_BYTES", "")
    try:
        return int(text) if text else DEFAULT_MAX_FILE_BYTES
    except ValueError:
        raise InputError(f"MUSC_EDGE_MAX_FILE_BYTES must be an integer, got {text!r}") from None


def max_pixels_limit() -> int:
    """The pixel limit for one image: MUSC_EDGE_MAX_PIXELS if set, else DEFAULT_MAX_PIXELS."""
    text = os.environ.get("MUSC_EDGE_MAX_PIXELS", "")
    try:
        return int(text) if text else DEFAULT_MAX_PIXELS
    except ValueError:
        raise InputError(f"MUSC_EDGE_MAX_PIXELS must be an integer, got {text!r}") from None


# --------------------------------------------------------------------------------------------- decode
def decode_image(path: str | Path, *, max_pixels: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Read an image file into an (H, W, 3) uint8 RGB array, or raise ImageDecodeError (one line)."""
    path = Path(path)
    return decode_bytes(read_image_file(path, max_bytes=max_bytes), name=str(path), max_pixels=max_pixels)


def read_image_file(path: str | Path, *, max_bytes: int | None = None) -> bytes:
    """The bytes of an image file, refused before they are read whole when they cannot be one.

    The first bytes must carry an image signature and the file must be at most ``max_bytes``
    (default :func:`max_file_bytes_limit`): both are checked before the rest is read, so memory is
    bounded by the limit whatever lands in the folder. ImageDecodeError for what the file holds,
    :class:`FileReadError` when the OS refuses the read.
    """
    path = Path(path)
    limit = max_file_bytes_limit() if max_bytes is None else int(max_bytes)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEADER_BYTES)
            _check_signature(head, str(path))
            _check_file_size(size, limit, str(path))
            # one byte more than fstat said, to see growth; read(n) allocates n bytes up front, so n
            # is the file's size, never the limit
            rest = f.read(size + 1 - len(head))
    except OSError as e:
        raise FileReadError(f"{path}: cannot read file ({e.strerror or e})", e.errno) from None
    data = head + rest
    if len(data) > size:  # a writer is still at it: looked at again once it changes no more
        raise ImageDecodeError(f"{path}: the file grew while it was read")
    return data


def _check_signature(head: bytes, name: str) -> str:
    """The format the first bytes announce; ImageDecodeError for an empty file, a GIF or no image."""
    if len(head) == 0:
        raise ImageDecodeError(f"{name}: empty file")
    kind = _sniff_format(head)
    if kind == "gif":
        raise ImageDecodeError(f"{name}: GIF images are not read (palette colours, often animated); "
                               "save it as PNG")
    if kind is None:
        raise ImageDecodeError(f"{name}: not a jpg/png/bmp/tiff image")
    return kind


def _check_file_size(size: int, limit: int, name: str) -> None:
    if size > limit:
        raise ImageDecodeError(f"{name}: file of {size / 2**20:.1f} MiB is over the limit of {limit / 2**20:.1f} MiB; "
                               "raise --max-file-size (or MUSC_EDGE_MAX_FILE_BYTES) if it is a real image")


def _decode_native(data: bytes, *, name: str, max_pixels: int | None) -> np.ndarray:
    """Checked ``cv2.imdecode(IMREAD_UNCHANGED)``: the array as stored (gray stays 2-D, BGR order)."""
    limit = max_pixels_limit() if max_pixels is None else int(max_pixels)
    kind = _check_signature(data[:_HEADER_BYTES], name)
    if _is_truncated(data, kind):
        raise ImageDecodeError(f"{name}: truncated {kind} file")
    size = _header_size(data, kind)
    if size is not None:
        _check_pixels(size[0], size[1], limit, name)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise ImageDecodeError(f"{name}: corrupt {kind} data ({_first_line(str(e))})") from None
    if image is None or image.size == 0:
        raise ImageDecodeError(f"{name}: corrupt {kind} data (OpenCV could not decode it)")
    _check_pixels(image.shape[1], image.shape[0], limit, name)
    tiff = _tiff_info(data) if kind == "tiff" else None
    if tiff is not None and tiff.pages > 1:
        log.warning("%s: a TIFF of %d pages; only page 1 is scored", name, tiff.pages)
    if image.dtype == np.uint16:
        image = _scale_uint16(image, _declared_bits(data, kind, tiff), name)
    return _orient(image, _orientation(data, kind))


def decode_bytes(data: bytes, *, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes (see :func:`decode_image`)."""
    return to_rgb8(_decode_native(data, name=name, max_pixels=max_pixels), name=name)


def to_rgb8(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Convert what ``cv2.imdecode(..., IMREAD_UNCHANGED)`` returns into (H, W, 3) uint8 RGB."""
    image = _to_uint8(image, name)
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if image.ndim != 3:
        raise ImageDecodeError(f"{name}: unsupported image shape {image.shape}")
    channels = image.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if channels == 2:  # gray + alpha: drop alpha
        return np.ascontiguousarray(np.repeat(image[:, :, :1], 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:  # BGRA: drop alpha, as PIL's convert("RGB") does
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ImageDecodeError(f"{name}: unsupported channel count {channels}")


def _to_uint8(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return _scale_uint16(image, None, name)
    if image.dtype == np.int8:
        return (image.astype(np.int16) + 128).astype(np.uint8)
    if image.dtype == np.int16:
        return ((image.astype(np.int32) + 32768) * 255 // 65535).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):  # float TIFF: taken as [0, 1]
        clean = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(np.rint(clean * 255.0), 0, 255).astype(np.uint8)
    raise ImageDecodeError(f"{name}: unsupported pixel type {image.dtype}")


def _check_pixels(width: int, height: int, limit: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{name}: invalid image size {width}x{height}")
    if width * height > limit:
        raise ImageDecodeError(
            f"{name}: image of {width}x{height} = {width * height} pixels is over the limit of {limit}; "
            "shrink it or raise MUSC_EDGE_MAX_PIXELS")


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def _sniff_format(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"  # recognised so that it is refused with a reason, not as "not an image"
    return None


def _is_truncated(data: bytes, kind: str) -> bool:
    """Cheap end-of-stream checks: OpenCV happily decodes a cut JPEG into a half-grey image."""
    if kind == "jpeg":
        return b"\xff\xd9" not in data[-1024:]
    if kind == "png":
        return b"IEND" not in data[-64:]
    if kind == "bmp" and len(data) >= 6:
        declared = struct.unpack("<I", data[2:6])[0]
        return declared > len(data)
    return False


def _header_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) from the file header, to refuse huge images before decoding them."""
    try:
        if kind == "png" and len(data) >= 24:
            return struct.unpack(">II", data[16:24])
        if kind == "bmp" and len(data) >= 26:
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if kind == "jpeg":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None  # tiff: checked after decoding


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    n = len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


# --------------------------------------------------------------------------- bit depth and orientation
#: Values of a 16-bit image all below this: 12-bit camera data (Mono12 and the like) stored in 16 bits.
_TWELVE_BIT_TOP = 4096
_said_twelve_bit = False


def _scale_uint16(image: np.ndarray, bits: int | None, name: str) -> np.ndarray:
    """uint16 -> uint8 by the data's depth: x * 255 / (2^bits - 1), rounded.

    ``bits`` is what the file declares (PNG sBIT, TIFF BitsPerSample / MaxSampleValue); without
    it, 12 when every value is below 4096 (scaled by the full 16-bit range such an image comes out
    near-black and scores as the most anomalous of its pool), else 16.
    """
    global _said_twelve_bit
    if bits is None:
        bits = 12 if int(image.max(initial=0)) < _TWELVE_BIT_TOP else 16
        if bits == 12 and not _said_twelve_bit:
            _said_twelve_bit = True
            log.warning("%s: a 16-bit image with every value below 4096 is read as 12-bit data (x * 255 / 4095), "
                        "as is every such image; a file that declares its depth (PNG sBIT, TIFF BitsPerSample or "
                        "MaxSampleValue) is scaled by that (said once)", name)
    bits = min(16, max(1, int(bits)))
    top = (1 << bits) - 1
    clipped = np.minimum(image, top).astype(np.uint32)
    return ((clipped * 255 + top // 2) // top).astype(np.uint8)


class _Tiff:
    """What the first IFD of a TIFF structure says: tag -> values (SHORT/LONG only), page count."""

    def __init__(self, tags: dict[int, tuple[int, ...]], pages: int) -> None:
        self.tags, self.pages = tags, pages


def _tiff_info(data: bytes, base: int = 0) -> _Tiff | None:
    """Parse the classic TIFF header at ``data[base:]`` (a TIFF file, or JPEG/PNG EXIF data).

    Only what decoding needs: IFD0's SHORT and LONG tags (orientation, bit depth) and how many
    IFDs follow (pages). None for BigTIFF or anything malformed: decoding then goes on without it.
    """
    try:
        order = {b"II": "<", b"MM": ">"}[data[base:base + 2]]
        if struct.unpack(order + "H", data[base + 2:base + 4])[0] != 42:
            return None
        offset = struct.unpack(order + "I", data[base + 4:base + 8])[0]
        seen = {offset}
        tags, offset = _tiff_ifd(data, base, order, offset)
        pages = 1
        while offset and pages < 100_000 and offset not in seen:  # a loop in the chain ends it
            seen.add(offset)
            _, offset = _tiff_ifd(data, base, order, offset, read_tags=False)
            pages += 1
        return _Tiff(tags, pages)
    except (KeyError, struct.error, IndexError):
        return None


def _tiff_ifd(data: bytes, base: int, order: str, offset: int, *, read_tags: bool = True
              ) -> tuple[dict[int, tuple[int, ...]], int]:
    """(SHORT/LONG tags, offset of the next IFD) of the IFD at ``offset`` (relative to ``base``)."""
    at = base + offset
    (count,) = struct.unpack(order + "H", data[at:at + 2])
    tags: dict[int, tuple[int, ...]] = {}
    for i in range(count if read_tags else 0):
        tag, kind, n, raw = struct.unpack(order + "HHI4s", data[at + 2 + 12 * i: at + 14 + 12 * i])
        if kind not in (3, 4) or not 0 < n <= 16:
            continue
        fmt = order + ("H" if kind == 3 else "I") * n
        size = struct.calcsize(fmt)
        blob = raw[:size] if size <= 4 else data[base + struct.unpack(order + "I", raw)[0]:][:size]
        tags[tag] = struct.unpack(fmt, blob)
    end = at + 2 + 12 * count
    (next_offset,) = struct.unpack(order + "I", data[end:end + 4])
    return tags, next_offset


_ORIENTATION, _BITS_PER_SAMPLE, _MAX_SAMPLE_VALUE = 274, 258, 281


def _orientation(data: bytes, kind: str) -> int:
    """The EXIF orientation still to apply (1-8; 1 = none) to what ``cv2.imdecode`` returned.

    ``IMREAD_UNCHANGED`` leaves JPEG (APP1 Exif) and PNG (eXIf) pixels as stored, while OpenCV's
    TIFF decoder turns the page upright itself (tests/unit/runtime/test_preprocess.py checks both
    against Pillow), so TIFF needs nothing more.
    """
    if kind == "jpeg":
        tiff = _jpeg_exif(data)
    elif kind == "png":
        chunk = _png_chunks(data).get(b"eXIf")
        tiff = _tiff_info(chunk) if chunk else None
    else:
        return 1
    value = tiff.tags.get(_ORIENTATION, (1,))[0] if tiff is not None else 1
    return value if 1 <= value <= 8 else 1


def _declared_bits(data: bytes, kind: str, tiff: _Tiff | None) -> int | None:
    """Significant bits per sample a 16-bit file declares: PNG sBIT, TIFF BitsPerSample or MaxSampleValue."""
    if kind == "png":
        sbit = _png_chunks(data).get(b"sBIT")
        return max(sbit) if sbit else None
    if tiff is None:
        return None
    bits = max(tiff.tags.get(_BITS_PER_SAMPLE, (16,)))
    if bits < 16:
        return bits
    top = tiff.tags.get(_MAX_SAMPLE_VALUE)
    return max(top).bit_length() if top and 0 < max(top) < 65535 else None


def _png_chunks(data: bytes) -> dict[bytes, bytes]:
    """The chunks before the image data (IHDR .. the first IDAT), by type."""
    chunks: dict[bytes, bytes] = {}
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if ctype == b"IDAT":
            break
        chunks.setdefault(ctype, data[pos + 8:pos + 8 + length])
        pos += 12 + length
    return chunks


def _jpeg_exif(data: bytes) -> _Tiff | None:
    """IFD0 of the APP1 Exif segment of a JPEG, if it has one before the image data."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: no metadata after it
            return None
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            return _tiff_info(data[:i + 2 + length], base=i + 10)
        i += 2 + length
    return None


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn the stored pixels upright, as Pillow's ``ImageOps.exif_transpose`` does for tags 2-8."""
    if orientation == 1:
        return image
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: a.swapaxes(0, 1)[:, ::-1],
           7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: a.swapaxes(0, 1)[::-1]}
    return np.ascontiguousarray(ops[orientation](image))


# ----------------------------------------------------------------------------------------- preprocess
def preprocess(image_rgb: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, S, S) float32 backbone input (MUSC_SPEC 1).

    Square resize (aspect not kept) with ``meta.interpolation``, /255, then (x - mean) / std.
    """
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise InputError(f"preprocess expects an (H, W, 3) uint8 RGB image, got {image_rgb.dtype} "
                         f"{image_rgb.shape}; decode it with decode_image")
    return _normalise(resize_like_pil(image_rgb, meta.image_size, meta.image_size, meta.interpolation), meta)


def load_input(path: str | Path, meta: ModelMeta, *, max_pixels: int | None = None, max_bytes: int | None = None
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode and preprocess one file: ((3, S, S) float32, original (h, w)).

    Equal to ``preprocess(decode_image(path), meta)``, but a gray image is resized as one channel
    and replicated afterwards (3x less work for the gray line cameras common in inspection).
    """
    path = Path(path)
    return input_from_bytes(read_image_file(path, max_bytes=max_bytes), meta, name=str(path), max_pixels=max_pixels)


def input_from_bytes(data: bytes, meta: ModelMeta, *, name: str = "image", max_pixels: int | None = None
                     ) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_input` on bytes already read (the watch daemon hashes them first)."""
    native = _decode_native(data, name=name, max_pixels=max_pixels)
    hw = (int(native.shape[0]), int(native.shape[1]))
    size = meta.image_size
    if native.ndim == 2 or (native.ndim == 3 and native.shape[2] == 1):
        gray = _to_uint8(native.reshape(hw), name)[:, :, None]
        resized = np.repeat(resize_like_pil(gray, size, size, meta.interpolation), 3, axis=2)
    else:
        resized = resize_like_pil(to_rgb8(native, name=name), size, size, meta.interpolation)
    return _normalise(resized, meta), hw


def load_views(path: str | Path, meta: ModelMeta, geometry: InputGeometry = SQUASH, *,
               max_pixels: int | None = None, max_bytes: int | None = None
               ) -> tuple[np.ndarray, tuple[int, int], tuple[View, ...]]:
    """Decode one file into its model inputs under ``geometry`` (``--resize``, ``--tiles``):
    ((V, 3, S, S) float32, original (h, w), the V views, :mod:`musc_edge.runtime.geometry`)."""
    path = Path(path)
    return views_from_bytes(read_image_file(path, max_bytes=max_bytes), meta, geometry, name=str(path),
                            max_pixels=max_pixels)


def views_from_bytes(data: bytes, meta: ModelMeta, geometry: InputGeometry = SQUASH, *, name: str = "image",
                     max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int], tuple[View, ...]]:
    """:func:`load_views` on bytes already read.

    Each view (a tile, or the whole image) is cut from the decoded pixels and resized on its own
    with the model's filter: squashed to S x S, or, with ``resize="pad"``, scaled to fit with its
    aspect kept and placed in a square of the normalisation mean, which is exactly 0 after
    normalising (so the padding is the same "nothing" for every image and every backbone). With
    the default geometry the one input equals :func:`input_from_bytes`'s.
    """
    native = _decode_native(data, name=name, max_pixels=max_pixels)
    hw = (int(native.shape[0]), int(native.shape[1]))
    gray = native.ndim == 2 or (native.ndim == 3 and native.shape[2] == 1)
    pixels = _to_uint8(native.reshape(hw), name)[:, :, None] if gray else to_rgb8(native, name=name)
    size = meta.image_size
    views = tuple(image_views(hw[0], hw[1], size, geometry))
    out = np.zeros((len(views), 3, size, size), np.float32)
    for k, view in enumerate(views):
        y0, y1, x0, x1 = view.box
        vy0, vy1, vx0, vx1 = view.valid
        resized = resize_like_pil(pixels[y0:y1, x0:x1], vx1 - vx0, vy1 - vy0, meta.interpolation)
        if gray:  # resized as one channel: 3x less work for gray line cameras
            resized = np.repeat(resized, 3, axis=2)
        out[k, :, vy0:vy1, vx0:vx1] = _normalise(resized, meta)
    return out, hw, views


def _normalise(resized: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """(S, S, 3) uint8 -> (3, S, S) float32: x / 255, then (x - mean) / std, as torchvision does."""
    mean = np.asarray(meta.mean, dtype=np.float32)
    std = np.asarray(meta.std, dtype=np.float32)
    out = (resized.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def resize_like_pil(image: np.ndarray, width: int, height: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize (H, W, C) uint8 exactly as PIL's ``Image.resize`` with BICUBIC or BILINEAR does.

    PIL resamples separably, one axis after the other, with a kernel widened by the shrink factor
    (antialiasing) and 22-bit fixed-point coefficients, rounding to uint8 after each pass.
    """
    if interpolation not in _FILTERS:
        raise InputError(f"unknown resize interpolation {interpolation!r}; expected one of "
                         f"{', '.join(sorted(_FILTERS))}")
    out = image
    # Pillow runs the vertical pass first when the width grows and the height shrinks (fewer rows
    # to widen). When both shrink it sometimes does too, by an internal cost rule we do not copy;
    # pixels can then differ by a few levels at sharp edges, far inside open_clip's tolerance.
    axes = (0, 1) if (width > out.shape[1] and height < out.shape[0]) else (1, 0)
    for axis in axes:
        target = width if axis == 1 else height
        if out.shape[axis] != target:
            idx, coeffs = _pil_coefficients(out.shape[axis], target, interpolation)
            out = _resample_axis(out, idx, coeffs, axis=axis)
    return out


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}


@lru_cache(maxsize=64)
def _pil_coefficients(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (out, K) and int32 fixed-point weights (out, K), as PIL's precompute_coeffs."""
    kernel, support = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, ksize), dtype=np.intp)
    weights = np.zeros((out_size, ksize), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C does
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = np.arange(xmax)
        w = kernel((taps + xmin - center + 0.5) / filterscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        weights[xx, :xmax] = w
        idx[xx, :xmax] = taps + xmin
        idx[xx, xmax:] = xmin  # padded taps have weight 0
    fixed = np.where(weights < 0, -0.5 + weights * (1 << _PRECISION_BITS),
                     0.5 + weights * (1 << _PRECISION_BITS))
    return idx, np.trunc(fixed).astype(np.int32)


def _resample_axis(image: np.ndarray, idx: np.ndarray, coeffs: np.ndarray, axis: int) -> np.ndarray:
    """One PIL resampling pass along ``axis`` (0 = rows, 1 = columns) of an (H, W, C) uint8 image."""
    src = np.ascontiguousarray(np.moveaxis(image, axis, 0))  # (in, other, C): gathers copy whole rows
    acc = np.full((idx.shape[0],) + src.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    for t in range(idx.shape[1]):
        k = coeffs[:, t]
        if not k.any():
            continue
        acc += src[idx[:, t]].astype(np.int32) * k[:, None, None]
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))
