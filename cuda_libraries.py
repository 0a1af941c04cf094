"""
The libraries the GPU step calls, and their emulations: device memory (alloc, addr),
cuBLAS (Blas: fp32 and TF32 matmuls, through CuPy's raw bindings), cuBLASLt (Lt: bf16
matmuls with fused epilogues, through nvmath-python, with its algorithms timed once per
shape and kept in a tuning cache), and cuDNN's fused flash attention (Attention, through
cudnn-frontend). train_gpt2_cuda.py drives them; cuda_kernels.py holds our own kernels.

With NUMBA_ENABLE_CUDASIM=1 (SIM) every library call is replaced by a numpy emulation of
the same contract: raw addresses, leading dimensions, transposes, epilogues, bounds
checked against the buffers that alloc registered, so the simulator tests cover the
plumbing too. The simulator is not the GPU: it accepts what a library may refuse, so
every path here also runs on a real GPU in dev/gpu_check.sh.
"""

import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
from numba import config as numba_config
from numba import cuda

import gpt2_common as common

SIM = bool(numba_config.ENABLE_CUDASIM)


def _lock_simulator_shared_arrays():
    """numba's simulator makes a block's static shared array when the first of its threads
    asks for it, without a lock: two threads that ask at once could each make one, and
    the writes of one were lost to the others, who read np.empty's garbage (once seen as
    gradients of 1e29 in a CI run with four simulators on two cores). The same method
    under a lock."""
    import threading
    import traceback
    from numba.cuda.simulator import kernelapi
    unlocked, lock = kernelapi.FakeCUDAShared.array, threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one buffer made up front
            return unlocked(self, shape, dtype)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe(1), limit=1)[0][0:2]  # the simulator's key
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


if SIM:
    _lock_simulator_shared_arrays()

CUBLAS_DEFAULT_MATH = 0
CUBLAS_TF32_TENSOR_OP_MATH = 3


# -----------------------------------------------------------------------------
# Addresses, and the matrix products (cuBLAS, or its numpy emulation in the simulator)


def addr(x):
    if SIM:
        return x._ary.__array_interface__["data"][0]
    return x.__cuda_array_interface__["data"][0]


_emu_buffers = []  # simulator: (address, numpy array) of every flat float32 / bf16 / fp8 buffer


def alloc(n, dtype=np.float32):
    """A flat device array of n values (the emulations can find it by address)."""
    arr = cuda.device_array(int(n), dtype=dtype)
    if SIM and dtype in (np.float32, np.uint16, np.uint8):
        _emu_buffers.append((addr(arr), arr._ary))
    return arr


def release(arrays):
    """Forget the emulation's record of these arrays (the memory goes back when nothing
    else holds them)."""
    if SIM:
        mine = {addr(x) for x in arrays if hasattr(x, "_ary")}
        _emu_buffers[:] = [(a, buf) for a, buf in _emu_buffers if a not in mine]


def _emu_matrix(addr, rows, cols, ld, dtype=None):
    """Column-major rows x cols matrix at an address of a float32, bf16 (uint16) or fp8
    (uint8) buffer, as a numpy view (dtype: of the buffer read as that type, as fp8
    codes in a bf16 buffer); checks that it lies inside the buffer."""
    assert ld >= max(1, rows), (rows, cols, ld)
    for base, buf in _emu_buffers:
        if base <= addr < base + buf.nbytes:
            if dtype is not None:
                buf = buf.view(dtype)
            size = buf.itemsize
            off = (addr - base) // size
            assert (addr - base) % size == 0
            extent = (cols - 1) * ld + rows
            assert off + extent <= buf.size, f"matrix out of bounds: offset {off} + extent {extent} > {buf.size}"
            return np.lib.stride_tricks.as_strided(buf[off:], shape=(rows, cols), strides=(size, size * ld))
    raise AssertionError(f"address {addr:#x} is in no device buffer")


def _emu_sgemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
    # exactly cublasSgemm's column-major contract
    a = _emu_matrix(A, k, m, lda).T if ta else _emu_matrix(A, m, k, lda)
    b = _emu_matrix(B, n, k, ldb).T if tb else _emu_matrix(B, k, n, ldb)
    c = _emu_matrix(C, m, n, ldc)
    r = np.float32(alpha) * np.matmul(a, b, dtype=np.float32)
    if beta == 0.0:
        c[...] = r
    else:
        c[...] = r + np.float32(beta) * c


