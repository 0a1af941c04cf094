"""
GPT-2 training on an NVIDIA GPU: the CUDA twin of train_gpt2.py (as llm.c has
train_gpt2.c and train_gpt2.cu).

Shape, as llm.c: flat functions over one struct of device buffers. `to_device(model,
B, T)` copies a gpt2_common.GPT2's parameters to the GPU and allocates, once, every
buffer a step needs (the `dm`); `gpt2_forward_cuda`, `mean_loss_cuda`,
`gpt2_backward_cuda`, `stage_update` and `update_on_device` run a step on it, each layer one kernel
launcher (`encoder_layernorm`, `attention_forward`, `colsum`, `adamw`, ...) over a
numba.cuda kernel (k_*). `CUDA`, at the end, is the training target that train_gpt2.py's
main() and test_gpt2.py use (the gpt2_common.Device interface, as train_gpt2.CPU): a
thin wrapper over those functions plus the host copies (params_to_host, state_to_host,
state_from_host, logits_to_host, grads_to_host). This module imports gpt2_common, never
train_gpt2.

The device buffers have exactly the CPU module's layout: one float32 buffer of
parameters (llm.c checkpoint order), gradients, AdamW m and v of the same layout,
one activation buffer sliced by `common.activation_shapes`, one backward-scratch buffer
sliced by `common.activation_grad_shapes` (plus the attention scratch). A host copy of
any of them is one memcpy. Every non-matmul layer is a numba.cuda kernel computing
the same math as its CPU twin; the matmuls go through cuBLAS (CuPy's raw bindings),
TF32 tensor cores or strict fp32 by the handle's math mode.

Three precisions (CUDA(..., precision=)): "fp32" and "tf32" as described here, all
buffers float32; "bf16", mixed precision (to_device_bf16, gpt2_forward_bf16,
gpt2_backward_bf16): a bf16 copy of the parameters and bf16 activations beside the float32
master weights, gradients, AdamW state and residual stream, matmuls through cuBLASLt
(nvmath-python's bindings) with the bias and GELU as epilogues, attention through cuDNN's
fused flash attention (cudnn-frontend), and each step phase replayed as a CUDA graph. The
kernels are the same for all three: they read and write through ld/st, which convert by
the array's dtype (uint16 holds bf16 bits), and the memory-bound row kernels through
ld4/st4, four values per access over a packed uint64 view (quads).

In fp32 and tf32, attention never permutes q, k, v: pointer-array batched GEMMs (one
matrix per (batch, head)) read them in place from the qkv rows and write the head outputs
in place into atty / dqkv. The causal mask is exploited by splitting the T query rows into blocks:
block i only multiplies against keys 0..end_i, so about (NB+1)/(2 NB) of the T x T work
and traffic is done. Entries above the diagonal of `att` stay zero. The softmax is one
warp per row, straight from device memory.

Measured and removed (on an H100, B=16, T=1024, TF32): llm.c's head-major layout
(q, k, v permuted into per-head copies, strided batched GEMMs, the outputs merged
back) was slower, 110 vs 100 ms per step: cuBLAS picks the same GEMM kernels, and the
copies cost; softmax kernels staging each row in shared memory measured no faster
than the plain ones.

Everything is allocated once in `to_device`; a training step does small async
host-to-device copies from pinned staging buffers (tokens and targets in the forward;
the encoder-backward buckets, built on the host while the device runs the forward,
behind them; the AdamW hyperparameters before the update) and no device allocation. The only device-to-host reads are the ones the
caller asks for: through `CUDA`, the loss of each forward and the norm of each update
(one wait each), and the *_to_host copies.

With NUMBA_ENABLE_CUDASIM=1 the kernels run in numba's simulator and cuBLAS, cuBLASLt
and cuDNN's attention are replaced by numpy emulations of the same calls (pointers,
leading dimensions, transposes, epilogues, bounds-checked), so the tests cover the
plumbing too.
"""

import json
import math
import os
import weakref
from types import SimpleNamespace

import numpy as np
from numba import config as numba_config
from numba import cuda, float32, float64, int32

import distributed
import gpt2_common as common

SIM = bool(numba_config.ENABLE_CUDASIM)
try:  # tiny test grids would warn about occupancy
    numba_config.CUDA_LOW_OCCUPANCY_WARNINGS = False
except Exception:  # pragma: no cover
    pass

JIT = {} if SIM else {"cache": True}

# launch shapes (the simulator runs one Python thread per GPU thread: keep it small there;
# its "warps" are LANES threads wide and reduce through shared memory)
LANES = 4 if SIM else 32               # threads per row in the warp-per-row kernels
ROWS = 2 if SIM else 8                 # rows per block there (block = LANES x ROWS)
CE_THREADS = 16 if SIM else 128        # classifier: one block per row
RED_THREADS = 16 if SIM else 256       # single-block reductions, grad norm blocks
RED_N = 1024 if SIM else 32            # shared scratch of the block reductions
ELT_THREADS = 32 if SIM else 256       # elementwise grid-stride kernels
ELT_MAX_BLOCKS = 2 if SIM else 132 * 16
NORM_BLOCKS = 3 if SIM else 132 * 8
CS_COLS = 2 if SIM else 16             # column sums: block = CS_COLS quads (4 columns each) x CS_ROWS
CS_ROWS = 4 if SIM else 16             # (at least 4: the block's first 4 CS_COLS threads finish a column each)
CS_WIDTH = 4 * CS_COLS                 # columns of a column-sum block
CS_CHUNK = 12 if SIM else 256          # rows per column-sum block (partials per chunk, then a fixed-order sum)
LNB_BLOCKS = 3 if SIM else 132 * 8     # layernorm backward: blocks (rows strided over them; a partial sum each)
MAX_THREADS = 1024                     # a block's threads: the layernorm backward's are C / 4, so C <= 4096
ENC_QUADS = 2 if SIM else 64           # wte backward: block = ENC_QUADS quad columns x ENC_GROUPS
ENC_GROUPS = 3 if SIM else 8           # position groups
ENC_WIDTH = 4 * ENC_QUADS
ENC_BLOCKS = 2 if SIM else 132 * 4     # blocks (buckets strided over them)

F0 = np.float32(0.0)
ONE = np.float32(1.0)
HALF = np.float32(0.5)
THREE = np.float32(3.0)
NEG_INF = np.float32(-np.inf)
EPS = np.float32(1e-5)
GELU_SCALE = common.GELU_SCALE
GELU_CUBE = common.GELU_CUBE
FULL_MASK = 0xFFFFFFFF

CUBLAS_DEFAULT_MATH = 0
CUBLAS_TF32_TENSOR_OP_MATH = 3


# -----------------------------------------------------------------------------
# Reductions. On the GPU: warp shuffles. The simulator has no shuffles, so there
# the same functions go through shared memory; both orders are fixed (deterministic).

if SIM:
    @cuda.jit(device=True)
    def warp_sum(x, sh, row):
        # sum over the LANES threads (threadIdx.x) of block row `row`; sh: shared (ROWS, LANES)
        lane = cuda.threadIdx.x
        sh[row, lane] = x
        cuda.syncthreads()
        s = sh[row, 0]
        for i in range(1, LANES):
            s += sh[row, i]
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def warp_max(x, sh, row):
        lane = cuda.threadIdx.x
        sh[row, lane] = x
        cuda.syncthreads()
        s = sh[row, 0]
        for i in range(1, LANES):
            if sh[row, i] > s:
                s = sh[row, i]
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def block_sum(x, sh):
        # sum over a 1-D block; sh: shared (RED_N,)
        tid = cuda.threadIdx.x
        sh[tid] = x
        cuda.syncthreads()
        s = sh[0]
        for i in range(1, cuda.blockDim.x):
            s += sh[i]
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def block_max(x, sh):
        tid = cuda.threadIdx.x
        sh[tid] = x
        cuda.syncthreads()
        s = sh[0]
        for i in range(1, cuda.blockDim.x):
            if sh[i] > s:
                s = sh[i]
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def block_sum2(x, y, sh, buf):
        # sums of x and of y over a 1-D block; sh: shared (2, 2, RED_N), of which half buf
        # is written: a caller that alternates buf between calls needs no second sync
        tid = cuda.threadIdx.x
        sh[buf, 0, tid] = x
        sh[buf, 1, tid] = y
        cuda.syncthreads()
        s = sh[buf, 0, 0]
        t = sh[buf, 1, 0]
        for i in range(1, cuda.blockDim.x):
            s += sh[buf, 0, i]
            t += sh[buf, 1, i]
        return s, t
