"""
GPT-2 training in one flat Python module, in the style of llm.c's train_gpt2.c.

One float32 buffer holds every parameter, laid out exactly as an llm.c checkpoint;
the gradients and the AdamW moments are buffers of the same layout, and one more
buffer holds every activation that the backward pass reads. Named views are sliced
out of them once, up front. Each layer is a pair of functions over raw arrays,
`*_forward` and `*_backward`, JIT-compiled by Numba; the big matrix products go
through numpy's BLAS on 2-D views of the buffers.

Read it top to bottom: formats, model shape, layers, the model (forward, backward,
update), data, sampling, the training loop.
"""

import argparse
import copy
import glob
import json
import math
import mmap
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

# Numba's OpenMP threads and OpenBLAS's threads take turns on the same cores; threads
# that spin-wait after a parallel region would slow the other library's next call.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

# Numba may reorder float additions (so reductions vectorize), and nothing more: no
# finite-math flags (the attention mask and GELU need inf semantics), and no
# "contract"/"nsz", which made freshly JIT-compiled code round differently from the
# same functions loaded from Numba's cache, breaking bit-exact resume.
FASTMATH = {"reassoc"}

# -----------------------------------------------------------------------------
# File formats shared with llm.c. Each file starts with 256 little-endian int32.

HEADER_INTS = 256
CHECKPOINT_MAGIC, CHECKPOINT_VERSION = 20240326, 3
STATE_MAGIC, STATE_VERSION = 20240327, 2
TOKENS_MAGIC, TOKENS_VERSION = 20240520, 1
TOKENIZER_MAGIC = 20240328
EOT_TOKEN = 50256


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 1."""


def read_header(f, path, magic, versions):
    raw = f.read(HEADER_INTS * 4)
    if len(raw) != HEADER_INTS * 4:
        raise UserError(f"{path}: file too short for a {HEADER_INTS * 4}-byte header (not an llm.c file)")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != magic:
        raise UserError(f"{path}: bad magic number {header[0]} (expected {magic})")
    if header[1] not in versions:
        raise UserError(f"{path}: unsupported version {header[1]} (expected {' or '.join(map(str, versions))})")
    return header


def write_file_atomic(path, chunks):
    """Write byte chunks to path through a temp file, fsync and rename: a crash never
    leaves a half-written file where a good one was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            for chunk in chunks:
                f.write(memoryview(chunk).cast("B") if isinstance(chunk, np.ndarray) else chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -----------------------------------------------------------------------------
# Model shape, and the layout of the parameter and activation buffers


@dataclass(frozen=True)
class GPT2Config:
    max_seq_len: int = 1024
    vocab_size: int = 50257
    padded_vocab_size: int = 50304
    num_layers: int = 12
    num_heads: int = 12
    channels: int = 768


def padded_vocab(vocab_size):
    return ((vocab_size + 127) // 128) * 128


GPT2_SIZES = {12: (12, 768), 24: (16, 1024), 36: (20, 1280), 48: (25, 1600)}  # depth: (heads, channels)


def config_from_depth(descriptor, vocab_size=50257, max_seq_len=1024):
    """'d12' is GPT-2 124M, 'd24' 350M, 'd36' 774M, 'd48' 1558M; any other 'dN' has
    N layers, N heads and 64*N channels."""
    if not (descriptor.startswith("d") and descriptor[1:].isdigit() and int(descriptor[1:]) > 0):
        raise UserError(f"bad model descriptor {descriptor!r}: expected d12, d24, d6, ... or a checkpoint file")
    depth = int(descriptor[1:])
    heads, channels = GPT2_SIZES.get(depth, (depth, 64 * depth))
    return GPT2Config(max_seq_len, vocab_size, padded_vocab(vocab_size), depth, heads, channels)


def parameter_shapes(cfg):
    """The 16 parameter tensors in llm.c checkpoint order; weights are (out, in)."""
    C, L, Vp, maxT = cfg.channels, cfg.num_layers, cfg.padded_vocab_size, cfg.max_seq_len
    return [
        ("wte", (Vp, C)), ("wpe", (maxT, C)),
        ("ln1w", (L, C)), ("ln1b", (L, C)),
        ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)),
        ("attprojw", (L, C, C)), ("attprojb", (L, C)),
        ("ln2w", (L, C)), ("ln2b", (L, C)),
        ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
        ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
        ("lnfw", (C,)), ("lnfb", (C,)),
    ]


MATRIX_PARAMETERS = {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}  # weight decay applies to these


def activation_shapes(cfg, B, T):
    """Everything the forward pass writes and the backward pass reads, per layer.
    Rows are the B*T token positions, so every matmul sees a plain 2-D view."""
    C, L, NH, Vp, BT = cfg.channels, cfg.num_layers, cfg.num_heads, cfg.padded_vocab_size, B * T
    return [
        ("encoded", (BT, C)),
        ("ln1", (L, BT, C)), ("ln1_mean", (L, BT)), ("ln1_rstd", (L, BT)),
        ("qkv", (L, BT, 3 * C)),
        ("att", (L, B, NH, T, T)),       # softmax of the causal attention scores
        ("atty", (L, BT, C)),            # attention output, heads side by side
        ("residual2", (L, BT, C)),       # residual + attention projection
        ("ln2", (L, BT, C)), ("ln2_mean", (L, BT)), ("ln2_rstd", (L, BT)),
        ("fch", (L, BT, 4 * C)),         # MLP hidden, before GELU
        ("fch_gelu", (L, BT, 4 * C)),
        ("residual3", (L, BT, C)),       # residual2 + MLP projection
        ("lnf", (BT, C)), ("lnf_mean", (BT,)), ("lnf_rstd", (BT,)),
        ("logits", (BT, Vp)),            # becomes dlogits in place during backward
        ("logsumexp", (BT,)),            # per position, kept for the fused classifier backward
        ("losses", (BT,)),
    ]


def activation_grad_shapes(cfg, B, T):
    """Backward scratch: the residual stream's gradient plus one buffer per width,
    reused by every layer (backward never needs a layer's activation gradients again)."""
    C, BT = cfg.channels, B * T
    return [
        ("dresidual", (BT, C)),
        ("dC", (BT, C)),
        ("d3C", (BT, 3 * C)),
        ("d4C", (BT, 4 * C)),
        ("gemm_scratch", (max(4 * C * C, BT * C),)),  # for accumulating weight gradients
    ]


def buffer_size(shapes):
    return sum(int(np.prod(shape)) for _, shape in shapes)


def tensor_offsets(shapes):
    """(name, shape, start, end) of each tensor laid out back to back in a flat buffer."""
    out, offset = [], 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out.append((name, shape, offset, offset + n))
        offset += n
    return out


def slice_views(buffer, shapes):
    """Named views into one flat buffer, in order."""
    layout = tensor_offsets(shapes)
    assert layout[-1][3] == buffer.size
    return SimpleNamespace(**{name: buffer[start:end].reshape(shape) for name, shape, start, end in layout})


def parameter_offsets(cfg):
    """(name, start, end) of each parameter tensor in the flat buffer."""
    return [(name, start, end) for name, _, start, end in tensor_offsets(parameter_shapes(cfg))]