class PtrArray:
    """Device pointers of one batched GEMM operand (one per (batch, head))."""

    def __init__(self, host, dev_addr):
        self.host = host          # np.int64 addresses (used by the emulator)
        self.dev_addr = dev_addr  # address of the device copy (used by cuBLAS)


class Blas:
    """One cuBLAS handle for the process (on the legacy default stream, which Numba
    also launches on, so GEMMs and kernels are ordered without host syncs)."""

    _instance = None

    @classmethod
    def get(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        self._scalars = np.zeros(64, dtype=np.float32)
        self._scalar_index = {}
        self.tf32 = None
        if SIM:
            self.cublas = None
            self.handle = None
        else:
            import cupy  # noqa: F401  (initializes the runtime on the current device)
            from cupy_backends.cuda.libs import cublas
            self.cublas = cublas
            self.handle = cublas.create()
            cublas.setStream(self.handle, 0)

    def scalar(self, value):
        """Host address of a float32 constant (cuBLAS's host pointer mode)."""
        key = float(np.float32(value))
        i = self._scalar_index.get(key)
        if i is None:
            i = len(self._scalar_index)
            assert i < self._scalars.size
            self._scalars[i] = key
            self._scalar_index[key] = i
        return self._scalars.ctypes.data + 4 * i

    def set_tf32(self, on):
        if self.tf32 is not on:
            if self.handle is not None:
                self.cublas.setMathMode(self.handle, CUBLAS_TF32_TENSOR_OP_MATH if on else CUBLAS_DEFAULT_MATH)
            self.tf32 = on

    def gemm(self, tA, tB, M, N, K, A, lda, B, ldb, C, ldc, alpha=1.0, beta=0.0):
        """Row-major C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C, with A stored
        M x K (K x M if tA) and B stored K x N (N x K if tB), row strides lda, ldb, ldc.
        In cuBLAS's column-major terms that is C^T = op(B)^T @ op(A)^T."""
        if SIM:
            _emu_sgemm(tB, tA, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc)
        else:
            self.cublas.sgemm(self.handle, int(tB), int(tA), N, M, K, self.scalar(alpha), B, ldb, A, lda,
                              self.scalar(beta), C, ldc)

    def gemm_batched(self, tA, tB, M, N, K, A, lda, B, ldb, C, ldc, alpha=1.0, beta=0.0):
        """gemm over pointer arrays (PtrArray), one product per batch entry."""
        count = A.host.size
        if SIM:
            for i in range(count):
                _emu_sgemm(tB, tA, N, M, K, alpha, int(B.host[i]), ldb, int(A.host[i]), lda, beta, int(C.host[i]), ldc)
        else:
            self.cublas.sgemmBatched(self.handle, int(tB), int(tA), N, M, K, self.scalar(alpha), B.dev_addr, ldb,
                                     A.dev_addr, lda, self.scalar(beta), C.dev_addr, ldc, count)


# -----------------------------------------------------------------------------
# bf16: cuBLASLt matmuls with fused epilogues, and cuDNN's fused attention

R_32F, R_16BF, COMPUTE_32F = 0, 14, 68   # cudaDataType / cublasComputeType_t values
R_8F_E4M3, R_8F_E5M2 = 28, 29             # cudaDataType of the fp8 formats
LT_WORKSPACE = 32 << 20                   # bytes (cuBLASLt's recommendation for Hopper)
LT_CANDIDATES = 8                         # algorithms of the heuristic timed per matmul shape
LT_TIMING_REPS = 5                        # timed calls per candidate (the median counts)


def tuning_cache_path():
    """Where the matmul algorithm choices are kept, per GPU and cuBLASLt version:
    $GPT2PY_TUNING_CACHE, else gpt2py/cublaslt_algorithms.json in $XDG_CACHE_HOME (~/.cache)."""
    return common.cache_file("GPT2PY_TUNING_CACHE", "cublaslt_algorithms.json")


def load_tuning(path):
    """The algorithm choices saved at path ({} when there are none; a file that is not
    such a JSON object is ignored, with a one-line warning, and rewritten on the next save)."""
    try:
        with open(path) as f:
            chosen = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as e:
        print(f"warning: ignoring the matmul tuning cache {path}: {type(e).__name__}: {e}")
        return {}
    if not isinstance(chosen, dict) or not all(isinstance(v, int) for v in chosen.values()):
        print(f"warning: ignoring the matmul tuning cache {path}: not a JSON object of algorithm indices")
        return {}
    return chosen


def save_tuning(path, name, index):
    """Add name: index to the choices at path, merged with what other processes saved
    meanwhile, written whole to a temporary file and renamed over it. A cache that cannot
    be written costs nothing but the timing again next run (one warning)."""
    try:
        chosen = load_tuning(path)
        chosen[name] = int(index)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(chosen, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        print(f"warning: could not save the matmul tuning cache {path}: {e}")


def choose_algorithm(chosen, name, count, time_candidate):
    """The index (of the heuristic's count candidates) a matmul shape uses: the one saved
    under name in chosen, else the fastest by time_candidate(index) (seconds; None: the
    candidate failed), which is then saved in chosen. Timing picks among near-equal
    algorithms by noise, and each sums in its own order: the saved choice is what makes
    a seed repeat its losses run after run."""
    index = chosen.get(name)
    if index is not None and 0 <= index < count:
        return index, False
    times = [time_candidate(j) for j in range(count)]
    ok = [j for j in range(count) if times[j] is not None]
    if not ok:
        raise RuntimeError(f"cuBLASLt: none of the {count} algorithms for {name} ran")
    index = min(ok, key=lambda j: times[j])
    chosen[name] = index
    return index, True


def _alignment(*addrs):
    """The largest power of two (at most 256) dividing every address."""
    a = 256
    for x in addrs:
        while x % a:
            a //= 2
    return a


def _emu_widen(x):
    return common.bfloat16_to_float32(np.ascontiguousarray(x)) if x.dtype == np.uint16 else np.asarray(x, np.float32)


def _emu_store(dst, x):
    dst[...] = common.float32_to_bfloat16(np.ascontiguousarray(x, np.float32)) if dst.dtype == np.uint16 else x


def _gelu_np(x):
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(common.GELU_SCALE * (x + common.GELU_CUBE * x * x * x)))


def _gelu_grad_np(x):
    th = np.tanh(common.GELU_SCALE * (x + common.GELU_CUBE * x * x * x))
    return np.float32(0.5) * (np.float32(1.0) + th) + np.float32(0.5) * x * (np.float32(1.0) - th * th) * \
        common.GELU_SCALE * (np.float32(1.0) + np.float32(3.0) * common.GELU_CUBE * x * x)


class Lt:
    """cuBLASLt through nvmath-python's bindings: bf16 operands, float32 accumulation,
    bf16 or float32 output, and the epilogues the bf16 step fuses: the bias, bias + GELU
    (keeping the pre-activation), and the GELU backward. One plan (descriptors and an
    algorithm) per shape, made on first use; a call is one cublasLtMatmul. The algorithm:
    the heuristic's first LT_CANDIDATES are timed on that first call's operands and the
    fastest is kept, saved per GPU and cuBLASLt version in the tuning cache
    (tuning_cache_path), so later runs skip the timing and repeat the same sums. Under
    the simulator, the same contract in numpy."""

    def __init__(self, stream_ptr):
        self.plans = {}
        self.stream = stream_ptr
        self.one, self.zero = np.ones(1, np.float32), np.zeros(1, np.float32)
        if SIM:
            return
        from nvmath.bindings import cublasLt
        self.lt = cublasLt
        self.handle = cublasLt.create()
        self.workspace = cuda.device_array(LT_WORKSPACE, dtype=np.uint8)
        self.ws_addr = addr(self.workspace)
        name = cuda.get_current_device().name
        self.tuning_prefix = f"{name.decode() if isinstance(name, bytes) else name}|cublasLt {cublasLt.get_version()}|"
        self.tuning_path = tuning_cache_path()
        self.chosen = load_tuning(self.tuning_path)

    def _plan(self, key):
        lt = self.lt
        ta, tb, m, n, k, lda, ldb, ldc, out_type, epilogue, align, type_a, type_b, fast_accum = key
        desc = lt.matmul_desc_create(COMPUTE_32F, R_32F)
        attrs = lt.MatmulDescAttribute

        def set_attr(attr, value, dtype):
            buf = np.array([value], dtype=dtype)
            lt.matmul_desc_set_attribute(desc, attr, buf.ctypes.data, buf.itemsize)
        set_attr(attrs.TRANSA, int(ta), np.int32)
        set_attr(attrs.TRANSB, int(tb), np.int32)
        set_attr(attrs.EPILOGUE, int(epilogue), np.uint32)
        if epilogue in (lt.Epilogue.GELU_AUX_BIAS, lt.Epilogue.DGELU):
            set_attr(attrs.EPILOGUE_AUX_LD, m, np.int64)
        if type_a != R_16BF:  # fp8: its bias is bf16 (whatever the output's type), its accumulation mode,
            set_attr(attrs.BIAS_DATA_TYPE, R_16BF, np.int32)
            set_attr(attrs.FAST_ACCUM, int(fast_accum), np.int8)
        la = lt.matrix_layout_create(type_a, k if ta else m, m if ta else k, lda)
        lb = lt.matrix_layout_create(type_b, n if tb else k, k if tb else n, ldb)
        lc = lt.matrix_layout_create(out_type, m, n, ldc)
        pref = lt.matmul_preference_create()
        prefs = lt.MatmulPreferenceAttribute
        for attr, value in ((prefs.MAX_WORKSPACE_BYTES, LT_WORKSPACE), (prefs.MIN_ALIGNMENT_A_BYTES, align),
                            (prefs.MIN_ALIGNMENT_B_BYTES, align), (prefs.MIN_ALIGNMENT_C_BYTES, align),
                            (prefs.MIN_ALIGNMENT_D_BYTES, align)):
            buf = np.array([value], dtype=np.uint64 if attr == prefs.MAX_WORKSPACE_BYTES else np.uint32)
            lt.matmul_preference_set_attribute(pref, attr, buf.ctypes.data, buf.itemsize)
        results = np.zeros(LT_CANDIDATES, dtype=lt.matmul_heuristic_result_dtype)
        count = np.zeros(1, dtype=np.int32)
        lt.matmul_algo_get_heuristic(self.handle, desc, la, lb, lc, lc, pref, LT_CANDIDATES, results.ctypes.data,
                                     count.ctypes.data)
        lt.matmul_preference_destroy(pref)
        if count[0] == 0:
            raise RuntimeError(f"cuBLASLt has no algorithm for {key}")
        ptrs = np.zeros(4, dtype=np.intp)  # bias, aux and the fp8 scale pointers, set per call
        return SimpleNamespace(desc=desc, la=la, lb=lb, lc=lc, results=results[:count[0]], result=None, ptrs=ptrs)

    def _choose(self, plan, key, call, C, nbytes, reads_C):
        """plan.result: the saved choice for key, else the fastest candidate, timed by
        call(result) on this call's operands (C, nbytes long, kept aside and restored
        when the call reads it)."""
        import cupy
        stream = cupy.cuda.ExternalStream(self.stream)
        saved, errors = [], []

        def time_candidate(j):
            if reads_C and not saved:
                saved.append(cuda.device_array(nbytes, dtype=np.uint8))  # (not CuPy's pool: freed after)
                cupy.cuda.runtime.memcpyAsync(addr(saved[0]), C, nbytes, 3, self.stream)
            result = plan.results[j:j + 1]
            events = [cupy.cuda.Event() for _ in range(LT_TIMING_REPS + 1)]
            try:
                call(result)
                events[0].record(stream)
                for e in events[1:]:
                    call(result)
                    e.record(stream)
                events[-1].synchronize()
            except self.lt.cuBLASLtError as e:
                stream.synchronize()
                errors.append(str(e))
                return None
            return float(np.median([cupy.cuda.get_elapsed_time(a, b) for a, b in zip(events, events[1:])]))
        fields = key if key[11] != R_16BF else key[:11]  # (a bf16 matmul's name predates fp8)
        name = self.tuning_prefix + ",".join(str(int(x)) for x in fields)
        try:
            index, timed = choose_algorithm(self.chosen, name, len(plan.results), time_candidate)
        except RuntimeError as e:
            raise RuntimeError(f"{e} ({errors[-1] if errors else ''})") from None
        if timed:
            save_tuning(self.tuning_path, name, index)
        if saved:
            cupy.cuda.runtime.memcpyAsync(C, addr(saved[0]), nbytes, 3, self.stream)
            stream.synchronize()
        plan.result = plan.results[index:index + 1]

    def matmul(self, tA, tB, M, N, K, A, lda, B, ldb, C, ldc, out_fp32=False, accumulate=False, add=0, bias=0,
               gelu_aux=0, dgelu_aux=0, a8=None, b8=None, fast_accum=False):
        """Row-major C[M, N] = op(A)[M, K] @ op(B)[K, N] (+ C with accumulate), A, B bf16
        at addresses A, B with row strides lda, ldb (stored M x K, K x N; transposed with
        tA, tB), C bf16 (float32 with out_fp32); add: the address of a matrix like C
        added to the product (C itself with accumulate). Epilogues: bias (length N, of
        C's type) added; with gelu_aux, C = gelu(pre) and pre (bf16, like C) stored at
        gelu_aux; with dgelu_aux, C = (op(A) @ op(B)) * gelu'(pre at dgelu_aux). In
        cuBLAS's column-major terms: C^T = op(B)^T @ op(A)^T.
        fp8: a8 and b8 = (R_8F_E4M3 or R_8F_E5M2, the device address, 16-byte aligned, of
        the float32 the operand's sums are multiplied by), A and B fp8 in the only form Hopper multiplies
        (K contiguous in both: tA False, tB True), the bias bf16; fast_accum: the tensor
        cores' faster, less precise accumulation (Transformer Engine's choice for the
        forward)."""
        if gelu_aux and (tA, tB) != (False, True):  # the fc layer's form; others measured wrong (fuses_gelu)
            raise ValueError("the bias + GELU epilogue takes only untransposed A and transposed B")
        if (a8 is None) != (b8 is None) or (a8 is not None and (tA, tB) != (False, True)):
            raise ValueError("an fp8 matmul takes two fp8 operands, A untransposed and B transposed")
        if SIM:
            return self._emulate(tA, tB, M, N, K, A, lda, B, ldb, C, ldc, add or (C if accumulate else 0), bias,
                                 gelu_aux, dgelu_aux, out_fp32, a8, b8)
        lt = self.lt
        E = lt.Epilogue
        epilogue = (E.GELU_AUX_BIAS if gelu_aux else E.BIAS if bias else E.DGELU if dgelu_aux else E.DEFAULT)
        out_type = R_32F if out_fp32 else R_16BF
        type_a, type_b = (R_16BF, R_16BF) if a8 is None else (b8[0], a8[0])  # cuBLAS's A is our B
        key = (tB, tA, N, M, K, ldb, lda, ldc, out_type, epilogue, _alignment(A, B, C, add, bias, gelu_aux, dgelu_aux),
               type_a, type_b, bool(fast_accum) and a8 is not None)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._plan(key)
        attrs = lt.MatmulDescAttribute
        if bias:
            plan.ptrs[0] = bias
            lt.matmul_desc_set_attribute(plan.desc, attrs.BIAS_POINTER, plan.ptrs.ctypes.data, 8)
        if gelu_aux or dgelu_aux:
            plan.ptrs[1] = gelu_aux or dgelu_aux
            lt.matmul_desc_set_attribute(plan.desc, attrs.EPILOGUE_AUX_POINTER, plan.ptrs.ctypes.data + 8, 8)
        if a8 is not None:
            plan.ptrs[2], plan.ptrs[3] = b8[1], a8[1]
            lt.matmul_desc_set_attribute(plan.desc, attrs.A_SCALE_POINTER, plan.ptrs.ctypes.data + 16, 8)
            lt.matmul_desc_set_attribute(plan.desc, attrs.B_SCALE_POINTER, plan.ptrs.ctypes.data + 24, 8)
        beta = self.one if accumulate or add else self.zero

        def call(result):
            lt.matmul(self.handle, plan.desc, self.one.ctypes.data, B, plan.la, A, plan.lb, beta.ctypes.data,
                      add or C, plan.lc, C, plan.lc, result.ctypes.data, self.ws_addr, LT_WORKSPACE, self.stream)
        if plan.result is None:
            self._choose(plan, key, call, C, M * ldc * (4 if out_fp32 else 2), accumulate or add == C)
        call(plan.result)

    def _emulate(self, tA, tB, M, N, K, A, lda, B, ldb, C, ldc, add, bias, gelu_aux, dgelu_aux, out_fp32, a8, b8):
        fp8 = None if a8 is None else np.uint8  # (the casts' codes may live in a bf16 buffer)
        opA = _emu_matrix(A, M, K, lda, fp8) if tA else _emu_matrix(A, K, M, lda, fp8).T
        opB = _emu_matrix(B, K, N, ldb, fp8) if tB else _emu_matrix(B, N, K, ldb, fp8).T
        c = _emu_matrix(C, N, M, ldc).T
        assert c.dtype == (np.float32 if out_fp32 else np.uint16)
        if a8 is None:
            assert opA.dtype == np.uint16 and opB.dtype == np.uint16
            r = np.matmul(_emu_widen(opA), _emu_widen(opB), dtype=np.float32)
        else:  # the exact products of the decoded codes, then the two scales
            assert opA.dtype == np.uint8 and opB.dtype == np.uint8
            wa, wb = _emu_fp8(opA, a8), _emu_fp8(opB, b8)
            r = np.matmul(wa, wb, dtype=np.float32) * _emu_matrix(a8[1], 1, 1, 1)[0, 0] * \
                _emu_matrix(b8[1], 1, 1, 1)[0, 0]
        if add:
            r = r + _emu_widen(_emu_matrix(add, N, M, ldc).T)
        if bias:
            r = r + _emu_widen(_emu_matrix(bias, N, 1, N)[:, 0])
        if gelu_aux:
            assert ldc == N
            _emu_store(_emu_matrix(gelu_aux, N, M, ldc).T, r)
            r = _gelu_np(r)
        if dgelu_aux:
            assert ldc == N
            r = r * _gelu_grad_np(_emu_widen(_emu_matrix(dgelu_aux, N, M, ldc).T))
        _emu_store(c, r)


def _emu_fp8(codes, operand):
    import cuda_fp8  # (it imports this module)
    return cuda_fp8.decode(codes, cuda_fp8.E4M3 if operand[0] == R_8F_E4M3 else cuda_fp8.E5M2)


class Attention:
    """cuDNN's fused causal attention through cudnn-frontend's Python graphs: flash-style,
    the B*NH*T*T scores never reach memory. q, k, v are read in place from the qkv rows
    (B, T, 3, NH, HS), the output written as (B, T, NH, HS) rows, the softmax's
    logsumexp (float32, B*NH*T) kept for the backward, which writes dq, dk, dv in place
    into the dqkv rows. bf16 in and out, float32 inside. deterministic: the backward's
    fixed-order kernels (a separate dq pass), where cuDNN has them (9.11 and later), so
    a seed repeats its losses; False takes its default kernels, which sum dq with
    atomics. Under the simulator, the same contract in numpy."""

    def __init__(self, B, NH, T, HS, stream_ptr, deterministic=True):
        self.B, self.NH, self.T, self.HS = B, NH, T, HS
        self.scale = 1.0 / math.sqrt(HS)
        self.deterministic = bool(deterministic)  # (the emulation always is)
        if SIM:
            return
        try:  # cudnn-frontend dlopens the CUDA runtime: the wheel's copy, where there is one
            from cuda.pathfinder import load_nvidia_dynamic_lib
            load_nvidia_dynamic_lib("cudart")
        except Exception:  # noqa: BLE001  (a system CUDA runtime is found by the loader)
            pass
        import cudnn
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        cudnn.set_stream(self.handle, stream_ptr)
        bf16, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
        C = NH * HS
        dims = [B, NH, T, HS]
        qkv_stride, out_stride = [T * 3 * C, HS, 3 * C, 1], [T * C, HS, C, 1]
        stats_dims, stats_stride = [B, NH, T, 1], [NH * T, T, 1, 1]

        def graph():
            return cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32,
                                 handle=self.handle)

        def build(g):
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
            return g.get_workspace_size()

        f = graph()
        q, k, v = (f.tensor(name=n, dim=dims, stride=qkv_stride, data_type=bf16) for n in "qkv")
        o, stats = f.sdpa(name="attention", q=q, k=k, v=v, generate_stats=True, attn_scale=self.scale,
                          use_causal_mask=True)
        o.set_output(True).set_dim(dims).set_stride(out_stride).set_data_type(bf16)
        stats.set_output(True).set_dim(stats_dims).set_stride(stats_stride).set_data_type(f32)

        def backward_graph(deterministic):
            b = graph()
            bq, bk, bv = (b.tensor(name=n, dim=dims, stride=qkv_stride, data_type=bf16) for n in "qkv")
            bo = b.tensor(name="o", dim=dims, stride=out_stride, data_type=bf16)
            bdo = b.tensor(name="do", dim=dims, stride=out_stride, data_type=bf16)
            bst = b.tensor(name="stats", dim=stats_dims, stride=stats_stride, data_type=f32)
            extra = {"use_deterministic_algorithm": True} if deterministic else {}
            dq, dk, dv = b.sdpa_backward(name="attention_backward", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bst,
                                         attn_scale=self.scale, use_causal_mask=True, **extra)
            for t in (dq, dk, dv):
                t.set_output(True).set_dim(dims).set_stride(qkv_stride).set_data_type(bf16)
            return b, build(b), (bq, bk, bv, bo, bdo, bst, dq, dk, dv)

        if self.deterministic:
            try:
                b, bws, self.bwd_tensors = backward_graph(True)
            except Exception:  # noqa: BLE001  (older cuDNN or binding: the default kernels)
                self.deterministic = False
        if not self.deterministic:
            b, bws, self.bwd_tensors = backward_graph(False)
        ws = max(build(f), bws, 1)
        self.workspace = cuda.device_array(ws, dtype=np.uint8)
        self.fwd, self.fwd_tensors = f, (q, k, v, o, stats)
        self.bwd = b

    def forward(self, qkv, out, stats):
        """Addresses: qkv (bf16 BT x 3C), out (bf16 BT x C), stats (float32 B*NH*T)."""
        if SIM:
            return self._emulate(qkv, out, stats)
        q, k, v, o, st = self.fwd_tensors
        C2 = 2 * self.NH * self.HS  # bytes of C bf16 values
        self.fwd.execute({q: qkv, k: qkv + C2, v: qkv + 2 * C2, o: out, st: stats}, addr(self.workspace),
                         handle=self.handle)

    def backward(self, qkv, out, dout, stats, dqkv):
        """dqkv (bf16 BT x 3C, overwritten) from dout (bf16 BT x C)."""
        if SIM:
            return self._emulate(qkv, out, stats, dout, dqkv)
        q, k, v, o, do, st, dq, dk, dv = self.bwd_tensors
        C2 = 2 * self.NH * self.HS
        self.bwd.execute({q: qkv, k: qkv + C2, v: qkv + 2 * C2, o: out, do: dout, st: stats,
                          dq: dqkv, dk: dqkv + C2, dv: dqkv + 2 * C2}, addr(self.workspace), handle=self.handle)

    def _emulate(self, qkv, out, stats, dout=None, dqkv=None):
        B, NH, T, HS = self.B, self.NH, self.T, self.HS
        C, BT = NH * HS, B * T
        x = _emu_widen(_emu_matrix(qkv, 3 * C, BT, 3 * C).T).reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)
        q, k, v = x[0], x[1], x[2]                                   # (B, NH, T, HS)
        s = np.matmul(q, k.transpose(0, 1, 3, 2)) * np.float32(self.scale)
        s = np.where(np.tril(np.ones((T, T), bool)), s, np.float32(-np.inf))
        m = s.max(-1, keepdims=True)
        e = np.exp(s - m)
        z = e.sum(-1, keepdims=True)
        p = (e / z).astype(np.float32)
        o_view = _emu_matrix(out, C, BT, C).T
        st_view = _emu_matrix(stats, B * NH * T, 1, B * NH * T)[:, 0]
        if dout is None:
            _emu_store(o_view, np.matmul(p, v).transpose(0, 2, 1, 3).reshape(BT, C))
            st_view[...] = (m + np.log(z)).reshape(-1)
            return
        dy = _emu_widen(_emu_matrix(dout, C, BT, C).T).reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
        dv = np.matmul(p.transpose(0, 1, 3, 2), dy)
        dp = np.matmul(dy, v.transpose(0, 1, 3, 2))
        ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * np.float32(self.scale)
        dq = np.matmul(ds, k)
        dk = np.matmul(ds.transpose(0, 1, 3, 2), q)
        grads = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(BT, 3 * C)
        _emu_store(_emu_matrix(dqkv, 3 * C, BT, 3 * C).T, grads)
