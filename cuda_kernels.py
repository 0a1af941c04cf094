"""
Our GPU kernels (numba.cuda) and their launchers: what train_gpt2_cuda.py runs for every
layer that is not a matrix product or cuDNN's attention. Read top to bottom: launch
shapes, reductions (warp shuffles; shared memory under the simulator), storage helpers
(ld / st widen bf16 and round to it, ld4 / st4 move a packed quad of four values), the
forward kernels, the backward kernels, the update kernels, then the launchers
(encoder_layernorm, residual_layernorm, colsum, layernorm_backward, adamw, ...), each a
plain function over device arrays that configures its kernel once.

Every kernel computes the same math as its CPU twin in train_gpt2.py, in float32, with
reductions in a fixed order (no float atomics), so a seed repeats its results.
"""

import math
import weakref
from types import SimpleNamespace

import numpy as np
from numba import config as numba_config
from numba import cuda, float32, float64, int32

import gpt2_common as common
from cuda_libraries import SIM, addr, alloc

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
def layernorm_quad(x, ln, w, b, i, k, m, rs):
    # quad k of row i: ln = (x - m) * rs * w + b, the layernorm output (the forward's
    # layernorms and the backward's recompute, layernorm_apply: the same bits)
    x0, x1, x2, x3 = ld4(x, i, k)
    w0, w1, w2, w3 = ld4(w, 0, k)
    b0, b1, b2, b3 = ld4(b, 0, k)
    st4(ln, i, k, (x0 - m) * rs * w0 + b0, (x1 - m) * rs * w1 + b1, (x2 - m) * rs * w2 + b2,
        (x3 - m) * rs * w3 + b3)


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
        layernorm_quad(x, ln, w, b, ii, k, m, rs)
    if lane == 0 and i < N:
        mean[ii] = m
        rstd[ii] = rs


@cuda.jit(**JIT)
def k_encoder_layernorm(encoded, ln, mean, rstd, tokens, wte, wpe, w, b, T, t0):
    # encoded[i] = wte[token] + wpe[t0 + i % T], then ln = layernorm(encoded): one warp per
    # row (all arrays quads; t0: the position of a generated token, else 0)
    sh = cuda.shared.array((ROWS, LANES), float32)
    lane = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.x * ROWS + ty
    N = encoded.shape[0]
    nq = encoded.shape[1] if i < N else 0
    ii = i if i < N else 0
    tok = tokens[ii]
    t = t0 + ii % T
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
def k_layernorm_apply(x, ln, mean, rstd, w, b):
    # ln = layernorm(x) from the forward's mean and rstd: the bf16 backward's recompute of a
    # layernorm output (-r 2). One warp per row, quads.
    i = cuda.blockIdx.x * ROWS + cuda.threadIdx.y
    if i >= x.shape[0]:
        return
    m = mean[i]
    rs = rstd[i]
    for k in range(cuda.threadIdx.x, x.shape[1], LANES):
        layernorm_quad(x, ln, w, b, i, k, m, rs)


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


