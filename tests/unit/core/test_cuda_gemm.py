"""The FP16 tensor-core product of ``--precision fast`` (``musc_edge.core.cuda_gemm``) passes
cuBLAS the right shapes, transposes and leading dimensions: checked here against a stand-in
``gemmEx`` that computes what cuBLAS computes (column-major, from raw pointers), since this
machine has no GPU. The real call runs in tests/gpu (test_fast_precision_keeps_the_ranking)."""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest

from musc_edge.core.cuda_gemm import CUDA_R_16F, CUDA_R_32F, matmul_nt_fp16

OP_N, OP_T = 0, 1
DTYPES = {CUDA_R_16F: np.float16, CUDA_R_32F: np.float32}


class FakeArray(np.ndarray):
    """A host array with CuPy's ``.data.ptr``."""

    @property
    def data(self):  # noqa: D401 - mimics cupy.ndarray.data (a MemoryPointer)
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _stored(ptr: int, dtype, ld: int, rows: int, cols: int) -> np.ndarray:
    """The column-major (rows, cols) matrix with leading dimension ``ld`` at ``ptr`` (a view)."""
    n = ld * (cols - 1) + rows
    buf = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint16 if dtype == np.float16
                                                                else ctypes.c_float)), (n,)).view(dtype)
    return np.lib.stride_tricks.as_strided(buf, (rows, cols), (buf.itemsize, ld * buf.itemsize))


def fake_modules(calls: list) -> tuple[types.ModuleType, types.ModuleType]:
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T, cublas.CUBLAS_POINTER_MODE_HOST = OP_N, OP_T, 0
    cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP = 68, 99
    mode = {"v": 1}
    cublas.getPointerMode = lambda h: mode["v"]
    cublas.setPointerMode = lambda h, m: mode.__setitem__("v", m)

    def gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
               compute, algo):
        assert mode["v"] == 0, "alpha and beta are host pointers: the pointer mode must be HOST"
        calls.append(dict(transa=transa, transb=transb, m=m, n=n, k=k, lda=lda, ldb=ldb, ldc=ldc, Atype=Atype,
                          Btype=Btype, Ctype=Ctype, compute=compute, algo=algo))
        a = _stored(A, DTYPES[Atype], lda, k if transa == OP_T else m, m if transa == OP_T else k)
        b = _stored(B, DTYPES[Btype], ldb, n if transb == OP_T else k, k if transb == OP_T else n)
        op_a = a.T if transa == OP_T else a
        op_b = b.T if transb == OP_T else b
        al = ctypes.cast(alpha, ctypes.POINTER(ctypes.c_float))[0]
        be = ctypes.cast(beta, ctypes.POINTER(ctypes.c_float))[0]
        c = _stored(C, DTYPES[Ctype], ldc, m, n)
        prod = al * (op_a.astype(np.float32) @ op_b.astype(np.float32))
        c[...] = prod if be == 0 else prod + be * c  # cuBLAS does not read C when beta is 0

    cublas.gemmEx = gemmEx
    cupy = types.ModuleType("cupy")
    cupy.float16, cupy.float32 = np.float16, np.float32
    cupy.ascontiguousarray = lambda x, dtype=None: np.ascontiguousarray(x, dtype=dtype).view(FakeArray)
    cupy.empty = lambda shape, dtype=None: np.full(shape, np.nan, dtype=dtype).view(FakeArray)  # poisoned
    cupy.cuda = types.SimpleNamespace(device=types.SimpleNamespace(get_cublas_handle=lambda: 7))
    return cupy, cublas


@pytest.mark.parametrize("m, c, n", [(5, 7, 3), (1, 16, 9), (33, 8, 33)])
def test_product_is_x_times_y_transposed(monkeypatch, m, c, n):
    calls: list = []
    cupy, cublas = fake_modules(calls)
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = cublas
    for name, mod in (("cupy_backends", types.ModuleType("cupy_backends")),
                      ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                      ("cupy_backends.cuda.libs", libs), ("cupy_backends.cuda.libs.cublas", cublas)):
        monkeypatch.setitem(sys.modules, name, mod)
    rng = np.random.default_rng(m * n)
    x = rng.standard_normal((m, c)).astype(np.float32)
    y = rng.standard_normal((n, c)).astype(np.float32)
    out = matmul_nt_fp16(cupy, x, y)
    ref = x.astype(np.float16).astype(np.float32) @ y.astype(np.float16).astype(np.float32).T
    assert out.shape == (m, n) and out.dtype == np.float32 and np.isfinite(out).all()  # every element written
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    (call,) = calls
    assert (call["Atype"], call["Btype"], call["Ctype"], call["compute"]) == (CUDA_R_16F, CUDA_R_16F, CUDA_R_32F, 68)
    assert cublas.getPointerMode(7) == 1  # the handle's pointer mode is put back
