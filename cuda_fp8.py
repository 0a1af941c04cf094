"""
fp8 for `--precision fp8` (Hopper and later): the two 8-bit float formats, the casts that
feed cuBLASLt's fp8 matmuls, and the per-tensor scales, delayed as Transformer Engine
does. train_gpt2_cuda.py drives them (linear_forward, linear_backward); everything else
of the step (layernorms, attention, softmax, the loss, the classifier, the optimizer
and its float32 master weights) stays as under bf16.

- Formats: E4M3 (4 exponent bits, 3 mantissa bits, largest 448, no infinity) for what
  the forward multiplies, the weights and the layers' inputs; E5M2 (largest 57344, the
  range of a gradient) for the activation gradients of the backward. A cast rounds to
  nearest even and saturates at the largest finite value; a NaN stays a NaN. On the GPU
  the rounding is the hardware's (PTX `cvt.rn.satfinite.e4m3x2.f32`, two values an
  instruction; it replaced a bit-twiddling encoder of about 20 integer operations a
  value); under the simulator it is `encode`, which the GPU's codes are checked against.
- Scales: each fp8 tensor has a slot (`slot`: layer, weight, and whether it is the weight,
  the layer's input or the gradient of its output). A cast multiplies by the slot's
  scale, rounds to fp8 and folds the largest |value| it saw (before scaling) into the
  slot's amax with an atomic max (exact, so a seed still repeats). The matmul multiplies
  its sums back by each operand's 1 / scale (cuBLASLt's scale pointers). Once per update
  `update_scales` pushes every slot's amax into its history (FP8_HISTORY steps) and sets
  scale = the largest power of two <= fp8 max / the history's largest amax (a power of
  two: scaling and unscaling are exact; an empty or zero history keeps the scale, 1 at
  the start). Delayed: a step casts with the scales of the steps before it, so no pass
  over a tensor precedes its cast.
- The first step has no history. The weights' scales come from the weights (`calibrate`).
  A fresh run's first training forward measures the rest (`Fp8State.measuring`,
  train_gpt2_cuda.CUDA.measure_fp8_scales): a bf16 forward and backward whose casts only
  fold each input's and gradient's amax; the scales are set from them, then the step runs
  in fp8. At scale 1, 73% of GPT-2 124M's first-step layer gradients (B=8, T=1024, largest
  |value| 1.3e-3) round to zero in E5M2. In a CPU emulation of these casts (124M, B=4,
  T=128, 200 steps; a probe, not kept) the val loss ended 1.40% above fp32's with every
  first-step scale at 1 (the weights' too, so worse than casting only the inputs and
  gradients at 1), and 0.08% above with scales from the tensors themselves. Once per
  run: a resumed run restores its scales (`restore`).
- Hopper's fp8 matmuls take both operands with the reduction dimension contiguous (cuBLAS's
  "TN" form) only. The forward's x @ W^T is already that; the backward's dx = dy @ W
  reads a transposed copy of each weight (made with the weight's cast, after each
  update), and dW = dy^T @ x reads transposed copies of dy and x, which the backward's
  casts write beside (or instead of) the plain ones: `cast` writes either or both from
  one read, through a shared-memory tile. The layernorm outputs' transposes come from
  their forward casts instead (`Fp8State.inputs_t`, but at -r 2), so the bf16 outputs
  are one layer's buffer. The casts' scratch lives in the classifier's logits buffer.

Under the simulator the same kernels run, and cuda_libraries.Lt emulates the matmuls by
decoding the operands (`decode`).
"""

import functools
import math

import numpy as np
from numba import cuda, float32, uint8, uint32

from cuda_kernels import FULL_MASK, JIT, gelu, ld4, _launch, _view, quads
from cuda_libraries import SIM, addr, alloc