# -----------------------------------------------------------------------------
# Layers: each a forward/backward pair over raw float32 arrays. Weight-gradient
# writes take `accumulate`: False overwrites (the first micro-step), True adds.


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def encoder_forward(out, tokens, wte, wpe, T):
    # out[bt] = wte[token] + wpe[t]
    BT, C = out.shape
    for bt in prange(BT):
        token, t = tokens[bt], bt % T
        for c in range(C):
            out[bt, c] = wte[token, c] + wpe[t, c]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def encoder_backward(dwte, dwpe, dout, tokens, T, accumulate):
    # dwpe[t] (+)= sum over the batch; dwte[token] += dout (a scatter, so split by channel)
    BT, C = dout.shape
    block = 64
    for cb in prange((C + block - 1) // block):
        c0, c1 = cb * block, min(C, cb * block + block)
        if not accumulate:
            for t in range(dwpe.shape[0]):
                for c in range(c0, c1):
                    dwpe[t, c] = 0.0
        for bt in range(BT):
            token, t = tokens[bt], bt % T
            for c in range(c0, c1):
                dwpe[t, c] += dout[bt, c]
                dwte[token, c] += dout[bt, c]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def layernorm_forward(out, mean, rstd, inp, weight, bias):
    N, C = inp.shape
    eps = np.float32(1e-5)
    for i in prange(N):
        m = np.float32(0.0)
        for c in range(C):
            m += inp[i, c]
        m = m / np.float32(C)  # a float32 divisor: dividing by the int C would promote to float64
        v = np.float32(0.0)
        for c in range(C):
            d = inp[i, c] - m
            v += d * d
        v = v / np.float32(C)
        s = np.float32(1.0) / np.sqrt(v + eps)
        for c in range(C):
            out[i, c] = (inp[i, c] - m) * s * weight[c] + bias[c]
        mean[i] = m
        rstd[i] = s


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, accumulate):
    # dinp += ... (it is the residual stream's gradient); dweight, dbias (+)= ...
    N, C = inp.shape
    for i in prange(N):
        m, s = mean[i], rstd[i]
        dnorm_mean = np.float32(0.0)
        dnorm_norm_mean = np.float32(0.0)
        for c in range(C):
            norm = (inp[i, c] - m) * s
            dnorm = weight[c] * dout[i, c]
            dnorm_mean += dnorm
            dnorm_norm_mean += dnorm * norm
        dnorm_mean = dnorm_mean / np.float32(C)
        dnorm_norm_mean = dnorm_norm_mean / np.float32(C)
        for c in range(C):
            norm = (inp[i, c] - m) * s
            dnorm = weight[c] * dout[i, c]
            dinp[i, c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s
    block = 64
    for cb in prange((C + block - 1) // block):
        c0, c1 = cb * block, min(C, cb * block + block)
        if not accumulate:
            for c in range(c0, c1):
                dweight[c] = 0.0
                dbias[c] = 0.0
        for i in range(N):
            m, s = mean[i], rstd[i]
            for c in range(c0, c1):
                dbias[c] += dout[i, c]
                dweight[c] += (inp[i, c] - m) * s * dout[i, c]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def bias_forward(out, bias):
    N, OC = out.shape
    for i in prange(N):
        for o in range(OC):
            out[i, o] += bias[o]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def bias_backward(dbias, dout, accumulate):
    N, OC = dout.shape
    block = 64
    for ob in prange((OC + block - 1) // block):
        o0, o1 = ob * block, min(OC, ob * block + block)
        if not accumulate:
            for o in range(o0, o1):
                dbias[o] = 0.0
        for i in range(N):
            for o in range(o0, o1):
                dbias[o] += dout[i, o]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def add_inplace(out, x):
    flat_out, flat_x = out.reshape(-1), x.reshape(-1)
    for i in prange(flat_out.size):
        flat_out[i] += flat_x[i]


def matmul_forward(out, inp, weight, bias):
    # out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias: BLAS on 2-D views, no copies
    np.matmul(inp, weight.T, out=out)
    if bias is not None:
        bias_forward(out, bias)


def gemm_weight_grad(dweight, dout, inp, accumulate, scratch):
    # dweight (OC, C) (+)= dout (N, OC)^T @ inp (N, C). Accumulating goes through a
    # bounded scratch, a block of output rows at a time, so nothing is allocated.
    if not accumulate:
        np.matmul(dout.T, inp, out=dweight)
        return
    OC, C = dweight.shape
    rows = max(1, min(OC, scratch.size // C))
    for r0 in range(0, OC, rows):
        r1 = min(OC, r0 + rows)
        block = scratch[:(r1 - r0) * C].reshape(r1 - r0, C)
        np.matmul(dout[:, r0:r1].T, inp, out=block)
        add_inplace(dweight[r0:r1], block)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, accumulate, scratch):
    # dinp = dout @ weight (overwritten: every caller hands a scratch buffer)
    np.matmul(dout, weight, out=dinp)
    gemm_weight_grad(dweight, dout, inp, accumulate, scratch)
    if dbias is not None:
        bias_backward(dbias, dout, accumulate)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def attention_forward(out, att, qkv, B, T, NH):
    # qkv rows hold [q | k | v], each C wide, heads of hs channels side by side.
    # att[b, h, t, :] = softmax(q_t . k_t2 / sqrt(hs)) over t2 <= t; out = att @ v
    C = qkv.shape[1] // 3
    hs = C // NH
    scale = np.float32(1.0) / np.float32(np.sqrt(hs))
    for bht in prange(B * NH * T):
        b, h, t = bht // (NH * T), (bht // T) % NH, bht % T
        q = qkv[b * T + t, h * hs:(h + 1) * hs]
        o = out[b * T + t, h * hs:(h + 1) * hs]
        att_row = att[b, h, t]
        maxval = np.float32(-np.inf)
        for t2 in range(t + 1):
            k = qkv[b * T + t2, C + h * hs:C + (h + 1) * hs]
            s = np.float32(0.0)
            for i in range(hs):
                s += q[i] * k[i]
            s *= scale
            att_row[t2] = s
            maxval = max(maxval, s)
        total = np.float32(0.0)
        for t2 in range(t + 1):
            e = np.exp(att_row[t2] - maxval)
            att_row[t2] = e
            total += e
        inv_total = np.float32(1.0) / total
        for t2 in range(t + 1):
            att_row[t2] *= inv_total
        for t2 in range(t + 1, T):
            att_row[t2] = 0.0  # the causal mask
        o[:] = 0.0
        for t2 in range(t + 1):
            a = att_row[t2]
            v = qkv[b * T + t2, 2 * C + h * hs:2 * C + (h + 1) * hs]
            for i in range(hs):
                o[i] += a * v[i]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def attention_backward(dqkv, dout, qkv, att, B, T, NH):
    # One (batch, head) per iteration: it owns that head's dq, dk, dv for all t.
    C = qkv.shape[1] // 3
    hs = C // NH
    scale = np.float32(1.0) / np.float32(np.sqrt(hs))
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        q_cols, k_cols, v_cols = h * hs, C + h * hs, 2 * C + h * hs
        datt = np.empty(T, dtype=qkv.dtype)
        for t in range(T):
            dqkv[b * T + t, q_cols:q_cols + hs] = 0.0
            dqkv[b * T + t, k_cols:k_cols + hs] = 0.0
            dqkv[b * T + t, v_cols:v_cols + hs] = 0.0
        for t in range(T):
            q = qkv[b * T + t, q_cols:q_cols + hs]
            dq = dqkv[b * T + t, q_cols:q_cols + hs]
            do = dout[b * T + t, h * hs:(h + 1) * hs]
            att_row = att[b, h, t]
            # through out = att @ v
            for t2 in range(t + 1):
                v = qkv[b * T + t2, v_cols:v_cols + hs]
                dv = dqkv[b * T + t2, v_cols:v_cols + hs]
                a = att_row[t2]
                d = np.float32(0.0)
                for i in range(hs):
                    d += do[i] * v[i]
                for i in range(hs):
                    dv[i] += a * do[i]
                datt[t2] = d
            # through the softmax: dpre = att * (datt - sum(att * datt))
            dot = np.float32(0.0)
            for t2 in range(t + 1):
                dot += att_row[t2] * datt[t2]
            for t2 in range(t + 1):
                dpre = att_row[t2] * (datt[t2] - dot) * scale
                k = qkv[b * T + t2, k_cols:k_cols + hs]
                dk = dqkv[b * T + t2, k_cols:k_cols + hs]
                for i in range(hs):
                    dq[i] += dpre * k[i]
                for i in range(hs):
                    dk[i] += dpre * q[i]


GELU_SCALE = np.float32(math.sqrt(2.0 / math.pi))
GELU_CUBE = np.float32(0.044715)
TANH_CLAMP = np.float32(7.90531110763549805)  # beyond this, tanh is +-1 in float32
TANH_P = [np.float32(c) for c in (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
                                   5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
                                   -2.76076847742355e-16)]
TANH_Q = [np.float32(c) for c in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
                                   1.19825839466702e-06)]
P1, P3, P5, P7, P9, P11, P13 = TANH_P
Q0, Q2, Q4, Q6 = TANH_Q


@njit(inline="always", fastmath=FASTMATH)
def tanh_f32(x):
    # tanh as a 13/6 rational function (the float32 minimax fit that Eigen uses):
    # plain arithmetic, so loops over it vectorize; within a few ulps of tanhf
    x = min(max(x, -TANH_CLAMP), TANH_CLAMP)
    x2 = x * x
    p = x2 * P13 + P11
    p = x2 * p + P9
    p = x2 * p + P7
    p = x2 * p + P5
    p = x2 * p + P3
    p = x2 * p + P1
    q = x2 * Q6 + Q4
    q = x2 * q + Q2
    q = x2 * q + Q0
    return x * p / q


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def gelu_forward(out, inp):
    # tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    flat_out, flat_inp = out.reshape(-1), inp.reshape(-1)
    for i in prange(flat_inp.size):
        x = flat_inp[i]
        u = GELU_SCALE * (x + GELU_CUBE * x * x * x)
        flat_out[i] = np.float32(0.5) * x * (np.float32(1.0) + tanh_f32(u))


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def gelu_backward(dinout, inp):
    # in place: d(inp) = gelu'(inp) * d(out)
    flat_d, flat_inp = dinout.reshape(-1), inp.reshape(-1)
    for i in prange(flat_inp.size):
        x = flat_inp[i]
        u = GELU_SCALE * (x + GELU_CUBE * x * x * x)
        th = tanh_f32(u)
        sech2 = np.float32(1.0) - th * th
        local = np.float32(0.5) * (np.float32(1.0) + th) + \
            np.float32(0.5) * x * sech2 * GELU_SCALE * (np.float32(1.0) + np.float32(3.0) * GELU_CUBE * x * x)
        flat_d[i] = local * flat_d[i]


LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
EXP_TAYLOR = [np.float32(1.0 / math.factorial(k)) for k in range(10)]
E0, E1, E2, E3, E4, E5, E6, E7, E8, E9 = EXP_TAYLOR


@njit(inline="always", fastmath=FASTMATH)
def exp_shifted(out, x, shift, n, exponent_bits):
    # out[:n] = exp(x[:n] - shift) for x <= shift, in loops that vectorize (a call to
    # expf does not): 2^t = 2^k * e^(f ln2) with k = floor(t), the power of two built
    # from its exponent bits and e^(f ln2), f in [0, 1), from a degree-9 Taylor
    # polynomial (truncation error 7e-9, so float32 rounding dominates; the rounding of
    # t grows with |t|, to a few 1e-6 relative where exp is below 1e-30). Float32 only.
    for j in range(n):
        t = max((x[j] - shift) * LOG2E, np.float32(-126.0))
        k = np.floor(t)
        f = (t - k) * LN2
        p = E9 * f + E8
        p = p * f + E7
        p = p * f + E6
        p = p * f + E5
        p = p * f + E4
        p = p * f + E3
        p = p * f + E2
        p = p * f + E1
        out[j] = p * f + E0
        exponent_bits[j] = (np.int32(k) + np.int32(127)) << 23
    powers_of_two = exponent_bits.view(np.float32)
    for j in range(n):
        out[j] *= powers_of_two[j]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def crossentropy_forward(losses, logsumexp, logits, targets, V):
    # softmax over the first V columns (padding excluded); a target of -1 is masked
    BT = logits.shape[0]
    for i in prange(BT):
        row = logits[i]
        maxval = np.float32(-np.inf)
        for j in range(V):
            maxval = max(maxval, row[j])
        exps = np.empty(V, dtype=np.float32)
        exponent_bits = np.empty(V, dtype=np.int32)
        exp_shifted(exps, row, maxval, V, exponent_bits)
        total = np.float32(0.0)
        for j in range(V):
            total += exps[j]
        lse = maxval + np.log(total)
        logsumexp[i] = lse
        losses[i] = lse - row[targets[i]] if targets[i] >= 0 else np.float32(0.0)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def crossentropy_backward(logits, logsumexp, targets, V, dloss):
    # in place: logits become dlogits = (softmax - onehot) * dloss; masked rows and
    # the padding columns get zero
    BT, Vp = logits.shape
    for i in prange(BT):
        row = logits[i]
        target = targets[i]
        if target < 0:
            row[:] = 0.0
            continue
        exponent_bits = np.empty(V, dtype=np.int32)
        exp_shifted(row, row, logsumexp[i], V, exponent_bits)
        for j in range(V):
            row[j] *= dloss
        row[target] -= dloss
        row[V:] = 0.0


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def sum_of_squares(x):
    # float64 accumulation: 124M float32 squares summed in float32 would drift
    total = 0.0
    for i in prange(x.size):
        total += np.float64(x[i]) * np.float64(x[i])
    return total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def adamw_update(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, bias_correction1,
                 bias_correction2, grad_scale):
    # one streaming pass; decoupled weight decay as in llm.c and torch.optim.AdamW.
    # Returns the sum of squares of the (unscaled) gradients it read, in float64, so
    # the gradient norm costs no extra pass when there is no clipping.
    one = np.float32(1.0)
    sum_sq = 0.0
    for i in prange(params.size):
        sum_sq += np.float64(grads[i]) * np.float64(grads[i])
        g = grads[i] * grad_scale
        mi = beta1 * m[i] + (one - beta1) * g
        vi = beta2 * v[i] + (one - beta2) * g * g
        m[i] = mi
        v[i] = vi
        m_hat = mi / bias_correction1
        v_hat = vi / bias_correction2
        params[i] -= lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * params[i])
    return sum_sq


# -----------------------------------------------------------------------------
# The model: buffers, checkpoint I/O, forward, backward, update


def zeros_f32(n):
    """A zeroed float32 buffer of n values. Big ones are anonymous memory mapped with
    MAP_POPULATE: the kernel faults every page in at once, which on the VMs we measured
    runs about 6x faster than first-touch page faults inside the first training step."""
    if n * 4 < (1 << 24) or not hasattr(mmap, "MAP_POPULATE"):
        return np.zeros(n, dtype=np.float32)
    memory = mmap.mmap(-1, n * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return np.frombuffer(memory, dtype=np.float32)


class GPT2:
    """Holds the buffers and their views; all the work is in the functions below."""

    def __init__(self, cfg):
        self.cfg = cfg
        shapes = parameter_shapes(cfg)
        self.num_parameters = buffer_size(shapes)
        self.params_memory = zeros_f32(self.num_parameters)
        self.params = slice_views(self.params_memory, shapes)
        # gradients and AdamW moments are allocated on first use (eval and sampling need none)
        self.grads_memory = self.m_memory = self.v_memory = None
        self.grads = None
        self.B = self.T = 0
        self.acts = self.dacts = None
        self.step = 0  # AdamW steps taken
        self.inputs = self.targets = None  # of the last forward pass, flat int32
        self.num_valid_targets = 0


INIT_BLOCK = 1 << 20  # parameters drawn per independent random stream


def fill_standard_normal(buffer, seed):
    """Standard normals into a flat float32 buffer, block k from its own stream
    SeedSequence([seed, k]): the result does not depend on the thread count, and the
    blocks are drawn on every core (numpy's generators release the GIL)."""
    def fill(k):
        rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
        rng.standard_normal(out=buffer[k * INIT_BLOCK:(k + 1) * INIT_BLOCK], dtype=np.float32)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(fill, range((buffer.size + INIT_BLOCK - 1) // INIT_BLOCK)))


def gpt2_init_random(cfg, seed):
    """llm.c's scheme: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2L),
    zero biases, unit LayerNorm weights; the padded vocab rows stay zero."""
    model = GPT2(cfg)
    fill_standard_normal(model.params_memory, seed)
    p = model.params
    residual_std = np.float32(0.02 / math.sqrt(2 * cfg.num_layers))
    for name, _ in parameter_shapes(cfg):
        view = getattr(p, name)
        if name in ("wte", "wpe", "qkvw", "fcw"):
            view *= np.float32(0.02)
        elif name in ("attprojw", "fcprojw"):
            view *= residual_std
        elif name in ("ln1w", "ln2w", "lnfw"):
            view[...] = 1.0
        else:
            view[...] = 0.0  # biases
    p.wte[cfg.vocab_size:] = 0.0
    return model


def read_checkpoint(path):
    """Load an llm.c version-3 (float32) checkpoint into a new model."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        header = read_header(f, path, CHECKPOINT_MAGIC, (3, 5))
        if header[1] == 5:
            raise UserError(f"{path}: bfloat16 checkpoints (version 5) are not supported; write a float32 one (version 3)")
        maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
        if min(maxT, V, L, NH, C) <= 0 or C % NH or Vp < V:
            raise UserError(f"{path}: header describes an impossible model (maxT={maxT}, V={V}, L={L}, NH={NH}, C={C}, Vp={Vp})")
        cfg = GPT2Config(maxT, V, Vp, L, NH, C)
        model = GPT2(cfg)
        expected = HEADER_INTS * 4 + model.num_parameters * 4
        actual = os.path.getsize(path)
        if actual != expected:
            raise UserError(f"{path}: size {actual} bytes, but its header describes {expected} bytes (truncated or corrupt)")
        f.readinto(memoryview(model.params_memory).cast("B"))
    return model


def checkpoint_header(cfg):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [CHECKPOINT_MAGIC, CHECKPOINT_VERSION, cfg.max_seq_len, cfg.vocab_size,
                  cfg.num_layers, cfg.num_heads, cfg.channels, cfg.padded_vocab_size]
    return header


def write_checkpoint(model, path):
    write_file_atomic(path, [checkpoint_header(model.cfg), model.params_memory])


def ensure_activations(model, B, T):
    """Allocate the activation buffers for batch shape (B, T), once."""
    cfg = model.cfg
    if T > cfg.max_seq_len:
        raise UserError(f"sequence length T={T} exceeds the model's max_seq_len={cfg.max_seq_len}")
    if B <= 0 or T <= 0:
        raise UserError(f"batch size and sequence length must be positive (got B={B}, T={T})")
    if (model.B, model.T) == (B, T):
        return
    shapes = activation_shapes(cfg, B, T)
    model.acts_memory = zeros_f32(buffer_size(shapes))
    model.acts = slice_views(model.acts_memory, shapes)
    model.dacts = None
    model.B, model.T = B, T


def ensure_optimizer_buffers(model):
    """Gradients and AdamW moments, allocated once (eval and sampling need none)."""
    if model.grads_memory is None:
        n = model.num_parameters
        model.grads_memory = zeros_f32(n)
        model.grads = slice_views(model.grads_memory, parameter_shapes(model.cfg))
        model.m_memory = zeros_f32(n)
        model.v_memory = zeros_f32(n)


def ensure_training_buffers(model):
    """Optimizer buffers plus the backward scratch for the current (B, T)."""
    ensure_optimizer_buffers(model)
    if model.dacts is None:
        shapes = activation_grad_shapes(model.cfg, model.B, model.T)
        model.dacts_memory = zeros_f32(buffer_size(shapes))
        model.dacts = slice_views(model.dacts_memory, shapes)


def check_tokens(tokens, vocab_size, what):
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens.max() if tokens.max() >= vocab_size else tokens.min()
        raise UserError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def gpt2_forward(model, inputs, targets=None):
    """inputs, targets: int32 (B, T). Fills model.acts; returns the mean loss over the
    unmasked targets (targets of -1 are masked), or None without targets."""
    cfg = model.cfg
    B, T = inputs.shape
    ensure_activations(model, B, T)
    L, NH, V = cfg.num_layers, cfg.num_heads, cfg.vocab_size
    p, a = model.params, model.acts
    tokens = np.ascontiguousarray(inputs, dtype=np.int32).reshape(-1)
    check_tokens(tokens, V, "inputs")  # the kernels index wte with them unchecked
    model.inputs = tokens

    encoder_forward(a.encoded, tokens, p.wte, p.wpe, T)
    residual = a.encoded
    for l in range(L):
        layernorm_forward(a.ln1[l], a.ln1_mean[l], a.ln1_rstd[l], residual, p.ln1w[l], p.ln1b[l])
        matmul_forward(a.qkv[l], a.ln1[l], p.qkvw[l], p.qkvb[l])
        attention_forward(a.atty[l], a.att[l], a.qkv[l], B, T, NH)
        matmul_forward(a.residual2[l], a.atty[l], p.attprojw[l], p.attprojb[l])
        add_inplace(a.residual2[l], residual)
        layernorm_forward(a.ln2[l], a.ln2_mean[l], a.ln2_rstd[l], a.residual2[l], p.ln2w[l], p.ln2b[l])
        matmul_forward(a.fch[l], a.ln2[l], p.fcw[l], p.fcb[l])
        gelu_forward(a.fch_gelu[l], a.fch[l])
        matmul_forward(a.residual3[l], a.fch_gelu[l], p.fcprojw[l], p.fcprojb[l])
        add_inplace(a.residual3[l], a.residual2[l])
        residual = a.residual3[l]
    layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, residual, p.lnfw, p.lnfb)
    matmul_forward(a.logits, a.lnf, p.wte, None)  # tied embedding; padded rows give 0

    if targets is None:
        model.targets = None
        return None
    model.targets = np.ascontiguousarray(targets, dtype=np.int32).reshape(-1)
    if model.targets.shape != tokens.shape:
        raise UserError(f"targets have {model.targets.size} positions, inputs {tokens.size}")
    check_tokens(model.targets[model.targets != -1], V, "targets (-1 masks a position)")
    crossentropy_forward(a.losses, a.logsumexp, a.logits, model.targets, V)
    model.num_valid_targets = int(np.count_nonzero(model.targets >= 0))
    if model.num_valid_targets == 0:
        return 0.0
    return float(a.losses.sum(dtype=np.float64) / model.num_valid_targets)


def gpt2_backward(model, accumulate=False, loss_scale=1.0):
    """Gradients of loss_scale * mean loss of the last forward. accumulate=False
    overwrites the parameter gradients, True adds to them (gradient accumulation)."""
    if model.targets is None:
        raise RuntimeError("gpt2_backward needs a forward pass with targets first")
    ensure_training_buffers(model)
    cfg = model.cfg
    B, T = model.B, model.T
    L, NH, V = cfg.num_layers, cfg.num_heads, cfg.vocab_size
    p, g, a, d = model.params, model.grads, model.acts, model.dacts
    scratch = d.gemm_scratch

    dloss = np.float32(loss_scale / model.num_valid_targets) if model.num_valid_targets else np.float32(0.0)
    crossentropy_backward(a.logits, a.logsumexp, model.targets, V, dloss)
    dlogits = a.logits
    # classifier: logits = lnf @ wte^T
    matmul_backward(d.dC, g.wte, None, dlogits, a.lnf, p.wte, accumulate, scratch)
    d.dresidual.fill(0.0)
    last_residual = a.residual3[L - 1] if L > 0 else a.encoded
    layernorm_backward(d.dresidual, g.lnfw, g.lnfb, d.dC, last_residual, p.lnfw, a.lnf_mean, a.lnf_rstd, accumulate)

    for l in range(L - 1, -1, -1):
        residual = a.residual3[l - 1] if l > 0 else a.encoded
        # MLP: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2))))
        matmul_backward(d.d4C, g.fcprojw[l], g.fcprojb[l], d.dresidual, a.fch_gelu[l], p.fcprojw[l], accumulate, scratch)
        gelu_backward(d.d4C, a.fch[l])
        matmul_backward(d.dC, g.fcw[l], g.fcb[l], d.d4C, a.ln2[l], p.fcw[l], accumulate, scratch)
        layernorm_backward(d.dresidual, g.ln2w[l], g.ln2b[l], d.dC, a.residual2[l], p.ln2w[l],
                           a.ln2_mean[l], a.ln2_rstd[l], accumulate)
        # attention: residual2 = residual + attproj(attention(qkv(ln1(residual))))
        matmul_backward(d.dC, g.attprojw[l], g.attprojb[l], d.dresidual, a.atty[l], p.attprojw[l], accumulate, scratch)
        attention_backward(d.d3C, d.dC, a.qkv[l], a.att[l], B, T, NH)
        matmul_backward(d.dC, g.qkvw[l], g.qkvb[l], d.d3C, a.ln1[l], p.qkvw[l], accumulate, scratch)
        layernorm_backward(d.dresidual, g.ln1w[l], g.ln1b[l], d.dC, residual, p.ln1w[l],
                           a.ln1_mean[l], a.ln1_rstd[l], accumulate)
    encoder_backward(g.wte, g.wpe, d.dresidual, model.inputs, T, accumulate)


def gpt2_update(model, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                weight_decay_mode="matrices", grad_clip=0.0):
    """One AdamW step over the whole parameter buffer. weight_decay_mode 'all' decays
    every tensor (llm.c's CPU trainer), 'matrices' only the 2-D weights (nanoGPT).
    Clips the gradient to global norm grad_clip when > 0. Returns the norm before clipping."""
    model.step += 1
    norm = math.sqrt(sum_of_squares(model.grads_memory)) if grad_clip > 0 else None  # clipping needs it first
    grad_scale = grad_clip / (norm + 1e-6) if norm is not None and norm > grad_clip else 1.0
    f32 = np.float32
    common = (f32(lr), f32(beta1), f32(beta2), f32(eps))
    corrections = (f32(1.0 - beta1 ** model.step), f32(1.0 - beta2 ** model.step), f32(grad_scale))
    if weight_decay_mode == "all" or weight_decay == 0.0:
        groups = [(0, model.num_parameters, weight_decay)]
    elif weight_decay_mode == "matrices":
        groups = []
        for name, start, end in parameter_offsets(model.cfg):
            decay = weight_decay if name in MATRIX_PARAMETERS else 0.0
            if groups and groups[-1][2] == decay and groups[-1][1] == start:
                groups[-1] = (groups[-1][0], end, decay)  # merge neighbours with the same decay
            else:
                groups.append((start, end, decay))
    else:
        raise ValueError(f"weight_decay_mode must be 'all' or 'matrices', not {weight_decay_mode!r}")
    sum_sq = 0.0
    for start, end, decay in groups:
        sum_sq += adamw_update(model.params_memory[start:end], model.grads_memory[start:end],
                               model.m_memory[start:end], model.v_memory[start:end], *common, f32(decay), *corrections)
    return norm if norm is not None else math.sqrt(sum_sq)


# -----------------------------------------------------------------------------
# Data: llm.c token files (256-int32 header, then uint16 tokens)


def read_token_file(path, vocab_size=None):
    """Memory-map an llm.c token file after validating its header, size and ids."""
    if not os.path.isfile(path):
        raise UserError(f"token file not found: {path}")
    with open(path, "rb") as f:
        header = read_header(f, path, TOKENS_MAGIC, (TOKENS_VERSION,))
    ntok = int(header[2])
    expected = HEADER_INTS * 4 + 2 * ntok
    actual = os.path.getsize(path)
    if ntok <= 0 or actual != expected:
        raise UserError(f"{path}: size {actual} bytes, but its header promises {ntok} tokens ({expected} bytes): truncated or corrupt")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(ntok,))
    if vocab_size is not None:
        check_tokens(tokens, vocab_size, path)
    return tokens


class DataLoader:
    """Batches of B sequences of T tokens (inputs, and targets shifted by one) from one
    or more token files. A file of n tokens holds (n-1)//T samples at stride T; in
    order, a batch is llm.c's contiguous B*T+1 tokens. With shuffle, each epoch visits
    every file's samples in a seeded random order. The position is three integers,
    so a checkpoint can save it and resume exactly."""

    def __init__(self, pattern, B, T, vocab_size, shuffle=False, seed=0):
        paths = sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else [])
        if not paths:
            raise UserError(f"no token file matches {pattern!r} (run `make data`, or pass -i/-j)")
        self.files = [read_token_file(path, vocab_size) for path in paths]
        self.paths = paths
        self.B, self.T, self.shuffle, self.seed = B, T, shuffle, seed
        for path, tokens in zip(paths, self.files):
            if (tokens.size - 1) // T < B:
                raise UserError(f"{path}: {tokens.size} tokens is too few for one batch of B={B}, T={T}")
        self.inputs = np.empty((B, T), dtype=np.int32)
        self.targets = np.empty((B, T), dtype=np.int32)
        self.reset()

    def reset(self):
        self.set_state({"epoch": 0, "file": 0, "batch": 0})

    def state(self):
        return {"epoch": self.epoch, "file": self.file_index, "batch": self.batch_index}

    def set_state(self, state):
        self.epoch, self.file_index, self.batch_index = state["epoch"], state["file"], state["batch"]
        self._order = None

    def batches_in_file(self, file_index):
        return ((self.files[file_index].size - 1) // self.T) // self.B

    def sample_order(self):
        if self._order is None:
            n = (self.files[self.file_index].size - 1) // self.T
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch, self.file_index])
                self._order = rng.permutation(n)
            else:
                self._order = np.arange(n)
        return self._order

    def next_batch(self):
        if self.batch_index >= self.batches_in_file(self.file_index):
            self.batch_index = 0
            self.file_index += 1
            if self.file_index == len(self.files):
                self.file_index = 0
                self.epoch += 1
            self._order = None
        tokens = self.files[self.file_index]
        samples = self.sample_order()[self.batch_index * self.B:(self.batch_index + 1) * self.B]
        T = self.T
        for row, sample in enumerate(samples):
            start = int(sample) * T
            chunk = tokens[start:start + T + 1]
            self.inputs[row] = chunk[:-1]
            self.targets[row] = chunk[1:]
        self.batch_index += 1
        return self.inputs, self.targets

    def num_batches(self):
        return sum(self.batches_in_file(i) for i in range(len(self.files)))


# -----------------------------------------------------------------------------
# Sampling: llm.c's xorshift* generator, and generation with a KV cache


def random_u32(state):
    """xorshift*, as llm.c: returns (u32, new state); state is a Python int < 2**64."""
    mask = (1 << 64) - 1
    state ^= state >> 12
    state ^= (state << 25) & mask
    state ^= state >> 27
    return ((state * 0x2545F4914F6CDD1D) & mask) >> 32, state


def random_f32(state):
    u, state = random_u32(state)
    return (u >> 8) / 16777216.0, state


def sample_from_logits(logits, vocab_size, temperature, top_k, coin):
    """Pick a token with a uniform coin in [0, 1): softmax over the first vocab_size
    logits, optionally sharpened by temperature and cut to the top_k; temperature 0
    is greedy. With temperature 1 and no top_k this is llm.c's sample_mult."""
    logits = logits[:vocab_size].astype(np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < vocab_size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits >= kth, logits, -np.inf)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, coin, side="right"))
    return min(index, vocab_size - 1)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def attention_decode(out, qkv, k_cache, v_cache, pos, NH):
    # one new position: store its k, v in the cache, attend over positions 0..pos
    C = qkv.shape[1] // 3
    hs = C // NH
    scale = np.float32(1.0) / np.float32(np.sqrt(hs))
    for c in range(C):
        k_cache[pos, c] = qkv[0, C + c]
        v_cache[pos, c] = qkv[0, 2 * C + c]
    for h in prange(NH):
        scores = np.empty(pos + 1, dtype=np.float32)
        maxval = np.float32(-np.inf)
        for t2 in range(pos + 1):
            s = np.float32(0.0)
            for i in range(hs):
                s += qkv[0, h * hs + i] * k_cache[t2, h * hs + i]
            s *= scale
            scores[t2] = s
            if s > maxval:
                maxval = s
        total = np.float32(0.0)
        for t2 in range(pos + 1):
            scores[t2] = np.exp(scores[t2] - maxval)
            total += scores[t2]
        for i in range(hs):
            acc = np.float32(0.0)
            for t2 in range(pos + 1):
                acc += scores[t2] * v_cache[t2, h * hs + i]
            out[0, h * hs + i] = acc / total


class KVCache:
    """Keys and values of every layer for one sequence, plus one-token scratch."""

    def __init__(self, cfg):
        C, L, maxT = cfg.channels, cfg.num_layers, cfg.max_seq_len
        self.k = np.zeros((L, maxT, C), dtype=np.float32)
        self.v = np.zeros((L, maxT, C), dtype=np.float32)
        self.x = np.zeros((1, C), dtype=np.float32)
        self.ln = np.zeros((1, C), dtype=np.float32)
        self.qkv = np.zeros((1, 3 * C), dtype=np.float32)
        self.atty = np.zeros((1, C), dtype=np.float32)
        self.proj = np.zeros((1, C), dtype=np.float32)
        self.fch = np.zeros((1, 4 * C), dtype=np.float32)
        self.fch_gelu = np.zeros((1, 4 * C), dtype=np.float32)
        self.mean = np.zeros(1, dtype=np.float32)
        self.rstd = np.zeros(1, dtype=np.float32)
        self.logits = np.zeros((1, cfg.padded_vocab_size), dtype=np.float32)
        self.length = 0


def gpt2_decode_step(model, cache, token):
    """Feed one token at position cache.length through the model using the cache;
    returns the logits for the next token (a view into the cache)."""
    cfg, p, c = model.cfg, model.params, cache
    pos = c.length
    if pos >= cfg.max_seq_len:
        raise UserError(f"generation reached the model's max_seq_len={cfg.max_seq_len}")
    c.x[0] = p.wte[token] + p.wpe[pos]
    for l in range(cfg.num_layers):
        layernorm_forward(c.ln, c.mean, c.rstd, c.x, p.ln1w[l], p.ln1b[l])
        matmul_forward(c.qkv, c.ln, p.qkvw[l], p.qkvb[l])
        attention_decode(c.atty, c.qkv, c.k[l], c.v[l], pos, cfg.num_heads)
        matmul_forward(c.proj, c.atty, p.attprojw[l], p.attprojb[l])
        c.x += c.proj
        layernorm_forward(c.ln, c.mean, c.rstd, c.x, p.ln2w[l], p.ln2b[l])
        matmul_forward(c.fch, c.ln, p.fcw[l], p.fcb[l])
        gelu_forward(c.fch_gelu, c.fch)
        matmul_forward(c.proj, c.fch_gelu, p.fcprojw[l], p.fcprojb[l])
        c.x += c.proj
    layernorm_forward(c.ln, c.mean, c.rstd, c.x, p.lnfw, p.lnfb)
    matmul_forward(c.logits, c.ln, p.wte, None)
    c.length = pos + 1
    return c.logits[0]


def start_token(cfg):
    """<|endoftext|> starts a sample; a model with a smaller vocabulary uses its last id."""
    return min(EOT_TOKEN, cfg.vocab_size - 1)


def generate(model, prompt_tokens, num_tokens, temperature=1.0, top_k=0, rng_state=1337, use_kv_cache=True):
    """Continue prompt_tokens by num_tokens sampled tokens. With use_kv_cache=False each
    new token reruns the whole sequence through gpt2_forward (llm.c's way), for
    checking and timing. Returns (new tokens, rng_state)."""
    cfg = model.cfg
    prompt = [int(t) for t in prompt_tokens] or [start_token(cfg)]
    check_tokens(np.array(prompt), cfg.vocab_size, "prompt")
    total = len(prompt) + num_tokens
    if total > cfg.max_seq_len:
        raise UserError(f"prompt ({len(prompt)} tokens) + {num_tokens} new tokens exceeds max_seq_len={cfg.max_seq_len}")
    sequence = list(prompt)
    if use_kv_cache:
        cache = KVCache(cfg)
        for token in prompt[:-1]:
            gpt2_decode_step(model, cache, token)

        def next_token_logits():  # feeds the newest token only
            return gpt2_decode_step(model, cache, sequence[-1])
    else:
        scratch_model = copy.copy(model)  # shares the parameters, owns its activations
        scratch_model.B = scratch_model.T = 0
        padded = np.zeros((1, total), dtype=np.int32)

        def next_token_logits():  # reruns everything; causal, so the padding does not matter
            padded[0, :len(sequence)] = sequence
            gpt2_forward(scratch_model, padded)
            return scratch_model.acts.logits[len(sequence) - 1]
    for _ in range(num_tokens):
        logits = next_token_logits()
        coin, rng_state = random_f32(rng_state)
        sequence.append(sample_from_logits(logits, cfg.vocab_size, temperature, top_k, coin))
    return sequence[len(prompt):], rng_state


# -----------------------------------------------------------------------------
# --profile: time per layer kind. The layer functions above are looked up by name
# at call time, so wrapping them here changes nothing else.

PROFILED_LAYERS = [
    "encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
    "matmul_forward", "matmul_backward", "attention_forward", "attention_backward",
    "gelu_forward", "gelu_backward", "add_inplace", "crossentropy_forward", "crossentropy_backward",
    "sum_of_squares", "adamw_update",
]


class LayerProfile:
    """Accumulates wall time per layer function while enabled."""

    def __init__(self):
        self.seconds = {}
        self.calls = {}
        self.steps = 0
        self.depth = 0
        self.active = True
        module = sys.modules[__name__]
        for name in PROFILED_LAYERS:
            setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            if self.depth or not self.active:  # inside another profiled layer: counted there
                return fn(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1
        timed.__wrapped__ = fn
        return timed

    def reset(self):
        self.seconds.clear()
        self.calls.clear()
        self.steps = 0

    def table(self, step_seconds):
        steps = max(1, self.steps)
        lines = [f"{'layer':<22}{'ms/step':>10}{'calls/step':>12}{'share':>8}"]
        for name, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            ms = 1000 * seconds / steps
            lines.append(f"{name:<22}{ms:>10.1f}{self.calls[name] / steps:>12.0f}{seconds / max(step_seconds, 1e-9):>8.1%}")
        covered = sum(self.seconds.values())
        lines.append(f"{'(other python)':<22}{1000 * (step_seconds - covered) / steps:>10.1f}")
        return "\n".join(lines)


# -----------------------------------------------------------------------------
# Hugging Face interop: GPT-2 weights from/to a transformers folder (config.json,
# model.safetensors or pytorch_model.bin), as save_pretrained writes and
# GPT2LMHeadModel.from_pretrained reads.

HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_LAYER_NAMES = [  # (our tensor, HF name within block i)
    ("ln1w", "ln_1.weight"), ("ln1b", "ln_1.bias"),
    ("qkvw", "attn.c_attn.weight"), ("qkvb", "attn.c_attn.bias"),
    ("attprojw", "attn.c_proj.weight"), ("attprojb", "attn.c_proj.bias"),
    ("ln2w", "ln_2.weight"), ("ln2b", "ln_2.bias"),
    ("fcw", "mlp.c_fc.weight"), ("fcb", "mlp.c_fc.bias"),
    ("fcprojw", "mlp.c_proj.weight"), ("fcprojb", "mlp.c_proj.bias"),
]
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


def bfloat16_to_float32(bits):
    """bfloat16 is the top half of a float32: widen the uint16 bit patterns exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path):
    """name -> float32 array, from the safetensors layout: u64 header size, JSON, raw data."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        assert isinstance(header, dict) and len(raw) >= 8 + n
    except (ValueError, UnicodeDecodeError, AssertionError):
        raise UserError(f"{path}: not a safetensors file")
    tensors, data = {}, memoryview(raw)[8 + n:]
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')} (F32, F16, BF16, F64 are read)")
        start, end = info["data_offsets"]
        try:
            array = np.frombuffer(data[start:end], dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        except ValueError:
            raise UserError(f"{path}: tensor {name}: its bytes do not hold shape {info['shape']} (truncated or corrupt)")
        tensors[name] = bfloat16_to_float32(array) if info["dtype"] == "BF16" else array.astype(np.float32)
    return tensors


def write_safetensors(path, tensors):
    header, offset, chunks = {"__metadata__": {"format": "pt"}}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        chunks.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    write_file_atomic(path, [len(blob).to_bytes(8, "little"), blob] + chunks)


def read_hf_weights(path):
    """The state dict of a weights file: model.safetensors, a sharded safetensors index,
    or pytorch_model.bin (which needs PyTorch)."""
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(os.path.dirname(path), shard)))
        return tensors
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading pytorch_model.bin needs PyTorch; convert it to model.safetensors instead")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a PyTorch state dict ({type(e).__name__})")
    return {k: v.float().numpy() for k, v in state.items()}


def hf_shapes(cfg):
    """HF name -> shape of every GPT-2 tensor we read or write (Conv1D weights are (in, out))."""
    C, V, maxT = cfg.channels, cfg.vocab_size, cfg.max_seq_len
    ours = dict(parameter_shapes(cfg))
    shapes = {"wte.weight": (V, C), "wpe.weight": (maxT, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for l in range(cfg.num_layers):
        for name, theirs in HF_LAYER_NAMES:
            shape = ours[name][1:]
            shapes[f"h.{l}.{theirs}"] = shape[::-1] if theirs in HF_CONV1D else shape
    return shapes


def gpt2_from_hf(path, num_heads=None):
    """A model from Hugging Face GPT-2 weights: a folder (config.json and weights, as
    save_pretrained writes), or a weights file (n_head from a config.json beside it, else
    GPT-2's sizes). Conv1D (in, out) weights are transposed; every tensor's presence and
    shape is checked."""
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise UserError(f"{path}: no {', '.join(HF_WEIGHT_FILES)} in this folder")
        weights_path, folder = found[0], path
    elif os.path.isfile(path):
        weights_path, folder = path, os.path.dirname(os.path.abspath(path))
    else:
        raise UserError(f"weights file not found: {path}")
    hf_config = {}
    if os.path.isfile(os.path.join(folder, "config.json")):
        try:
            with open(os.path.join(folder, "config.json")) as f:
                hf_config = json.load(f)
        except ValueError:
            raise UserError(f"{os.path.join(folder, 'config.json')}: not valid JSON")
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v
          for k, v in read_hf_weights(weights_path).items()}
    if "wte.weight" not in sd or "wpe.weight" not in sd or sd["wte.weight"].ndim != 2 or sd["wpe.weight"].ndim != 2:
        raise UserError(f"{weights_path}: not a GPT-2 state dict (wte.weight / wpe.weight missing)")
    V, C = sd["wte.weight"].shape
    maxT = sd["wpe.weight"].shape[0]
    L = 1 + max((int(k.split(".")[1]) for k in sd if re.match(r"h\.\d+\.", k)), default=-1)
    for key, value in (("vocab_size", V), ("n_embd", C), ("n_positions", maxT), ("n_layer", L)):
        if hf_config.get(key, value) != value:
            raise UserError(f"{weights_path}: config.json says {key}={hf_config[key]}, the tensors say {value}")
    NH = num_heads or hf_config.get("n_head") or {c: h for h, c in GPT2_SIZES.values()}.get(C, max(1, C // 64))
    if C % NH:
        raise UserError(f"{weights_path}: {NH} heads do not divide {C} channels (put n_head in config.json beside it)")
    cfg = GPT2Config(maxT, V, padded_vocab(V), L, NH, C)
    for name, shape in hf_shapes(cfg).items():
        if name not in sd:
            raise UserError(f"{weights_path}: tensor {name} is missing (a GPT-2 with {L} layers, {C} channels needs it)")
        if sd[name].shape != shape:
            raise UserError(f"{weights_path}: tensor {name} has shape {list(sd[name].shape)}, expected {list(shape)}")
    model = GPT2(cfg)
    p = model.params
    p.wte[:V] = sd["wte.weight"]
    p.wpe[...] = sd["wpe.weight"]
    for l in range(L):
        for ours, theirs in HF_LAYER_NAMES:
            tensor = sd[f"h.{l}.{theirs}"]
            getattr(p, ours)[l] = tensor.T if theirs in HF_CONV1D else tensor
    p.lnfw[...] = sd["ln_f.weight"]
    p.lnfb[...] = sd["ln_f.bias"]
    return model


def hf_config(cfg):
    """config.json of a transformers GPT-2 (GPT2LMHeadModel, tied embeddings, no dropout)."""
    eot = start_token(cfg)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "n_embd": cfg.channels,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
            "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32"}


def write_hf(model, path):
    """A Hugging Face GPT-2 folder: model.safetensors (save_pretrained's names, Conv1D
    layout, unpadded vocab), config.json and generation_config.json. A path ending in
    .safetensors names the weights file; the JSON files go beside it."""
    folder = os.path.dirname(os.path.abspath(path)) if path.endswith(".safetensors") else path
    weights_path = path if path.endswith(".safetensors") else os.path.join(folder, "model.safetensors")
    cfg, p = model.cfg, model.params
    tensors = {"wte.weight": p.wte[:cfg.vocab_size], "wpe.weight": p.wpe}
    for l in range(cfg.num_layers):
        for ours, theirs in HF_LAYER_NAMES:
            tensor = getattr(p, ours)[l]
            tensors[f"h.{l}.{theirs}"] = tensor.T if theirs in HF_CONV1D else tensor
    tensors["ln_f.weight"], tensors["ln_f.bias"] = p.lnfw, p.lnfb
    write_safetensors(weights_path, {"transformer." + name: tensor for name, tensor in tensors.items()})
    config = hf_config(cfg)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    for name, content in (("config.json", config), ("generation_config.json", generation)):
        write_file_atomic(os.path.join(folder, name), [json.dumps(content, indent=2).encode() + b"\n"])
    return folder


# -----------------------------------------------------------------------------
# Training state on disk: model_NNNNNNNN.bin (llm.c v3 weights) beside
# state_NNNNNNNN.bin (AdamW m and v, step, data position, sampler RNG).

STATE_FILE_MAGIC, STATE_FILE_VERSION = 20240527, 1


def checkpoint_paths(output_dir, step):
    return (os.path.join(output_dir, f"model_{step:08d}.bin"), os.path.join(output_dir, f"state_{step:08d}.bin"))


def save_training_checkpoint(model, output_dir, step, extra, keep_last):
    model_path, state_path = checkpoint_paths(output_dir, step)
    write_checkpoint(model, model_path)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    blob = json.dumps(dict(extra, step=step, adam_step=model.step)).encode()
    header[:4] = [STATE_FILE_MAGIC, STATE_FILE_VERSION, model.num_parameters % (1 << 31), len(blob)]
    write_file_atomic(state_path, [header, model.m_memory, model.v_memory, blob])  # written last: marks it complete
    steps = list_checkpoint_steps(output_dir)
    for old in steps[:-keep_last] if keep_last > 0 else []:
        for path in checkpoint_paths(output_dir, old):
            if os.path.exists(path):
                os.remove(path)
    # leftovers of saves that were killed: temp files, and weights whose state never landed
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"(model|state)_(\d{8})\.bin(\.tmp\.\d+)?", name)
        if match and int(match.group(2)) < step and (match.group(3) or int(match.group(2)) not in steps):
            os.remove(os.path.join(output_dir, name))
    return model_path


def list_checkpoint_steps(output_dir):
    steps = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = re.fullmatch(r"state_(\d{8})\.bin", name)
        if match and os.path.exists(checkpoint_paths(output_dir, int(match.group(1)))[0]):
            steps.append(int(match.group(1)))
    return sorted(steps)


def load_training_checkpoint(output_dir):
    """(model with optimizer state, extra dict) from the newest complete checkpoint; a
    damaged newest one is reported and the one before it used."""
    for step in reversed(list_checkpoint_steps(output_dir)):
        model_path, state_path = checkpoint_paths(output_dir, step)
        try:
            model = read_checkpoint(model_path)
            n = model.num_parameters
            expected_min = HEADER_INTS * 4 + 8 * n
            with open(state_path, "rb") as f:
                header = read_header(f, state_path, STATE_FILE_MAGIC, (STATE_FILE_VERSION,))
                if header[2] != n % (1 << 31) or os.path.getsize(state_path) != expected_min + int(header[3]):
                    raise UserError(f"{state_path}: size or parameter count does not match {model_path}")
                ensure_optimizer_buffers(model)
                f.readinto(memoryview(model.m_memory).cast("B"))
                f.readinto(memoryview(model.v_memory).cast("B"))
                extra = json.loads(f.read(int(header[3])))
            model.step = int(extra["adam_step"])
            return model, extra
        except (UserError, ValueError, KeyError) as e:
            print(f"warning: skipping damaged checkpoint at step {step}: {e}", file=sys.stderr)
    raise UserError(f"--resume: no complete checkpoint in {output_dir}")


# -----------------------------------------------------------------------------
# Tokenizer (llm.c's gpt2_tokenizer.bin, for decoding without tiktoken)


def read_tokenizer(path):
    """List of byte strings per token id, or None when the file is missing."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        header = read_header(f, path, TOKENIZER_MAGIC, (1, 2))
        table = []
        for _ in range(int(header[2])):
            length = f.read(1)
            if not length:
                raise UserError(f"{path}: truncated tokenizer file")
            table.append(f.read(length[0]))
    return table


def decode(tokenizer, tokens):
    if tokenizer is None:
        return " ".join(str(t) for t in tokens)
    return b"".join(tokenizer[t] for t in tokens if t < len(tokenizer) and t != EOT_TOKEN).decode("utf-8", errors="replace")


def encode_prompt(text):
    from prepro_tinyshakespeare import PreproError, load_gpt2_encoding
    try:
        encoding = load_gpt2_encoding(mirror=os.environ.get("DATA_MIRROR"))
    except PreproError as e:
        raise UserError(str(e))
    return encoding.encode(text, allowed_special={"<|endoftext|>"})


# -----------------------------------------------------------------------------
# Learning rate, flops, and the main loop


def learning_rate(step, max_lr, total_steps, warmup_steps, schedule, final_lr_frac):
    """Linear warmup over warmup_steps, then cosine/linear decay to final_lr_frac * max_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    min_lr = max_lr * final_lr_frac
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    return max_lr + progress * (min_lr - max_lr)


def perplexity(loss):
    return math.exp(min(loss, 700.0))  # capped: exp overflows a float past 709


def flops_per_token(cfg, T):
    """6N for the parameters plus 12*L*C*T for attention (nanoGPT's count)."""
    n = buffer_size(parameter_shapes(cfg)) - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.channels
    return 6 * n + 12 * cfg.num_layers * cfg.channels * T


def measure_cpu_peak_flops():
    """The machine's float32 matmul ceiling, from a short numpy sgemm run."""
    a = np.ones((1024, 1024), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.matmul(a, a, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best


def evaluate(forward, loader, max_batches):
    loader.reset()
    batches = loader.num_batches() if max_batches <= 0 else min(max_batches, loader.num_batches())
    total = 0.0
    for _ in range(batches):
        x, y = loader.next_batch()
        total += forward(x, y)
    return total / batches


def load_model(init, seed, vocab_size=50257):
    """--init: 'dN' (from scratch), an llm.c checkpoint, or Hugging Face weights (a folder
    or a weights file). A file is told by its first bytes, never by its name."""
    if os.path.isdir(init):
        return gpt2_from_hf(init)
    if not os.path.exists(init):
        if not re.search(r"[./\\]", init):  # not path-like: a descriptor such as d12 (or a bad one)
            return gpt2_init_random(config_from_depth(init, vocab_size), seed)
        raise UserError(f"--init {init}: checkpoint not found (no such file or folder, and not a dN descriptor such as d12)")
    with open(init, "rb") as f:
        head = f.read(9)
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == CHECKPOINT_MAGIC:
        return read_checkpoint(init)
    if head[:2] == b"PK" or (len(head) == 9 and head[8:9] == b"{"):  # a torch zip, or safetensors' JSON header
        return gpt2_from_hf(init)
    raise UserError(f"{init}: not a model file: expected an llm.c checkpoint (magic {CHECKPOINT_MAGIC}), "
                    "a Hugging Face model.safetensors / pytorch_model.bin, or a folder holding one")


class JsonlLog:
    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, "log.jsonl") if output_dir else None

    def truncate(self, step):
        """On resume: drop what the interrupted run logged after its checkpoint at step
        (train records past it, evals at or past it), since the resumed run logs them again."""
        if not self.path or not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the interruption
                if record.get("step", 0) < step or (record.get("type") == "train" and record.get("step") == step):
                    kept.append(line if line.endswith("\n") else line + "\n")
        write_file_atomic(self.path, [line.encode() for line in kept])

    def write(self, **record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Train GPT-2 on llm.c token files (CPU with Numba, or --device cuda). "
                    "Also: --eval-only, --sample (text generation), --export-hf.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("-i", "--train-data", default="data/tinyshakespeare/tiny_shakespeare_train.bin",
                   help="training token file(s), a glob pattern allowed")
    g.add_argument("-j", "--val-data", default="data/tinyshakespeare/tiny_shakespeare_val.bin",
                   help="validation token file(s); '' for none")
    g.add_argument("-e", "--init", default="d12",
                   help="model: dN from scratch (d12 = GPT-2 124M), an llm.c .bin checkpoint, or Hugging Face "
                        "weights: a save_pretrained folder, model.safetensors (F32/F16/BF16) or pytorch_model.bin")
    g.add_argument("-o", "--output-dir", default=None, help="checkpoints and log.jsonl go here (none: not written)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    g.add_argument("--seed", type=int, default=1337, help="init, data shuffling and sampling seed")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train")
    g.add_argument("--tf32", type=int, default=1, help="cuda: TF32 matmuls (1) or strict fp32 (0)")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("-b", "--batch-size", type=int, default=4, help="sequences per micro-batch (B)")
    g.add_argument("-t", "--seq-len", type=int, default=64, help="tokens per sequence (T)")
    g.add_argument("-d", "--total-batch-tokens", type=int, default=0,
                   help="tokens per optimizer step; a multiple of B*T gives gradient accumulation (0: B*T)")
    g.add_argument("-x", "--steps", type=int, default=40, help="optimizer steps to train to")
    g.add_argument("-l", "--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("-u", "--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="constant",
                   help="decay after warmup")
    g.add_argument("-q", "--final-lr-frac", type=float, default=0.0, help="final lr as a fraction of --lr")
    g.add_argument("-c", "--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--weight-decay-mode", choices=["matrices", "all"], default="matrices",
                   help="decay only the 2-D weights, or every tensor (llm.c's CPU trainer)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.999)
    g.add_argument("--eps", type=float, default=1e-8)
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--shuffle", type=int, default=1, help="shuffle the training samples each epoch (val stays in order)")
    g = p.add_argument_group("evaluation, sampling, checkpoints, output")
    g.add_argument("-v", "--val-every", type=int, default=10, help="val loss every N steps (0: never)")
    g.add_argument("-m", "--val-batches", type=int, default=5, help="val batches per evaluation (0: all)")
    g.add_argument("-s", "--sample-every", type=int, default=20, help="print a sample every N steps (0: never)")
    g.add_argument("-g", "--gen-tokens", type=int, default=64, help="tokens per sample")
    g.add_argument("-n", "--checkpoint-every", type=int, default=0,
                   help="checkpoint every N steps, plus at the end (needs --output-dir; 0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the newest K checkpoints (0: all)")
    g.add_argument("--tokenizer", default="data/gpt2_tokenizer.bin", help="llm.c tokenizer file for decoding samples")
    g.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak TFLOP/s for MFU (0: measured numpy sgemm on the CPU, the datasheet TF32/FP32 figure on H100)")
    g.add_argument("--profile", action="store_true", help="print time per layer kind after training")
    g = p.add_argument_group("other modes")
    g.add_argument("--eval-only", action="store_true", help="print the val loss and perplexity of --init and exit")
    g.add_argument("--sample", action="store_true", help="generate text from --init and exit")
    g.add_argument("--prompt", default="", help="--sample: text to continue (empty: start from <|endoftext|>)")
    g.add_argument("--temperature", type=float, default=1.0, help="--sample: softmax temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=0, help="--sample: keep the k most likely tokens (0: all)")
    g.add_argument("--no-kv-cache", action="store_true", help="--sample: recompute the whole sequence per token")
    g.add_argument("--compare-kv-cache", action="store_true", help="--sample: time generation with and without the cache")
    g.add_argument("--export-hf", metavar="PATH", default=None,
                   help="write the final (or --init) model as a Hugging Face GPT-2 folder (model.safetensors, "
                        "config.json, generation_config.json) that transformers' from_pretrained loads; a path "
                        "ending in .safetensors names the weights file, the JSON files go beside it")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.resume and not args.output_dir:
        p.error("--resume needs --output-dir")
    if args.profile and args.device != "cpu":
        p.error("--profile times the CPU layers; on CUDA use dev/cuda_check.py bench --profile")
    if args.total_batch_tokens and args.total_batch_tokens % (args.batch_size * args.seq_len):
        p.error(f"--total-batch-tokens {args.total_batch_tokens} is not a multiple of B*T = {args.batch_size * args.seq_len}")
    return args


def sample_mode(model, args, tokenizer):
    prompt = encode_prompt(args.prompt) if args.prompt else [start_token(model.cfg)]
    runs = [False, True] if args.compare_kv_cache else [not args.no_kv_cache]
    outputs = []
    for use_cache in runs:
        t0 = time.perf_counter()
        tokens, _ = generate(model, prompt, args.gen_tokens, args.temperature, args.top_k, args.seed, use_cache)
        seconds = time.perf_counter() - t0
        outputs.append(tokens)
        print(f"[{'with' if use_cache else 'without'} KV cache: {len(tokens)} tokens in {seconds:.2f} s, "
              f"{len(tokens) / seconds:.1f} tokens/s]")
    if len(outputs) == 2:
        print(f"[same tokens with and without the cache: {'yes' if outputs[0] == outputs[1] else 'NO'}]")
    print(decode(tokenizer, prompt if args.prompt else []) + decode(tokenizer, outputs[-1]))


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    tokenizer = read_tokenizer(args.tokenizer)
    extra = {}
    if args.resume and list_checkpoint_steps(args.output_dir):
        model, extra = load_training_checkpoint(args.output_dir)
        print(f"resuming from {args.output_dir} at step {extra['step']}")
    else:
        if args.resume:
            print(f"--resume: no checkpoint in {args.output_dir} yet, starting fresh")
        model = load_model(args.init, args.seed)
    cfg = model.cfg
    print(f"model: L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} V={cfg.vocab_size} maxT={cfg.max_seq_len} "
          f"({model.num_parameters:,} parameters)")
    if args.sample:
        sample_mode(model, args, tokenizer)
        export_hf(model, args.export_hf)
        return 0
    B, T = args.batch_size, args.seq_len
    if T > cfg.max_seq_len:
        raise UserError(f"-t {T} exceeds the model's max_seq_len={cfg.max_seq_len}")
    val_loader = DataLoader(args.val_data, B, T, cfg.vocab_size) if args.val_data else None

    if args.device == "cuda":
        import train_gpt2_cuda as gcu
        if not gcu.cuda_available():
            raise UserError("--device cuda: no CUDA GPU found (install numba-cuda; check the driver)")
        dm = gcu.to_device(model, B, T, tf32=bool(args.tf32))
        if extra:
            gcu.optimizer_state_from_host(dm, model.m_memory, model.v_memory, model.step)

        def forward(x, y):
            gcu.gpt2_forward_cuda(dm, x, y)
            return gcu.mean_loss_cuda(dm)
        backward = lambda accumulate, scale: gcu.gpt2_backward_cuda(dm, accumulate, scale)  # noqa: E731
        update = lambda *a: gcu.read_norm(gcu.gpt2_update_cuda(dm, *a))  # noqa: E731
        params_to_host = lambda: gcu.params_to_host(dm, model)  # noqa: E731 (for sampling and exports)

        def training_state_to_host():  # for checkpoints
            params_to_host()
            model.m_memory, model.v_memory = gcu.optimizer_state_to_host(dm)
            model.step = dm.step
    else:
        forward = lambda x, y: gpt2_forward(model, x, y)  # noqa: E731
        backward = lambda accumulate, scale: gpt2_backward(model, accumulate, scale)  # noqa: E731
        update = lambda *a: gpt2_update(model, *a)  # noqa: E731
        params_to_host = training_state_to_host = lambda: None  # noqa: E731 (the host model is the model)

    if args.eval_only:
        if val_loader is None:
            raise UserError("--eval-only needs validation data (-j)")
        loss = evaluate(forward, val_loader, args.val_batches)
        print(f"val loss {loss:.6f} | perplexity {perplexity(loss):.3f}")
        export_hf(model, args.export_hf)
        return 0

    if extra and extra.get("seed") != args.seed:
        raise UserError(f"--resume: the checkpoint was trained with --seed {extra.get('seed')}; pass the same seed")
    train_loader = DataLoader(args.train_data, B, T, cfg.vocab_size, shuffle=bool(args.shuffle), seed=args.seed)
    accum_steps = max(1, args.total_batch_tokens // (B * T)) if args.total_batch_tokens else 1
    tokens_per_step = accum_steps * B * T
    start_step = 0
    rng_state = args.seed
    if extra:
        start_step = extra["step"]
        train_loader.set_state(extra["loader"])
        rng_state = extra["rng_state"]
        if extra.get("B") != B or extra.get("T") != T or extra.get("accum_steps") != accum_steps:
            raise UserError(f"--resume: the checkpoint was trained with B={extra.get('B')} T={extra.get('T')} "
                            f"accumulation={extra.get('accum_steps')}; pass the same -b, -t, -d")
    if args.device == "cuda":
        peak = (args.peak_tflops or gcu.datasheet_peak_tflops(bool(args.tf32))) * 1e12 or float("nan")
    else:
        peak = args.peak_tflops * 1e12 or measure_cpu_peak_flops()
    flops_per_step = flops_per_token(cfg, T) * tokens_per_step
    log = JsonlLog(args.output_dir)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    if extra:
        log.truncate(start_step)
    print(f"train: {train_loader.num_batches()} batches of B={B} T={T} in {len(train_loader.paths)} file(s); "
          f"{accum_steps} micro-step(s) per step ({tokens_per_step} tokens); "
          f"val: {val_loader.num_batches() if val_loader else 0} batches")
    print(f"ready in {time.perf_counter() - t_start:.2f} s; MFU is against {peak / 1e12:.3f} TFLOP/s")

    profile = LayerProfile() if args.profile else None
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))

    def checkpoint(step):
        if not args.output_dir:
            return
        training_state_to_host()
        path = save_training_checkpoint(model, args.output_dir, step,
                                        {"loader": train_loader.state(), "rng_state": rng_state, "B": B, "T": T,
                                         "accum_steps": accum_steps, "seed": args.seed}, args.keep_checkpoints)
        print(f"checkpoint: {path}")

    step_times = []
    try:
        for step in range(start_step, args.steps + 1):
            last = step == args.steps
            if val_loader and args.val_every > 0 and (step % args.val_every == 0 or last):
                val_loss = evaluate(forward, val_loader, args.val_batches)
                print(f"val loss {val_loss:.6f} | perplexity {perplexity(val_loss):.2f}")
                log.write(type="val", step=step, loss=val_loss, perplexity=perplexity(val_loss))
            if args.sample_every > 0 and step > 0 and (step % args.sample_every == 0 or last):
                params_to_host()
                tokens, rng_state = generate(model, [start_token(cfg)], min(args.gen_tokens, cfg.max_seq_len - 1),
                                             rng_state=rng_state)
                print("generating:\n---\n" + decode(tokenizer, tokens) + "\n---")
            if last:
                break
            t0 = time.perf_counter()
            if profile:
                profile.active = True  # the training step only, not evals or samples
            lr = learning_rate(step, args.lr, args.steps, args.warmup_steps, args.lr_schedule, args.final_lr_frac)
            loss = 0.0
            for micro in range(accum_steps):
                x, y = train_loader.next_batch()
                loss += forward(x, y) / accum_steps
                backward(micro > 0, 1.0 / accum_steps)
            norm = float(update(lr, args.beta1, args.beta2, args.eps, args.weight_decay, args.weight_decay_mode,
                                args.grad_clip))
            seconds = time.perf_counter() - t0
            if profile:
                profile.active = False
                profile.steps += 1
                if len(step_times) == 0:
                    profile.reset()  # the first step pays one-time costs: profile the rest
            step_times.append(seconds)
            mfu = flops_per_step / seconds / peak
            print(f"step {step + 1:5d}/{args.steps} | loss {loss:.6f} | norm {norm:7.4f} | lr {lr:.2e} | "
                  f"{1000 * seconds:7.1f} ms | {tokens_per_step / seconds:8.0f} tok/s | MFU {100 * mfu:5.1f}%")
            log.write(type="train", step=step + 1, loss=loss, norm=norm, lr=lr, ms=1000 * seconds,
                      tokens_per_s=tokens_per_step / seconds, mfu=mfu)
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at step {step + 1}: lower the learning rate or clip gradients")
            if interrupted:
                print("interrupted: saving a checkpoint")
                checkpoint(step + 1)
                return 130
            if args.output_dir and args.checkpoint_every > 0 and (step + 1) % args.checkpoint_every == 0 \
                    and step + 1 < args.steps:
                checkpoint(step + 1)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if start_step < args.steps:
        checkpoint(args.steps)
    if step_times:
        times = sorted(step_times[1:] or step_times)
        print(f"done: median step {1000 * times[len(times) // 2]:.1f} ms (first step {1000 * step_times[0]:.1f} ms)")
    if profile:
        print(f"time per layer kind, averaged over steps 2..{len(step_times)}:")
        print(profile.table(sum(step_times[1:])))
    if args.export_hf:
        params_to_host()
        export_hf(model, args.export_hf)
    return 0


def export_hf(model, path):
    if path:
        folder = write_hf(model, path)
        print(f"wrote {path} (a Hugging Face GPT-2 folder: {folder} holds the weights, config.json, "
              "generation_config.json)")


def cli(argv=None):
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
