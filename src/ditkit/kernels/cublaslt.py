"""cuBLASLt matrix products with a GELU epilogue, for the MLP's training step and FP8 sampling (through ctypes).

torch exposes cuBLASLt's fused epilogues only for the forward GELU without its input
(``torch._addmm_activation``, which has no derivative).  Training needs two more: the forward
product that also writes GELU's input for the backward, and the backward product that applies
GELU's derivative.  Without them, GELU and its
gradient are separate passes over the (tokens × 4·hidden) activation: on an H100 at DiT-XL/2
batch 128, 19.6 of 230 GPU-ms per training step went to GELU, its backward and its bias sum.

    linear_gelu(x, w, b)      a = GELU(x wᵀ + b), pre = x wᵀ + b        (GELU_AUX_BIAS)
    matmul_dgelu(g, w, pre)   ∂pre = (g w) ⊙ GELU'(pre)                  (DGELU)

Not the bias-gradient epilogues: on an H100 at XL/2 batch-128 shapes, every algorithm the heuristic
offered for DGELU_BGRAD ran a separate epilogue kernel (1.79 ms against 0.64 for DGELU alone), and
BGRADB on the weight-gradient product took 0.79 ms against 0.67 for the product and a sum.

Row-major tensors, bf16 or fp16, float32 accumulation.  cuBLAS is column-major: a row-major (M, N)
matrix is a column-major N × M one with the same memory, so Y = X Wᵀ is computed as Yᵀ = W Xᵀ.
cuBLASLt's GELU is the tanh approximation (DiT's ``nn.GELU(approximate="tanh")``);
``benchmarks/fused_mlp_check.py`` checks both products against torch on the GPU.

The algorithm for a shape is the fastest of the heuristic's candidates, timed at its first call
(outside CUDA-graph capture), so two processes may pick different ones: the results may differ by
float rounding between runs, as cuBLAS's own choices may.  Operands must be contiguous and
256-byte aligned (fresh allocations are), which is what the heuristic is asked to assume.
"""
from __future__ import annotations

import ctypes
import functools
import threading

import torch

# cublasLt.h
_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
_R_32F = 0  # cudaDataType
_DTYPES = {torch.float16: 2, torch.bfloat16: 14}
_FP8_DTYPES = {torch.float8_e4m3fn: 28, torch.float8_e5m2: 29}
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_SM_COUNT_TARGET = 3, 4, 7, 15  # cublasLtMatmulDescAttributes_t
_DESC_BIAS_POINTER, _DESC_AUX_POINTER, _DESC_AUX_LD = 8, 11, 12
_DESC_A_SCALE_POINTER, _DESC_B_SCALE_POINTER, _DESC_FAST_ACCUM, _DESC_A_SCALE_MODE, _DESC_B_SCALE_MODE = 17, 18, 25, 31, 32
_DESC_D_SCALE_POINTER, _DESC_BIAS_DATA_TYPE = 20, 26
SCALAR, OUTER_VEC = 0, 3  # cublasLtMatmulMatrixScale_t: one float32 scale per operand, or one per row of op(A) / column of op(B)
_PREF_MAX_WORKSPACE_BYTES = 1  # cublasLtMatmulPreferenceAttributes_t
# cublasLtEpilogue_t
DEFAULT, BIAS, GELU, GELU_BIAS, GELU_AUX, GELU_AUX_BIAS = 1, 4, 32, 32 | 4, 32 | 128, 32 | 128 | 4
DGELU, BGRADB = 64 | 128, 512
_WITH_BIAS, _WITH_AUX = 4 | 256 | 512, 128  # the epilogue bits that use the bias (or its gradient) and the aux matrix
_WORKSPACE = 32 << 20  # bytes, as torch gives cuBLASLt on Hopper