E4M3, E5M2 = 0, 1                        # our format ids (the kernels' e5m2 flag)
FORMAT_NAMES = ("E4M3", "E5M2")
MANTISSA = (3, 2)                        # mantissa bits
MIN_EXPONENT = (-6, -14)                 # exponent of the smallest normal value
LARGEST_CODE = (0x7E, 0x7B)              # the largest finite value's code (448, 57344)
NAN_CODE = 0x7F                          # a NaN in both (E5M2's 0x7C is its infinity)
FP8_HISTORY = 16                         # steps of amax history per slot
WEIGHT, INPUT, GRAD = 0, 1, 2            # a slot's kind: the weight, the layer's input, its output's gradient
KIND_FORMAT = (E4M3, E4M3, E5M2)
MATMUL_WEIGHTS = ("qkvw", "attprojw", "fcw", "fcprojw")
INPUTS_T = ("qkvw", "fcw")  # the weights whose inputs (the layernorm outputs) keep fp8 transposes (Fp8State)
# meta columns of a slot: 1 / scale (a matmul's scale pointer: first, so that with rows of a
# multiple of 16 bytes it is 16-byte aligned, as cuBLASLt's fp8 matmuls require; at an
# address 4 bytes off, every algorithm answered CUBLAS_STATUS_NOT_SUPPORTED on an H100),
# the scale, the amax of the current step, the format's largest value, then the history
# (newest first)
SCALE_INV, SCALE, AMAX, FP8_MAX, HISTORY = 0, 1, 2, 3, 4

