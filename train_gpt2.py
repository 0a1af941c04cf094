"""
GPT-2 training in one flat Python module, in the style of llm.c's train_gpt2.c.

One float32 buffer holds every parameter, laid out exactly as an llm.c checkpoint;
the gradients and the AdamW moments are buffers of the same layout, and one more
buffer holds every activation that the backward pass reads. Named views are sliced
out of them once, up front (the layouts, file formats and data loader live in
gpt2_common.py, which the CUDA target shares). Each layer is a pair of functions over
raw arrays, `*_forward` and `*_backward`, JIT-compiled by Numba; the big matrix
products go through numpy's BLAS on 2-D views of the buffers.

Read it top to bottom: layers, the model (forward, backward, update) and the CPU
device, sampling, then the training loop, main(), which talks to the CPU target here
or the CUDA one (train_gpt2_cuda.py) through the same Device interface, on one
process or as one rank of a data-parallel run (distributed.py).
"""

import argparse
import copy
import json
import math
import os
import signal
import sys
import time
import zlib

# Numba's OpenMP threads and OpenBLAS's threads take turns on the same cores; threads
# that spin-wait after a parallel region would slow the other library's next call.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenMP's static schedule gives every parallel reduction the same order run to run
# (bit-exact resume relies on it); TBB, which Numba prefers when installed, does not.
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")

import distributed  # noqa: E402
from distributed import SINGLE, shard_range  # noqa: E402

distributed.share_cores()  # processes of a data-parallel run split the cores: before numpy sizes its BLAS pool

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from gpt2_common import (  # noqa: E402  (shapes, formats, data, errors: what the CUDA target shares)
    GELU_CUBE, GELU_SCALE, DataLoader, Device, UserError, activation_grad_shapes, cache_file,
    activation_shapes, buffer_size, check_tokens, decode, encode_prompt, ensure_gradients, ensure_optimizer_buffers,
    checkpoint_paths, list_checkpoint_steps, load_model, load_training_checkpoint, matrix_groups, parameter_shapes,
    read_tokenizer, remove_run_files, run_files, save_training_checkpoint, slice_views, start_token, write_file_atomic,
    write_hf, zeros_f32)

# Numba may reorder float additions (so reductions vectorize), and nothing more: no
# finite-math flags (the attention mask and GELU need inf semantics), and no
# "contract"/"nsz", which made freshly JIT-compiled code round differently from the
# same functions loaded from Numba's cache, breaking bit-exact resume.
FASTMATH = {"reassoc"}


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


def ensure_training_buffers(model):
    """Gradients plus the backward scratch for the current (B, T)."""
    ensure_gradients(model)
    if model.dacts is None:
        shapes = activation_grad_shapes(model.cfg, model.B, model.T)
        model.dacts_memory = zeros_f32(buffer_size(shapes))
        model.dacts = slice_views(model.dacts_memory, shapes)


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


def decay_groups(cfg, weight_decay, weight_decay_mode):
    """(start, end, decay) ranges of the flat buffer: 'all' decays every tensor (llm.c's
    CPU trainer), 'matrices' only the 2-D weights (nanoGPT); neighbours merged."""
    if weight_decay_mode == "all" or weight_decay == 0.0:
        return [(0, buffer_size(parameter_shapes(cfg)), weight_decay)]
    if weight_decay_mode != "matrices":
        raise ValueError(f"weight_decay_mode must be 'all' or 'matrices', not {weight_decay_mode!r}")
    return [(start, end, weight_decay if is_matrix else 0.0) for start, end, is_matrix in matrix_groups(cfg)]


def gpt2_update(model, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                weight_decay_mode="matrices", grad_clip=0.0, shard=None, sum_across=float):
    """One AdamW step; clips the gradient to global norm grad_clip when > 0. Returns the
    norm before clipping. By default over the whole buffer; a ZeRO-1 rank passes its
    shard = (lo, grads, m, v): the summed gradients and the moments of the buffer's
    values lo..lo+len(grads), and sum_across, which sums a float over the ranks."""
    model.step += 1
    if shard is None:
        ensure_optimizer_buffers(model)
        shard = (0, model.grads_memory, model.m_memory, model.v_memory)
    lo, grads, m, v = shard
    hi = lo + grads.size
    norm = math.sqrt(sum_across(sum_of_squares(grads))) if grad_clip > 0 else None  # clipping needs it first
    grad_scale = grad_clip / (norm + 1e-6) if norm is not None and norm > grad_clip else 1.0
    f32 = np.float32
    common = (f32(lr), f32(beta1), f32(beta2), f32(eps))
    corrections = (f32(1.0 - beta1 ** model.step), f32(1.0 - beta2 ** model.step), f32(grad_scale))
    sum_sq = 0.0
    for start, end, decay in decay_groups(model.cfg, weight_decay, weight_decay_mode):
        a, b = max(start, lo) - lo, min(end, hi) - lo  # the group's part of the shard
        if a < b:
            sum_sq += adamw_update(model.params_memory[lo + a:lo + b], grads[a:b], m[a:b], v[a:b], *common,
                                   f32(decay), *corrections)
    return norm if norm is not None else math.sqrt(sum_across(sum_sq))