@cuda.jit(**JIT)
def k_attention_decode(out, qkv, kcache, vcache, pos, NH, scale):
    # one block per head h of the newest position (row 0 of qkv, out): its k and v into
    # row pos of the caches, then softmax(q . k_t2 * scale) over t2 <= pos, and out = the
    # weighted sum of v_t2; the scores in dynamic shared memory (one float per position)
    scores = cuda.shared.array(0, float32)
    red = cuda.shared.array(RED_N, float32)
    h = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    C = out.shape[1]
    hs = C // NH
    for i in range(tid, hs, nt):
        st(kcache, (pos, h * hs + i), ld(qkv, (0, C + h * hs + i)))
        st(vcache, (pos, h * hs + i), ld(qkv, (0, 2 * C + h * hs + i)))
    cuda.syncthreads()
    m = NEG_INF
    for t2 in range(tid, pos + 1, nt):
        d = F0
        for i in range(hs):
            d += ld(qkv, (0, h * hs + i)) * ld(kcache, (t2, h * hs + i))
        d *= scale
        scores[t2] = d
        m = max(m, d)
    m = block_max(m, red)
    total = F0
    for t2 in range(tid, pos + 1, nt):
        e = math.exp(scores[t2] - m)
        scores[t2] = e
        total += e
    total = block_sum(total, red)
    for i in range(tid, hs, nt):
        acc = F0
        for t2 in range(pos + 1):
            acc += scores[t2] * ld(vcache, (t2, h * hs + i))
        st(out, (0, h * hs + i), acc / total)


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
def k_classifier_backward(logits, lse, targets, V, stats, loss_scale, per_target):
    # in place: logits (quads) become dlogits = (softmax - onehot) * dloss, dloss =
    # loss_scale / #valid (per_target: 1, the scale applied later); padding columns and
    # masked rows get zero. One pass over each row.
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    fast = logits.shape[2] == 1
    cnt = stats[1]
    dloss = float32(loss_scale / cnt) if cnt > 0.0 else F0
    if per_target:
        dloss = ONE
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
def k_layernorm_backward(dinp, dout, inp, w, mean, rstd, overwrite, shadow, has_shadow, part, dscale):
    # dinp (+)= the layernorm input gradient of dout * dscale[0] (dinp may be dout: each
    # thread reads its quad of a row before writing it), float32 row sums as the CPU; with has_shadow,
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
    sc = dscale[0]
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
            d0 *= sc
            d1 *= sc
            d2 *= sc
            d3 *= sc
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


@cuda.jit(**JIT)
def k_classifier_wte_grad(gwte, pending, stats, dscale, loss_scale, accumulate):
    # the classifier's wte gradient, summed per target by the forward (pending), scaled
    # now that the loss scale is known: gwte (+)= pending * loss_scale / #valid (flat
    # quads); dscale[0] = that scale, for the final layernorm's backward
    cnt = stats[1]
    s = float32(loss_scale / cnt) if cnt > 0.0 else F0
    if cuda.grid(1) == 0:
        dscale[0] = s
    for q in range(cuda.grid(1), gwte.shape[1], cuda.gridsize(1)):
        p0, p1, p2, p3 = ld4(pending, 0, q)
        p0 *= s
        p1 *= s
        p2 *= s
        p3 *= s
        if accumulate:
            g0, g1, g2, g3 = ld4(gwte, 0, q)
            p0, p1, p2, p3 = add4(g0, g1, g2, g3, p0, p1, p2, p3)
        st4(gwte, 0, q, p0, p1, p2, p3)


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


def set_launch_stream(stream):
    """Where the launchers send their kernels from now on (None: the legacy default stream)."""
    _launch_stream[0] = stream


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
    # a quad is one 8-byte (bf16) or 16-byte (float32) access: the array must start there
    assert addr(arr) % (4 * arr.dtype.itemsize) == 0, f"misaligned {arr.dtype} array at {addr(arr):#x}"
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


def encoder_layernorm(encoded, ln, mean, rstd, tokens, wte, wpe, w, b, T, t0=0):
    N = encoded.shape[0]
    _launch(k_encoder_layernorm, (N + ROWS - 1) // ROWS, (LANES, ROWS))(
        quads(encoded), quads(ln), mean, rstd, tokens, quads(wte), quads(wpe), quads(w), quads(b), T, t0)