else:
    @cuda.jit(device=True)
    def _shfl_sum(x):
        x += cuda.shfl_xor_sync(FULL_MASK, x, 16)
        x += cuda.shfl_xor_sync(FULL_MASK, x, 8)
        x += cuda.shfl_xor_sync(FULL_MASK, x, 4)
        x += cuda.shfl_xor_sync(FULL_MASK, x, 2)
        x += cuda.shfl_xor_sync(FULL_MASK, x, 1)
        return x

    @cuda.jit(device=True)
    def _shfl_max(x):
        x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, 16))
        x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, 8))
        x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, 4))
        x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, 2))
        x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, 1))
        return x

    @cuda.jit(device=True)
    def warp_sum(x, sh, row):
        return _shfl_sum(x)

    @cuda.jit(device=True)
    def warp_max(x, sh, row):
        return _shfl_max(x)

    @cuda.jit(device=True)
    def block_sum(x, sh):
        tid = cuda.threadIdx.x
        x = _shfl_sum(x)
        if tid % 32 == 0:
            sh[tid // 32] = x
        cuda.syncthreads()
        s = sh[0]
        for w in range(1, cuda.blockDim.x // 32):
            s += sh[w]
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def block_max(x, sh):
        tid = cuda.threadIdx.x
        x = _shfl_max(x)
        if tid % 32 == 0:
            sh[tid // 32] = x
        cuda.syncthreads()
        s = sh[0]
        for w in range(1, cuda.blockDim.x // 32):
            s = max(s, sh[w])
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def block_sum2(x, y, sh, buf):
        tid = cuda.threadIdx.x
        x = _shfl_sum(x)
        y = _shfl_sum(y)
        if tid % 32 == 0:
            sh[buf, 0, tid // 32] = x
            sh[buf, 1, tid // 32] = y
        cuda.syncthreads()
        s = sh[buf, 0, 0]
        t = sh[buf, 1, 0]
        for w in range(1, cuda.blockDim.x // 32):
            s += sh[buf, 0, w]
            t += sh[buf, 1, w]
        return s, t


# -----------------------------------------------------------------------------
# Storage. Activations and parameters are float32 (fp32, tf32) or bf16 (stored as
# uint16 bit patterns; under bf16 some stay float32: the residual stream, layernorm
# weights). Every kernel that touches them reads through ld(array, index), which widens
# to float32, and writes through st(array, index, value), which rounds to the array's
# storage (bf16: to nearest even, as gpt2_common.float32_to_bfloat16); both branch on
# the array's itemsize, a compile-time constant, so each compiled kernel keeps one
# path. Arithmetic is float32 throughout.

if SIM:  # plain functions (a simulated device function swaps module globals on every call)
    def bf16_ld(u):
        return np.uint32(int(u) << 16).view(np.float32)

    def bf16_st(x):
        b = int(np.float32(x).view(np.uint32))
        if (b & 0x7FFFFFFF) > 0x7F800000:  # NaN stays a (quiet) NaN
            return np.uint16((b >> 16) | 0x40)
        return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)

    def ld(arr, idx):
        v = arr[idx]
        return bf16_ld(v) if arr.itemsize == 2 else v

    def st(arr, idx, v):
        arr[idx] = bf16_st(v) if arr.itemsize == 2 else v
else:
    from numba import uint16, uint32
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def bf16_ld(u):
        return libdevice.int_as_float(int32(uint32(u) << uint32(16)))

    @cuda.jit(device=True, inline=True)
    def bf16_st(x):
        b = uint32(libdevice.float_as_int(x))
        if (b & uint32(0x7FFFFFFF)) > uint32(0x7F800000):  # NaN stays a (quiet) NaN
            return uint16((b >> uint32(16)) | uint32(0x40))
        b = b + uint32(0x7FFF) + ((b >> uint32(16)) & uint32(1))
        return uint16(b >> uint32(16))

    @cuda.jit(device=True, inline=True)
    def ld(arr, idx):
        v = arr[idx]
        if arr.itemsize == 2:
            return bf16_ld(v)
        return float32(v)

    @cuda.jit(device=True, inline=True)
    def st(arr, idx, v):
        if arr.itemsize == 2:
            arr[idx] = bf16_st(v)
        else:
            arr[idx] = v


# Packed access: the row kernels (layernorms and their backward, column sums, the
# classifier, the GELU recompute) move four consecutive values per access through a uint64
# view of shape (rows, columns / 4, words), made on the host by quads(): one 8-byte word
# holds four bf16 (words = 1), two hold four float32 (words = 2). ld4 / st4 are ld / st for
# such a quad: a lane's 8 or 16 bytes instead of 2 or 4, so that these memory-bound
# kernels keep enough bytes in flight (with 2-byte bf16 loads they ran at a third of
# the H200's bandwidth).

if SIM:
    def ld4(q, i, k):
        if q.shape[2] == 1:
            u = int(q[i, k, 0])
            return (bf16_ld(u & 0xFFFF), bf16_ld((u >> 16) & 0xFFFF), bf16_ld((u >> 32) & 0xFFFF),
                    bf16_ld(u >> 48))
        f = np.array([q[i, k, 0], q[i, k, 1]], dtype=np.uint64).view(np.float32)
        return f[0], f[1], f[2], f[3]

    def st4(q, i, k, x0, x1, x2, x3):
        if q.shape[2] == 1:
            q[i, k, 0] = np.uint64(int(bf16_st(x0)) | int(bf16_st(x1)) << 16 | int(bf16_st(x2)) << 32 |
                                   int(bf16_st(x3)) << 48)
        else:
            w = np.array([x0, x1, x2, x3], dtype=np.float32).view(np.uint64)
            q[i, k, 0] = w[0]
            q[i, k, 1] = w[1]
else:
    from numba import uint64

    @cuda.jit(device=True, inline=True)
    def f32_lo(w):
        return libdevice.int_as_float(int32(w & uint64(0xFFFFFFFF)))

    @cuda.jit(device=True, inline=True)
    def f32_hi(w):
        return libdevice.int_as_float(int32(w >> uint64(32)))

    @cuda.jit(device=True, inline=True)
    def f32_word(lo, hi):
        return uint64(uint32(libdevice.float_as_int(lo))) | (uint64(uint32(libdevice.float_as_int(hi))) << uint64(32))

    @cuda.jit(device=True, inline=True)
    def ld4(q, i, k):
        w = q[i, k, 0]
        if q.shape[2] == 1:  # four bf16
            return (bf16_ld(uint32(w & uint64(0xFFFF))), bf16_ld(uint32((w >> uint64(16)) & uint64(0xFFFF))),
                    bf16_ld(uint32((w >> uint64(32)) & uint64(0xFFFF))), bf16_ld(uint32(w >> uint64(48))))
        w1 = q[i, k, 1]
        return f32_lo(w), f32_hi(w), f32_lo(w1), f32_hi(w1)

    @cuda.jit(device=True, inline=True)
    def st4(q, i, k, x0, x1, x2, x3):
        if q.shape[2] == 1:
            q[i, k, 0] = (uint64(bf16_st(x0)) | (uint64(bf16_st(x1)) << uint64(16)) |
                          (uint64(bf16_st(x2)) << uint64(32)) | (uint64(bf16_st(x3)) << uint64(48)))
        else:
            q[i, k, 0] = f32_word(x0, x1)
            q[i, k, 1] = f32_word(x2, x3)


# Fast exponent and quotient (ex2.approx, the approximate divide: a few ulp of float32)
# where a result is rounded to bf16 anyway: the bf16 GELU recompute and the classifier
# on bf16 logits. Float32 rows keep math.exp and the IEEE divide.
if SIM:
    def exp_fast(x):
        return np.float32(math.exp(x))

    def div_fast(a, b):
        return np.float32(a / b)
else:
    @cuda.jit(device=True, inline=True)
    def exp_fast(x):
        return libdevice.fast_expf(x)

    @cuda.jit(device=True, inline=True)
    def div_fast(a, b):
        return libdevice.fast_fdividef(a, b)


@cuda.jit(device=True)
def add4(a0, a1, a2, a3, x0, x1, x2, x3):
    # two quads added
    return a0 + x0, a1 + x1, a2 + x2, a3 + x3


@cuda.jit(device=True)
def pick4(x0, x1, x2, x3, r):
    # value r (0..3) of a quad
    if r == 0:
        return x0
    if r == 1:
        return x1
    return x2 if r == 2 else x3


# -----------------------------------------------------------------------------
# Kernels, forward


@cuda.jit(device=True)
def layernorm_row(x, ln, mean, rstd, w, b, s, sh, i, ii, N, nq):
    # the end of both layernorm kernels (quads, nq a row): this lane's partial sum s of
    # row ii of x (the row that block row threadIdx.y owns) -> mean, rstd and ln[ii];
    # float32 statistics, as the CPU computes them
    lane = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    C = float32(4 * x.shape[1])
    m = warp_sum(s, sh, ty) / C
    v = F0
    for k in range(lane, nq, LANES):
        x0, x1, x2, x3 = ld4(x, ii, k)
        x0 -= m
        x1 -= m
        x2 -= m
        x3 -= m
        v += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3)
    v = warp_sum(v, sh, ty) / C
    rs = ONE / math.sqrt(v + EPS)
    for k in range(lane, nq, LANES):
        x0, x1, x2, x3 = ld4(x, ii, k)
        w0, w1, w2, w3 = ld4(w, 0, k)
        b0, b1, b2, b3 = ld4(b, 0, k)
        st4(ln, ii, k, (x0 - m) * rs * w0 + b0, (x1 - m) * rs * w1 + b1, (x2 - m) * rs * w2 + b2,
            (x3 - m) * rs * w3 + b3)
    if lane == 0 and i < N:
        mean[ii] = m
        rstd[ii] = rs


@cuda.jit(**JIT)
def k_encoder_layernorm(encoded, ln, mean, rstd, tokens, wte, wpe, w, b, T):
    # encoded[i] = wte[token] + wpe[i % T], then ln = layernorm(encoded): one warp per row
    # (all arrays quads)
    sh = cuda.shared.array((ROWS, LANES), float32)
    lane = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.x * ROWS + ty
    N = encoded.shape[0]
    nq = encoded.shape[1] if i < N else 0
    ii = i if i < N else 0
    tok = tokens[ii]
    t = ii % T
    s = F0
    for k in range(lane, nq, LANES):
        e0, e1, e2, e3 = ld4(wte, tok, k)
        p0, p1, p2, p3 = ld4(wpe, t, k)
        st4(encoded, ii, k, e0 + p0, e1 + p1, e2 + p2, e3 + p3)
        x0, x1, x2, x3 = ld4(encoded, ii, k)  # as stored
        s += (x0 + x1) + (x2 + x3)
    layernorm_row(encoded, ln, mean, rstd, w, b, s, sh, i, ii, N, nq)


@cuda.jit(**JIT)
def k_residual_layernorm(res, prev, bias, ln, mean, rstd, w, b, mode):
    # mode 1: res = (res + bias) + prev (matmul output + bias + residual, in place), then
    # ln = layernorm(res). mode 0: ln = layernorm(res) (prev and bias unused). Quads.
    # (Keeping a lane's quads in registers for the later passes measured no faster in a
    # training step on the H200, 1.00 vs 0.99 ms for the 24 calls: the row is still in
    # cache.)
    sh = cuda.shared.array((ROWS, LANES), float32)
    lane = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.x * ROWS + ty
    N = res.shape[0]
    nq = res.shape[1] if i < N else 0
    ii = i if i < N else 0
    s = F0
    for k in range(lane, nq, LANES):
        if mode == 1:
            x0, x1, x2, x3 = ld4(res, ii, k)
            c0, c1, c2, c3 = ld4(bias, 0, k)
            p0, p1, p2, p3 = ld4(prev, ii, k)
            st4(res, ii, k, (x0 + c0) + p0, (x1 + c1) + p1, (x2 + c2) + p2, (x3 + c3) + p3)
        x0, x1, x2, x3 = ld4(res, ii, k)
        s += (x0 + x1) + (x2 + x3)
    layernorm_row(res, ln, mean, rstd, w, b, s, sh, i, ii, N, nq)


@cuda.jit(**JIT)
def k_bias_forward(out, bias):
    # out[i, o] += bias[o]; grid: (column blocks, row blocks), rows strided
    N, OC = out.shape
    o = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if o < OC:
        bo = bias[o]
        for i in range(cuda.blockIdx.y, N, cuda.gridDim.y):
            out[i, o] += bo


@cuda.jit(**JIT)
def k_bias_gelu_forward(fch, fch_gelu, bias):
    # fch += bias; fch_gelu = gelu(fch) (tanh form), one pass
    N, OC = fch.shape
    o = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if o < OC:
        bo = bias[o]
        for i in range(cuda.blockIdx.y, N, cuda.gridDim.y):
            x = fch[i, o] + bo
            fch[i, o] = x
            fch_gelu[i, o] = gelu(x)


@cuda.jit(device=True)
def gelu(x):
    # the tanh form, as the CPU's gelu_forward
    u = GELU_SCALE * (x + GELU_CUBE * x * x * x)
    return HALF * x * (ONE + math.tanh(u))


@cuda.jit(device=True)
def gelu_bf16(x):
    # gelu for a bf16 result: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), fast exp and divide
    u = GELU_SCALE * (x + GELU_CUBE * x * x * x)
    return div_fast(x, ONE + exp_fast(-(u + u)))


@cuda.jit(**JIT)
def k_gelu_forward(out, inp):
    # out = gelu(inp), elementwise over flat quads (one row): the bf16 backward's recompute
    # of the GELU output from the stored pre-activation (and the forward's, where the
    # matmul has no GELU epilogue). Two quads a thread per iteration (loads in flight).
    n = inp.shape[1]
    G = cuda.gridsize(1)
    k = cuda.grid(1)
    while k + G < n:
        x0, x1, x2, x3 = ld4(inp, 0, k)
        y0, y1, y2, y3 = ld4(inp, 0, k + G)
        st4(out, 0, k, gelu_bf16(x0), gelu_bf16(x1), gelu_bf16(x2), gelu_bf16(x3))
        st4(out, 0, k + G, gelu_bf16(y0), gelu_bf16(y1), gelu_bf16(y2), gelu_bf16(y3))
        k += 2 * G
    if k < n:
        x0, x1, x2, x3 = ld4(inp, 0, k)
        st4(out, 0, k, gelu_bf16(x0), gelu_bf16(x1), gelu_bf16(x2), gelu_bf16(x3))


@cuda.jit(**JIT)
def k_softmax_forward(att, Tb):
    # att (B*NH, T, T) holds scale * q.k for t2 < end of the row's query block; in place:
    # causal softmax over t2 <= t, zeros for t < t2 < block end. One warp per row, each
    # lane four elements per iteration (loads in flight).
    sh = cuda.shared.array((ROWS, LANES), float32)
    lane = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    BNH, T, _ = att.shape
    r = cuda.blockIdx.x * ROWS + ty
    valid = r < BNH * T
    rr = r if valid else 0
    bh = rr // T
    t = rr - bh * T
    n = t + 1 if valid else 0
    m = NEG_INF
    for j0 in range(lane, n, 4 * LANES):
        j1 = j0 + LANES
        j2 = j1 + LANES
        j3 = j2 + LANES
        x0 = att[bh, t, j0]
        x1 = att[bh, t, j1] if j1 < n else NEG_INF
        x2 = att[bh, t, j2] if j2 < n else NEG_INF
        x3 = att[bh, t, j3] if j3 < n else NEG_INF
        m = max(m, max(max(x0, x1), max(x2, x3)))
    m = warp_max(m, sh, ty)
    s = F0
    for j0 in range(lane, n, 4 * LANES):
        j1 = j0 + LANES
        j2 = j1 + LANES
        j3 = j2 + LANES
        e0 = math.exp(att[bh, t, j0] - m)
        e1 = math.exp(att[bh, t, j1] - m) if j1 < n else F0
        e2 = math.exp(att[bh, t, j2] - m) if j2 < n else F0
        e3 = math.exp(att[bh, t, j3] - m) if j3 < n else F0
        s += (e0 + e1) + (e2 + e3)
    s = warp_sum(s, sh, ty)
    inv = ONE / s
    for j0 in range(lane, n, 4 * LANES):
        j1 = j0 + LANES
        j2 = j1 + LANES
        j3 = j2 + LANES
        x0 = att[bh, t, j0]
        x1 = att[bh, t, j1] if j1 < n else F0
        x2 = att[bh, t, j2] if j2 < n else F0
        x3 = att[bh, t, j3] if j3 < n else F0
        att[bh, t, j0] = math.exp(x0 - m) * inv
        if j1 < n:
            att[bh, t, j1] = math.exp(x1 - m) * inv
        if j2 < n:
            att[bh, t, j2] = math.exp(x2 - m) * inv
        if j3 < n:
            att[bh, t, j3] = math.exp(x3 - m) * inv
    end = min(T, (t // Tb + 1) * Tb) if valid else 0
    for t2 in range(t + 1 + lane, end, LANES):
        att[bh, t, t2] = F0


@cuda.jit(device=True)
def exp_row(x, fast):
    # exp of a classifier entry: fast on bf16 rows
    return exp_fast(x) if fast else math.exp(x)


@cuda.jit(device=True)
def past_vocab(x1, x2, x3, j, V):
    # values 1..3 of the quad at column j, -inf past the vocabulary (the padding; value 0
    # of a read quad is always inside)
    return (x1 if j + 1 < V else NEG_INF, x2 if j + 2 < V else NEG_INF, x3 if j + 3 < V else NEG_INF)


@cuda.jit(**JIT)
def k_classifier_forward(losses, lse, logits, targets, V):
    # one block per row of the logits (quads): online max / sum of exp over the first V
    # columns (one read), logsumexp kept for the backward; a target of -1 gives loss 0.
    # (llm.c's fused classifier, this kernel then writing the row's dlogits while they are
    # in cache, measured no faster on the H200: the second pass missed the cache; nor with
    # a bf16 row held in registers, 13 quads in each of 1024 threads: 3.2 ms against 1.97
    # for the two kernels, one such block an SM waits out its own loads and reductions.)
    sh = cuda.shared.array(RED_N, float32)
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    fast = logits.shape[2] == 1
    m = NEG_INF
    s = F0
    nt = cuda.blockDim.x
    nq = (V + 3) // 4
    k = tid
    while k < nq:  # two quads an iteration (loads in flight)
        x0, x1, x2, x3 = ld4(logits, row, k)
        y0 = y1 = y2 = y3 = NEG_INF
        if k + nt < nq:
            y0, y1, y2, y3 = ld4(logits, row, k + nt)
        x1, x2, x3 = past_vocab(x1, x2, x3, 4 * k, V)
        y1, y2, y3 = past_vocab(y1, y2, y3, 4 * (k + nt), V)
        mx = max(max(max(x0, x1), max(x2, x3)), max(max(y0, y1), max(y2, y3)))
        if mx > m:
            s = s * math.exp(m - mx)
            m = mx
        s += ((exp_row(x0 - m, fast) + exp_row(x1 - m, fast)) + (exp_row(x2 - m, fast) + exp_row(x3 - m, fast))) + \
            ((exp_row(y0 - m, fast) + exp_row(y1 - m, fast)) + (exp_row(y2 - m, fast) + exp_row(y3 - m, fast)))
        k += 2 * nt
    M = block_max(m, sh)
    s = s * math.exp(m - M) if s > F0 else F0
    S = block_sum(s, sh)
    if tid == 0:
        lv = M + math.log(S)
        lse[row] = lv
        tg = targets[row]
        if tg >= 0:
            x0, x1, x2, x3 = ld4(logits, row, tg // 4)
            losses[row] = lv - pick4(x0, x1, x2, x3, tg % 4)
        else:
            losses[row] = F0


@cuda.jit(**JIT)
def k_loss_reduce(stats, losses, targets):
    # one block: stats = [sum of losses (float64), number of unmasked targets]
    sh = cuda.shared.array(RED_N, float64)
    tid = cuda.threadIdx.x
    s = 0.0
    cnt = 0.0
    for i in range(tid, losses.shape[0], cuda.blockDim.x):
        s += losses[i]
        if targets[i] >= 0:
            cnt += 1.0
    s = block_sum(s, sh)
    cnt = block_sum(cnt, sh)
    if tid == 0:
        stats[0] = s
        stats[1] = cnt


# -----------------------------------------------------------------------------
# Kernels, backward


@cuda.jit(device=True)
def classifier_grad(x, lv, dloss, j, tg, V, fast):
    # d loss / d logit j of a row with logsumexp lv and target tg: (softmax_j - [j == tg])
    # * dloss; zero in the padding columns
    if j >= V:
        return F0
    g = exp_row(x - lv, fast) * dloss
    if j == tg:
        g -= dloss
    return g


@cuda.jit(device=True)
def classifier_grad4(x0, x1, x2, x3, lv, dloss, j, tg, V, fast):
    # classifier_grad of columns j .. j + 3; without padding or the target among them (all
    # quads of a row but one or two), no per-column tests
    if j + 3 < V and (tg < j or tg > j + 3):
        return (exp_row(x0 - lv, fast) * dloss, exp_row(x1 - lv, fast) * dloss, exp_row(x2 - lv, fast) * dloss,
                exp_row(x3 - lv, fast) * dloss)
    return (classifier_grad(x0, lv, dloss, j, tg, V, fast), classifier_grad(x1, lv, dloss, j + 1, tg, V, fast),
            classifier_grad(x2, lv, dloss, j + 2, tg, V, fast), classifier_grad(x3, lv, dloss, j + 3, tg, V, fast))


@cuda.jit(**JIT)
def k_classifier_backward(logits, lse, targets, V, stats, loss_scale):
    # in place: logits (quads) become dlogits = (softmax - onehot) * dloss, dloss =
    # loss_scale / #valid; padding columns and masked rows get zero. One pass over each row.
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    fast = logits.shape[2] == 1
    cnt = stats[1]
    dloss = float32(loss_scale / cnt) if cnt > 0.0 else F0
    tg = targets[row]
    if tg < 0:
        dloss = F0
    lv = lse[row]
    nt = cuda.blockDim.x
    nq = logits.shape[1]
    for k in range(tid, nq, 2 * nt):  # two quads an iteration (loads in flight)
        x0, x1, x2, x3 = ld4(logits, row, k)
        k2 = k + nt
        if k2 < nq:
            y0, y1, y2, y3 = ld4(logits, row, k2)
            y0, y1, y2, y3 = classifier_grad4(y0, y1, y2, y3, lv, dloss, 4 * k2, tg, V, fast)
            st4(logits, row, k2, y0, y1, y2, y3)
        x0, x1, x2, x3 = classifier_grad4(x0, x1, x2, x3, lv, dloss, 4 * k, tg, V, fast)
        st4(logits, row, k, x0, x1, x2, x3)


@cuda.jit(**JIT)
def k_layernorm_backward(dinp, dout, inp, w, mean, rstd, overwrite, shadow, has_shadow, part):
    # dinp (+)= the layernorm input gradient, float32 row sums as the CPU; with has_shadow,
    # shadow = dinp too (the bf16 copy of a float32 residual gradient that the matmuls
    # read). Thread k of a block owns quad k (columns 4k..4k+3) of every row, the blocks
    # strided over the rows: a row's two sums are one block reduction, and the thread's
    # column sums stay in its registers, written at the end as the block's partial sums
    # part[block, :] = [sum dout * norm (the weight gradient) | sum dout (the bias
    # gradient) | sum of the new dinp (the bias gradient of the matmul whose output this
    # layernorm read)], which colsum (mode 2) adds up: fixed orders, deterministic. So
    # the weight and bias gradients cost no second read of dout and inp. (The warp-a-row
    # kernel this replaced kept each warp's column sums in shared memory, which held it to
    # 20 warps an SM: 122 against 86 us at 16384 x 768 on the H200, one call.)
    sh = cuda.shared.array((2, 2, RED_N), float32)  # the row sums' per-warp partials, double buffered
    k = cuda.threadIdx.x
    N = inp.shape[0]
    nq = inp.shape[1]
    Cf = float32(4 * nq)
    mine = k < nq  # (the block is whole warps)
    w0 = w1 = w2 = w3 = F0
    if mine:
        w0, w1, w2, w3 = ld4(w, 0, k)
    p0 = p1 = p2 = p3 = q0 = q1 = q2 = q3 = r0 = r1 = r2 = r3 = F0
    buf = 0
    for i in range(cuda.blockIdx.x, N, cuda.gridDim.x):  # block-uniform (the block reduction syncs)
        m = mean[i]
        s = rstd[i]
        x0 = x1 = x2 = x3 = d0 = d1 = d2 = d3 = o0 = o1 = o2 = o3 = F0
        if mine:
            x0, x1, x2, x3 = ld4(inp, i, k)
            d0, d1, d2, d3 = ld4(dout, i, k)
            if not overwrite:
                o0, o1, o2, o3 = ld4(dinp, i, k)
        n0 = (x0 - m) * s
        n1 = (x1 - m) * s
        n2 = (x2 - m) * s
        n3 = (x3 - m) * s
        g0 = w0 * d0
        g1 = w1 * d1
        g2 = w2 * d2
        g3 = w3 * d3
        a, bb = block_sum2((g0 + g1) + (g2 + g3), (g0 * n0 + g1 * n1) + (g2 * n2 + g3 * n3), sh, buf)
        buf = 1 - buf
        a /= Cf
        bb /= Cf
        if mine:
            v0 = (g0 - a - n0 * bb) * s + o0
            v1 = (g1 - a - n1 * bb) * s + o1
            v2 = (g2 - a - n2 * bb) * s + o2
            v3 = (g3 - a - n3 * bb) * s + o3
            st4(dinp, i, k, v0, v1, v2, v3)
            if has_shadow:
                st4(shadow, i, k, v0, v1, v2, v3)
            p0, p1, p2, p3 = add4(p0, p1, p2, p3, d0 * n0, d1 * n1, d2 * n2, d3 * n3)
            q0, q1, q2, q3 = add4(q0, q1, q2, q3, d0, d1, d2, d3)
            r0, r1, r2, r3 = add4(r0, r1, r2, r3, v0, v1, v2, v3)
    if mine:
        b = cuda.blockIdx.x
        st4(part, b, k, p0, p1, p2, p3)
        st4(part, b, nq + k, q0, q1, q2, q3)
        st4(part, b, 2 * nq + k, r0, r1, r2, r3)


@cuda.jit(device=True)
def gelu_grad(x):
    # d gelu(x) / dx, the tanh form, as the CPU's gelu_backward
    th = math.tanh(GELU_SCALE * (x + GELU_CUBE * x * x * x))
    return HALF * (ONE + th) + HALF * x * (ONE - th * th) * GELU_SCALE * (ONE + THREE * GELU_CUBE * x * x)


@cuda.jit(**JIT)
def k_colsum(out1, out2, out3, split, part, count, dout, aux, mode, chunk, accumulate):
    # Column sums of dout (quads) into out1 (+=, with accumulate): the bias gradient (mode
    # 0); first the GELU backward in place, dout = gelu'(aux) * dout (mode 1); or (mode 2)
    # the sums of columns [0, split), [split, 2 split), [2 split, 3 split) into out1, out2,
    # out3 (the layernorm backward's per-block partials). Block (x, y): CS_COLS quads x
    # CS_ROWS threads over chunk y's rows, their sums into part[y, column]; the last block
    # of a column group to finish (count[x], reset after) adds the chunks' partials up.
    # Fixed orders, no float atomics: deterministic. (The last block reads the partials
    # others wrote once, through 128-byte lines no other column group shares: part's rows
    # are padded to whole groups.)
    sh = cuda.shared.array((CS_ROWS, CS_WIDTH), float32)
    last = cuda.shared.array(1, int32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    bx = cuda.blockIdx.x
    N, NQ = dout.shape[0], dout.shape[1]
    kq = bx * CS_COLS + tx
    r0 = cuda.blockIdx.y * chunk
    r1 = min(N, r0 + chunk)
    a0 = a1 = a2 = a3 = F0
    if kq < NQ and mode != 1:  # two rows an iteration (loads in flight)
        i = r0 + ty
        while i + CS_ROWS < r1:
            d0, d1, d2, d3 = ld4(dout, i, kq)
            f0, f1, f2, f3 = ld4(dout, i + CS_ROWS, kq)
            d0, d1, d2, d3 = add4(d0, d1, d2, d3, f0, f1, f2, f3)
            a0, a1, a2, a3 = add4(a0, a1, a2, a3, d0, d1, d2, d3)
            i += 2 * CS_ROWS
        if i < r1:
            d0, d1, d2, d3 = ld4(dout, i, kq)
            a0, a1, a2, a3 = add4(a0, a1, a2, a3, d0, d1, d2, d3)
    elif kq < NQ:
        for i in range(r0 + ty, r1, CS_ROWS):
            d0, d1, d2, d3 = ld4(dout, i, kq)
            x0, x1, x2, x3 = ld4(aux, i, kq)
            st4(dout, i, kq, gelu_grad(x0) * d0, gelu_grad(x1) * d1, gelu_grad(x2) * d2, gelu_grad(x3) * d3)
            d0, d1, d2, d3 = ld4(dout, i, kq)
            a0, a1, a2, a3 = add4(a0, a1, a2, a3, d0, d1, d2, d3)
    c = 4 * tx
    sh[ty, c] = a0
    sh[ty, c + 1] = a1
    sh[ty, c + 2] = a2
    sh[ty, c + 3] = a3
    cuda.syncthreads()
    # thread (tx, ty) of the block's first 4 CS_COLS threads: column col of the group
    t = ty * CS_COLS + tx
    col = bx * CS_WIDTH + t
    mine = t < CS_WIDTH and col < 4 * NQ
    if mine:
        tot = sh[0, t]
        for r in range(1, CS_ROWS):
            tot += sh[r, t]
        part[cuda.blockIdx.y, col] = tot
        cuda.threadfence()
    cuda.syncthreads()
    if tx == 0 and ty == 0:
        last[0] = 1 if cuda.atomic.add(count, bx, 1) == cuda.gridDim.y - 1 else 0
    cuda.syncthreads()
    if last[0] == 1 and mine:
        tot = part[0, col]
        for y in range(1, cuda.gridDim.y):
            tot += part[y, col]
        j = col // split if mode == 2 else 0
        if j == 0:
            out1[col] = out1[col] + tot if accumulate else tot
        elif j == 1:
            out2[col - split] = out2[col - split] + tot if accumulate else tot
        else:
            out3[col - 2 * split] = out3[col - 2 * split] + tot if accumulate else tot
        if t == 0:
            count[bx] = 0


@cuda.jit(**JIT)
def k_softmax_backward(datt, att, Tb, scale):
    # in place: datt becomes d(scores) = att * (datt - sum(att * datt)) * scale over
    # t2 <= t; zeros for t < t2 < block end. One warp per row. (Unrolling this one four
    # ways, as the forward, measured slower on an H100: 8.3 ms vs 6.5 ms per step.)
    sh = cuda.shared.array((ROWS, LANES), float32)
    lane = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    BNH, T, _ = datt.shape
    r = cuda.blockIdx.x * ROWS + ty
    valid = r < BNH * T
    rr = r if valid else 0
    bh = rr // T
    t = rr - bh * T
    n = t + 1 if valid else 0
    dot = F0
    for t2 in range(lane, n, LANES):
        dot += att[bh, t, t2] * datt[bh, t, t2]
    dot = warp_sum(dot, sh, ty)
    for t2 in range(lane, n, LANES):
        datt[bh, t, t2] = att[bh, t, t2] * (datt[bh, t, t2] - dot) * scale
    end = min(T, (t // Tb + 1) * Tb) if valid else 0
    for t2 in range(t + 1 + lane, end, LANES):
        datt[bh, t, t2] = F0


@cuda.jit(**JIT)
def k_encoder_backward_wpe(dwpe, dout, B, T, accumulate):
    # dwpe[t] (+)= sum over b of dout[b*T + t], in the CPU's order; rows >= T zeroed
    # when not accumulating (as the CPU). One thread per (t, c): deterministic.
    maxT, C = dwpe.shape
    for idx in range(cuda.grid(1), maxT * C, cuda.gridsize(1)):
        t = idx // C
        c = idx - t * C
        if t < T:
            s = dwpe[t, c] if accumulate else F0
            for b in range(B):
                s += ld(dout, (b * T + t, c))
            dwpe[t, c] = s
        elif not accumulate:
            dwpe[t, c] = F0


@cuda.jit(**JIT)
def k_encoder_backward_wte(dwte, dout, positions, bucket_token, bucket_start, num_buckets):
    # dwte[token] += dout[bt] for every position bt holding token (quads). One bucket per
    # distinct token (built on the host: positions in increasing order, as the CPU walks
    # them), buckets strided over the blocks. In a block, thread (x, y) sums quad column x
    # (then x + ENC_QUADS, ...) over positions y, y + ENC_GROUPS, ... of the bucket (two
    # sums, loads in flight), and row 0 adds the groups in order: each row of dwte has one
    # owner and every sum a fixed order (deterministic, no atomics), and a frequent token
    # takes ENC_GROUPS times fewer dependent steps than one thread summing it.
    sh = cuda.shared.array((ENC_GROUPS, ENC_WIDTH), float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    nq = dout.shape[1]
    c = 4 * tx
    for bk in range(cuda.blockIdx.x, num_buckets[0], cuda.gridDim.x):
        tok = bucket_token[bk]
        p1 = bucket_start[bk + 1]
        for q0 in range(0, nq, ENC_QUADS):
            k = q0 + tx
            a0 = a1 = a2 = a3 = F0
            if k < nq:
                b0 = b1 = b2 = b3 = F0
                p = bucket_start[bk] + ty
                while p + ENC_GROUPS < p1:
                    x0, x1, x2, x3 = ld4(dout, positions[p], k)
                    y0, y1, y2, y3 = ld4(dout, positions[p + ENC_GROUPS], k)
                    a0, a1, a2, a3 = add4(a0, a1, a2, a3, x0, x1, x2, x3)
                    b0, b1, b2, b3 = add4(b0, b1, b2, b3, y0, y1, y2, y3)
                    p += 2 * ENC_GROUPS
                if p < p1:
                    x0, x1, x2, x3 = ld4(dout, positions[p], k)
                    a0, a1, a2, a3 = add4(a0, a1, a2, a3, x0, x1, x2, x3)
                a0, a1, a2, a3 = add4(a0, a1, a2, a3, b0, b1, b2, b3)
            sh[ty, c] = a0
            sh[ty, c + 1] = a1
            sh[ty, c + 2] = a2
            sh[ty, c + 3] = a3
            cuda.syncthreads()
            if ty == 0 and k < nq:
                w0, w1, w2, w3 = ld4(dwte, tok, k)
                for g in range(ENC_GROUPS):
                    w0 += sh[g, c]
                    w1 += sh[g, c + 1]
                    w2 += sh[g, c + 2]
                    w3 += sh[g, c + 3]
                st4(dwte, tok, k, w0, w1, w2, w3)
            cuda.syncthreads()


# -----------------------------------------------------------------------------
# Kernels, update


@cuda.jit(**JIT)
def k_sumsq_partial(part, g):
    # stage 1 of the global norm: float64 sum of squares per block
    sh = cuda.shared.array(RED_N, float64)
    s = 0.0
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        x = float64(g[i])
        s += x * x
    s = block_sum(s, sh)
    if cuda.threadIdx.x == 0:
        part[cuda.blockIdx.x] = s


@cuda.jit(**JIT)
def k_norm_finalize(normbuf, part, grad_clip):
    # stage 2 (one block, fixed order): normbuf = [norm, clip scale]; torch's rule:
    # scale = clip / (norm + 1e-6) when norm > clip
    sh = cuda.shared.array(RED_N, float64)
    s = 0.0
    for i in range(cuda.threadIdx.x, part.shape[0], cuda.blockDim.x):
        s += part[i]
    s = block_sum(s, sh)
    if cuda.threadIdx.x == 0:
        norm = math.sqrt(s)
        normbuf[0] = norm
        normbuf[1] = grad_clip / (norm + 1e-6) if grad_clip > 0.0 and norm > grad_clip else 1.0


@cuda.jit(device=True)
def adamw_one(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, wd):
    # one parameter's AdamW step (g already clipped): the new p, m, v
    m = beta1 * m + (ONE - beta1) * g
    v = beta2 * v + (ONE - beta2) * g * g
    return p - lr * ((m / bc1) / (math.sqrt(v / bc2) + eps) + wd * p), m, v


@cuda.jit(**JIT)
def k_adamw(params, grads, m, v, normbuf, hyper, group_end, group_decay, params16, has16):
    # cpu.adamw_update over flat quads (the decay groups start at multiples of 4), with the
    # clip scale and hyperparameters read on the device; the weight decay of element i is
    # that of the first group whose end is > i (i only grows: the search goes on from the
    # last group). With has16, params16 = the new parameters rounded to bf16 (the next
    # step's weights), in the same pass.
    scale = float32(normbuf[1])
    lr = hyper[0]
    beta1 = hyper[1]
    beta2 = hyper[2]
    eps = hyper[3]
    bc1 = hyper[4]
    bc2 = hyper[5]
    k = 0
    for q in range(cuda.grid(1), params.shape[1], cuda.gridsize(1)):
        while 4 * q >= group_end[k]:
            k += 1
        wd = group_decay[k]
        p0, p1, p2, p3 = ld4(params, 0, q)
        g0, g1, g2, g3 = ld4(grads, 0, q)
        m0, m1, m2, m3 = ld4(m, 0, q)
        v0, v1, v2, v3 = ld4(v, 0, q)
        p0, m0, v0 = adamw_one(p0, g0 * scale, m0, v0, lr, beta1, beta2, eps, bc1, bc2, wd)
        p1, m1, v1 = adamw_one(p1, g1 * scale, m1, v1, lr, beta1, beta2, eps, bc1, bc2, wd)
        p2, m2, v2 = adamw_one(p2, g2 * scale, m2, v2, lr, beta1, beta2, eps, bc1, bc2, wd)
        p3, m3, v3 = adamw_one(p3, g3 * scale, m3, v3, lr, beta1, beta2, eps, bc1, bc2, wd)
        st4(params, 0, q, p0, p1, p2, p3)
        st4(m, 0, q, m0, m1, m2, m3)
        st4(v, 0, q, v0, v1, v2, v3)
        if has16:
            st4(params16, 0, q, p0, p1, p2, p3)


@cuda.jit(**JIT)
def k_fill(x, value):
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        st(x, i, value)


@cuda.jit(**JIT)
def k_store(dst, src):
    # dst = src rounded to storage (the bf16 weights from the float32 master weights)
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        st(dst, i, src[i])


# -----------------------------------------------------------------------------
# Launch helpers (configured kernels are cached: no per-call configuration objects)

_configured = {}
_launch_stream = [None]  # the stream kernels go to: None is the legacy default stream


def _launch(kernel, grid, block, shared=0):
    """kernel configured for grid x block on the current launch stream, with `shared`
    bytes of dynamic shared memory."""
    if SIM:  # the simulator's kernel[...] configures the kernel object itself: no caching
        return kernel[grid, block, 0, shared]
    stream = _launch_stream[0]
    key = (kernel, grid, block, stream, shared)
    cfg = _configured.get(key)
    if cfg is None:
        cfg = _configured[key] = kernel[grid, block, 0 if stream is None else stream, shared]
    return cfg


_views = {}  # (id(array), kind) -> (weak reference to the array, the view), dropped with the array


def _view(arr, kind, make):
    """make(arr), made once per array: the launchers' views cost no Python per launch."""
    key = (id(arr), kind)
    hit = _views.get(key)
    if hit is not None and hit[0]() is arr:
        return hit[1]
    view = make(arr)
    _views[key] = (weakref.ref(arr), view)
    weakref.finalize(arr, _views.pop, key, None)
    return view


def _make_quads(arr):
    cols = arr.shape[arr.ndim - 1]  # (the simulator's shapes take no negative index)
    rows = arr.size // cols
    assert cols % 4 == 0 and arr.dtype in (np.float32, np.uint16), (arr.shape, arr.dtype)
    return arr.reshape(rows, cols).view(np.uint64).reshape(rows, cols // 4, 1 if arr.dtype == np.uint16 else 2)


def quads(arr):
    """The packed view that ld4 / st4 read (see there) of a contiguous float32 or bf16
    (uint16) array whose last axis (or size, for vectors) is a multiple of 4: uint64 of
    shape (rows, columns / 4, 1 for bf16 or 2 for float32); vectors are one row."""
    return _view(arr, "quads", _make_quads)


def flat_quads(arr):
    """quads of arr as one row (elementwise kernels)."""
    return _view(arr, "flat quads", lambda x: _make_quads(x.reshape(x.size)))


def _elt_grid(n):
    return min(ELT_MAX_BLOCKS, max(1, (n + ELT_THREADS - 1) // ELT_THREADS))


def fill(x, value=0.0):
    flat = x.reshape(x.size) if x.ndim != 1 else x
    _launch(k_fill, _elt_grid(flat.size), ELT_THREADS)(flat, np.float32(value))


def encoder_layernorm(encoded, ln, mean, rstd, tokens, wte, wpe, w, b, T):
    N = encoded.shape[0]
    _launch(k_encoder_layernorm, (N + ROWS - 1) // ROWS, (LANES, ROWS))(
        quads(encoded), quads(ln), mean, rstd, tokens, quads(wte), quads(wpe), quads(w), quads(b), T)


def residual_layernorm(res, prev, bias, ln, mean, rstd, w, b):
    """res = (res + bias) + prev in place, then ln = layernorm(res); with prev None,
    ln = layernorm(res) only."""
    N = res.shape[0]
    mode = 0 if prev is None else 1
    prev = res if prev is None else prev
    bias = w if bias is None else bias
    _launch(k_residual_layernorm, (N + ROWS - 1) // ROWS, (LANES, ROWS))(
        quads(res), quads(prev), quads(bias), quads(ln), mean, rstd, quads(w), quads(b), mode)


def gelu_forward(out, inp):
    """out = gelu(inp), elementwise (the same shape, contiguous, sizes multiples of 4)."""
    _launch(k_gelu_forward, _elt_grid(inp.size // 8), ELT_THREADS)(flat_quads(out), flat_quads(inp))


def store(dst, src):
    """dst = src (float32) rounded to dst's storage."""
    _launch(k_store, _elt_grid(src.size), ELT_THREADS)(dst, src)


def _rows_grid(N, OC, rows_per_block=4):
    return ((OC + ELT_THREADS - 1) // ELT_THREADS, max(1, min(65535, (N + rows_per_block - 1) // rows_per_block)))


def bias_forward(out, bias):
    _launch(k_bias_forward, _rows_grid(*out.shape), ELT_THREADS)(out, bias)


def bias_gelu_forward(fch, fch_gelu, bias):
    _launch(k_bias_gelu_forward, _rows_grid(*fch.shape), ELT_THREADS)(fch, fch_gelu, bias)


def softmax_forward(att3, Tb):
    rows = att3.shape[0] * att3.shape[1]
    _launch(k_softmax_forward, (rows + ROWS - 1) // ROWS, (LANES, ROWS))(att3, Tb)


def softmax_backward(datt3, att3, Tb, scale):
    rows = att3.shape[0] * att3.shape[1]
    _launch(k_softmax_backward, (rows + ROWS - 1) // ROWS, (LANES, ROWS))(datt3, att3, Tb, np.float32(scale))


def classifier_forward(losses, lse, logits, targets, V):
    _launch(k_classifier_forward, logits.shape[0], CE_THREADS)(losses, lse, quads(logits), targets, V)


def loss_reduce(stats, losses, targets):
    _launch(k_loss_reduce, 1, RED_THREADS)(stats, losses, targets)


def classifier_backward(logits, lse, targets, V, stats, loss_scale):
    _launch(k_classifier_backward, logits.shape[0], CE_THREADS)(quads(logits), lse, targets, V, stats,
                                                                 float(loss_scale))


def layernorm_backward_scratch(C):
    """layernorm_backward's scratch: the per-block partial sums, their colsum scratch, and
    a vector for the matmul bias gradient of a layernorm that has none (the first one)."""
    part = _alloc(LNB_BLOCKS * 3 * C).reshape(LNB_BLOCKS, 3 * C)
    return SimpleNamespace(part=part, sums=colsum_scratch(LNB_BLOCKS, 3 * C), unused=_alloc(C))


def layernorm_backward(scratch, dinp, dout, inp, w, mean, rstd, overwrite, dw, db, accumulate, dbias=None,
                       shadow=None):
    """dinp (+)= the input gradient of ln = layernorm(inp) (mean, rstd of its forward) from
    dout; dw, db (+)= its weight and bias gradients (accumulate); dbias (+)= the column sums
    of the new dinp: the bias gradient of the matmul whose output inp is (None: there is
    none); shadow: a bf16 copy of dinp."""
    C = inp.shape[1]
    threads = (C // 4 + LANES - 1) // LANES * LANES  # a thread a quad, whole warps
    _launch(k_layernorm_backward, LNB_BLOCKS, threads)(
        quads(dinp), quads(dout), quads(inp), quads(w), mean, rstd, int(overwrite),
        quads(dinp if shadow is None else shadow), int(shadow is not None), quads(scratch.part))
    colsum(scratch.sums, dw, scratch.part, accumulate, mode=2, out2=db,
           out3=scratch.unused if dbias is None else dbias)


def colsum_scratch(N, OC):
    """k_colsum's scratch for up to N rows and OC columns: the partial sums (rows padded
    to whole column groups) and the column groups' block counters (zero between calls)."""
    groups = (OC // 4 + CS_COLS - 1) // CS_COLS
    nchunks = (N + CS_CHUNK - 1) // CS_CHUNK
    part = _alloc(nchunks * groups * CS_WIDTH).reshape(nchunks, groups * CS_WIDTH)
    count = cuda.to_device(np.zeros(groups, dtype=np.int32))
    return SimpleNamespace(part=part, count=count)


def colsum(scratch, out1, dout, accumulate, aux=None, mode=0, out2=None, out3=None):
    """out1 (+)= column sums of dout (mode 0: a bias gradient); mode 1 first applies the
    GELU backward (pre-activation aux) to dout in place; mode 2 sums the three column
    thirds of dout into out1, out2, out3. scratch: colsum_scratch's."""
    N, OC = dout.shape
    nchunks = (N + CS_CHUNK - 1) // CS_CHUNK
    groups = (OC // 4 + CS_COLS - 1) // CS_COLS
    assert nchunks <= scratch.part.shape[0] and groups <= scratch.count.shape[0]
    aux = dout if aux is None else aux
    out2 = out1 if out2 is None else out2
    out3 = out1 if out3 is None else out3
    _launch(k_colsum, (groups, nchunks), (CS_COLS, CS_ROWS))(
        out1, out2, out3, OC // 3, scratch.part, scratch.count, quads(dout), quads(aux), mode, CS_CHUNK,
        int(accumulate))


def encoder_backward_wpe(dwpe, dout, B, T, accumulate):
    _launch(k_encoder_backward_wpe, _elt_grid(dwpe.size), ELT_THREADS)(dwpe, dout, B, T, int(accumulate))


def encoder_backward_wte(dwte, dout, positions, bucket_token, bucket_start, num_buckets, max_buckets):
    _launch(k_encoder_backward_wte, min(max_buckets, ENC_BLOCKS), (ENC_QUADS, ENC_GROUPS))(
        quads(dwte), quads(dout), positions, bucket_token, bucket_start, num_buckets)


def global_norm(normbuf, part, grads, grad_clip, dist=None):
    """normbuf = [norm, clip scale]; with dist, grads is this rank's shard and the
    partial sums are added over the ranks first (the same fixed-order sum everywhere)."""
    _launch(k_sumsq_partial, part.shape[0], RED_THREADS)(part, grads)
    if dist is not None:
        dist.allreduce_sum_device(part)
    _launch(k_norm_finalize, 1, RED_THREADS)(normbuf, part, float(grad_clip))


def adamw(params, grads, m, v, normbuf, hyper, group_end, group_decay, params16=None):
    """hyper: device float32 [lr, beta1, beta2, eps, 1 - beta1^t, 1 - beta2^t] (read on the
    device, so a captured update replays with the step's values); params16: a bf16 copy
    of params to refresh in the same pass."""
    _launch(k_adamw, _elt_grid(params.size // 4), ELT_THREADS)(
        flat_quads(params), flat_quads(grads), flat_quads(m), flat_quads(v), normbuf, hyper, group_end, group_decay,
        flat_quads(params if params16 is None else params16), int(params16 is not None))


def encoder_buckets(tokens):
    """Host side of the deterministic wte scatter: positions grouped by token (each
    group in increasing order), the most frequent tokens first (their blocks start
    first), the distinct tokens, and where each one's positions start."""
    if not tokens.size:
        return np.zeros(0, np.int32), np.zeros(0, tokens.dtype), np.zeros(1, np.int32)
    _, inverse, counts = np.unique(tokens, return_inverse=True, return_counts=True)
    order = np.lexsort((np.arange(tokens.size), tokens, -counts[inverse])).astype(np.int32)
    sorted_tokens = tokens[order]
    starts = np.flatnonzero(np.diff(sorted_tokens)) + 1
    bucket_start = np.concatenate(([0], starts, [tokens.size])).astype(np.int32)
    bucket_token = sorted_tokens[bucket_start[:-1]]
    return order, bucket_token, bucket_start


# -----------------------------------------------------------------------------
# Addresses, and the matrix products (cuBLAS, or its numpy emulation in the simulator)


def _addr(x):
    if SIM:
        return x._ary.__array_interface__["data"][0]
    return x.__cuda_array_interface__["data"][0]


_emu_buffers = []  # simulator: (address, numpy array) of every flat float32 / bf16 buffer


def _alloc(n, dtype=np.float32):
    arr = cuda.device_array(int(n), dtype=dtype)
    if SIM and dtype in (np.float32, np.uint16):
        _emu_buffers.append((_addr(arr), arr._ary))
    return arr


def _emu_matrix(addr, rows, cols, ld):
    """Column-major rows x cols matrix at an address of a float32 or bf16 (uint16)
    buffer, as a numpy view; checks that it lies inside the buffer."""
    assert ld >= max(1, rows), (rows, cols, ld)
    for base, buf in _emu_buffers:
        if base <= addr < base + buf.nbytes:
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
LT_WORKSPACE = 32 << 20                   # bytes (cuBLASLt's recommendation for Hopper)
LT_CANDIDATES = 8                         # algorithms of the heuristic timed per matmul shape
LT_TIMING_REPS = 5                        # timed calls per candidate (the median counts)


def tuning_cache_path():
    """Where the matmul algorithm choices are kept, per GPU and cuBLASLt version:
    $GPT2PY_TUNING_CACHE, else gpt2py/cublaslt_algorithms.json in $XDG_CACHE_HOME (~/.cache)."""
    path = os.environ.get("GPT2PY_TUNING_CACHE")
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2py", "cublaslt_algorithms.json")


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
        self.ws_addr = _addr(self.workspace)
        name = cuda.get_current_device().name
        self.tuning_prefix = f"{name.decode() if isinstance(name, bytes) else name}|cublasLt {cublasLt.get_version()}|"
        self.tuning_path = tuning_cache_path()
        self.chosen = load_tuning(self.tuning_path)

    def _plan(self, key):
        lt = self.lt
        ta, tb, m, n, k, lda, ldb, ldc, out_type, epilogue, align = key
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
        la = lt.matrix_layout_create(R_16BF, k if ta else m, m if ta else k, lda)
        lb = lt.matrix_layout_create(R_16BF, n if tb else k, k if tb else n, ldb)
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
        ptrs = np.zeros(2, dtype=np.intp)  # bias and aux pointers, set per call
        return SimpleNamespace(desc=desc, la=la, lb=lb, lc=lc, results=results[:count[0]], result=None, ptrs=ptrs)

    def _choose(self, plan, key, call, C, nbytes, reads_C):
        """plan.result: the saved choice for key, else the fastest candidate, timed by
        call(result) on this call's operands (C, nbytes long, kept aside and restored
        when the call reads it)."""
        import cupy
        stream = cupy.cuda.ExternalStream(self.stream)
        saved = []

        def time_candidate(j):
            if reads_C and not saved:
                saved.append(cuda.device_array(nbytes, dtype=np.uint8))  # (not CuPy's pool: freed after)
                cupy.cuda.runtime.memcpyAsync(_addr(saved[0]), C, nbytes, 3, self.stream)
            result = plan.results[j:j + 1]
            events = [cupy.cuda.Event() for _ in range(LT_TIMING_REPS + 1)]
            try:
                call(result)
                events[0].record(stream)
                for e in events[1:]:
                    call(result)
                    e.record(stream)
                events[-1].synchronize()
            except self.lt.cuBLASLtError:
                stream.synchronize()
                return None
            return float(np.median([cupy.cuda.get_elapsed_time(a, b) for a, b in zip(events, events[1:])]))
        name = self.tuning_prefix + ",".join(str(int(x)) for x in key)
        index, timed = choose_algorithm(self.chosen, name, len(plan.results), time_candidate)
        if timed:
            save_tuning(self.tuning_path, name, index)
        if saved:
            cupy.cuda.runtime.memcpyAsync(C, _addr(saved[0]), nbytes, 3, self.stream)
            stream.synchronize()
        plan.result = plan.results[index:index + 1]

    def matmul(self, tA, tB, M, N, K, A, lda, B, ldb, C, ldc, out_fp32=False, accumulate=False, add=0, bias=0,
               gelu_aux=0, dgelu_aux=0):
        """Row-major C[M, N] = op(A)[M, K] @ op(B)[K, N] (+ C with accumulate), A, B bf16
        at addresses A, B with row strides lda, ldb (stored M x K, K x N; transposed with
        tA, tB), C bf16 (float32 with out_fp32); add: the address of a matrix like C
        added to the product (C itself with accumulate). Epilogues: bias (length N, of
        C's type) added; with gelu_aux, C = gelu(pre) and pre (bf16, like C) stored at
        gelu_aux; with dgelu_aux, C = (op(A) @ op(B)) * gelu'(pre at dgelu_aux). In
        cuBLAS's column-major terms: C^T = op(B)^T @ op(A)^T."""
        if gelu_aux and (tA, tB) != (False, True):  # the fc layer's form; others measured wrong (fuses_gelu)
            raise ValueError("the bias + GELU epilogue takes only untransposed A and transposed B")
        if SIM:
            return self._emulate(tA, tB, M, N, K, A, lda, B, ldb, C, ldc, add or (C if accumulate else 0), bias,
                                 gelu_aux, dgelu_aux, out_fp32)
        lt = self.lt
        E = lt.Epilogue
        epilogue = (E.GELU_AUX_BIAS if gelu_aux else E.BIAS if bias else E.DGELU if dgelu_aux else E.DEFAULT)
        out_type = R_32F if out_fp32 else R_16BF
        key = (tB, tA, N, M, K, ldb, lda, ldc, out_type, epilogue, _alignment(A, B, C, add, bias, gelu_aux, dgelu_aux))
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
        beta = self.one if accumulate or add else self.zero

        def call(result):
            lt.matmul(self.handle, plan.desc, self.one.ctypes.data, B, plan.la, A, plan.lb, beta.ctypes.data,
                      add or C, plan.lc, C, plan.lc, result.ctypes.data, self.ws_addr, LT_WORKSPACE, self.stream)
        if plan.result is None:
            self._choose(plan, key, call, C, M * ldc * (4 if out_fp32 else 2), accumulate or add == C)
        call(plan.result)

    def _emulate(self, tA, tB, M, N, K, A, lda, B, ldb, C, ldc, add, bias, gelu_aux, dgelu_aux, out_fp32):
        opA = _emu_matrix(A, M, K, lda) if tA else _emu_matrix(A, K, M, lda).T
        opB = _emu_matrix(B, K, N, ldb) if tB else _emu_matrix(B, N, K, ldb).T
        c = _emu_matrix(C, N, M, ldc).T
        assert opA.dtype == np.uint16 and opB.dtype == np.uint16 and c.dtype == (np.float32 if out_fp32 else np.uint16)
        r = np.matmul(_emu_widen(opA), _emu_widen(opB), dtype=np.float32)
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


class Attention:
    """cuDNN's fused causal attention through cudnn-frontend's Python graphs: flash-style,
    the B*NH*T*T scores never reach memory. q, k, v are read in place from the qkv rows
    (B, T, 3, NH, HS), the output written as (B, T, NH, HS) rows, the softmax's
    logsumexp (float32, B*NH*T) kept for the backward, which writes dq, dk, dv in place
    into the dqkv rows. bf16 in and out, float32 inside. Under the simulator, the same
    contract in numpy."""

    def __init__(self, B, NH, T, HS, stream_ptr):
        self.B, self.NH, self.T, self.HS = B, NH, T, HS
        self.scale = 1.0 / math.sqrt(HS)
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

        try:  # a fixed accumulation order (cuDNN 9.11 and later): a seed repeats its losses
            b, bws, self.bwd_tensors = backward_graph(True)
            self.deterministic = True
        except Exception:  # noqa: BLE001  (older cuDNN or binding: the default kernels)
            b, bws, self.bwd_tensors = backward_graph(False)
            self.deterministic = False
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
        self.fwd.execute({q: qkv, k: qkv + C2, v: qkv + 2 * C2, o: out, st: stats}, _addr(self.workspace),
                         handle=self.handle)

    def backward(self, qkv, out, dout, stats, dqkv):
        """dqkv (bf16 BT x 3C, overwritten) from dout (bf16 BT x C)."""
        if SIM:
            return self._emulate(qkv, out, stats, dout, dqkv)
        q, k, v, o, do, st, dq, dk, dv = self.bwd_tensors
        C2 = 2 * self.NH * self.HS
        self.bwd.execute({q: qkv, k: qkv + C2, v: qkv + 2 * C2, o: out, do: dout, st: stats,
                          dq: dqkv, dk: dqkv + C2, dv: dqkv + 2 * C2}, _addr(self.workspace), handle=self.handle)

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


# -----------------------------------------------------------------------------
# The model on the device


class CudaGPT2:
    """Device buffers (same layouts as common.GPT2's), their views, and the step state."""


def cuda_available():
    try:
        if not cuda.is_available():
            return False
        if not SIM:
            import cupy  # noqa: F401
            from cupy_backends.cuda.libs import cublas  # noqa: F401
        return True
    except Exception:
        return False


def default_attention_blocks(T, tf32=True):
    """Causal query blocks: block i multiplies against keys 0..end_i only, so the T x T
    work is (NB+1)/(2 NB) of the full product. Blocks of about 256 rows with TF32
    (smaller products lose tensor-core efficiency), about 128 in strict fp32."""
    rows = 256 if tf32 else 128
    return max(1, min(1024 // rows, (T + rows - 1) // rows))


LAYER_PARAMETERS = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
                    "fcw", "fcb", "fcprojw", "fcprojb")
LAYER_ACTIVATIONS = ("ln1", "ln1_mean", "ln1_rstd", "qkv", "att", "atty", "residual2", "ln2", "ln2_mean",
                     "ln2_rstd", "fch", "fch_gelu", "residual3")


def _per_layer(view, L):
    return [view[l] for l in range(L)]


def _check_shape(cfg, B, T):
    if T > cfg.max_seq_len or B <= 0 or T <= 0:
        raise common.UserError(f"bad batch shape B={B}, T={T} (max_seq_len={cfg.max_seq_len})")
    if cfg.channels % cfg.num_heads:
        raise ValueError(f"channels {cfg.channels} not divisible by heads {cfg.num_heads}")
    if cfg.channels % 4 or cfg.padded_vocab_size % 4:  # the row kernels' packed access (quads)
        raise common.UserError(f"the GPU needs channels and padded vocab size that are multiples of 4, not "
                               f"{cfg.channels} and {cfg.padded_vocab_size}")
    if cfg.channels > 4 * MAX_THREADS:  # the layernorm backward's block: a thread per 4 channels
        raise common.UserError(f"the GPU takes at most {4 * MAX_THREADS} channels, not {cfg.channels}")


def _parameters_to_device(dm, model, B, T, shards, rank, shard_optimizer):
    """What both precisions keep in float32: the parameters (the master weights under
    bf16), their gradients, AdamW m and v, the grad-norm and loss scratch, the AdamW
    decay groups, and the pinned token staging."""
    cfg = dm.cfg = model.cfg
    dm.B, dm.T = B, T
    dm.num_parameters = model.num_parameters
    dm.step = 0
    BT, C = B * T, cfg.channels
    pshapes = common.parameter_shapes(cfg)
    n = dm.num_parameters
    dm.shard_size = -(-distributed.shard_size(n, shards) // 4) * 4  # whole quads (k_adamw)
    dm.params_padded, dm.grads_padded = _alloc(dm.shard_size * shards), _alloc(dm.shard_size * shards)
    dm.params_memory, dm.grads_memory = dm.params_padded[:n], dm.grads_padded[:n]
    moments = dm.shard_size if shard_optimizer else n
    dm.m_memory, dm.v_memory = _alloc(moments), _alloc(moments)
    dm.grad_shard = _alloc(dm.shard_size) if shard_optimizer else None
    for buf in (dm.params_padded, dm.grads_padded, dm.m_memory, dm.v_memory):
        fill(buf, 0.0)
    dm.params_memory.copy_to_device(model.params_memory)
    dm.params = common.slice_views(dm.params_memory, pshapes)
    dm.grads = common.slice_views(dm.grads_memory, pshapes)
    dm.G = SimpleNamespace(**{name: _per_layer(getattr(dm.grads, name), cfg.num_layers) for name in LAYER_PARAMETERS})

    # column-sum and layernorm-backward scratch (bias and layernorm weight gradients), norm
    # partials, loss stats
    dm.colsum_scratch = colsum_scratch(BT, 4 * C)
    dm.layernorm_scratch = layernorm_backward_scratch(C)
    dm.norm_part = cuda.device_array(NORM_BLOCKS, dtype=np.float64)
    dm.normbuf = cuda.device_array(2, dtype=np.float64)
    dm.stats = cuda.device_array(2, dtype=np.float64)
    dm.stats.copy_to_device(np.zeros(2))
    dm.normbuf.copy_to_device(np.array([0.0, 1.0]))

    # token staging: [inputs | targets | positions | bucket tokens | bucket starts (BT+1) | #buckets]
    ns = 5 * BT + 2
    dm.staging_host = cuda.pinned_array(ns, dtype=np.int32)
    dm.staging_host[:] = 0
    dm.staging = cuda.device_array(ns, dtype=np.int32)
    dm.staging.copy_to_device(dm.staging_host)
    stg = dm.staging
    dm.tokens, dm.targets = stg[0:BT], stg[BT:2 * BT]
    dm.positions, dm.bucket_token = stg[2 * BT:3 * BT], stg[3 * BT:4 * BT]
    dm.bucket_start, dm.num_buckets = stg[4 * BT:5 * BT + 1], stg[5 * BT + 1:5 * BT + 2]
    dm.staging_event = None if SIM else cuda.event(timing=False)
    dm.host_tokens = None
    dm.buckets_staged = True
    dm.has_loss = False        # a forward with targets ran: the loss statistics are valid
    dm.backward_ready = False  # ... and its logits are still there for a backward
    # AdamW hyperparameters of the next update, staged as the tokens are
    dm.hyper_host = cuda.pinned_array(6, dtype=np.float32)
    dm.hyper_host[:] = 0
    dm.hyper = cuda.to_device(dm.hyper_host)

    # AdamW weight-decay groups: contiguous ranges of the parameter buffer (the padding
    # last, never decayed), as ends relative to the first value this rank updates
    groups = common.matrix_groups(cfg, end=dm.shard_size * shards)
    dm.update_start = dm.shard_size * rank if shard_optimizer else 0
    dm.group_end = cuda.to_device(np.array([end for _, end, _ in groups], dtype=np.int64) - dm.update_start)
    dm.group_is_matrix = np.array([is_matrix for _, _, is_matrix in groups], dtype=bool)
    dm.group_decay = cuda.to_device(np.zeros(len(groups), dtype=np.float32))
    dm._decay_key = None


def to_device(model, B, T, tf32=True, attention_blocks=None, shards=1, rank=0, shard_optimizer=False):
    """Copy a common.GPT2's parameters to the device and allocate, once, everything a
    training step at batch shape (B, T) needs. m, v start at zero (step 0);
    CUDA.state_from_host resumes. attention_blocks: the number of causal query blocks
    (default: default_attention_blocks). Data parallel over `shards` ranks: the flat
    parameter and gradient buffers are padded to a multiple of it (NCCL's reduce-scatter
    and all-gather take equal shards), and with shard_optimizer (ZeRO-1) m and v hold
    only this rank's shard."""
    cfg = model.cfg
    _check_shape(cfg, B, T)
    C, L, NH = cfg.channels, cfg.num_layers, cfg.num_heads
    hs = C // NH
    dm = CudaGPT2()
    dm.tf32 = bool(tf32)
    dm.blas = Blas.get()
    dm.stream = 0 if SIM else cuda.default_stream()
    dm.launch_stream = None  # kernels go to the legacy default stream, as cuBLAS
    dm.params16_padded = None
    _parameters_to_device(dm, model, B, T, shards, rank, shard_optimizer)

    ashapes = common.activation_shapes(cfg, B, T)
    dm.acts_memory = _alloc(common.buffer_size(ashapes))
    fill(dm.acts_memory, 0.0)  # att above the computed causal blocks must read as zero
    dm.acts = common.slice_views(dm.acts_memory, ashapes)
    # backward scratch: the CPU's shapes, plus the attention score gradients of one layer
    dshapes = common.activation_grad_shapes(cfg, B, T) + [("datt", (B * NH, T, T))]
    dm.dacts_memory = _alloc(common.buffer_size(dshapes))
    fill(dm.dacts_memory, 0.0)
    dm.dacts = common.slice_views(dm.dacts_memory, dshapes)
    # per-layer views (indexing a device array costs a Python object each time)
    p, g, a = dm.params, dm.grads, dm.acts
    dm.P = SimpleNamespace(**{name: _per_layer(getattr(p, name), L) for name in LAYER_PARAMETERS})
    dm.A = SimpleNamespace(**{name: _per_layer(getattr(a, name), L) for name in LAYER_ACTIVATIONS})
    dm.att3 = [a.att[l].reshape(B * NH, T, T) for l in range(L)]
    dm.datt3 = dm.dacts.datt

    # attention: query blocks and the pointer arrays of the batched GEMMs
    nb = attention_blocks or default_attention_blocks(T, tf32)
    nb = max(1, min(int(nb), T))
    Tb = (T + nb - 1) // nb
    dm.attn_Tb = Tb
    dm.attn_blocks = [(r0, min(T, r0 + Tb)) for r0 in range(0, T, Tb)]
    dm.attn_scale = 1.0 / math.sqrt(hs)
    _build_attention_pointers(dm)

    # addresses of every GEMM operand
    ad = SimpleNamespace()
    for name in ("qkvw", "attprojw", "fcw", "fcprojw"):
        setattr(ad, name, [_addr(x) for x in getattr(dm.P, name)])
        setattr(ad, "g" + name, [_addr(x) for x in getattr(dm.G, name)])
    for name in ("ln1", "qkv", "atty", "residual2", "ln2", "fch", "fch_gelu", "residual3"):
        setattr(ad, name, [_addr(x) for x in getattr(dm.A, name)])
    ad.wte, ad.gwte = _addr(p.wte), _addr(g.wte)
    ad.lnf, ad.logits = _addr(a.lnf), _addr(a.logits)
    d = dm.dacts
    ad.dC, ad.d3C, ad.d4C, ad.dresidual = _addr(d.dC), _addr(d.d3C), _addr(d.d4C), _addr(d.dresidual)
    dm.addr = ad
    return dm


def _build_attention_pointers(dm):
    """Pointer arrays (one entry per (b, h)) for every batched GEMM of every layer and
    query block, uploaded once into one device int64 array."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    C, L, NH = cfg.channels, cfg.num_layers, cfg.num_heads
    hs = C // NH
    bb = np.repeat(np.arange(B, dtype=np.int64), NH)
    hh = np.tile(np.arange(NH, dtype=np.int64), B)
    F = 4
    tok3 = bb * T * 3 * C + hh * hs          # element offset of head (b, h) in a (BT, 3C) matrix
    tok1 = bb * T * C + hh * hs              # ... in a (BT, C) matrix
    sq = (bb * NH + hh) * T * T              # ... of its (T, T) score matrix
    specs = {}
    d = dm.dacts
    dC, d3C, datt = _addr(d.dC), _addr(d.d3C), _addr(d.datt)
    for l in range(L):
        qkv, att, atty = _addr(dm.A.qkv[l]), _addr(dm.att3[l]), _addr(dm.A.atty[l])
        specs[("K", l)] = qkv + F * (tok3 + C)
        specs[("V", l)] = qkv + F * (tok3 + 2 * C)
        for i, (r0, r1) in enumerate(dm.attn_blocks):
            specs[("Q", l, i)] = qkv + F * (tok3 + r0 * 3 * C)
            specs[("att", l, i)] = att + F * (sq + r0 * T)
            specs[("attT", l, i)] = att + F * (sq + r0 * T + r0)
            specs[("atty", l, i)] = atty + F * (tok1 + r0 * C)
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        specs[("dout", i)] = dC + F * (tok1 + r0 * C)
        specs[("dq", i)] = d3C + F * (tok3 + r0 * 3 * C)
        specs[("dk", i)] = d3C + F * (tok3 + C + r0 * 3 * C)
        specs[("dv", i)] = d3C + F * (tok3 + 2 * C + r0 * 3 * C)
        specs[("datt", i)] = datt + F * (sq + r0 * T)
        specs[("dattT", i)] = datt + F * (sq + r0 * T + r0)
    keys = list(specs)
    table = np.concatenate([specs[k] for k in keys]).astype(np.int64)
    dm.ptr_table = cuda.to_device(table)
    base = _addr(dm.ptr_table)
    n = B * NH
    dm.ptrs = {k: PtrArray(table[j * n:(j + 1) * n], base + 8 * j * n) for j, k in enumerate(keys)}


def attention_forward(dm, l):
    """att[l] = causal softmax(q k^T * scale), atty[l] = att @ v, per (b, h), reading
    q, k, v in place from qkv[l] (with its bias) and writing atty[l] in place."""
    cfg, T = dm.cfg, dm.T
    C = cfg.channels
    hs = C // cfg.num_heads
    blas, P = dm.blas, dm.ptrs
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        R = r1 - r0
        blas.gemm_batched(False, True, R, r1, hs, P[("Q", l, i)], 3 * C, P[("K", l)], 3 * C, P[("att", l, i)], T,
                          alpha=dm.attn_scale)
    softmax_forward(dm.att3[l], dm.attn_Tb)
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        R = r1 - r0
        blas.gemm_batched(False, False, R, hs, r1, P[("att", l, i)], T, P[("V", l)], 3 * C, P[("atty", l, i)], C)


def attention_backward(dm, l):
    """dqkv (d3C) from datty (dC) of layer l, through att @ v and the softmax."""
    cfg, T = dm.cfg, dm.T
    C = cfg.channels
    hs = C // cfg.num_heads
    blas, P = dm.blas, dm.ptrs
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        R = r1 - r0
        # dv[r0:r1] = att[r0:T, r0:r1]^T @ dout[r0:T]
        blas.gemm_batched(True, False, R, hs, T - r0, P[("attT", l, i)], T, P[("dout", i)], C, P[("dv", i)], 3 * C)
        # datt[r0:r1, 0:r1] = dout[r0:r1] @ v[0:r1]^T
        blas.gemm_batched(False, True, R, r1, hs, P[("dout", i)], C, P[("V", l)], 3 * C, P[("datt", i)], T)
    softmax_backward(dm.datt3, dm.att3[l], dm.attn_Tb, dm.attn_scale)
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        R = r1 - r0
        # dq[r0:r1] = dpre[r0:r1, 0:r1] @ k[0:r1]
        blas.gemm_batched(False, False, R, hs, r1, P[("datt", i)], T, P[("K", l)], 3 * C, P[("dq", i)], 3 * C)
        # dk[r0:r1] = dpre[r0:T, r0:r1]^T @ q[r0:T]
        blas.gemm_batched(True, False, R, hs, T - r0, P[("dattT", i)], T, P[("Q", l, i)], 3 * C, P[("dk", i)], 3 * C)


def _stage(dm, lo, hi):
    """Copy staging[lo:hi] host -> device (pinned, async, on the default stream)."""
    dm.staging[lo:hi].copy_to_device(dm.staging_host[lo:hi], stream=dm.stream)
    if dm.staging_event is not None:
        dm.staging_event.record(dm.stream)


def _wait_staging(dm):
    if dm.staging_event is not None:
        dm.staging_event.synchronize()  # the last copy out of the staging buffer is done


def _stage_tokens(dm, inputs, targets):
    B, T, BT = dm.B, dm.T, dm.B * dm.T
    inputs = np.asarray(inputs)
    if inputs.shape != (B, T):
        raise ValueError(f"inputs of shape {inputs.shape}, but the device model was built for (B, T) = {(B, T)}")
    tokens = np.ascontiguousarray(inputs, dtype=np.int32).reshape(-1)
    V = dm.cfg.vocab_size
    if tokens.min() < 0 or tokens.max() >= V:
        raise ValueError(f"token ids must lie in [0, {V})")
    if targets is not None:
        targets = np.asarray(targets)
        if targets.shape != (B, T):
            raise ValueError(f"targets of shape {targets.shape}, expected {(B, T)}")
        tg = np.ascontiguousarray(targets, dtype=np.int32).reshape(-1)
        if tg.max() >= V or tg.min() < -1:
            raise ValueError(f"target ids must lie in [0, {V}) or be -1 (masked)")
    _wait_staging(dm)
    h = dm.staging_host
    h[0:BT] = tokens
    if targets is not None:
        h[BT:2 * BT] = tg
    _stage(dm, 0, 2 * BT if targets is not None else BT)
    dm.host_tokens = tokens.copy()
    dm.buckets_staged = False


def _stage_buckets(dm):
    """The encoder backward's buckets, built on the host while the device still runs
    the forward, staged behind it."""
    if dm.buckets_staged:
        return
    BT = dm.B * dm.T
    order, bucket_token, bucket_start = encoder_buckets(dm.host_tokens)
    _wait_staging(dm)
    h = dm.staging_host
    nb = bucket_token.size
    h[2 * BT:3 * BT] = order
    h[3 * BT:3 * BT + nb] = bucket_token
    h[4 * BT:4 * BT + nb + 1] = bucket_start
    h[5 * BT + 1] = nb
    _stage(dm, 2 * BT, 5 * BT + 2)
    dm.buckets_staged = True


def embed(dm):
    """encoded = wte[tokens] + wpe, and the first layernorm (ln1 of layer 0, or lnf for a
    model without layers), from the float32 parameters in both precisions."""
    p, a, P, A, L = dm.params, dm.acts, dm.P, dm.A, dm.cfg.num_layers
    first_ln = (A.ln1[0], A.ln1_mean[0], A.ln1_rstd[0], P.ln1w[0], P.ln1b[0]) if L else \
        (a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb)
    encoder_layernorm(a.encoded, first_ln[0], first_ln[1], first_ln[2], dm.tokens, p.wte, p.wpe,
                      first_ln[3], first_ln[4], dm.T)


def gpt2_forward_cuda(dm):
    """The fp32 / tf32 forward over the staged tokens: fills the device activations and,
    with targets (dm.has_loss), the per-position losses and the loss statistics on the
    device; returns nothing (read the loss with mean_loss_cuda)."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    L, V = cfg.num_layers, cfg.vocab_size
    C, Vp, BT = cfg.channels, cfg.padded_vocab_size, B * T
    blas = dm.blas
    blas.set_tf32(dm.tf32)
    p, a, P, A, ad = dm.params, dm.acts, dm.P, dm.A, dm.addr

    embed(dm)
    residual = a.encoded
    for l in range(L):
        blas.gemm(False, True, BT, 3 * C, C, ad.ln1[l], C, ad.qkvw[l], C, ad.qkv[l], 3 * C)
        bias_forward(A.qkv[l], P.qkvb[l])
        attention_forward(dm, l)
        blas.gemm(False, True, BT, C, C, ad.atty[l], C, ad.attprojw[l], C, ad.residual2[l], C)
        residual_layernorm(A.residual2[l], residual, P.attprojb[l], A.ln2[l], A.ln2_mean[l], A.ln2_rstd[l],
                           P.ln2w[l], P.ln2b[l])
        blas.gemm(False, True, BT, 4 * C, C, ad.ln2[l], C, ad.fcw[l], C, ad.fch[l], 4 * C)
        bias_gelu_forward(A.fch[l], A.fch_gelu[l], P.fcb[l])
        blas.gemm(False, True, BT, C, 4 * C, ad.fch_gelu[l], 4 * C, ad.fcprojw[l], 4 * C, ad.residual3[l], C)
        if l + 1 < L:
            nxt = (A.ln1[l + 1], A.ln1_mean[l + 1], A.ln1_rstd[l + 1], P.ln1w[l + 1], P.ln1b[l + 1])
        else:
            nxt = (a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb)
        residual_layernorm(A.residual3[l], A.residual2[l], P.fcprojb[l], nxt[0], nxt[1], nxt[2], nxt[3], nxt[4])
        residual = A.residual3[l]
    blas.gemm(False, True, BT, Vp, C, ad.lnf, C, ad.wte, C, ad.logits, Vp)  # tied embedding
    if dm.has_loss:
        classifier_forward(a.losses, a.logsumexp, a.logits, dm.targets, V)
        loss_reduce(dm.stats, a.losses, dm.targets)


def mean_loss_cuda(dm):
    """Mean loss over the unmasked targets of the last forward (a device-to-host read;
    it waits for the device). None after a forward without targets."""
    if not dm.has_loss:
        return None
    s, cnt = dm.stats.copy_to_host()
    return float(s / cnt) if cnt else 0.0


def gpt2_backward_cuda(dm, accumulate, loss_scale):
    """Gradients of loss_scale * mean loss of the last forward (fp32 / tf32).
    accumulate=False overwrites the parameter gradients, True adds to them. The logits
    become dlogits."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    L, V = cfg.num_layers, cfg.vocab_size
    C, Vp, BT = cfg.channels, cfg.padded_vocab_size, B * T
    blas = dm.blas
    blas.set_tf32(dm.tf32)
    p, g, a, d = dm.params, dm.grads, dm.acts, dm.dacts
    P, G, A, ad = dm.P, dm.G, dm.A, dm.addr
    cs, lnb = dm.colsum_scratch, dm.layernorm_scratch
    beta = 1.0 if accumulate else 0.0

    classifier_backward(a.logits, a.logsumexp, dm.targets, V, dm.stats, loss_scale)
    # logits = lnf @ wte^T
    blas.gemm(False, False, BT, C, Vp, ad.logits, Vp, ad.wte, C, ad.dC, C)
    blas.gemm(True, False, Vp, C, BT, ad.logits, Vp, ad.lnf, C, ad.gwte, C, beta=beta)
    last_residual = A.residual3[L - 1] if L > 0 else a.encoded
    layernorm_backward(lnb, d.dresidual, d.dC, last_residual, p.lnfw, a.lnf_mean, a.lnf_rstd, True, g.lnfw, g.lnfb,
                       accumulate, dbias=G.fcprojb[L - 1] if L > 0 else None)

    for l in range(L - 1, -1, -1):
        residual = A.residual3[l - 1] if l > 0 else a.encoded
        # MLP: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2)))); fcprojb's gradient came
        # with the layernorm backward above it
        blas.gemm(False, False, BT, 4 * C, C, ad.dresidual, C, ad.fcprojw[l], 4 * C, ad.d4C, 4 * C)
        blas.gemm(True, False, C, 4 * C, BT, ad.dresidual, C, ad.fch_gelu[l], 4 * C, ad.gfcprojw[l], 4 * C, beta=beta)
        colsum(cs, G.fcb[l], d.d4C, accumulate, aux=A.fch[l], mode=1)  # GELU backward in place + fc bias
        blas.gemm(False, False, BT, C, 4 * C, ad.d4C, 4 * C, ad.fcw[l], C, ad.dC, C)
        blas.gemm(True, False, 4 * C, C, BT, ad.d4C, 4 * C, ad.ln2[l], C, ad.gfcw[l], C, beta=beta)
        layernorm_backward(lnb, d.dresidual, d.dC, A.residual2[l], P.ln2w[l], A.ln2_mean[l], A.ln2_rstd[l], False,
                           G.ln2w[l], G.ln2b[l], accumulate, dbias=G.attprojb[l])
        # attention: residual2 = residual + attproj(attention(qkv(ln1(residual))))
        blas.gemm(False, False, BT, C, C, ad.dresidual, C, ad.attprojw[l], C, ad.dC, C)
        blas.gemm(True, False, C, C, BT, ad.dresidual, C, ad.atty[l], C, ad.gattprojw[l], C, beta=beta)
        attention_backward(dm, l)
        colsum(cs, G.qkvb[l], d.d3C, accumulate)
        blas.gemm(False, False, BT, C, 3 * C, ad.d3C, 3 * C, ad.qkvw[l], C, ad.dC, C)
        blas.gemm(True, False, 3 * C, C, BT, ad.d3C, 3 * C, ad.ln1[l], C, ad.gqkvw[l], C, beta=beta)
        layernorm_backward(lnb, d.dresidual, d.dC, residual, P.ln1w[l], A.ln1_mean[l], A.ln1_rstd[l], False,
                           G.ln1w[l], G.ln1b[l], accumulate, dbias=G.fcprojb[l - 1] if l > 0 else None)
    encoder_backward_wte(g.wte, d.dresidual, dm.positions, dm.bucket_token, dm.bucket_start, dm.num_buckets, BT)
    encoder_backward_wpe(g.wpe, d.dresidual, B, T, accumulate)


# One AdamW step over the whole parameter buffer (cpu.gpt2_update's semantics), with the
# global gradient norm and the clipping computed on the device, in two halves: the host's
# (stage_update) and the device's (update_on_device, which a CUDA graph can capture).
# Data parallel (dist: distributed.NCCLGroup, or the MPIGroup under the simulator): the
# gradients are summed over the ranks in one call over the flat buffer; under ZeRO-1
# (dm.grad_shard) that is a reduce-scatter, this rank updates its shard of the parameters
# with its shard of m and v, and the ranks all-gather the parameters.


def stage_update(dm, lr, beta1, beta2, eps, weight_decay, weight_decay_mode):
    """The host side of an update: count the step, stage the AdamW hyperparameters and
    bias corrections (pinned, async, like the tokens), and the decay groups when they
    change."""
    if weight_decay_mode not in ("all", "matrices"):
        raise ValueError(f"weight_decay_mode must be 'all' or 'matrices', not {weight_decay_mode!r}")
    dm.step += 1
    key = (float(weight_decay), weight_decay_mode)
    if dm._decay_key != key:  # a small host-to-device copy only when the decay changes
        decay = np.full(dm.group_is_matrix.size, weight_decay, dtype=np.float32)
        if weight_decay_mode == "matrices":
            decay[~dm.group_is_matrix] = 0.0
        dm.group_decay.copy_to_device(decay, stream=dm.stream)
        dm._decay_key = key
    _wait_staging(dm)
    dm.hyper_host[:] = (lr, beta1, beta2, eps, 1.0 - beta1 ** dm.step, 1.0 - beta2 ** dm.step)
    dm.hyper.copy_to_device(dm.hyper_host, stream=dm.stream)
    if dm.staging_event is not None:
        dm.staging_event.record(dm.stream)


def update_on_device(dm, grad_clip, dist=None):
    """The device side of an update: the gradient reduction over the ranks, the norm and
    clip scale, AdamW, the all-gather, and under bf16 the bf16 weights of the next step.
    The norm before clipping lands in dm.normbuf[0] (overwritten by the next update);
    nothing here waits for the device."""
    sharded = dm.grad_shard is not None
    if sharded:
        dist.reduce_scatter_sum_device(dm.grads_padded, dm.grad_shard)
        params = dm.params_padded[dm.update_start:dm.update_start + dm.shard_size]
        grads = dm.grad_shard
    else:
        if dist is not None:
            dist.allreduce_sum_device(dm.grads_padded)
        params, grads = dm.params_memory, dm.grads_memory
    global_norm(dm.normbuf, dm.norm_part, grads, grad_clip, dist if sharded else None)
    params16 = dm.params16_memory if dm.params16_padded is not None and not sharded else None
    adamw(params, grads, dm.m_memory, dm.v_memory, dm.normbuf, dm.hyper, dm.group_end, dm.group_decay, params16)
    if sharded:
        dist.allgather_device(dm.params_padded)
        if dm.params16_padded is not None:
            store(dm.params16_padded, dm.params_padded)


# -----------------------------------------------------------------------------
# bf16 mixed precision: bf16 weights for the matmuls, bf16 activations and activation
# gradients; float32 master weights (which the layernorms and the embedding lookup read,
# as PyTorch's autocast does), parameter gradients, AdamW m and v, the residual stream
# and its gradient (the matmuls that end a block add their output to it in float32, and
# read a bf16 shadow of its gradient), layernorm, softmax and loss statistics. Matmuls
# through Lt, attention through Attention, the GELU output recomputed in the backward
# from the stored pre-activation by default (llm.c's -r 1: one shared buffer instead of
# one per layer, 2*B*T*4C*(L-1) bytes less; recompute_gelu=False keeps them).

BF16_ACTIVATIONS = ("ln1", "qkv", "atty", "ln2", "fch")
F32_ACTIVATIONS = ("residual2", "residual3", "ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd")


def bf16_activation_shapes(cfg, B, T, recompute_gelu=True):
    """The bf16 activations and backward scratch (one buffer), then the float32 ones."""
    L, C, Vp, NH, BT = cfg.num_layers, cfg.channels, cfg.padded_vocab_size, cfg.num_heads, B * T
    bf16 = [("ln1", (L, BT, C)), ("qkv", (L, BT, 3 * C)), ("atty", (L, BT, C)), ("ln2", (L, BT, C)),
            ("fch", (L, BT, 4 * C)), ("fch_gelu", (BT, 4 * C) if recompute_gelu else (L, BT, 4 * C)),
            ("lnf", (BT, C)), ("logits", (BT, Vp)),
            ("dresidual16", (BT, C)), ("dC", (BT, C)), ("d3C", (BT, 3 * C)), ("d4C", (BT, 4 * C))]
    f32 = [("encoded", (BT, C)), ("residual2", (L, BT, C)), ("residual3", (L, BT, C)), ("dresidual", (BT, C)),
           ("ln1_mean", (L, BT)), ("ln1_rstd", (L, BT)), ("ln2_mean", (L, BT)), ("ln2_rstd", (L, BT)),
           ("lnf_mean", (BT,)), ("lnf_rstd", (BT,)), ("losses", (BT,)), ("logsumexp", (BT,)),
           ("att_stats", (L, B * NH * T))]
    return bf16, f32


def fuses_gelu(BT, C):
    """Whether the fc layer's bias + GELU runs as cuBLASLt's epilogue: on GPT-2-like
    shapes only. At a small ragged shape (24 x 40 x 56) the epilogue returned wrong
    values on an H200 (dev/cuda_check.py bf16), as it did at 64 x 128 x 64 with A
    transposed (which Lt.matmul refuses), so other shapes take the bias epilogue and our
    GELU kernel."""
    return BT % 64 == 0 and C % 64 == 0


def to_device_bf16(model, B, T, shards=1, rank=0, shard_optimizer=False, recompute_gelu=True):
    """to_device for bf16: the float32 state of _parameters_to_device, a bf16 copy of the
    parameters (same layout), the bf16 and float32 activations, one stream that every
    kernel, matmul, attention call and copy of the step goes to (so a step can be
    captured in a CUDA graph), the cuBLASLt plans and the cuDNN attention graphs."""
    cfg = model.cfg
    _check_shape(cfg, B, T)
    C, L, NH = cfg.channels, cfg.num_layers, cfg.num_heads
    dm = CudaGPT2()
    dm.recompute_gelu = bool(recompute_gelu)
    dm.fused_gelu = fuses_gelu(B * T, C)
    if SIM:
        dm.stream, dm.stream_ptr, dm.cupy_stream = 0, 0, None
    else:
        import cupy
        dm.cupy_stream = cupy.cuda.Stream(non_blocking=False)  # ordered with the legacy default stream
        dm.stream_ptr = dm.cupy_stream.ptr
        dm.stream = cuda.external_stream(dm.stream_ptr)
    dm.launch_stream = None if SIM else dm.stream
    _parameters_to_device(dm, model, B, T, shards, rank, shard_optimizer)
    dm.params16_padded = _alloc(dm.params_padded.size, np.uint16)
    store(dm.params16_padded, dm.params_padded)
    dm.params16_memory = dm.params16_padded[:dm.num_parameters]
    dm.params16 = common.slice_views(dm.params16_memory, common.parameter_shapes(cfg))
    dm.P = SimpleNamespace(**{name: _per_layer(getattr(dm.params, name), L) for name in LAYER_PARAMETERS})

    bf16, f32 = bf16_activation_shapes(cfg, B, T, recompute_gelu)
    dm.acts16_memory = _alloc(common.buffer_size(bf16), np.uint16)
    dm.acts32_memory = _alloc(common.buffer_size(f32))
    fill(dm.acts16_memory, 0.0)
    fill(dm.acts32_memory, 0.0)
    dm.acts = common.slice_views(dm.acts16_memory, bf16)
    for name, view in vars(common.slice_views(dm.acts32_memory, f32)).items():
        setattr(dm.acts, name, view)
    a = dm.acts
    dm.A = SimpleNamespace(**{name: _per_layer(getattr(a, name), L) for name in BF16_ACTIVATIONS + F32_ACTIVATIONS})
    dm.att_stats = [_addr(x) for x in _per_layer(a.att_stats, L)]
    dm.A.fch_gelu = [a.fch_gelu] * L if recompute_gelu else _per_layer(a.fch_gelu, L)

    ad = SimpleNamespace()  # addresses of every matmul operand
    p16 = SimpleNamespace(**{name: _per_layer(getattr(dm.params16, name), L) for name in LAYER_PARAMETERS})
    for name in ("qkvw", "qkvb", "attprojw", "fcw", "fcb", "fcprojw"):  # bf16 weights, and the biases of bf16 outputs
        setattr(ad, name, [_addr(x) for x in getattr(p16, name)])
    for name in ("attprojb", "fcprojb"):  # float32 biases of the float32 (residual) outputs
        setattr(ad, name, [_addr(x) for x in getattr(dm.P, name)])
    for name in ("qkvw", "attprojw", "fcw", "fcprojw"):
        setattr(ad, "g" + name, [_addr(x) for x in getattr(dm.G, name)])
    for name in BF16_ACTIVATIONS + ("fch_gelu", "residual2", "residual3"):
        setattr(ad, name, [_addr(x) for x in getattr(dm.A, name)])
    for name in ("encoded", "lnf", "logits", "dresidual16", "dC", "d3C", "d4C"):
        setattr(ad, name, _addr(getattr(a, name)))
    ad.wte, ad.gwte = _addr(dm.params16.wte), _addr(dm.grads.wte)
    dm.addr = ad
    dm.lt = Lt(dm.stream_ptr)
    dm.attention = Attention(B, NH, T, C // NH, dm.stream_ptr)
    return dm


def gpt2_forward_bf16(dm):
    """The bf16 forward over the staged tokens (and targets, with dm.has_loss)."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    L, V = cfg.num_layers, cfg.vocab_size
    C, Vp, BT = cfg.channels, cfg.padded_vocab_size, B * T
    p, a, P, A, ad, lt = dm.params, dm.acts, dm.P, dm.A, dm.addr, dm.lt

    embed(dm)
    residual = ad.encoded
    for l in range(L):
        lt.matmul(False, True, BT, 3 * C, C, ad.ln1[l], C, ad.qkvw[l], C, ad.qkv[l], 3 * C, bias=ad.qkvb[l])
        dm.attention.forward(ad.qkv[l], ad.atty[l], dm.att_stats[l])
        lt.matmul(False, True, BT, C, C, ad.atty[l], C, ad.attprojw[l], C, ad.residual2[l], C, out_fp32=True,
                  add=residual, bias=ad.attprojb[l])
        residual_layernorm(A.residual2[l], None, None, A.ln2[l], A.ln2_mean[l], A.ln2_rstd[l], P.ln2w[l], P.ln2b[l])
        if dm.fused_gelu:
            lt.matmul(False, True, BT, 4 * C, C, ad.ln2[l], C, ad.fcw[l], C, ad.fch_gelu[l], 4 * C, bias=ad.fcb[l],
                      gelu_aux=ad.fch[l])
        else:
            lt.matmul(False, True, BT, 4 * C, C, ad.ln2[l], C, ad.fcw[l], C, ad.fch[l], 4 * C, bias=ad.fcb[l])
            gelu_forward(A.fch_gelu[l], A.fch[l])
        lt.matmul(False, True, BT, C, 4 * C, ad.fch_gelu[l], 4 * C, ad.fcprojw[l], 4 * C, ad.residual3[l], C,
                  out_fp32=True, add=ad.residual2[l], bias=ad.fcprojb[l])
        if l + 1 < L:
            nxt = (A.ln1[l + 1], A.ln1_mean[l + 1], A.ln1_rstd[l + 1], P.ln1w[l + 1], P.ln1b[l + 1])
        else:
            nxt = (a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb)
        residual_layernorm(A.residual3[l], None, None, *nxt)
        residual = ad.residual3[l]
    lt.matmul(False, True, BT, Vp, C, ad.lnf, C, ad.wte, C, ad.logits, Vp)  # tied embedding
    if dm.has_loss:
        classifier_forward(a.losses, a.logsumexp, a.logits, dm.targets, V)
        loss_reduce(dm.stats, a.losses, dm.targets)


def gpt2_backward_bf16(dm, accumulate, loss_scale):
    """The bf16 backward of the last forward (gradients into the float32 buffer;
    accumulate adds to them). The logits become dlogits."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    L, V = cfg.num_layers, cfg.vocab_size
    C, Vp, BT = cfg.channels, cfg.padded_vocab_size, B * T
    p, g, a = dm.params, dm.grads, dm.acts
    P, G, A, ad, lt = dm.P, dm.G, dm.A, dm.addr, dm.lt
    cs, lnb = dm.colsum_scratch, dm.layernorm_scratch

    classifier_backward(a.logits, a.logsumexp, dm.targets, V, dm.stats, loss_scale)
    lt.matmul(False, False, BT, C, Vp, ad.logits, Vp, ad.wte, C, ad.dC, C)
    lt.matmul(True, False, Vp, C, BT, ad.logits, Vp, ad.lnf, C, ad.gwte, C, out_fp32=True, accumulate=accumulate)
    last_residual = A.residual3[L - 1] if L > 0 else a.encoded
    layernorm_backward(lnb, a.dresidual, a.dC, last_residual, p.lnfw, a.lnf_mean, a.lnf_rstd, True, g.lnfw, g.lnfb,
                       accumulate, dbias=G.fcprojb[L - 1] if L > 0 else None, shadow=a.dresidual16)
    for l in range(L - 1, -1, -1):
        residual = A.residual3[l - 1] if l > 0 else a.encoded
        # MLP: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2)))); fcprojb's gradient came
        # with the layernorm backward above it
        if dm.recompute_gelu:
            gelu_forward(A.fch_gelu[l], A.fch[l])
        lt.matmul(True, False, C, 4 * C, BT, ad.dresidual16, C, ad.fch_gelu[l], 4 * C, ad.gfcprojw[l], 4 * C,
                  out_fp32=True, accumulate=accumulate)
        lt.matmul(False, False, BT, 4 * C, C, ad.dresidual16, C, ad.fcprojw[l], 4 * C, ad.d4C, 4 * C,
                  dgelu_aux=ad.fch[l])
        colsum(cs, G.fcb[l], a.d4C, accumulate)
        lt.matmul(False, False, BT, C, 4 * C, ad.d4C, 4 * C, ad.fcw[l], C, ad.dC, C)
        lt.matmul(True, False, 4 * C, C, BT, ad.d4C, 4 * C, ad.ln2[l], C, ad.gfcw[l], C, out_fp32=True,
                  accumulate=accumulate)
        layernorm_backward(lnb, a.dresidual, a.dC, A.residual2[l], P.ln2w[l], A.ln2_mean[l], A.ln2_rstd[l], False,
                           G.ln2w[l], G.ln2b[l], accumulate, dbias=G.attprojb[l], shadow=a.dresidual16)
        # attention: residual2 = residual + attproj(attention(qkv(ln1(residual))))
        lt.matmul(False, False, BT, C, C, ad.dresidual16, C, ad.attprojw[l], C, ad.dC, C)
        lt.matmul(True, False, C, C, BT, ad.dresidual16, C, ad.atty[l], C, ad.gattprojw[l], C, out_fp32=True,
                  accumulate=accumulate)
        dm.attention.backward(ad.qkv[l], ad.atty[l], ad.dC, dm.att_stats[l], ad.d3C)
        colsum(cs, G.qkvb[l], a.d3C, accumulate)
        lt.matmul(False, False, BT, C, 3 * C, ad.d3C, 3 * C, ad.qkvw[l], C, ad.dC, C)
        lt.matmul(True, False, 3 * C, C, BT, ad.d3C, 3 * C, ad.ln1[l], C, ad.gqkvw[l], C, out_fp32=True,
                  accumulate=accumulate)
        layernorm_backward(lnb, a.dresidual, a.dC, residual, P.ln1w[l], A.ln1_mean[l], A.ln1_rstd[l], False,
                           G.ln1w[l], G.ln1b[l], accumulate, dbias=G.fcprojb[l - 1] if l > 0 else None,
                           shadow=a.dresidual16)
    encoder_backward_wte(g.wte, a.dresidual, dm.positions, dm.bucket_token, dm.bucket_start, dm.num_buckets, BT)
    encoder_backward_wpe(g.wpe, a.dresidual, B, T, accumulate)


def synchronize():
    cuda.synchronize()


def device_memory_used():
    """Bytes in use on the device (whole context: ours, cuBLAS's, CuPy's), or None."""
    if SIM:
        return None
    free, total = cuda.current_context().get_memory_info()
    return total - free


def datasheet_peak_tflops(precision):
    """Dense peak of the GPU for MFU: the H100/H200 SXM datasheet's BF16 (989.4), TF32
    tensor-core (494.7) or plain FP32 (66.9) TFLOP/s; 0 (MFU not shown) for other GPUs
    and the simulator."""
    if SIM:
        return 0.0
    name = cuda.get_current_device().name
    name = name.decode() if isinstance(name, bytes) else str(name)
    if "H100" in name or "H200" in name:
        return {"bf16": 989.4, "tf32": 494.7}.get(precision, 66.9)
    return 0.0


def _free(dm):
    """Drop the device buffers of dm (the memory goes back when nothing else holds them)."""
    if SIM:
        mine = {_addr(x) for x in vars(dm).values() if hasattr(x, "_ary")}
        _emu_buffers[:] = [(a, buf) for a, buf in _emu_buffers if a not in mine]
    dm.__dict__.clear()


# -----------------------------------------------------------------------------
# The training target (gpt2_common.Device): train_gpt2.py's main() and test_gpt2.py talk
# to the GPU only through it


PRECISIONS = ("fp32", "tf32", "bf16")


class CUDA(common.Device):
    """The host model's training on the GPU: a thin wrapper over the functions above.
    The device holds the parameters, gradients, AdamW state and step count; the host
    model is read at construction and by state_from_host, and written only when asked
    (params_to_host, state_to_host).

    precision: "fp32" (strict), "tf32" (TF32 matmuls) or "bf16" (mixed precision, the
    bf16 functions above). bf16 steps run as CUDA graphs: the forward (with or without
    targets), the backward (per accumulate flag and loss scale) and the update (per
    clip) are each captured on their second call and replayed after, so Python's
    launch cost (tens of microseconds a kernel) is paid once; host work (token and
    hyperparameter staging, the encoder buckets) stays outside the graphs."""

    name = "cuda"

    def __init__(self, model, B, T, precision="tf32", attention_blocks=None, dist=None, zero_stage=0,
                 graphs=True, recompute_gelu=True):
        """dist: one rank of a data-parallel run (distributed.setup), which has already
        made this rank's GPU (LOCAL_RANK) the current one; zero_stage 1 shards m and v.
        graphs: capture bf16 steps in CUDA graphs (never under the simulator, nor data
        parallel, whose collectives run outside the step's stream). recompute_gelu (bf16):
        recompute the GELU output in the backward instead of keeping it per layer."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.model = model
        self.precision = precision
        self.tf32 = precision == "tf32"
        self.dist = dist if dist is not None and dist.world > 1 else None
        world, rank = (self.dist.world, self.dist.rank) if self.dist else (1, 0)
        shard_optimizer = bool(self.dist) and zero_stage == 1
        if precision == "bf16":
            self.dm = to_device_bf16(model, B, T, shards=world, rank=rank, shard_optimizer=shard_optimizer,
                                     recompute_gelu=recompute_gelu)
        else:
            self.dm = to_device(model, B, T, tf32=self.tf32, attention_blocks=attention_blocks, shards=world,
                                rank=rank, shard_optimizer=shard_optimizer)
        self.graphs = {} if graphs and precision == "bf16" and not SIM and self.dist is None else None
        self.ran_once = set()

    def _device_step(self, key, work):
        """Run work() (device launches only) on the target's stream. bf16: eagerly the
        first time (kernels compile, plans are made), captured into a CUDA graph the
        second, replayed from then on."""
        dm = self.dm
        _launch_stream[0] = dm.launch_stream
        try:
            if self.graphs is None or key not in self.ran_once:
                work()
                self.ran_once.add(key)
                return
            graph = self.graphs.get(key)
            if graph is None:
                dm.cupy_stream.begin_capture()
                try:
                    work()
                finally:
                    graph = dm.cupy_stream.end_capture()
                self.graphs[key] = graph
            graph.launch(dm.cupy_stream)
        finally:
            _launch_stream[0] = None

    def forward(self, inputs, targets=None):
        dm = self.dm
        _stage_tokens(dm, inputs, targets)
        dm.has_loss = dm.backward_ready = targets is not None
        forward = gpt2_forward_bf16 if self.precision == "bf16" else gpt2_forward_cuda
        self._device_step(("forward", targets is not None), lambda: forward(dm))
        if targets is not None:
            _stage_buckets(dm)  # built on the host while the device runs the forward
        return mean_loss_cuda(dm)  # waits for the forward

    def backward(self, accumulate=False, loss_scale=1.0):
        dm = self.dm
        if not dm.backward_ready:
            raise RuntimeError("backward needs a forward pass with targets first")
        _stage_buckets(dm)
        dm.backward_ready = False  # the logits become dlogits
        backward = gpt2_backward_bf16 if self.precision == "bf16" else gpt2_backward_cuda
        accumulate, loss_scale = bool(accumulate), float(loss_scale)
        self._device_step(("backward", accumulate, loss_scale), lambda: backward(dm, accumulate, loss_scale))

    def update(self, lr, beta1, beta2, eps, weight_decay, weight_decay_mode, grad_clip):
        dm = self.dm
        stage_update(dm, lr, beta1, beta2, eps, weight_decay, weight_decay_mode)
        self._device_step(("update", float(grad_clip)), lambda: update_on_device(dm, grad_clip, self.dist))
        return float(dm.normbuf.copy_to_host()[0])  # waits for the update

    def params_to_host(self):
        self.dm.params_memory.copy_to_host(self.model.params_memory)

    def state_to_host(self):
        """Under ZeRO-1 every rank takes part: the m and v shards are all-gathered
        through the gradient buffer (free between an update and the next backward)."""
        dm, model = self.dm, self.model
        common.ensure_optimizer_buffers(model)
        dm.params_memory.copy_to_host(model.params_memory)
        for moments, host in ((dm.m_memory, model.m_memory), (dm.v_memory, model.v_memory)):
            if dm.grad_shard is None:
                moments.copy_to_host(host)
            else:
                dm.grads_padded[dm.update_start:dm.update_start + dm.shard_size].copy_to_device(moments)
                self.dist.allgather_device(dm.grads_padded)
                dm.grads_memory.copy_to_host(host)
        model.step = dm.step

    def state_from_host(self):
        """ZeRO-1: this rank takes its shard of the host model's m and v."""
        dm, model = self.dm, self.model
        dm.params_memory.copy_to_device(model.params_memory)
        if model.m_memory is None:  # no optimizer state on the host: a fresh one
            fill(dm.m_memory, 0.0)
            fill(dm.v_memory, 0.0)
        else:
            lo = dm.update_start
            for moments, host in ((dm.m_memory, model.m_memory), (dm.v_memory, model.v_memory)):
                part = np.zeros(moments.size, dtype=np.float32)  # the padding past the end stays zero
                part[:max(0, min(moments.size, host.size - lo))] = host[lo:lo + moments.size]
                moments.copy_to_device(part)
        if dm.params16_padded is not None:
            store(dm.params16_padded, dm.params_padded)
        dm.step = int(model.step)

    def logits_to_host(self):
        logits = self.dm.acts.logits.copy_to_host()
        return common.bfloat16_to_float32(logits) if logits.dtype == np.uint16 else logits

    def grads_to_host(self):
        return self.dm.grads_memory.copy_to_host()

    def optimizer_bytes(self):
        """AdamW state held on this GPU (m and v, or their shards)."""
        return 2 * 4 * self.dm.m_memory.size

    def peak_flops(self):
        return datasheet_peak_tflops(self.precision) * 1e12

    def memory_used(self):
        return device_memory_used()

    def free(self):
        if self.dm is not None:
            synchronize()
            self.graphs = None
            _free(self.dm)
            self.dm = None