class CPU(Device):
    """The CPU target: the host model is the model, and the functions above run on it.
    Data parallel (dist from distributed.setup): the gradients are summed over the ranks
    through MPI before the update; with ZeRO-1 each rank keeps and updates only its
    shard of m and v (and of the summed gradients), then the ranks gather the parameters."""

    name = "cpu"

    def __init__(self, model, B, T, dist=SINGLE, zero_stage=0):
        self.model, self.dist = model, dist
        ensure_activations(model, B, T)
        self.views = {}  # the forward-only evaluators by batch shape
        self.shard = None  # (lo, grads, m, v) of this rank's part of the buffer under ZeRO-1
        if zero_stage == 1 and dist.world > 1:
            lo, hi = shard_range(model.num_parameters, dist.world, dist.rank)
            self.shard = (lo, zeros_f32(hi - lo), zeros_f32(hi - lo), zeros_f32(hi - lo))

    def forward(self, inputs, targets=None):
        return gpt2_forward(self.model, inputs, targets)

    def backward(self, accumulate=False, loss_scale=1.0, last_micro_step=True):
        gpt2_backward(self.model, accumulate, loss_scale)  # the ranks' sum waits for update()

    def update(self, lr, beta1, beta2, eps, weight_decay, weight_decay_mode, grad_clip):
        hyper = (lr, beta1, beta2, eps, weight_decay, weight_decay_mode, grad_clip)
        if self.shard is None:
            self.dist.allreduce_sum(self.model.grads_memory)  # nothing to do in a run of one process
            return gpt2_update(self.model, *hyper)
        self.dist.reduce_scatter_sum(self.model.grads_memory, self.shard[1])
        norm = gpt2_update(self.model, *hyper, shard=self.shard, sum_across=self.dist.sum)
        self.dist.allgather(self.model.params_memory)
        return norm

    def params_to_host(self):
        pass  # the host model is the model

    def state_to_host(self):
        """ZeRO-1: rank 0's host model gets the whole m and v, gathered from the shards."""
        if self.shard is not None:
            if self.dist.rank == 0:
                ensure_optimizer_buffers(self.model)
            for full, part in ((self.model.m_memory, self.shard[2]), (self.model.v_memory, self.shard[3])):
                self.dist.gather_to_root(part, full, self.model.num_parameters)

    def state_from_host(self):
        """ZeRO-1: each rank takes its shard of the checkpoint's m and v, and drops the rest."""
        if self.shard is not None:
            lo, grads, m, v = self.shard
            m[...] = self.model.m_memory[lo:lo + m.size]
            v[...] = self.model.v_memory[lo:lo + v.size]
            self.model.m_memory = self.model.v_memory = None

    def logits_to_host(self):
        return self.model.acts.logits

    def losses_to_host(self):
        return self.model.acts.losses

    def evaluator(self, B, T):
        """A forward-only CPU target at batch shape (B, T) over the same parameters: a
        shallow copy of the host model, with activations of its own (made once per shape);
        at the training's own shape, this target (its forward does nothing for a backward)."""
        if (B, T) == (self.model.B, self.model.T):
            return self
        if (B, T) not in self.views:
            view = copy.copy(self.model)
            view.B = view.T = 0
            view.acts = view.dacts = None
            self.views[(B, T)] = CPU(view, B, T)
        return self.views[(B, T)]

    def decoder(self):
        return HostDecoder(self.model)

    def grads_to_host(self):
        return self.model.grads_memory

    def optimizer_bytes(self):
        """AdamW state held by this process (m and v, or their shards)."""
        return 2 * 4 * (self.shard[2].size if self.shard else self.model.num_parameters)

    def peak_flops(self):
        return cpu_peak_flops()

    def memory_used(self):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


class HostDecoder:
    """One generated sequence on the host: step(token) feeds the token at the next
    position through the KV cache and returns the next token's logits (CPU.decoder;
    train_gpt2_cuda's Decoder is the GPU's)."""

    def __init__(self, model):
        self.model, self.cache = model, KVCache(model.cfg)

    def step(self, token):
        return gpt2_decode_step(self.model, self.cache, token)


def generate(model, prompt_tokens, num_tokens, temperature=1.0, top_k=0, rng_state=1337, use_kv_cache=True,
             decoder=None):
    """Continue prompt_tokens by num_tokens sampled tokens, through decoder (a fresh
    one of a device: the host's KV cache by default, the GPU's with a CUDA target's
    decoder()). With use_kv_cache=False each new token reruns the whole sequence through
    gpt2_forward on the host (llm.c's way), for checking and timing. The tokens are drawn
    on the host from the logits (llm.c's sampler). Returns (new tokens, rng_state)."""
    cfg = model.cfg
    prompt = [int(t) for t in prompt_tokens] or [start_token(cfg)]
    check_tokens(np.array(prompt), cfg.vocab_size, "prompt")
    total = len(prompt) + num_tokens
    if total > cfg.max_seq_len:
        raise UserError(f"prompt ({len(prompt)} tokens) + {num_tokens} new tokens exceeds max_seq_len={cfg.max_seq_len}")
    sequence = list(prompt)
    if use_kv_cache:
        decoder = decoder or HostDecoder(model)
        for token in prompt[:-1]:
            decoder.step(token)

        def next_token_logits():  # feeds the newest token only
            return decoder.step(sequence[-1])
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
        self.active = False
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

    def start(self):
        self.active = True  # the training step only, not evals or samples

    def stop(self, first_step):
        self.active = False
        self.steps += 1
        if first_step:  # it pays one-time costs (compilation, page faults): profile the rest
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


PEAK_MATRIX = 2048        # sgemm size of the peak-rate measurement (2 * 2048^3 = 17.2 GFLOP a product)
PEAK_SECONDS = 3.0        # measured for this long (at least PEAK_MIN_RUNS products); the fastest counts
PEAK_MIN_RUNS = 10


def measure_cpu_peak_flops():
    """The machine's float32 matmul ceiling: the fastest of many 2048^3 numpy sgemms
    over about 3 s (the best of a long run, so a moment of load from elsewhere does not
    lower it)."""
    a = np.ones((PEAK_MATRIX, PEAK_MATRIX), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)  # warm-up: BLAS threads started, pages touched
    best, runs, t_end = float("inf"), 0, time.perf_counter() + PEAK_SECONDS
    while runs < PEAK_MIN_RUNS or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        np.matmul(a, a, out=out)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return 2 * PEAK_MATRIX ** 3 / best


def cpu_peak_cache_path():
    """Where the measured sgemm rate is kept: $GPT2PY_CPU_PEAK_CACHE, else
    gpt2py/cpu_peak.json in $XDG_CACHE_HOME (~/.cache)."""
    return cache_file("GPT2PY_CPU_PEAK_CACHE", "cpu_peak.json")