class _Heuristic(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _loaded_library() -> str | None:
    """The path of the libcublasLt torch has loaded (it links it), from this process's memory map."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcublasLt" in line}
    except OSError:
        return None
    return min(paths) if paths else None


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None
    major = torch.version.cuda.split(".")[0]
    for name in (_loaded_library(), f"libcublasLt.so.{major}", "libcublasLt.so"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def available(device: torch.device) -> bool:
    """Whether the fused products run on ``device`` (a CUDA device, cuBLASLt found)."""
    return device.type == "cuda" and _lib() is not None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


@functools.cache
def _handle() -> ctypes.c_void_p:
    h = ctypes.c_void_p()
    _check(_lib().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
    return h


def _layout(dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
    lay = ctypes.c_void_p()
    _check(_lib().cublasLtMatrixLayoutCreate(ctypes.byref(lay), dtype, ctypes.c_uint64(rows), ctypes.c_uint64(cols),
                                             ctypes.c_int64(ld)), "cublasLtMatrixLayoutCreate")
    return lay


def _set(desc: ctypes.c_void_p, attr: int, value: ctypes._SimpleCData) -> None:
    _check(_lib().cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
           f"cublasLtMatmulDescSetAttribute({attr})")


@functools.cache
def _plan(dtype: int, epilogue: int, trans_a: int, trans_b: int, m: int, n: int, k: int, device: int,
          out_dtype: int | None = None, scale_mode: int | None = None, sm_target: int = 0):
    """Descriptors and the heuristic's candidate algorithms for one (column-major) product
    D (m × n) = op(A) op(B), every matrix dense (D's leading dimension m); cached: a step's shapes repeat.
    A and B are ``dtype``, D ``out_dtype`` (default: ``dtype``); with ``scale_mode`` (FP8 operands) each
    operand comes with its scales (``SCALAR`` or ``OUTER_VEC``) and the tensor cores accumulate fast.  ``sm_target``
    (0: all): the multiprocessors the product should plan for, leaving the others to work on another stream.  An FP8
    ``out_dtype`` comes with a scale for D (set per call), a bf16 bias and a bf16 C layout with no matrix behind it (β = 0:
    cuBLASLt refuses D's memory as C when their types differ, status 7, and takes a null C)."""
    lib = _lib()
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "cublasLtMatmulDescCreate")
    _set(desc, _DESC_TRANSA, ctypes.c_int32(trans_a))
    _set(desc, _DESC_TRANSB, ctypes.c_int32(trans_b))
    _set(desc, _DESC_EPILOGUE, ctypes.c_int32(epilogue))
    if sm_target:
        _set(desc, _DESC_SM_COUNT_TARGET, ctypes.c_int32(sm_target))
    if scale_mode is not None:
        for pointer, mode in ((_DESC_A_SCALE_POINTER, _DESC_A_SCALE_MODE), (_DESC_B_SCALE_POINTER, _DESC_B_SCALE_MODE)):
            _set(desc, pointer, ctypes.c_void_p(256))
            if scale_mode != SCALAR:
                _set(desc, mode, ctypes.c_int32(scale_mode))
        _set(desc, _DESC_FAST_ACCUM, ctypes.c_int8(1))
    fp8_out = out_dtype in _FP8_DTYPES.values()
    if fp8_out:
        _set(desc, _DESC_D_SCALE_POINTER, ctypes.c_void_p(256))
        _set(desc, _DESC_BIAS_DATA_TYPE, ctypes.c_int32(_DTYPES[torch.bfloat16]))
    a = _layout(dtype, k, m, k) if trans_a == _OP_T else _layout(dtype, m, k, m)
    b = _layout(dtype, n, k, n) if trans_b == _OP_T else _layout(dtype, k, n, k)
    d = _layout(dtype if out_dtype is None else out_dtype, m, n, m)
    c = _layout(_DTYPES[torch.bfloat16], m, n, m) if fp8_out else d
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
    ws = ctypes.c_uint64(_WORKSPACE)
    _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), ctypes.sizeof(ws)),
           "cublasLtMatmulPreferenceSetAttribute")
    # The heuristic checks pointer alignment from the attributes; torch's allocations are 256-byte aligned.
    if epilogue & _WITH_BIAS:
        _set(desc, _DESC_BIAS_POINTER, ctypes.c_void_p(256))
    if epilogue & _WITH_AUX:
        _set(desc, _DESC_AUX_POINTER, ctypes.c_void_p(256))
        _set(desc, _DESC_AUX_LD, ctypes.c_int64(m))
    results, count = (_Heuristic * _CANDIDATES)(), ctypes.c_int(0)
    _check(lib.cublasLtMatmulAlgoGetHeuristic(_handle(), desc, a, b, c, d, pref, _CANDIDATES, results,
                                              ctypes.byref(count)), "cublasLtMatmulAlgoGetHeuristic")
    if count.value == 0:
        raise RuntimeError(f"cuBLASLt has no algorithm for epilogue {epilogue} at m={m} n={n} k={k}")
    return desc, a, b, c, d, list(results[:count.value])


