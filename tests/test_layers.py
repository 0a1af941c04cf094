"""Layer kernels of train_gpt2.py against plain float64 numpy written from the math,
and every backward against central finite differences in float64 (gradient checks).

Forward checks run the kernels on float32 inputs (what training uses); gradient
checks run them on float64 arrays (Numba compiles a float64 specialization) so that
finite differences with eps=1e-6 are accurate to ~1e-9.
"""

import math

import numpy as np
import pytest

import train_gpt2 as gpt

RNG_SEED = 1234
EPS = 1e-6
GELU_K = math.sqrt(2.0 / math.pi)


def rng(offset=0):
    return np.random.default_rng(RNG_SEED + offset)


def numerical_grad(objective, x, eps=EPS, indices=None):
    """Central differences of objective() with respect to array x (perturbed in place)."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat = x.reshape(-1)
    gflat = grad.reshape(-1)
    for i in (range(flat.size) if indices is None else indices):
        old = flat[i]
        flat[i] = old + eps
        plus = objective()
        flat[i] = old - eps
        minus = objective()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def assert_grad_close(analytic, numeric, rel=1e-8, what=""):
    """max |analytic - numeric| <= rel * max |numeric| (plus a tiny floor)."""
    analytic = np.asarray(analytic, dtype=np.float64)
    scale = max(float(np.max(np.abs(numeric))), 1e-12)
    err = float(np.max(np.abs(analytic - numeric)))
    assert err <= rel * scale + 1e-12, f"{what}: max abs error {err:.3e} vs max |grad| {scale:.3e} (rel tol {rel})"


# ----------------------------------------------------------------------------- references (float64)


def ref_encoder(tokens, wte, wpe, T):
    tokens = np.asarray(tokens).reshape(-1)
    out = np.empty((tokens.size, wte.shape[1]))
    for bt, tok in enumerate(tokens):
        out[bt] = np.float64(wte[tok]) + np.float64(wpe[bt % T])
    return out


def ref_layernorm(x, w, b):
    x = x.astype(np.float64)
    mean = x.mean(axis=1)
    var = ((x - mean[:, None]) ** 2).mean(axis=1)  # biased
    rstd = 1.0 / np.sqrt(var + 1e-5)
    return (x - mean[:, None]) * rstd[:, None] * w + b, mean, rstd


def ref_attention(qkv, B, T, NH):
    """Causal multi-head attention; qkv rows are [q | k | v], heads side by side."""
    qkv = qkv.astype(np.float64)
    C = qkv.shape[1] // 3
    hs = C // NH
    out = np.zeros((B * T, C))
    att = np.zeros((B, NH, T, T))
    for b in range(B):
        for h in range(NH):
            rows = slice(b * T, (b + 1) * T)
            q = qkv[rows, h * hs:(h + 1) * hs]
            k = qkv[rows, C + h * hs:C + (h + 1) * hs]
            v = qkv[rows, 2 * C + h * hs:2 * C + (h + 1) * hs]
            scores = q @ k.T / math.sqrt(hs)
            for t in range(T):
                s = scores[t, :t + 1]
                e = np.exp(s - s.max())
                att[b, h, t, :t + 1] = e / e.sum()
            out[rows, h * hs:(h + 1) * hs] = att[b, h] @ v
    return out, att


def ref_gelu(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(GELU_K * (x + 0.044715 * x ** 3)))


def ref_gelu_grad(x):
    x = np.asarray(x, dtype=np.float64)
    u = GELU_K * (x + 0.044715 * x ** 3)
    th = np.tanh(u)
    return 0.5 * (1 + th) + 0.5 * x * (1 - th ** 2) * GELU_K * (1 + 3 * 0.044715 * x ** 2)


def ref_crossentropy(logits, targets, V):
    z = logits[:, :V].astype(np.float64)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    losses = np.where(targets >= 0, lse - z[np.arange(len(targets)), np.maximum(targets, 0)], 0.0)
    return losses, lse


# ----------------------------------------------------------------------------- encoder

B, T, C, NH, V, VP, MAXT = 2, 4, 16, 2, 12, 16, 8
N = B * T


def encoder_inputs(dtype):
    r = rng(1)
    tokens = r.integers(0, V, size=N).astype(np.int32)
    tokens[3] = tokens[0]  # a repeated token: the scatter must add, not overwrite
    wte = r.standard_normal((VP, C)).astype(dtype)
    wpe = r.standard_normal((MAXT, C)).astype(dtype)
    return tokens, wte, wpe


def test_encoder_forward():
    tokens, wte, wpe = encoder_inputs(np.float32)
    out = np.full((N, C), np.nan, dtype=np.float32)
    gpt.encoder_forward(out, tokens, wte, wpe, T)
    np.testing.assert_allclose(out, ref_encoder(tokens, wte, wpe, T), rtol=1e-6, atol=1e-7)


def test_encoder_backward_gradcheck_and_accumulate():
    tokens, wte, wpe = encoder_inputs(np.float64)
    W = rng(2).standard_normal((N, C))
    out = np.empty((N, C))

    def objective():
        gpt.encoder_forward(out, tokens, wte, wpe, T)
        return float(np.sum(out * W))

    num_wte = numerical_grad(objective, wte)
    num_wpe = numerical_grad(objective, wpe)
    assert np.count_nonzero(np.abs(num_wte).sum(axis=1)) == len(set(tokens.tolist()))
    assert np.all(num_wpe[T:] == 0)

    # accumulate=False: dwpe is overwritten; dwte is a scatter-add (the classifier
    # matmul, which runs first in gpt2_backward, is what overwrites wte's gradient)
    dwte0 = rng(3).standard_normal((VP, C))
    dwpe0 = rng(4).standard_normal((MAXT, C))
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    gpt.encoder_backward(dwte, dwpe, W, tokens, T, False)
    assert_grad_close(dwpe, num_wpe, what="dwpe (accumulate=False overwrites)")
    assert_grad_close(dwte - dwte0, num_wte, what="dwte (always adds)")

    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    gpt.encoder_backward(dwte, dwpe, W, tokens, T, True)
    assert_grad_close(dwpe - dwpe0, num_wpe, what="dwpe (accumulate=True adds)")
    assert_grad_close(dwte - dwte0, num_wte, what="dwte (accumulate=True adds)")


# ----------------------------------------------------------------------------- layernorm


def layernorm_inputs(dtype):
    r = rng(5)
    # nonzero means; row scales from 0.01 to 3, so that eps=1e-5 matters for the small rows
    scale = np.geomspace(0.01, 3.0, N)[:, None]
    x = (scale * (1.5 + r.standard_normal((N, C)))).astype(dtype)
    w = (1.0 + 0.5 * r.standard_normal(C)).astype(dtype)
    b = r.standard_normal(C).astype(dtype)
    return x, w, b


# float64: 1e-8, not 1e-12, because the kernel's eps is np.float32(1e-5) (2.5e-14 below 1e-5)
@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-8)])
def test_layernorm_forward(dtype, tol):
    x, w, b = layernorm_inputs(dtype)
    out, mean, rstd = np.empty_like(x), np.empty(N, dtype), np.empty(N, dtype)
    gpt.layernorm_forward(out, mean, rstd, x, w, b)
    ref_out, ref_mean, ref_rstd = ref_layernorm(x, w, b)
    np.testing.assert_allclose(mean, ref_mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(rstd, ref_rstd, rtol=tol)
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=10 * tol)


def test_layernorm_backward_gradcheck_and_accumulate():
    x, w, b = layernorm_inputs(np.float64)
    W = rng(6).standard_normal((N, C))
    out, mean, rstd = np.empty_like(x), np.empty(N), np.empty(N)

    def objective():
        gpt.layernorm_forward(out, mean, rstd, x, w, b)
        return float(np.sum(out * W))

    num_x, num_w, num_b = (numerical_grad(objective, a) for a in (x, w, b))
    objective()  # mean, rstd for the unperturbed input

    r = rng(7)
    dx0, dw0, db0 = r.standard_normal((N, C)), r.standard_normal(C), r.standard_normal(C)
    dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()
    gpt.layernorm_backward(dx, dw, db, W, x, w, mean, rstd, False)
    assert_grad_close(dx - dx0, num_x, what="dinp (always adds: residual stream)")
    assert_grad_close(dw, num_w, what="dweight (accumulate=False overwrites)")
    assert_grad_close(db, num_b, what="dbias (accumulate=False overwrites)")

    dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()
    gpt.layernorm_backward(dx, dw, db, W, x, w, mean, rstd, True)
    assert_grad_close(dx - dx0, num_x, what="dinp")
    assert_grad_close(dw - dw0, num_w, what="dweight (accumulate=True adds)")
    assert_grad_close(db - db0, num_b, what="dbias (accumulate=True adds)")


# ----------------------------------------------------------------------------- matmul

OC = 12


def matmul_inputs(dtype):
    r = rng(8)
    return (r.standard_normal((N, C)).astype(dtype), r.standard_normal((OC, C)).astype(dtype),
            r.standard_normal(OC).astype(dtype))


@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_forward(with_bias):
    x, w, b = matmul_inputs(np.float32)
    out = np.full((N, OC), np.nan, dtype=np.float32)
    gpt.matmul_forward(out, x, w, b if with_bias else None)
    ref = np.zeros((N, OC))
    for n in range(N):
        for o in range(OC):
            ref[n, o] = sum(float(x[n, c]) * float(w[o, c]) for c in range(C)) + (float(b[o]) if with_bias else 0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scratch_rows", [OC, 5])  # 5: the accumulate path works in blocks of 5,5,2 rows
def test_matmul_backward_gradcheck_and_accumulate(with_bias, scratch_rows):
    x, w, b = matmul_inputs(np.float64)
    bias = b if with_bias else None
    W = rng(9).standard_normal((N, OC))
    out = np.empty((N, OC))

    def objective():
        gpt.matmul_forward(out, x, w, bias)
        return float(np.sum(out * W))

    num_x, num_w, num_b = (numerical_grad(objective, a) for a in (x, w, b))
    if not with_bias:
        assert np.all(num_b == 0)

    r = rng(10)
    dx0, dw0, db0 = r.standard_normal((N, C)), r.standard_normal((OC, C)), r.standard_normal(OC)
    for accumulate in (False, True):
        dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()
        scratch = np.full(scratch_rows * C, np.nan)
        gpt.matmul_backward(dx, dw, db if with_bias else None, W, x, w, accumulate, scratch)
        base_w, base_b = (dw0, db0) if accumulate else (0.0, 0.0)
        assert_grad_close(dx, num_x, what=f"dinp (overwritten), accumulate={accumulate}")
        assert_grad_close(dw - base_w, num_w, what=f"dweight, accumulate={accumulate}")
        if with_bias:
            assert_grad_close(db - base_b, num_b, what=f"dbias, accumulate={accumulate}")
        else:
            np.testing.assert_array_equal(db, db0)


# ----------------------------------------------------------------------------- attention

AT_B, AT_T, AT_NH, AT_C = 2, 5, 2, 16  # head size 8


def attention_inputs(dtype):
    return rng(11).standard_normal((AT_B * AT_T, 3 * AT_C)).astype(dtype)


# float64: 1e-7, because the kernel's scale is np.float32(1 / sqrt(8)) (3e-8 off) in either specialization
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-7)])
def test_attention_forward(dtype, tol):
    qkv = attention_inputs(dtype)
    out = np.full((AT_B * AT_T, AT_C), np.nan, dtype=dtype)
    att = np.full((AT_B, AT_NH, AT_T, AT_T), np.nan, dtype=dtype)
    gpt.attention_forward(out, att, qkv, AT_B, AT_T, AT_NH)
    ref_out, ref_att = ref_attention(qkv, AT_B, AT_T, AT_NH)
    np.testing.assert_allclose(att, ref_att, rtol=tol, atol=tol)
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(att.sum(axis=-1), 1.0, rtol=tol)
    upper = np.triu(np.ones((AT_T, AT_T), dtype=bool), k=1)
    assert np.all(att[..., upper] == 0.0), "causal mask: attention to future positions must be exactly 0"
    assert np.all(att[..., ~upper] > 0.0)


def test_attention_backward_gradcheck():
    qkv = attention_inputs(np.float64)
    W = rng(12).standard_normal((AT_B * AT_T, AT_C))
    out = np.empty((AT_B * AT_T, AT_C))
    att = np.empty((AT_B, AT_NH, AT_T, AT_T))

    def objective():
        gpt.attention_forward(out, att, qkv, AT_B, AT_T, AT_NH)
        return float(np.sum(out * W))

    num = numerical_grad(objective, qkv)
    objective()
    dqkv = np.full_like(qkv, 123.0)  # overwritten, not accumulated
    gpt.attention_backward(dqkv, W, qkv, att, AT_B, AT_T, AT_NH)
    # 1e-6, not 1e-8: attention_backward keeps its per-row datt scratch in float32
    # (np.empty(T, dtype=np.float32)) even in the float64 specialization
    assert_grad_close(dqkv, num, rel=1e-6, what="dqkv")
    # the query at t=0 attends to itself only: a softmax over one score has zero gradient
    assert np.all(dqkv[0::AT_T, :AT_C] == 0.0)


# ----------------------------------------------------------------------------- GELU


def gelu_inputs(dtype):
    # |x| <= 4.5: below the point (|x| ~ 4.8) where tanh_f32's argument reaches its clamp;
    # the saturated tails are tested separately below
    x = np.clip(rng(13).standard_normal(64) * 2, -4.5, 4.5)
    x = np.concatenate([x, [-4.5, -3.0, -1.0, 0.0, 1.0, 3.0, 4.0, 4.5]])
    return x.astype(dtype).reshape(8, 9)


def test_gelu_forward():
    x = gelu_inputs(np.float32)
    out = np.full_like(x, np.nan)
    gpt.gelu_forward(out, x)
    np.testing.assert_allclose(out, ref_gelu(x), rtol=2e-6, atol=7e-7)
    # the tanh form, not the erf form (they differ by 1.5e-4 at x=1)
    one = np.array([1.0], dtype=np.float32)
    o = np.empty_like(one)
    gpt.gelu_forward(o, one)
    assert abs(float(o[0]) - 0.8411920071) < 1e-6


def test_gelu_forward_negative_tail_is_zero():
    # regression: with FASTMATH "contract" (FMA) tanh_f32 saturated at -(1 - 1.2e-7), so
    # GELU(x) was 1.2e-7 * x instead of 0 for x <= -6 (llm.c's tanhf and PyTorch give -0.0)
    x = np.array([-6.0, -10.0, -20.0, -100.0], dtype=np.float32)
    out = np.full_like(x, np.nan)
    gpt.gelu_forward(out, x)
    # exact values are below 1e-10 in magnitude (0 in float32 with tanhf)
    np.testing.assert_allclose(out, ref_gelu(x), rtol=0, atol=1e-9)


def test_gelu_backward_gradcheck():
    x = gelu_inputs(np.float64)
    W = rng(14).standard_normal(x.shape)
    d = W.copy()
    gpt.gelu_backward(d, x)  # in place: d <- gelu'(x) * d
    # finite differences of the exact tanh-form GELU (float64 np.tanh)
    num = np.zeros_like(x)
    num_own = np.zeros_like(x)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += EPS
        xm[idx] -= EPS
        num[idx] = (ref_gelu(xp[idx]) - ref_gelu(xm[idx])) / (2 * EPS) * W[idx]
        gpt.gelu_forward(out, xp)
        plus = out[idx]
        gpt.gelu_forward(out, xm)
        num_own[idx] = (plus - out[idx]) / (2 * EPS) * W[idx]
    # 2e-6, not 1e-8: the kernel's tanh is a float32-accurate rational approximation
    # (tanh_f32), also in the float64 specialization
    assert_grad_close(d, num, rel=2e-6, what="gelu' vs exact GELU")
    assert_grad_close(d, num_own, rel=2e-6, what="gelu' vs the kernel's own forward")


def test_gelu_backward_float32():
    x = gelu_inputs(np.float32)
    d = np.ones_like(x)
    gpt.gelu_backward(d, x)
    np.testing.assert_allclose(d, ref_gelu_grad(x), rtol=2e-6, atol=2e-6)


def test_gelu_backward_saturated_tails():
    # regression: with FASTMATH "contract" (FMA) tanh_f32 returned 1 - 1.2e-7 in the tails,
    # so sech^2 was 2.4e-7 instead of ~0 and gelu'(x) was off by ~1.6e-8 |x|^3.
    # (float32 only: the float64 specialization still evaluates the rational function to
    # 1 - 1.2e-7 at the clamp, so gelu'(+-30) is off by 7e-4 in float64.)
    x = np.array([-30.0, -12.0, -6.0, 6.0, 12.0, 30.0], dtype=np.float32)
    d = np.ones_like(x)
    gpt.gelu_backward(d, x)
    # exact: 0 for the negative tail, 1 for the positive tail (to better than 1e-10)
    np.testing.assert_allclose(d, ref_gelu_grad(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- cross-entropy

CE_N = 6


def crossentropy_inputs(dtype):
    r = rng(15)
    logits = (2 * r.standard_normal((CE_N, VP))).astype(dtype)
    logits[:, V:] = 50.0  # padding columns: would dominate the softmax if they were included
    targets = r.integers(0, V, size=CE_N).astype(np.int32)
    targets[2] = -1  # masked
    return logits, targets


def test_crossentropy_forward():
    logits, targets = crossentropy_inputs(np.float32)
    losses = np.full(CE_N, np.nan, dtype=np.float32)
    lse = np.full(CE_N, np.nan, dtype=np.float32)
    gpt.crossentropy_forward(losses, lse, logits, targets, V)
    ref_losses, ref_lse = ref_crossentropy(logits, targets, V)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-6)
    assert losses[2] == 0.0


def test_crossentropy_backward_gradcheck():
    logits, targets = crossentropy_inputs(np.float64)
    dloss = 0.37

    def objective():  # the float64 math, not the kernel: see the note below
        return dloss * float(ref_crossentropy(logits, targets, V)[0].sum())

    num = numerical_grad(objective, logits)
    assert np.all(num[:, V:] == 0) and np.all(num[2] == 0)
    losses, lse = np.empty(CE_N), np.empty(CE_N)
    gpt.crossentropy_forward(losses, lse, logits, targets, V)
    dlogits = logits.copy()
    gpt.crossentropy_backward(dlogits, lse, targets, V, dloss)
    # 2e-6, not 1e-8, and against the numpy forward rather than the kernel's own: the
    # kernels' exp (exp_shifted) keeps float32 scratch (np.empty(V, np.float32), a
    # float32 power-of-two view) even in the float64 specialization, so the float64
    # kernel forward is a float32-accurate step function under 1e-6 perturbations
    assert_grad_close(dlogits, num, rel=2e-6, what="dlogits")
    assert np.all(dlogits[:, V:] == 0.0), "padding columns get exactly zero gradient"
    assert np.all(dlogits[2] == 0.0), "a masked row gets exactly zero gradient"


def test_crossentropy_backward_float32():
    logits, targets = crossentropy_inputs(np.float32)
    dloss = np.float32(0.25)
    losses, lse = np.empty(CE_N, np.float32), np.empty(CE_N, np.float32)
    gpt.crossentropy_forward(losses, lse, logits, targets, V)
    dlogits = logits.copy()
    gpt.crossentropy_backward(dlogits, lse, targets, V, dloss)
    z = logits[:, :V].astype(np.float64)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ref = probs.copy()
    ref[np.arange(CE_N), targets] -= 1.0
    ref *= float(dloss)
    ref[targets < 0] = 0.0
    np.testing.assert_allclose(dlogits[:, :V], ref, rtol=0, atol=1e-6 * float(dloss))
    assert np.all(dlogits[:, V:] == 0.0)


# ----------------------------------------------------------------------------- AdamW


def test_adamw_update_matches_formula():
    r = rng(16)
    n = 1000
    p0 = r.standard_normal(n).astype(np.float32)
    g = r.standard_normal(n).astype(np.float32)
    m0 = (0.1 * r.standard_normal(n)).astype(np.float32)
    v0 = (0.01 * r.random(n)).astype(np.float32)
    lr, b1, b2, eps, wd, step, gscale = 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, 0.5
    c1, c2 = 1 - b1 ** step, 1 - b2 ** step
    p, m, v = p0.copy(), m0.copy(), v0.copy()
    f = np.float32
    gpt.adamw_update(p, g, m, v, f(lr), f(b1), f(b2), f(eps), f(wd), f(c1), f(c2), f(gscale))

    gg = g.astype(np.float64) * gscale
    ref_m = b1 * m0.astype(np.float64) + (1 - b1) * gg
    ref_v = b2 * v0.astype(np.float64) + (1 - b2) * gg ** 2
    ref_p = p0 - lr * ((ref_m / c1) / (np.sqrt(ref_v / c2) + eps) + wd * p0.astype(np.float64))
    np.testing.assert_allclose(m, ref_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(p - p0, ref_p - p0, rtol=1e-3, atol=1e-6)  # the update itself, ~1e-2


def test_adamw_weight_decay_is_decoupled():
    # zero gradient and moments: only decay acts, p <- p (1 - lr wd) exactly, not an Adam-normalized step
    p0 = np.array([0.5, -2.0, 3.0, 1e-3], dtype=np.float32)
    p = p0.copy()
    z = np.zeros_like(p)
    f = np.float32
    gpt.adamw_update(p, z, z.copy(), z.copy(), f(0.1), f(0.9), f(0.999), f(1e-8), f(0.2), f(0.1), f(0.001), f(1.0))
    np.testing.assert_allclose(p, p0.astype(np.float64) * (1 - 0.1 * 0.2), rtol=1e-6)


# ----------------------------------------------------------------------------- sum of squares


def test_sum_of_squares_small():
    x = rng(17).standard_normal(1001).astype(np.float32)
    ref = float(np.sum(x.astype(np.float64) ** 2))
    assert gpt.sum_of_squares(x) == pytest.approx(ref, rel=1e-12)


def test_sum_of_squares_accumulates_in_float64():
    # 4M values of 0.1: a float32 running sum would be off by far more than 1e-9
    x = np.full(4_000_000, 0.1, dtype=np.float32)
    ref = x.size * float(np.float64(np.float32(0.1)) ** 2)
    assert gpt.sum_of_squares(x) == pytest.approx(ref, rel=1e-9)