def cpu_peak_key():
    """What the sgemm rate depends on: the CPU model, the BLAS thread count and OpenBLAS's kernel choice."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        import platform
        model = platform.processor() or model
    threads = (os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
               or str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
    return f"{model} | {threads} threads | OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}"


def cpu_peak_flops():
    """The sgemm rate MFU is measured against on the CPU: read from the cache file under
    this machine's key, else measured once (about 3 s) and saved there. A cache that does
    not read as a JSON object of positive rates gets a one-line warning and is rewritten."""
    path, key = cpu_peak_cache_path(), cpu_peak_key()
    cache = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                cache = json.load(f)
            if not isinstance(cache, dict):
                raise ValueError("not a JSON object")
            entry = cache.get(key)
            if entry is not None:
                flops = entry.get("flops") if isinstance(entry, dict) else None
                if not isinstance(flops, (int, float)) or not math.isfinite(flops) or flops <= 0:
                    raise ValueError(f"no positive rate for {key!r}")
                return float(flops)
        except (OSError, ValueError) as e:
            print(f"warning: ignoring the CPU peak-rate cache {path} ({e}); measuring again", file=sys.stderr)
            cache = {}
    print("measuring this machine's float32 sgemm rate for MFU (once; about 3 s; cached in "
          f"{path})", flush=True)
    flops = measure_cpu_peak_flops()
    cache[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "matrix": PEAK_MATRIX}
    try:
        write_file_atomic(path, [json.dumps(cache, indent=1, sort_keys=True).encode() + b"\n"])
    except OSError as e:
        print(f"warning: could not save the CPU peak-rate cache {path}: {e}", file=sys.stderr)
    return flops


def forget_cpu_peak():
    """Drop this machine's cached sgemm rate (a training step ran faster than it, so it was
    measured while the machine was busy): the next run measures again."""
    path, key = cpu_peak_cache_path(), cpu_peak_key()
    try:
        with open(path) as f:
            cache = json.load(f)
        if isinstance(cache, dict) and cache.pop(key, None) is not None:
            write_file_atomic(path, [json.dumps(cache, indent=1, sort_keys=True).encode() + b"\n"])
    except (OSError, ValueError):
        pass  # unreadable: the next run warns about it and measures again anyway


def kernels_need_compiling():
    """True when Numba's on-disk cache holds no up-to-date build of this module's cached
    kernels: the first run after a clone, after an edit of this file (Numba stamps its
    cache with a hash of the source, so an edit makes every kernel stale) or with a new
    NUMBA_CACHE_DIR. (A later run may still compile a kernel it is the first to use, such
    as the sampler's, in a second or two.) Each kernel's cache index is asked through
    Numba's internals; should those change, the test falls back to whether the index
    file, named as Numba names it, exists."""
    from numba.core.dispatcher import Dispatcher
    module = sys.modules[__name__]
    modname = os.path.splitext(os.path.basename(module.__file__))[0]
    version = f"py{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"
    for kernel in vars(module).values():
        if not isinstance(kernel, Dispatcher) or getattr(kernel.py_func, "__module__", None) != module.__name__:
            continue
        cache_dir = kernel.stats.cache_path
        if cache_dir is None:
            continue  # not a cache=True kernel (inlined helpers)
        try:
            if kernel._cache._cache_file._load_index():  # {} when missing or stale
                return False
        except AttributeError:
            code = kernel.py_func.__code__
            name = f"{modname}.{kernel.py_func.__qualname__}-{code.co_firstlineno}.{version}.nbi"
            if os.path.isfile(os.path.join(cache_dir, name.replace("<", "").replace(">", ""))):
                return False
        except Exception:
            continue  # an unreadable index: Numba compiles that kernel again
    return True


def announce_first_compile():
    if kernels_need_compiling():
        print("compiling kernels, first run only (about 15 s)", flush=True)


EVAL_PROGRESS_BATCHES = 20  # evaluations of at least this many batches show a progress bar on a terminal


def evaluate(device, loader, max_batches):
    """Mean loss over the first max_batches batches of loader (0: all of them). A long
    evaluation draws a progress bar on stderr when that is a terminal."""
    loader.reset()
    batches = loader.num_batches() if max_batches <= 0 else min(max_batches, loader.num_batches())
    bar = None
    if batches >= EVAL_PROGRESS_BATCHES and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=batches, desc="val", unit="batch", leave=False, file=sys.stderr)
    total = 0
    evaluator = device.evaluator(loader.B, loader.T)  # a forward that prepares no backward
    for _ in range(batches):
        total += evaluator.forward(*loader.next_batch())
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return total / batches


HELLASWAG_GPU_POSITIONS = 16384  # on a GPU, a HellaSwag forward takes at least this many positions (16 x 1024)


def read_hellaswag(path, cfg):
    """The examples of an llm.c eval file (prepro_hellaswag.py writes them), and the
    longest row's input length; one line of error for a file that is not one, a token
    outside the vocabulary or an example longer than the model's context."""
    from prepro_hellaswag import PreproError, example_rows, read_eval_file
    if not os.path.isfile(path):
        raise UserError(f"--hellaswag-data {path}: not found (run python prepro_hellaswag.py)")
    try:
        examples = read_eval_file(path)
    except PreproError as e:
        raise UserError(str(e))
    longest = 0
    for i, example in enumerate(examples):
        for row, _, _ in example_rows(example):
            check_tokens(np.array(row), cfg.vocab_size, f"{path}: example {i}")
            if len(row) - 1 > cfg.max_seq_len:
                raise UserError(f"{path}: example {i} has {len(row)} tokens, more than the model's "
                                f"max_seq_len={cfg.max_seq_len} + 1")
            longest = max(longest, len(row) - 1)
    return examples, longest


def hellaswag_rows(examples, B, T):
    """One batch of B rows of T positions (4 rows an example, llm.c's EvalLoader):
    inputs are each row's context + ending shifted for next-token prediction, targets the
    ending's tokens where the model predicts them and -1 elsewhere (and in the padding
    rows of a short last batch)."""
    from prepro_hellaswag import example_rows
    inputs = np.zeros((B, T), dtype=np.int32)
    targets = np.full((B, T), -1, dtype=np.int32)
    for k, example in enumerate(examples):
        for r, (row, start, end) in enumerate(example_rows(example)):
            inputs[4 * k + r, :len(row) - 1] = row[:-1]
            first = max(start, 1)  # row[j] is predicted at position j - 1 (none for row[0])
            targets[4 * k + r, first - 1:end - 1] = row[first:end]
    return inputs, targets


def hellaswag_predictions(device, examples, T, rows):
    """The ending each example's model picks: the lowest mean cross-entropy of the
    ending's tokens given the context (llm.c's acc_norm), from the per-position losses
    of forward passes of `rows` rows (a multiple of 4) at T positions, through a
    forward-only view of the device."""
    evaluator = device.evaluator(rows, T)
    picks = []
    for first in range(0, len(examples), rows // 4):
        batch = examples[first:first + rows // 4]
        inputs, targets = hellaswag_rows(batch, rows, T)
        evaluator.forward(inputs, targets)
        losses = evaluator.losses_to_host().reshape(rows, T).astype(np.float64)
        scored = targets >= 0
        mean = (losses * scored).sum(axis=1) / np.maximum(scored.sum(axis=1), 1)
        picks += [int(p) for p in mean.reshape(-1, 4).argmin(axis=1)[:len(batch)]]
    return picks


def hellaswag_evaluate(device, examples, T, rows, dist=SINGLE):
    """(correct, total) over every rank: rank r scores examples r, r + N, ... and the
    counts are summed (llm.c's split)."""
    mine = examples[dist.rank::dist.world]
    picks = hellaswag_predictions(device, mine, T, rows) if mine else []
    correct = sum(int(pick == example["label"]) for pick, example in zip(picks, mine))
    return int(dist.sum(correct)), int(dist.sum(len(mine)))


def hellaswag_shape(args, longest):
    """(T, rows) of the HellaSwag forwards: rows as long as the longest example, as many
    as the training batch's positions hold (on a GPU at least HELLASWAG_GPU_POSITIONS), a
    multiple of 4 and at least 4."""
    positions = max(args.batch_size * args.seq_len, HELLASWAG_GPU_POSITIONS if args.device == "cuda" else 0)
    return longest, max(4, positions // longest // 4 * 4)


def check_device(name):
    """Fail early, in one line, when the target cannot run here."""
    if name == "cuda":
        import train_gpt2_cuda  # only for CUDA: CPU runs never import numba.cuda or CuPy
        if not train_gpt2_cuda.cuda_available():
            raise UserError("--device cuda: no CUDA GPU found (install numba-cuda and CuPy; check the driver)")


def build_device(name, model, B, T, precision="fp32", dist=SINGLE, zero_stage=0, recompute=1, deterministic=1):
    """The training target by name ('cpu' or 'cuda'), built from the host model;
    precision: fp32 (both), tf32, bf16 or fp8 (cuda); dist and zero_stage make it one rank of
    a data-parallel run; recompute (cuda bf16): what the backward computes again instead
    of keeping per layer (0 nothing, 1 the GELU output, 2 also the layernorm outputs and
    the residual after attention); deterministic (cuda bf16): 0 takes cuDNN's
    faster attention backward, whose sums vary in order from run to run."""
    check_device(name)
    if name == "cpu":
        if precision != "fp32":
            raise UserError(f"precision {precision}: the CPU trains in fp32")
        return CPU(model, B, T, dist, zero_stage)
    import train_gpt2_cuda
    return train_gpt2_cuda.CUDA(model, B, T, precision=precision, dist=dist, zero_stage=zero_stage,
                                recompute=recompute, deterministic=bool(deterministic))


class JsonlLog:
    """log.jsonl in the output directory (none without one): the log of one run. A run
    resumed at resume_step first drops what the interrupted run logged after its
    checkpoint (train records past it, evals at or past it), since the resumed run logs
    them again; a run that starts at step 0 (--resume with no checkpoint yet) starts it
    empty."""

    def __init__(self, output_dir, resume_step=0):
        self.path = os.path.join(output_dir, "log.jsonl") if output_dir else None
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
        self.truncate(resume_step)

    def truncate(self, step):
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line (no usage block)."""

    def error(self, message):
        print(f"error: {message} (python train_gpt2.py --help lists the options)", file=sys.stderr)
        sys.exit(2)


# Flags that take a count or a rate: (dest, the least value allowed). Zero is allowed
# where it means "off", "all" or "measure it"; floats must also be finite.
AT_LEAST = [("batch_size", 1), ("seq_len", 1), ("gen_tokens", 1), ("steps", 0), ("total_batch_tokens", 0),
            ("lr", 0), ("warmup_steps", 0), ("final_lr_frac", 0), ("weight_decay", 0), ("grad_clip", 0),
            ("val_every", 0), ("val_batches", 0), ("sample_every", 0), ("checkpoint_every", 0),
            ("keep_checkpoints", 0), ("peak_tflops", 0), ("dist_timeout", 0), ("seed", 0), ("temperature", 0),
            ("top_k", 0)]


def check_numbers(p, args):
    """One line, exit 2, for a count or rate out of its range (a negative learning rate, ...)."""
    flags = {action.dest: "/".join(action.option_strings) for action in p._actions}
    for name, least in AT_LEAST:
        value = getattr(args, name)
        if isinstance(value, float) and not math.isfinite(value):
            p.error(f"{flags[name]} must be a finite number (got {value})")
        if value < least:
            p.error(f"{flags[name]} must be {'positive' if least == 1 else 'at least 0'} (got {value})")
    if args.final_lr_frac > 1:
        p.error(f"-q/--final-lr-frac is a fraction of --lr, from 0 to 1 (got {args.final_lr_frac})")
    for name in ("beta1", "beta2"):
        value = getattr(args, name)
        if not 0 <= value < 1:
            p.error(f"--{name} must be in [0, 1) (got {value})")
    if not (math.isfinite(args.eps) and args.eps > 0):
        p.error(f"--eps must be positive (got {args.eps})")


def parse_args(argv):
    p = ArgumentParser(
        description="Train GPT-2 on llm.c token files (CPU with Numba, or --device cuda). Also: --eval-only, "
                    "--sample (text generation), --export-hf (convert: -e FILE -x 0 --export-hf DIR).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("-i", "--train-data", default="data/tinyshakespeare/tiny_shakespeare_train.bin",
                   help="training token file(s), a glob pattern allowed")
    g.add_argument("-j", "--val-data", default="data/tinyshakespeare/tiny_shakespeare_val.bin",
                   help="validation token file(s); '' for none")
    g.add_argument("-e", "--init", default="d12",
                   help="model: dN from scratch (d12 = GPT-2 124M), an llm.c .bin checkpoint, or Hugging Face "
                        "weights: a save_pretrained folder, model.safetensors (F32/F16/BF16) or pytorch_model.bin")
    g.add_argument("-o", "--output-dir", default=None,
                   help="checkpoints and log.jsonl go here (none: not written); a new run needs a folder without "
                        "another run's checkpoints or log (see --resume, --overwrite)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in --output-dir even though it holds another run: first delete that "
                        "run's model_/state_NNNNNNNN.bin, log.jsonl and temp files (nothing else)")
    g.add_argument("--seed", type=int, default=1337, help="init, data shuffling and sampling seed")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train")
    g.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16", "fp8"], default="auto",
                   help="cpu: fp32 only. cuda: bf16 mixed precision (bf16 weights, activations and matmuls, float32 "
                        "master weights, gradients and AdamW state), fp8 (bf16 with the layers' matmuls in fp8: "
                        "E4M3 forward, E5M2 gradients, delayed per-tensor scales; Ada or Hopper GPUs), tf32 (TF32 "
                        "matmuls, float32 storage; what --tf32 1 was) or fp32 (strict; --tf32 0). auto: bf16 on "
                        "cuda, fp32 on cpu")
    g.add_argument("-r", "--recompute", type=int, choices=[0, 1, 2], default=1,
                   help="cuda bf16, fp8: what the backward computes again instead of keeping per layer: 0 nothing "
                        "(fastest), 1 the GELU output (llm.c's default), 2 also the layernorm outputs and the "
                        "residual after attention (least memory: 350M in 15%% less, 4 to 5%% slower)")
    g.add_argument("--deterministic", type=int, choices=[0, 1], default=1,
                   help="cuda bf16, fp8: 1 runs cuDNN's attention backward in a fixed order, so a seed repeats its "
                        "losses bit for bit; 0 takes its faster kernels, whose gradient sums vary in order")
    g = p.add_argument_group("data parallel (launch with mpirun -np N, srun, or torchrun's environment)")
    g.add_argument("-z", "--zero-stage", type=int, choices=[0, 1], default=0,
                   help="0: every rank keeps all of AdamW's state; 1 (ZeRO-1): each keeps and updates 1/N of it")
    g.add_argument("--dist-timeout", type=float, default=900,
                   help="end the job when no step finishes in this many seconds (a rank died or hangs; 0: never)")
    g.add_argument("--nccl-init-dir", default=None,
                   help="cuda without MPI: a directory all ranks share, where rank 0 leaves the NCCL id "
                        "(default: TCP at MASTER_ADDR:MASTER_PORT)")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("-b", "--batch-size", type=int, default=4, help="sequences per micro-batch (B)")
    g.add_argument("-t", "--seq-len", type=int, default=64, help="tokens per sequence (T)")
    g.add_argument("-d", "--total-batch-tokens", type=int, default=0,
                   help="tokens per optimizer step; a multiple of B*T gives gradient accumulation (0: B*T)")
    g.add_argument("-x", "--steps", type=int, default=40,
                   help="optimizer steps to train to (0: no training: load -e, then --eval-only and --export-hf "
                        "if given, and write no checkpoint)")
    g.add_argument("-l", "--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("-u", "--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="constant",
                   help="decay after warmup")
    g.add_argument("-q", "--final-lr-frac", type=float, default=0.0, help="final lr as a fraction of --lr (0 to 1)")
    g.add_argument("-c", "--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--weight-decay-mode", choices=["matrices", "all"], default="matrices",
                   help="decay only the 2-D weights, or every tensor (llm.c's CPU trainer)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1, in [0, 1)")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2, in [0, 1)")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon (positive)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--shuffle", type=int, choices=[0, 1], default=1,
                   help="shuffle the training samples each epoch (val stays in order)")
    g = p.add_argument_group("evaluation, sampling, checkpoints, output")
    g.add_argument("-v", "--val-every", type=int, default=10, help="val loss every N steps (0: never)")
    g.add_argument("-m", "--val-batches", type=int, default=5,
                   help="val batches per evaluation, during training and for --eval-only (0: the whole val split)")
    g.add_argument("-s", "--sample-every", type=int, default=20, help="print a sample every N steps (0: never)")
    g.add_argument("-g", "--gen-tokens", type=int, default=64, help="tokens per sample")
    g.add_argument("-n", "--checkpoint-every", type=int, default=0,
                   help="checkpoint every N steps, plus at the end (needs --output-dir; 0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="keep the newest K checkpoints of the run, the one just written included (0: all)")
    g.add_argument("--tokenizer", default="data/gpt2_tokenizer.bin", help="llm.c tokenizer file for decoding samples")
    g.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak TFLOP/s that MFU is against (0: on the CPU numpy's float32 sgemm rate, measured once per "
                        "machine and cached in $GPT2PY_CPU_PEAK_CACHE or ~/.cache/gpt2py/cpu_peak.json; the "
                        "datasheet TF32/FP32 figure on an H100)")
    g.add_argument("--profile", action="store_true", help="print time per layer kind after training")
    g = p.add_argument_group("other modes")
    g.add_argument("--eval-only", action="store_true",
                   help="print the val loss and perplexity of --init over -m batches (default 5; -m 0: the whole "
                        "val split) and exit")
    g.add_argument("--hellaswag", action="store_true",
                   help="HellaSwag accuracy (llm.c's -h 1) at every val step and with --eval-only: each ending scored "
                        "by the mean loss of its tokens, the lowest wins")
    g.add_argument("--hellaswag-data", metavar="PATH", default="data/hellaswag/hellaswag_val.bin",
                   help="--hellaswag: llm.c's eval file (python prepro_hellaswag.py writes it)")
    g.add_argument("--sample", action="store_true",
                   help="generate text from --init and exit (with --device cuda: on the GPU, in --precision)")
    g.add_argument("--prompt", default="", help="--sample: text to continue (empty: start from <|endoftext|>)")
    g.add_argument("--vocab", metavar="FILE", default=None,
                   help="--prompt: gpt2.tiktoken BPE ranks file; none: <mirror>/gpt2.tiktoken, else "
                        "data/gpt2.tiktoken (where make data leaves it), else tiktoken's download")
    g.add_argument("--mirror", metavar="DIR", default=None,
                   help="--prompt: directory holding gpt2.tiktoken; none: $DATA_MIRROR")
    g.add_argument("--temperature", type=float, default=1.0, help="--sample: softmax temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=0, help="--sample: keep the k most likely tokens (0: all)")
    g.add_argument("--no-kv-cache", action="store_true",
                   help="--sample on the CPU: recompute the whole sequence per token")
    g.add_argument("--compare-kv-cache", action="store_true",
                   help="--sample on the CPU: time generation with and without the cache")
    g.add_argument("--export-hf", metavar="PATH", default=None,
                   help="write the model as a Hugging Face GPT-2 folder (model.safetensors, config.json, "
                        "generation_config.json) that transformers' from_pretrained loads; a path ending in "
                        ".safetensors names the weights file, the JSON files go beside it. The model written is "
                        "the one after training; with -x 0 (or --eval-only, --sample) it is --init as it is: "
                        "-e FILE -x 0 --export-hf DIR converts FILE")
    args = p.parse_args(argv)
    check_numbers(p, args)
    if args.resume and not args.output_dir:
        p.error("--resume needs --output-dir")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output-dir and --overwrite deletes it: pass one of them")
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.device == "cpu" and args.precision != "fp32":
        p.error(f"--precision {args.precision} needs --device cuda (the CPU trains in fp32)")
    if (args.no_kv_cache or args.compare_kv_cache) and args.device != "cpu":
        p.error("--no-kv-cache and --compare-kv-cache time the CPU's generation; the GPU's uses its KV cache")
    if args.profile and args.device != "cpu":
        p.error("--profile times the CPU layers; on CUDA use dev/cuda_check.py bench --profile")
    if args.total_batch_tokens and args.total_batch_tokens % (args.batch_size * args.seq_len):
        p.error(f"--total-batch-tokens {args.total_batch_tokens} is not a multiple of B*T = {args.batch_size * args.seq_len}")
    # where a prompt's BPE ranks come from: checked as the prepro script checks them
    mirror_source = "--mirror" if args.mirror else "DATA_MIRROR"
    args.mirror = args.mirror or os.environ.get("DATA_MIRROR") or None
    if args.vocab and not os.path.isfile(args.vocab):
        p.error(f"vocab file not found: {args.vocab}")
    if args.mirror and not os.path.isdir(args.mirror):
        p.error(f"{mirror_source} directory not found: {args.mirror}")
    return args


def sample_mode(model, args, tokenizer):
    """--sample: on the CPU, or with --device cuda on the GPU (its KV cache, the run's precision)."""
    prompt = encode_prompt(args.prompt, args.vocab, args.mirror) if args.prompt else [start_token(model.cfg)]
    device = build_device(args.device, model, 1, 1, args.precision)
    if args.device == "cpu":
        announce_first_compile()
    runs = [False, True] if args.compare_kv_cache else [not args.no_kv_cache]
    outputs = []
    for use_cache in runs:
        t0 = time.perf_counter()
        tokens, _ = generate(model, prompt, args.gen_tokens, args.temperature, args.top_k, args.seed, use_cache,
                             device.decoder())
        seconds = time.perf_counter() - t0
        outputs.append(tokens)
        print(f"[{'with' if use_cache else 'without'} KV cache: {len(tokens)} tokens in {seconds:.2f} s, "
              f"{len(tokens) / seconds:.1f} tokens/s]")
    if len(outputs) == 2:
        print(f"[same tokens with and without the cache: {'yes' if outputs[0] == outputs[1] else 'NO'}]")
    print(decode(tokenizer, prompt if args.prompt else []) + decode(tokenizer, outputs[-1]))


def claim_output_dir(args):
    """A new training run (no --resume) gets a folder of its own: one that holds another
    run's checkpoints or log is refused in one line, unless --overwrite, which first
    deletes those files (and nothing else)."""
    names = run_files(args.output_dir)
    if not names:
        return
    if args.overwrite:
        removed = remove_run_files(args.output_dir)
        print(f"--overwrite: deleted the previous run's {removed} file(s) in {args.output_dir}")
        return
    steps = list_checkpoint_steps(args.output_dir)
    held = [f"checkpoints up to step {steps[-1]}"] if steps else []
    held += ["log.jsonl"] if "log.jsonl" in names else []
    held = held or [f"{len(names)} unfinished checkpoint file(s)"]
    raise UserError(f"-o {args.output_dir} holds another run's files ({', '.join(held)}): pass --resume to "
                    "continue that run, another -o DIR to start a new one, or --overwrite to delete its checkpoints "
                    "and log first")


def load_run(args):
    """(host model, training state) for this run: the newest checkpoint with --resume,
    else --init. The state is {} for a fresh start."""
    if args.resume and list_checkpoint_steps(args.output_dir):
        model, state = load_training_checkpoint(args.output_dir)
        print(f"resuming from {args.output_dir} at step {state['step']}")
        return model, state
    if args.resume:
        print(f"--resume: no checkpoint in {args.output_dir} yet, starting fresh")
    return load_model(args.init, args.seed), {}


def check_resume(state, args, accum_steps, world):
    """A resumed run must see the same batches in the same order as the interrupted one:
    the same seed, B, T and tokens per step (on any number of ranks)."""
    if state.get("seed") != args.seed:
        raise UserError(f"--resume: the checkpoint was trained with --seed {state.get('seed')}; pass the same seed")
    was = (state.get("B"), state.get("T"), state.get("accum_steps") * state.get("world", 1))
    if was != (args.batch_size, args.seq_len, accum_steps * world):
        raise UserError(f"--resume: the checkpoint was trained with B={was[0]} T={was[1]} and {was[2]} micro-batches "
                        f"per step over all ranks; pass the same -b, -t, -d")


def save_checkpoint(args, dist, device, model, step, train_loader, rng_state, accum_steps):
    """One set of files, written by rank 0 (every rank takes part in gathering the state)."""
    if not args.output_dir:
        return
    device.state_to_host()
    if dist.rank == 0:
        extra = {"loader": train_loader.state(), "rng_state": rng_state, "B": args.batch_size, "T": args.seq_len,
                 "accum_steps": accum_steps, "seed": args.seed, "world": dist.world, "device": device.run_state()}
        path = save_training_checkpoint(model, args.output_dir, step, extra, args.keep_checkpoints,
                                        bfloat16=args.precision in ("bf16", "fp8"))
        state_path = checkpoint_paths(args.output_dir, step)[1]
        print(f"checkpoint: {path} (weights, llm.c format) + {os.path.basename(state_path)} (optimizer, data "
              "position: for --resume)")
    dist.barrier()  # no rank runs ahead of a checkpoint that is not on disk yet


def log_step(log, step, steps, loss, norm, lr, seconds, tokens, peak_seconds):
    """The step line, and its log.jsonl record (peak_seconds: the step's time at peak FLOP/s)."""
    mfu = peak_seconds / seconds
    print(f"step {step:5d}/{steps} | loss {loss:.6f} | norm {norm:7.4f} | lr {lr:.2e} | "
          f"{1000 * seconds:7.1f} ms | {tokens / seconds:8.0f} tok/s | MFU {100 * mfu:5.1f}%")
    log.write(type="train", step=step, loss=loss, norm=norm, lr=lr, ms=1000 * seconds, tokens_per_s=tokens / seconds,
              mfu=mfu)


def main(args, dist=SINGLE):
    t_start = time.perf_counter()
    check_device(args.device)  # before minutes of loading, not after
    if dist.rank != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the run; errors still reach stderr
    training = args.steps > 0 and not (args.eval_only or args.sample)
    if training and args.output_dir and not args.resume and dist.rank == 0:
        claim_output_dir(args)  # before minutes of loading; rank 0 writes the files, so it alone checks
    tokenizer = read_tokenizer(args.tokenizer)
    model, state = load_run(args)
    cfg = model.cfg
    print(f"model: L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} V={cfg.vocab_size} maxT={cfg.max_seq_len} "
          f"({model.num_parameters:,} parameters)")
    if args.sample:
        sample_mode(model, args, tokenizer)
        export_hf(model, args.export_hf)
        return 0
    if not training and not args.eval_only:  # -x 0: load, export if asked, and nothing more
        if dist.rank == 0:
            export_hf(model, args.export_hf)
        if not args.export_hf:
            print("-x 0: no training; nothing else asked (add --eval-only or --export-hf DIR)")
        return 0
    B, T = args.batch_size, args.seq_len
    if T > cfg.max_seq_len:
        raise UserError(f"-t {T} exceeds the model's max_seq_len={cfg.max_seq_len}")
    val_loader = DataLoader(args.val_data, B, T, cfg.vocab_size) if args.val_data else None
    hellaswag = read_hellaswag(args.hellaswag_data, cfg) if args.hellaswag else None
    device = build_device(args.device, model, B, T, args.precision, dist, args.zero_stage, args.recompute,
                          args.deterministic)
    if args.eval_only:
        if val_loader is None and hellaswag is None:
            raise UserError("--eval-only needs validation data (-j) or --hellaswag")
        if args.device == "cpu":
            announce_first_compile()
        if val_loader is not None and dist.rank == 0:
            batches = val_loader.num_batches() if args.val_batches <= 0 else \
                min(args.val_batches, val_loader.num_batches())
            print(f"eval: {batches} of the {val_loader.num_batches()} val batches of B={B} T={T}"
                  + (" (-m 0 for all of them)" if batches < val_loader.num_batches() else ""), flush=True)
            loss = evaluate(device, val_loader, args.val_batches)
            print(f"val loss {loss:.6f} | perplexity {perplexity(loss):.3f}")
        if hellaswag is not None:
            run_hellaswag(device, hellaswag, args, dist, None, 0)
        export_hf(model, args.export_hf)
        return 0
    if args.export_hf:
        print(f"--export-hf: writes the model after step {args.steps} (-x 0 exports -e as it is, untrained)")

    train_loader = DataLoader(args.train_data, B, T, cfg.vocab_size, bool(args.shuffle), args.seed, dist.rank, dist.world)
    if args.total_batch_tokens % (B * T * dist.world):
        raise UserError(f"-d {args.total_batch_tokens} is not a multiple of B*T*ranks = {B * T * dist.world}")
    accum_steps = max(1, args.total_batch_tokens // (B * T * dist.world))
    tokens_per_step = accum_steps * B * T * dist.world
    start_step, rng_state = 0, args.seed
    if state:
        check_resume(state, args, accum_steps, dist.world)
        device.state_from_host()
        device.set_run_state(state.get("device", {}))
        start_step, rng_state = state["step"], state["rng_state"]
        train_loader.set_state(state["loader"])
    peak = args.peak_tflops * 1e12 or device.peak_flops() or float("nan")
    peak_source = ("--peak-tflops" if args.peak_tflops else
                   f"numpy's sgemm rate on this machine, cached in {cpu_peak_cache_path()}" if args.device == "cpu" else
                   "the GPU's datasheet peak")
    flops_per_step = flops_per_token(cfg, T) * tokens_per_step
    log = JsonlLog(args.output_dir if dist.rank == 0 else None, start_step)
    print(f"train: {train_loader.num_batches()} batches of B={B} T={T} in {len(train_loader.paths)} file(s); "
          f"{accum_steps} micro-step(s) per step{f' on each of {dist.world} ranks' if dist.world > 1 else ''} "
          f"({tokens_per_step} tokens); "
          f"val: {val_loader.num_batches() if val_loader else 0} batches")
    if dist is not SINGLE:
        ranks = f"{dist.world} rank{'s' if dist.world > 1 else ''}"
        print(f"data parallel: {ranks} over {dist.engine}, ZeRO-{args.zero_stage}: "
              f"{device.optimizer_bytes() / 2 ** 20:.1f} MiB of AdamW state per rank")
    print(f"ready in {time.perf_counter() - t_start:.2f} s; MFU is against {peak / 1e12:.3f} TFLOP/s ({peak_source})")
    if args.device == "cpu":
        announce_first_compile()  # the first forward compiles them

    profile = LayerProfile() if args.profile else None
    interrupted = []  # Ctrl-C, or SIGTERM (Slurm's time limit): checkpoint after this step and stop
    previous_handlers = {sig: signal.signal(sig, lambda *_: interrupted.append(True))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    step_times = []
    watchdog = distributed.Watchdog(dist, args.dist_timeout)
    try:
        for step in range(start_step, args.steps + 1):
            watchdog.beat()
            last = step == args.steps
            val_step = args.val_every > 0 and (step % args.val_every == 0 or last)
            if val_loader and dist.rank == 0 and val_step:
                val_loss = evaluate(device, val_loader, args.val_batches)
                print(f"val loss {val_loss:.6f} | perplexity {perplexity(val_loss):.2f}")
                log.write(type="val", step=step, loss=val_loss, perplexity=perplexity(val_loss))
            if hellaswag is not None and val_step:  # every rank: each scores its share
                run_hellaswag(device, hellaswag, args, dist, log, step)
            if dist.rank == 0 and args.sample_every > 0 and step > 0 and (step % args.sample_every == 0 or last):
                tokens, rng_state = generate(model, [start_token(cfg)], min(args.gen_tokens, cfg.max_seq_len - 1),
                                             rng_state=rng_state, decoder=device.decoder())
                print("generating:\n---\n" + decode(tokenizer, tokens) + "\n---")
            if last:
                break

            t0 = time.perf_counter()
            if profile:
                profile.start()
            lr = learning_rate(step, args.lr, args.steps, args.warmup_steps, args.lr_schedule, args.final_lr_frac)
            loss = 0.0
            for micro in range(accum_steps):
                x, y = train_loader.next_batch()
                loss += device.forward(x, y) / accum_steps
                device.backward(micro > 0, 1.0 / (accum_steps * dist.world), micro == accum_steps - 1)
            norm = device.update(lr, args.beta1, args.beta2, args.eps, args.weight_decay, args.weight_decay_mode,
                                 args.grad_clip)
            loss = dist.sum(loss) / dist.world
            stop = dist.any(interrupted)  # every rank stops at the same step
            seconds = time.perf_counter() - t0
            if profile:
                profile.stop(first_step=not step_times)
            step_times.append(seconds)

            log_step(log, step + 1, args.steps, loss, norm, lr, seconds, tokens_per_step, flops_per_step / peak)
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at step {step + 1}: lower the learning rate or clip gradients")
            if stop:
                print("interrupted: saving a checkpoint")
                save_checkpoint(args, dist, device, model, step + 1, train_loader, rng_state, accum_steps)
                return 130
            if args.checkpoint_every > 0 and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
                save_checkpoint(args, dist, device, model, step + 1, train_loader, rng_state, accum_steps)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    if start_step < args.steps:
        save_checkpoint(args, dist, device, model, args.steps, train_loader, rng_state, accum_steps)
    if step_times and not args.peak_tflops and args.device == "cpu" and dist.rank == 0 \
            and flops_per_step / peak / min(step_times) > 1:
        forget_cpu_peak()
        print(f"note: a step ran above the cached sgemm rate ({peak / 1e12:.3f} TFLOP/s), so that rate was measured "
              "while the machine was busy: it is dropped and measured again next run")
    device.params_to_host()
    if dist.world > 1 and not dist.all_equal(zlib.crc32(model.params_memory)):
        raise UserError("the ranks ended with different parameters: the data-parallel update is broken")
    if step_times:
        times = sorted(step_times[1:] or step_times)
        memory = device.memory_used()
        print(f"done: median step {1000 * times[len(times) // 2]:.1f} ms (first step {1000 * step_times[0]:.1f} ms)"
              + (f"; {device.name} memory {memory / 2 ** 30:.2f} GiB" + (" (rank 0)" if dist.world > 1 else "")
                 if memory else ""))
    if profile:
        print(f"time per layer kind, averaged over steps 2..{len(step_times)}:")
        print(profile.table(sum(step_times[1:])))
    if args.export_hf and dist.rank == 0:
        export_hf(model, args.export_hf)
    return 0


def run_hellaswag(device, hellaswag, args, dist, log, step):
    """HellaSwag over the eval file, printed as llm.c prints it and logged."""
    examples, longest = hellaswag
    T, rows = hellaswag_shape(args, longest)
    t0 = time.perf_counter()
    correct, total = hellaswag_evaluate(device, examples, T, rows, dist)
    accuracy = correct / max(total, 1)
    print(f"HellaSwag: {correct}/{total} = {accuracy:.6f} ({time.perf_counter() - t0:.1f} s, rows of {T} tokens, "
          f"{rows} a forward)")
    if log is not None:
        log.write(type="hellaswag", step=step, correct=correct, total=total, accuracy=accuracy)


def export_hf(model, path):
    if path:
        folder = write_hf(model, path)
        print(f"wrote {path} (a Hugging Face GPT-2 folder: {folder} holds the weights, config.json, "
              "generation_config.json)")


def cli(argv=None):
    dist = SINGLE
    try:
        args = parse_args(argv)
        dist = distributed.setup(args.device, args.nccl_init_dir)
        return main(args, dist)
    except (UserError, distributed.DistributedError) as e:
        print(f"error{f' (rank {dist.rank} of {dist.world})' if dist.world > 1 else ''}: {e}", file=sys.stderr)
        dist.abort(1)  # the other ranks may be waiting in a collective: end them too
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