def _matmul(epilogue: int, trans_a: int, trans_b: int, a: torch.Tensor, b: torch.Tensor, m: int, n: int, k: int,
            bias: torch.Tensor | None = None, aux: torch.Tensor | None = None,
            scales: tuple[torch.Tensor, torch.Tensor, int] | None = None, out_dtype: torch.dtype | None = None,
            sm_target: int = 0, d_scale: torch.Tensor | None = None) -> torch.Tensor:
    """D (m × n column-major, i.e. a row-major (n, m) tensor) = op(A) op(B) with ``epilogue``; ``scales``:
    (A's, B's, the scale mode) for FP8 operands, whose result is ``out_dtype``; an FP8 result is
    q(d_scale · epilogue(…)) with d_scale a (1,) float32 tensor."""
    out_dtype = out_dtype or a.dtype
    if scales is None:
        key = (_DTYPES[a.dtype], epilogue, trans_a, trans_b, m, n, k, a.device.index, None, None, sm_target)
    else:
        key = (_FP8_DTYPES[a.dtype], epilogue, trans_a, trans_b, m, n, k, a.device.index,
               {**_DTYPES, **_FP8_DTYPES}[out_dtype], scales[2], sm_target)
    if (out_dtype in _FP8_DTYPES) != (d_scale is not None):
        raise ValueError(f"an FP8 result takes a d_scale and only an FP8 one does; out_dtype {out_dtype}")
    desc, la, lb, lc, ld, candidates = _plan(*key)
    out = torch.empty(n, m, device=a.device, dtype=out_dtype)
    workspace = torch.empty(_WORKSPACE, device=a.device, dtype=torch.uint8)
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    torch_stream = torch.cuda.current_stream(a.device)
    stream = ctypes.c_void_p(torch_stream.cuda_stream)

    c = ctypes.c_void_p(0 if d_scale is not None else out.data_ptr())  # C: never read (β = 0); see _plan

    def run(algo: _Heuristic) -> int:
        return _lib().cublasLtMatmul(_handle(), desc, ctypes.byref(one), ctypes.c_void_p(a.data_ptr()), la,
                                     ctypes.c_void_p(b.data_ptr()), lb, ctypes.byref(zero), c, lc,
                                     ctypes.c_void_p(out.data_ptr()), ld, ctypes.byref(algo.algo),
                                     ctypes.c_void_p(workspace.data_ptr()), ctypes.c_size_t(_WORKSPACE), stream)

    with _LOCK:  # the cached descriptor holds this call's pointers until the launch
        if scales is not None:
            _set(desc, _DESC_A_SCALE_POINTER, ctypes.c_void_p(scales[0].data_ptr()))
            _set(desc, _DESC_B_SCALE_POINTER, ctypes.c_void_p(scales[1].data_ptr()))
        if d_scale is not None:
            _set(desc, _DESC_D_SCALE_POINTER, ctypes.c_void_p(d_scale.data_ptr()))
        if bias is not None:
            _set(desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        if aux is not None:
            _set(desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
        if key not in _chosen and not torch.cuda.is_current_stream_capturing():
            _timings[key] = _time_all(candidates, run, torch_stream)
            _chosen[key] = min(range(len(candidates)), key=_timings[key].__getitem__)
        _check(run(candidates[_chosen.get(key, 0)]), "cublasLtMatmul")
    return out


_CANDIDATES = 8  # algorithms asked of the heuristic, timed on first use
_chosen: dict[tuple, int] = {}
_timings: dict[tuple, list[float]] = {}  # ms per run of each candidate, by product (benchmarks read it)
_LOCK = threading.Lock()


def _time_all(candidates: list[_Heuristic], run, stream: torch.cuda.Stream, rounds: int = 2, reps: int = 5) -> list[float]:
    """Milliseconds per run of each candidate (inf where it cannot run), the best of ``rounds`` interleaved
    rounds of ``reps`` runs.  Each round's runs are queued behind a sleeping kernel, so that the GPU runs
    them back to back and the time is the product's, not the host's launches (ctypes calls cost ~10 µs,
    the small products ~40 µs)."""
    usable = [algo.workspace_size <= _WORKSPACE and run(algo) == 0 for algo in candidates]
    best = [float("inf")] * len(candidates)
    for _ in range(rounds):
        for i, algo in enumerate(candidates):
            if not usable[i]:
                continue
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            with torch.cuda.stream(stream):
                torch.cuda._sleep(1_000_000)  # ~0.5 ms: the runs below are queued before the GPU reaches them
            events[0].record(stream)
            for _ in range(reps):
                run(algo)
            events[1].record(stream)
            events[1].synchronize()
            best[i] = min(best[i], events[0].elapsed_time(events[1]) / reps)
    return best


def _operands(*tensors: torch.Tensor) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise TypeError(f"cuBLASLt products take bf16 or fp16 operands of one dtype, got {sorted(map(str, dtypes))}")
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("cuBLASLt products take contiguous row-major operands")


def mm(a: torch.Tensor, b: torch.Tensor, trans_a: bool = False, trans_b: bool = False, epilogue: int = DEFAULT,
       bias: torch.Tensor | None = None, aux: torch.Tensor | None = None, sm_target: int = 0) -> torch.Tensor:
    """op(a) op(b) for row-major a and b (op: transposed where asked), (P, Q), with ``epilogue``: the product
    cuBLAS sees is the column-major Cᵀ (Q × P) = op(b)ᵀ op(a)ᵀ, whose operands are b's and a's memory.
    ``sm_target``: see ``_plan``."""
    _operands(a, b, *(t for t in (bias, aux) if t is not None))
    p, r = (a.shape[1], a.shape[0]) if trans_a else a.shape
    q = b.shape[0] if trans_b else b.shape[1]
    return _matmul(epilogue, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, b, a, q, p, r, bias, aux,
                   sm_target=sm_target)


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), w (N, K), b (N,) -> (GELU(pre), pre) with pre = x wᵀ + b, both (M, N)."""
    pre = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    return mm(x, w, trans_b=True, epilogue=GELU_AUX_BIAS, bias=b, aux=pre), pre


def matmul_dgelu(g: torch.Tensor, w: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """g (M, K) = ∂ of the next layer's output, w (K, N) its weight, pre (M, N) -> ∂pre = (g w) ⊙ GELU'(pre),
    (M, N) in g's dtype."""
    return mm(g, w, epilogue=DGELU, aux=pre)


def weight_grad(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gy (M, N) = ∂y, x (M, K) the input -> ∂W = gyᵀ x (N, K): a linear's weight gradient."""
    return mm(gy, x, trans_a=True)


def weight_and_bias_grad(gy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (∂W = gyᵀ x, ∂b = Σ_M gy (N,) in gy's dtype), the sum in the product's epilogue (BGRADB)."""
    db = torch.empty(gy.shape[1], device=gy.device, dtype=gy.dtype)
    return mm(gy, x, trans_a=True, epilogue=BGRADB, bias=db), db


def _check_fp8_operands(caller: str, xq: torch.Tensor, wq: torch.Tensor, b: torch.Tensor | None,
                        bias_dtype: torch.dtype) -> None:
    if xq.dtype not in _FP8_DTYPES or wq.dtype not in _FP8_DTYPES:
        raise TypeError(f"{caller} takes FP8 operands, got {xq.dtype} and {wq.dtype}")
    if not (xq.is_contiguous() and wq.is_contiguous()):
        raise ValueError(f"{caller} takes contiguous row-major operands")
    if b is not None and b.dtype != bias_dtype:
        raise TypeError(f"{caller}'s bias must be {bias_dtype}, got {b.dtype}")


def linear_fp8(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, b: torch.Tensor | None = None,
               gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16, mode: int = SCALAR
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = (sx xq)(sw wq)ᵀ + b for FP8 xq (M, K) and wq (N, K) with float32 scales (``SCALAR``: one each; ``OUTER_VEC``:
    sx (M,) per token, sw (N,) per output), y (M, N) in ``out_dtype`` (b too).  With ``gelu``: (GELU(y), y), GELU
    and its input written by the product (GELU_AUX_BIAS).  Hopper's FP8 kernels take both operands with K
    contiguous, which a row-major x and W are."""
    _check_fp8_operands("linear_fp8", xq, wq, b, out_dtype)
    (m, k), n = xq.shape, wq.shape[0]
    epilogue = (GELU_AUX_BIAS if b is not None else GELU_AUX) if gelu else (BIAS if b is not None else DEFAULT)
    pre = torch.empty(m, n, device=xq.device, dtype=out_dtype) if gelu else None
    y = _matmul(epilogue, _OP_T, _OP_N, wq, xq, n, m, k, bias=b, aux=pre, scales=(sw, sx, mode), out_dtype=out_dtype)
    return (y, pre) if gelu else y


def linear_gelu_fp8(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, b: torch.Tensor | None,
                    d_scale: torch.Tensor) -> torch.Tensor:
    """q(d_scale · GELU((sx xq)(sw wq)ᵀ + b)) (M, N) in e4m3, saturating at ±448: an FP8 linear whose GELU and the
    quantization of the next product's input happen in its epilogue (GELU_BIAS, an e4m3 D with a scale).  sx, sw,
    d_scale: (1,) float32, one scale per operand (with an e4m3 result cuBLASLt refuses per-row scales: status 7 on
    an H100); b (N,) bf16."""
    _check_fp8_operands("linear_gelu_fp8", xq, wq, b, torch.bfloat16)
    if any(t.dtype != torch.float32 or t.numel() != 1 for t in (sx, sw, d_scale)):
        raise TypeError("linear_gelu_fp8 takes one float32 scale each for x, W and the result, got "
                        f"{[(t.dtype, tuple(t.shape)) for t in (sx, sw, d_scale)]}")
    (m, k), n = xq.shape, wq.shape[0]
    return _matmul(GELU_BIAS if b is not None else GELU, _OP_T, _OP_N, wq, xq, n, m, k, bias=b, scales=(sw, sx, SCALAR),
                   out_dtype=torch.float8_e4m3fn, d_scale=d_scale)