TQ = 2 if SIM else 16   # a cast tile is 4 TQ rows x 4 TQ columns; its block TQ x TQ threads
TILE = 4 * TQ           # (shared-memory shapes must be constants)
TILE_ROW = TILE + 4
WARPS = max(1, TQ * TQ // 32)


def largest(fmt):
    return float(decode_table(fmt)[LARGEST_CODE[fmt]])


@functools.lru_cache(maxsize=None)
def decode_table(fmt):
    """The float32 value of each of the 256 codes of fmt (NaN codes: NaN; E5M2's 0x7C and
    0xFC: +-infinity), from the format's definition (made once; read-only)."""
    mb, emin = MANTISSA[fmt], MIN_EXPONENT[fmt]
    values = np.empty(256, np.float64)
    for code in range(128):
        e, m = code >> mb, code & ((1 << mb) - 1)
        values[code] = m * 2.0 ** (emin - mb) if e == 0 else (1 + m / 2 ** mb) * 2.0 ** (e - 1 + emin)
    if fmt == E4M3:
        values[0x7F] = np.nan
    else:
        values[0x7C] = np.inf
        values[0x7D:0x80] = np.nan
    values[128:] = -values[:128]
    table = values.astype(np.float32)
    table.setflags(write=False)
    return table


def decode(codes, fmt):
    """fp8 codes (uint8) -> float32."""
    return decode_table(fmt)[np.asarray(codes, np.uint8)]


def encode(x, fmt):
    """float32 -> fp8 codes (uint8), by nearest value in the format's table (ties to the
    even code, which is the even mantissa), saturating at the largest finite value; NaN
    to NaN. The reference the GPU's casts are checked against (and the simulator's
    rounding)."""
    x = np.asarray(x, np.float32)
    table = decode_table(fmt)[:LARGEST_CODE[fmt] + 1].astype(np.float64)  # ascending, codes 0..largest
    a = np.minimum(np.abs(x.astype(np.float64)), table[-1])
    hi = np.clip(np.searchsorted(table, a), 0, len(table) - 1)  # first value >= a
    lo = np.maximum(hi - 1, 0)
    dlo, dhi = a - table[lo], table[hi] - a
    code = np.where(dhi < dlo, hi, np.where(dlo < dhi, lo, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(np.isnan(x), NAN_CODE, code).astype(np.uint8)
    return code | np.where(np.signbit(x) & ~np.isnan(x), 0x80, 0).astype(np.uint8)


# -----------------------------------------------------------------------------
# Device code

if SIM:
    def _amax_bits(x):
        return np.int32(np.float32(x).view(np.int32))

    def _warp_max(x):
        return x

    def _word(c0, c1, c2, c3):
        return int(c0) | int(c1) << 8 | int(c2) << 16 | int(c3) << 24

    def _fp8_word(v0, v1, v2, v3, e5m2):
        c = encode(np.array([v0, v1, v2, v3], np.float32), E5M2 if e5m2 else E4M3)
        return _word(c[0], c[1], c[2], c[3])
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic

    def _cvt_pair(ptx_format):
        """The hardware's conversion of two float32 to fp8 (sm_89 and later): round to
        nearest even, saturate at the largest finite value (infinities too), NaN to NaN;
        the first argument's code in the high byte."""
        @intrinsic
        def cvt(typingctx, hi, lo):
            def codegen(context, builder, sig, args):
                fn = ir.FunctionType(ir.IntType(16), [ir.FloatType(), ir.FloatType()])
                asm = ir.InlineAsm(fn, f"cvt.rn.satfinite.{ptx_format}x2.f32 $0, $1, $2;", "=h,f,f")
                return builder.call(asm, args)
            return types.uint16(types.float32, types.float32), codegen
        return cvt

    _e4m3x2, _e5m2x2 = _cvt_pair("e4m3"), _cvt_pair("e5m2")

    @cuda.jit(device=True, inline=True)
    def _amax_bits(x):
        return libdevice.float_as_int(x)

    @cuda.jit(device=True, inline=True)
    def _word(c0, c1, c2, c3):
        return uint32(c0) | (uint32(c1) << uint32(8)) | (uint32(c2) << uint32(16)) | (uint32(c3) << uint32(24))

    @cuda.jit(device=True, inline=True)
    def _fp8_word(v0, v1, v2, v3, e5m2):
        # the fp8 codes of four float32, v0's in the low byte
        if e5m2:
            lo, hi = _e5m2x2(v1, v0), _e5m2x2(v3, v2)
        else:
            lo, hi = _e4m3x2(v1, v0), _e4m3x2(v3, v2)
        return uint32(lo) | (uint32(hi) << uint32(16))

    @cuda.jit(device=True, inline=True)
    def _warp_max(x):
        for k in (16, 8, 4, 2, 1):
            x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, k))
        return x


@cuda.jit(**JIT)
def k_cast(x, out, out_t, meta, meta_bits, slot, e5m2, mode, with_gelu):
    # x (rows, cols) bf16 quads -> fp8 codes: out (rows, cols / 4) uint32 words of four
    # codes (mode & 1), out_t (cols, rows / 4) the transpose (mode & 2), scaled by the
    # slot's scale; the amax of |x| into the slot's (an integer atomic max on its bits,
    # meta_bits: for floats >= 0 the order is the same; one atomic a block). with_gelu: of
    # gelu(x) instead. A block of TQ x TQ threads covers a TILE x TILE tile: thread (tx, ty)
    # reads quad column tx of rows ty + TQ j, then writes the tile's transposed rows
    # ty + TQ j, four codes (four rows of x) at word tx.
    tile = cuda.shared.array((TILE, TILE_ROW), uint8)
    warp_amax = cuda.shared.array(WARPS, float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    rows, nq = x.shape[0], x.shape[1]
    kq = cuda.blockIdx.x * TQ + tx
    scale = meta[slot, SCALE]
    amax = float32(0.0)
    for j in range(4):
        r = ty + TQ * j
        i = cuda.blockIdx.y * 4 * TQ + r
        if i < rows and kq < nq:
            v0, v1, v2, v3 = ld4(x, i, kq)
            if with_gelu:
                v0, v1, v2, v3 = gelu(v0), gelu(v1), gelu(v2), gelu(v3)
            amax = max(amax, max(max(abs(v0), abs(v1)), max(abs(v2), abs(v3))))
            w = _fp8_word(v0 * scale, v1 * scale, v2 * scale, v3 * scale, e5m2)
            if mode & 1:
                out[i, kq] = w
            for k in range(4):
                tile[r, 4 * tx + k] = (w >> (8 * k)) & 0xFF
    if SIM:
        cuda.atomic.max(meta_bits, (slot, AMAX), _amax_bits(amax))
    else:
        amax = _warp_max(amax)
        lin = tx + TQ * ty
        if lin % 32 == 0:
            warp_amax[lin // 32] = amax
        cuda.syncthreads()
        if lin == 0:
            for w in range(1, WARPS):
                amax = max(amax, warp_amax[w])
            cuda.atomic.max(meta_bits, (slot, AMAX), _amax_bits(amax))
    if mode & 2:
        cuda.syncthreads()
        wq = cuda.blockIdx.y * TQ + tx  # word of out_t's row: x's rows 4 wq .. 4 wq + 3
        for j in range(4):
            c = ty + TQ * j
            col = cuda.blockIdx.x * 4 * TQ + c
            if col < 4 * nq and 4 * wq < rows:
                out_t[col, wq] = _word(tile[4 * tx, c], tile[4 * tx + 1, c], tile[4 * tx + 2, c], tile[4 * tx + 3, c])


@cuda.jit(**JIT)
def k_update_scales(meta):
    # per slot: push the step's amax into the history, zero it, and set the scale from the
    # history's largest (kept when that is zero or not finite)
    s = cuda.grid(1)
    if s >= meta.shape[0]:
        return
    H = meta.shape[1] - HISTORY
    for k in range(H - 1, 0, -1):
        meta[s, HISTORY + k] = meta[s, HISTORY + k - 1]
    meta[s, HISTORY] = meta[s, AMAX]
    meta[s, AMAX] = 0.0
    m = meta[s, HISTORY]
    for k in range(1, H):
        m = max(m, meta[s, HISTORY + k])
    if m > 0.0 and m < math.inf:
        e = math.floor(math.log2(meta[s, FP8_MAX] / m))
        scale = float32(2.0) ** e
        # log2 may round across an integer: the power of two must not overflow the format
        if m * scale > meta[s, FP8_MAX]:
            scale *= float32(0.5)
        elif m * scale * float32(2.0) <= meta[s, FP8_MAX]:
            scale *= float32(2.0)
        meta[s, SCALE] = scale
        meta[s, SCALE_INV] = float32(1.0) / scale


# -----------------------------------------------------------------------------
# Launchers and the fp8 state of a model


def supported():
    """Whether this GPU has fp8 tensor cores (compute capability 8.9, Ada, or later;
    the simulator emulates them)."""
    if SIM:
        return True
    cc = cuda.get_current_device().compute_capability
    return tuple(cc) >= (8, 9)


def slot(l, weight, kind):
    """The meta row of layer l's weight (a MATMUL_WEIGHTS name) and kind (WEIGHT, INPUT,
    GRAD)."""
    return (l * len(MATMUL_WEIGHTS) + MATMUL_WEIGHTS.index(weight)) * 3 + kind


def _words(arr):
    rows = arr.shape[0]
    return arr.reshape(rows, arr.size // rows).view(np.uint32)


def words(arr):
    """A 2-D uint8 array as uint32 words of four codes along its rows."""
    return _view(arr, "fp8 words", _words)


def cast(x, meta, slot_index, fmt, out=None, out_t=None, with_gelu=False):
    """out (rows, cols) and / or out_t (cols, rows) uint8 = the fp8 codes (format fmt) of
    x (bf16, rows x cols; with_gelu: of gelu(x), in float32) times the slot's scale; the
    slot's amax takes max |x|."""
    rows, cols = x.shape
    assert cols % 4 == 0 and (out_t is None or rows % 4 == 0), (rows, cols)
    mode = (out is not None) | 2 * (out_t is not None)
    assert mode
    grid = ((cols + TILE - 1) // TILE, (rows + TILE - 1) // TILE)
    o = words(out if out is not None else out_t)
    ot = words(out_t if out_t is not None else out)
    bits = _view(meta, "amax bits", lambda m: m.view(np.int32))
    _launch(k_cast, grid, (TQ, TQ))(quads(x), o, ot, meta, bits, int(slot_index), int(fmt), mode, int(with_gelu))


def scratch_bytes(BT, C):
    """The casts' scratch: x8 (B*T x 4C: a forward input, or a backward's dy), dy_t and
    x_t (4C x B*T: the transposed copies dW reads)."""
    return 3 * BT * 4 * C


def update_scales(meta):
    _launch(k_update_scales, (meta.shape[0] + 127) // 128, 128)(meta)


class Fp8State:
    """The fp8 side of a model on the device (to_device_bf16 with fp8): the slots' meta
    (float32, one row a slot), each matmul weight's E4M3 copy and its transpose (one
    uint8 buffer), the layernorm outputs' transposes (inputs_t), and the casts' scratch
    (`scratch_bytes`, `use_scratch`)."""

    def __init__(self, cfg, B, T, params16, keeps_inputs_t=True):
        L, C, BT = cfg.num_layers, cfg.channels, B * T
        rows = L * len(MATMUL_WEIGHTS) * 3
        meta = np.zeros((rows, HISTORY + FP8_HISTORY), np.float32)
        assert meta.shape[1] % 4 == 0  # (16-byte rows: SCALE_INV aligned)
        meta[:, SCALE] = meta[:, SCALE_INV] = 1.0
        for s in range(rows):
            meta[s, FP8_MAX] = largest(KIND_FORMAT[s % 3])
        self.meta = alloc(meta.size).reshape(meta.shape)
        self.meta.copy_to_device(meta)
        self.meta_addr = addr(self.meta)
        sizes = [getattr(params16, w)[l].size for l in range(L) for w in MATMUL_WEIGHTS]
        self.weights_memory = alloc(2 * sum(sizes), np.uint8)
        self.w8, self.w8_t, off = {}, {}, 0
        for l in range(L):
            for w in MATMUL_WEIGHTS:
                N, K = getattr(params16, w)[l].shape
                self.w8[w, l] = self.weights_memory[off:off + N * K].reshape(N, K)
                self.w8_t[w, l] = self.weights_memory[off + N * K:off + 2 * N * K].reshape(K, N)
                off += 2 * N * K
        # the E4M3 transposes of the qkv and fc layers' inputs (ln1, ln2), written by their
        # forward casts, read by the backward's weight gradients (instead of keeping the
        # bf16 inputs per layer and casting them again)
        self.inputs_t_memory = alloc(L * len(INPUTS_T) * C * BT, np.uint8) if keeps_inputs_t else None
        self.inputs_t = {}
        for i, (l, w) in enumerate((l, w) for l in range(L) for w in INPUTS_T if keeps_inputs_t):
            self.inputs_t[w, l] = self.inputs_t_memory[i * C * BT:(i + 1) * C * BT].reshape(C, BT)
        self.scratch_bytes = scratch_bytes(BT, C)
        self.scratch_memory = None  # (use_scratch)
        self.num_layers = L
        # no amax history yet for the inputs and gradients: the first training step measures
        # them first (train_gpt2_cuda.CUDA.measure_fp8_scales), with bf16 matmuls meanwhile
        self.unscaled, self.measuring = True, False

    def use_scratch(self, idle):
        """The casts' scratch in the device array idle (a buffer nothing else uses while
        the layers' matmuls run: the classifier's logits) where it is large enough, else
        in memory of its own (scratch_memory)."""
        n = self.scratch_bytes
        s = idle.reshape(-1).view(np.uint8)
        if s.size < n:
            s = self.scratch_memory = alloc(n, np.uint8)
        self.x8, self.dy_t, self.x_t = s[:n // 3], s[n // 3:2 * n // 3], s[2 * n // 3:n]

    def buffer(self, flat, rows, cols):
        """The first rows x cols of a scratch buffer, as a matrix."""
        return flat[:rows * cols].reshape(rows, cols)

    def scale_inv(self, slot_index):
        """The device address of a slot's 1 / scale (a matmul's scale pointer)."""
        return self.meta_addr + 4 * (slot_index * self.meta.shape[1] + SCALE_INV)

    def cast_weights(self, params16):
        """Every matmul weight's E4M3 copy and transpose, from the bf16 weights."""
        for l in range(self.num_layers):
            for w in MATMUL_WEIGHTS:
                cast(getattr(params16, w)[l], self.meta, slot(l, w, WEIGHT), E4M3, self.w8[w, l],
                     self.w8_t[w, l])

    def calibrate(self, params16):
        """At start (and after new weights arrive from the host): cast the weights once to
        learn their amax, set the scales, cast again with them."""
        self.cast_weights(params16)
        update_scales(self.meta)
        self.cast_weights(params16)

    def restore(self, meta, params16, unscaled=False):
        """A saved run's meta (scales, amaxes, histories), and the fp8 weights cast by it;
        unscaled: the run had not yet measured its first step's scales."""
        if meta.shape != self.meta.shape:
            raise ValueError(f"fp8 state of shape {meta.shape}, not {self.meta.shape}")
        self.meta.copy_to_device(np.ascontiguousarray(meta, np.float32))
        self.cast_weights(params16)
        self.unscaled = bool(unscaled)