def attention_decode(out, qkv, k_cache, v_cache, pos, num_heads):
    """Generation: the newest position (row 0 of qkv) against every earlier one; its k and
    v go into the caches (maxT, C) at row pos first."""
    threads = min(RED_THREADS, max(LANES, (pos + 1 + LANES - 1) // LANES * LANES))
    _launch(k_attention_decode, num_heads, threads, shared=4 * k_cache.shape[0])(
        out, qkv, k_cache, v_cache, pos, num_heads, np.float32(1.0 / math.sqrt(out.shape[1] // num_heads)))


def residual_layernorm(res, prev, bias, ln, mean, rstd, w, b):
    """res = (res + bias) + prev in place, then ln = layernorm(res); with prev None,
    ln = layernorm(res) only."""
    N = res.shape[0]
    mode = 0 if prev is None else 1
    prev = res if prev is None else prev
    bias = w if bias is None else bias
    _launch(k_residual_layernorm, (N + ROWS - 1) // ROWS, (LANES, ROWS))(
        quads(res), quads(prev), quads(bias), quads(ln), mean, rstd, quads(w), quads(b), mode)


def layernorm_apply(x, ln, mean, rstd, w, b):
    """ln = layernorm(x) from its stored mean and rstd (the forward's bits again)."""
    N = x.shape[0]
    _launch(k_layernorm_apply, (N + ROWS - 1) // ROWS, (LANES, ROWS))(
        quads(x), quads(ln), mean, rstd, quads(w), quads(b))


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


def classifier_backward(logits, lse, targets, V, stats, loss_scale, per_target=False):
    """logits become dlogits in place: of loss_scale * the mean loss, or (per_target) of
    each target's loss unscaled (classifier_wte_grad and the layernorm's dout_scale scale
    them later)."""
    _launch(k_classifier_backward, logits.shape[0], CE_THREADS)(quads(logits), lse, targets, V, stats,
                                                                 float(loss_scale), int(per_target))


def classifier_wte_grad(gwte, pending, stats, dscale, loss_scale, accumulate):
    """gwte (+)= pending * loss_scale / #valid targets; dscale[0] = that scale."""
    _launch(k_classifier_wte_grad, _elt_grid(gwte.size // 4), ELT_THREADS)(
        flat_quads(gwte), flat_quads(pending), stats, dscale, float(loss_scale), int(accumulate))


def layernorm_backward_scratch(C):
    """layernorm_backward's scratch: the per-block partial sums, their colsum scratch, and
    a vector for the matmul bias gradient of a layernorm that has none (the first one)."""
    part = alloc(LNB_BLOCKS * 3 * C).reshape(LNB_BLOCKS, 3 * C)
    return SimpleNamespace(part=part, sums=colsum_scratch(LNB_BLOCKS, 3 * C), unused=alloc(C),
                           one=cuda.to_device(np.ones(1, np.float32)))


def layernorm_backward(scratch, dinp, dout, inp, w, mean, rstd, overwrite, dw, db, accumulate, dbias=None,
                       shadow=None, dout_scale=None):
    """dinp (+)= the input gradient of ln = layernorm(inp) (mean, rstd of its forward) from
    dout (times dout_scale[0], a device float32, when given; dinp may be dout); dw, db (+)=
    its weight and bias gradients (accumulate); dbias (+)= the column sums of the new dinp:
    the bias gradient of the matmul whose output inp is (None: there is none); shadow: a
    bf16 copy of dinp."""
    C = inp.shape[1]
    threads = (C // 4 + LANES - 1) // LANES * LANES  # a thread a quad, whole warps
    _launch(k_layernorm_backward, LNB_BLOCKS, threads)(
        quads(dinp), quads(dout), quads(inp), quads(w), mean, rstd, int(overwrite),
        quads(dinp if shadow is None else shadow), int(shadow is not None), quads(scratch.part),
        scratch.one if dout_scale is None else dout_scale)
    colsum(scratch.sums, dw, scratch.part, accumulate, mode=2, out2=db,
           out3=scratch.unused if dbias is None else dbias)


def colsum_scratch(N, OC):
    """k_colsum's scratch for up to N rows and OC columns: the partial sums (rows padded
    to whole column groups) and the column groups' block counters (zero between calls)."""
    groups = (OC // 4 + CS_COLS - 1) // CS_COLS
    nchunks = (N + CS_CHUNK - 1) // CS_CHUNK
    part = alloc(nchunks * groups * CS_WIDTH).reshape(nchunks, groups * CS_WIDTH)
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


def global_norm(normbuf, part, grads, grad_clip, sum_partials=None):
    """normbuf = [norm, clip scale]; with sum_partials, grads is this rank's shard and
    sum_partials(part) adds the partial sums over the ranks first (the same fixed-order
    sum everywhere)."""
    _launch(k_sumsq_partial, part.shape[0], RED_THREADS)(part, grads)
    if sum_partials is not None:
        sum_partials(part)
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
