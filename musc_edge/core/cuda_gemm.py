"""The one CuPy-specific piece of the pair kernel: an FP16 x FP16 -> FP32 product on tensor cores.

``--precision fast`` only uses the product to *choose* each patch's nearest patch (its arg-max);
FP16 inputs keep 11 bits, and accumulating in FP32 and keeping the FP32 result (rather than
CuPy's FP16 ``matmul`` output, whose spacing of 5e-4 near 1 makes near-ties of the arg-max) keeps
those choices close to the FP32 ones. cuBLAS ``gemmEx`` does exactly that; CuPy exposes it in
``cupy_backends.cuda.libs.cublas``. Imported only on the GPU path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: cudaDataType and cublasComputeType_t values (cuBLAS 11+ API).
CUDA_R_16F = 2
CUDA_R_32F = 0
CUBLAS_COMPUTE_32F = 68


def matmul_nt_fp16(cupy: Any, x: Any, y: Any) -> Any:
    """``x @ y.T`` for row-major float32 x (M, C), y (N, C): FP16 operands, FP32 result.

    Row-major (M, N) is column-major (N, M) = Y X^T, with Y and X read as column-major (C, N) and
    (C, M): ``gemmEx(T, N, m=N, n=M, k=C)``.
    """
    from cupy_backends.cuda.libs import cublas

    m, c = (int(v) for v in x.shape)
    n = int(y.shape[0])
    x16 = cupy.ascontiguousarray(x, dtype=cupy.float16)
    y16 = cupy.ascontiguousarray(y, dtype=cupy.float16)
    out = cupy.empty((m, n), dtype=cupy.float32)
    one = np.ones(1, dtype=np.float32)
    zero = np.zeros(1, dtype=np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    compute = getattr(cublas, "CUBLAS_COMPUTE_32F", CUBLAS_COMPUTE_32F)
    algo = getattr(cublas, "CUBLAS_GEMM_DEFAULT_TENSOR_OP", getattr(cublas, "CUBLAS_GEMM_DEFAULT", -1))
    try:
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, m, c,
                      one.ctypes.data, y16.data.ptr, CUDA_R_16F, c, x16.data.ptr, CUDA_R_16F, c,
                      zero.ctypes.data, out.data.ptr, CUDA_R_32F, n, compute, algo)
    finally:
        cublas.setPointerMode(handle, mode)
    return out
