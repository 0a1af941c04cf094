#!/usr/bin/env python
"""Checks and benchmarks of train_gpt2_cuda.py (the CUDA twin of train_gpt2.py).

Subcommands:
  kernels      every CUDA kernel (and the cuBLAS plumbing) against its CPU twin on tiny
               shapes, then full forward/backward/update steps of both paths. Runs in
               numba's simulator too (NUMBA_ENABLE_CUDASIM=1): tests/test_cuda_sim.py.
  parity       CUDA step vs CPU step on a real-size model (default GPT-2 124M, B=4,
               T=64, random init): max abs error of logits, loss, all 16 gradients and
               the 10 step losses of llm.c's test recipe; --tf32 0/1.
  bench        train at B=16, T=1024 on tinyshakespeare (or random tokens): loss per
               step, median tokens/s, peak device memory; JSON to --json.
  bench-torch  the same step in PyTorch eager (dev/torch_reference.py's model, fused
               AdamW), manual attention and SDPA; JSON to --json.
  table        the summary table of the JSON files in a folder.
Every check line says OK or FAIL; the exit status is non-zero on any FAIL.
"""

import argparse
import gc
import glob
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FAILS = []


def report(name, got, ref, tol, absolute=False):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        print(f"CHECK {name:28s} shape {got.shape} != {ref.shape} FAIL", flush=True)
        FAILS.append(name)
        return
    err = float(np.max(np.abs(got - ref))) if got.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = err / scale if scale > 0 else err
    bad = not np.all(np.isfinite(got)) or (err if absolute else rel) > tol
    print(f"CHECK {name:28s} maxabs={err:.3e} rel={rel:.3e} tol={tol:.0e}{' abs' if absolute else ''} "
          f"{'FAIL' if bad else 'OK'}", flush=True)
    if bad:
        FAILS.append(name)


def finish():
    if FAILS:
        print(f"RESULT FAIL {len(FAILS)}: {' '.join(FAILS)}", flush=True)
        sys.exit(1)
    print("RESULT OK", flush=True)


# -----------------------------------------------------------------------------
# kernels


def cmd_kernels(args):
    import train_gpt2 as cpu
    import train_gpt2_cuda as tc
    from numba import cuda

    print(f"simulator={tc.SIM}", flush=True)
    rng = np.random.default_rng(1234)
    f32 = np.float32
    tol = args.tol

    def put(x):
        x = np.ascontiguousarray(x)
        if x.dtype == np.float32:
            d = tc._alloc(x.size)
            d.copy_to_device(x.reshape(-1))
            return d.reshape(x.shape)
        return cuda.to_device(x)

    def rand(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(f32)

    N, C, T, B = 18, 40, 6, 3  # N, C not multiples of the block sizes
    # encoder + layernorm
    V, maxT = 50, 8
    wte, wpe, w, b = rand(V, C), rand(maxT, C), rand(C), rand(C)
    tokens = rng.integers(0, 7, size=B * T).astype(np.int32)  # repeats, for the wte scatter
    enc, ln, mean, rstd = np.zeros((B * T, C), f32), np.zeros((B * T, C), f32), np.zeros(B * T, f32), np.zeros(B * T, f32)
    cpu.encoder_forward(enc, tokens, wte, wpe, T)
    cpu.layernorm_forward(ln, mean, rstd, enc, w, b)
    d_enc, d_ln, d_mean, d_rstd = put(enc * 0), put(ln * 0), put(mean * 0), put(rstd * 0)
    tc.encoder_layernorm(d_enc, d_ln, d_mean, d_rstd, put(tokens), put(wte), put(wpe), put(w), put(b), T)
    report("encoder_forward", d_enc.copy_to_host(), enc, tol)
    report("encoder+layernorm ln", d_ln.copy_to_host(), ln, tol)
    report("encoder+layernorm mean", d_mean.copy_to_host(), mean, tol)
    report("encoder+layernorm rstd", d_rstd.copy_to_host(), rstd, tol)

    # residual + bias + layernorm (fused), and plain layernorm
    mm, prev, bias = rand(N, C), rand(N, C), rand(C)
    x = mm.copy()
    cpu.bias_forward(x, bias)
    cpu.add_inplace(x, prev)
    ln, mean, rstd = np.zeros((N, C), f32), np.zeros(N, f32), np.zeros(N, f32)
    cpu.layernorm_forward(ln, mean, rstd, x, w, b)
    d_res, d_ln, d_mean, d_rstd = put(mm), put(ln * 0), put(mean * 0), put(rstd * 0)
    tc.residual_layernorm(d_res, put(prev), put(bias), d_ln, d_mean, d_rstd, put(w), put(b))
    report("residual+bias add", d_res.copy_to_host(), x, tol)
    report("residual+layernorm ln", d_ln.copy_to_host(), ln, tol)
    report("residual+layernorm mean", d_mean.copy_to_host(), mean, tol)
    report("residual+layernorm rstd", d_rstd.copy_to_host(), rstd, tol)
    cpu.layernorm_forward(ln, mean, rstd, mm, w, b)
    tc.residual_layernorm(d_res := put(mm), None, None, d_ln, d_mean, d_rstd, put(w), put(b))
    report("layernorm_forward", d_ln.copy_to_host(), ln, tol)
    report("layernorm_forward rstd", d_rstd.copy_to_host(), rstd, tol)

    # bias, bias + gelu
    out = rand(N, 3 * C)
    bias3 = rand(3 * C)
    ref = out.copy()
    cpu.bias_forward(ref, bias3)
    d_out = put(out)
    tc.bias_forward(d_out, put(bias3))
    report("bias_forward", d_out.copy_to_host(), ref, tol)
    fch, fb = rand(N, 4 * C), rand(4 * C)
    ref_h = fch.copy()
    cpu.bias_forward(ref_h, fb)
    ref_g = np.zeros_like(ref_h)
    cpu.gelu_forward(ref_g, ref_h)
    d_h, d_g = put(fch), put(fch * 0)
    tc.bias_gelu_forward(d_h, d_g, put(fb))
    report("bias+gelu_forward fch", d_h.copy_to_host(), ref_h, tol)
    report("bias+gelu_forward gelu", d_g.copy_to_host(), ref_g, tol)

    # classifier: cross-entropy forward (masked targets), loss statistics, backward
    Vv, Vp = 45, 64
    logits = rand(N, Vp, scale=3.0)
    logits[:, Vv:] = 0.0
    targets = rng.integers(0, Vv, size=N).astype(np.int32)
    targets[[1, 5, 6]] = -1
    losses, lse = np.zeros(N, f32), np.zeros(N, f32)
    cpu.crossentropy_forward(losses, lse, logits, targets, Vv)
    d_logits, d_losses, d_lse, d_t = put(logits), put(losses * 0), put(lse * 0), put(targets)
    stats = cuda.to_device(np.zeros(2))
    tc.classifier_forward(d_losses, d_lse, d_logits, d_t, Vv)
    tc.loss_reduce(stats, d_losses, d_t)
    report("crossentropy_forward loss", d_losses.copy_to_host(), losses, tol)
    report("crossentropy logsumexp", d_lse.copy_to_host(), lse, tol)
    st = stats.copy_to_host()
    nvalid = int(np.count_nonzero(targets >= 0))
    report("mean loss (masked)", st[0] / st[1], losses.sum(dtype=np.float64) / nvalid, tol)
    report("valid target count", st[1], nvalid, 0.0, absolute=True)
    ref = logits.copy()
    cpu.crossentropy_backward(ref, lse, targets, Vv, np.float32(0.7 / nvalid))
    tc.classifier_backward(d_logits, d_lse, d_t, Vv, stats, 0.7)
    report("crossentropy_backward", d_logits.copy_to_host(), ref, tol)

    # layernorm backward: dinp (+=), dweight/dbias (overwrite and accumulate)
    inp, dout, w = rand(N, C), rand(N, C), rand(C)
    ln, mean, rstd = np.zeros((N, C), f32), np.zeros(N, f32), np.zeros(N, f32)
    cpu.layernorm_forward(ln, mean, rstd, inp, w, b)
    part = tc._alloc(2 * 64 * 4 * C).reshape(2, 64, 4 * C)
    for acc in (False, True):
        dinp0, dw0, db0 = rand(N, C), rand(C), rand(C)
        dinp, dw, db = dinp0.copy(), dw0.copy(), db0.copy()
        cpu.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, acc)
        d_dinp, d_dw, d_db = put(dinp0), put(dw0), put(db0)
        d_inp, d_dout, d_mean, d_rstd = put(inp), put(dout), put(mean), put(rstd)
        tc.layernorm_backward_dinp(d_dinp, d_dout, d_inp, put(w), d_mean, d_rstd, False)
        tc.colsum(part, d_db, d_dout, acc, out2=d_dw, aux=d_inp, mean=d_mean, rstd=d_rstd, mode=1)
        report(f"layernorm_backward dinp{' acc' if acc else ''}", d_dinp.copy_to_host(), dinp, tol)
        report(f"layernorm_backward dw{' acc' if acc else ''}", d_dw.copy_to_host(), dw, tol)
        report(f"layernorm_backward db{' acc' if acc else ''}", d_db.copy_to_host(), db, tol)
    dinp = np.zeros((N, C), f32)
    cpu.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, False)
    d_dinp = put(rand(N, C))
    tc.layernorm_backward_dinp(d_dinp, put(dout), put(inp), put(w), put(mean), put(rstd), True)
    report("layernorm_backward dinp =", d_dinp.copy_to_host(), dinp, tol)

    # bias backward; GELU backward fused with the fc bias gradient
    for acc in (False, True):
        dout = rand(N, 3 * C)
        db0 = rand(3 * C)
        db = db0.copy()
        cpu.bias_backward(db, dout, acc)
        d_db = put(db0)
        tc.colsum(part, d_db, put(dout), acc)
        report(f"bias_backward{' acc' if acc else ''}", d_db.copy_to_host(), db, tol)
    d4, h = rand(N, 4 * C), rand(N, 4 * C, scale=2.0)
    ref = d4.copy()
    cpu.gelu_backward(ref, h)
    db = np.zeros(4 * C, f32)
    cpu.bias_backward(db, ref, False)
    d_d4, d_db = put(d4), put(db * 0 + 5)
    tc.colsum(part, d_db, d_d4, False, aux=put(h), mode=2)
    report("gelu_backward", d_d4.copy_to_host(), ref, tol)
    report("gelu_backward + fc bias", d_db.copy_to_host(), db, tol)

    # encoder backward (deterministic wte scatter through host-built buckets)
    dres = rand(B * T, C)
    for acc in (False, True):
        dwte0, dwpe0 = rand(V, C), rand(maxT, C)
        dwte, dwpe = dwte0.copy(), dwpe0.copy()
        cpu.encoder_backward(dwte, dwpe, dres, tokens, T, acc)
        order, btok, bstart = tc.encoder_buckets(tokens)
        d_wte, d_wpe, d_dres = put(dwte0), put(dwpe0), put(dres)
        tc.encoder_backward_wte(d_wte, d_dres, put(order), put(btok.astype(np.int32)), put(bstart),
                                put(np.array([btok.size], np.int32)), B * T)
        tc.encoder_backward_wpe(d_wpe, d_dres, B, T, acc)
        report(f"encoder_backward dwte{' acc' if acc else ''}", d_wte.copy_to_host(), dwte, tol)
        report(f"encoder_backward dwpe{' acc' if acc else ''}", d_wpe.copy_to_host(), dwpe, tol)

    # GEMM plumbing: every (transA, transB) combination, with alpha and beta, on
    # sub-matrices of a larger buffer (row strides larger than the widths)
    blas = tc.Blas.get()
    blas.set_tf32(False)
    M_, N_, K_ = 5, 7, 3
    big = tc._alloc(4096)
    big.copy_to_device(rand(4096))
    host = big.copy_to_host()
    base = tc._addr(big)
    for tA in (False, True):
        for tB in (False, True):
            lda, ldb, ldc = 11, 13, 9
            oa, ob, oc = 10, 500, 1500
            A = host[oa:oa + (K_ if tA else M_) * lda].reshape(-1, lda)[:, :(M_ if tA else K_)]
            Bm = host[ob:ob + (N_ if tB else K_) * ldb].reshape(-1, ldb)[:, :(K_ if tB else N_)]
            Cm = host[oc:oc + M_ * ldc].reshape(-1, ldc)[:, :N_].astype(np.float64)
            ref = 0.5 * (A.T if tA else A).astype(np.float64) @ (Bm.T if tB else Bm).astype(np.float64) + 2.0 * Cm
            blas.gemm(tA, tB, M_, N_, K_, base + 4 * oa, lda, base + 4 * ob, ldb, base + 4 * oc, ldc, alpha=0.5, beta=2.0)
            got = big.copy_to_host()[oc:oc + M_ * ldc].reshape(-1, ldc)[:, :N_]
            report(f"gemm tA={int(tA)} tB={int(tB)}", got, ref, 1e-5)
            big.copy_to_device(host)

    # attention forward and backward, through a tiny model's buffers, for several
    # numbers of query blocks (ragged ones included)
    cfg = cpu.GPT2Config(max_seq_len=16, vocab_size=60, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)
    model = cpu.gpt2_init_random(cfg, 7)
    Bq, Tq = 2, 8
    NH, Cq = cfg.num_heads, cfg.channels
    variants = [(nb, False, "pointers") for nb in args.attention_blocks]
    variants += [(args.attention_blocks[-1], True, "pointers"), (args.attention_blocks[-1], False, "strided")]
    for nb, shared, impl in variants:
        tc.SOFTMAX_SHARED = shared
        dm = tc.to_device(model, Bq, Tq, tf32=False, attention_blocks=nb, attention=impl)
        qkv = rand(Bq * Tq, 3 * Cq)
        att = np.zeros((Bq, NH, Tq, Tq), f32)
        atty = np.zeros((Bq * Tq, Cq), f32)
        cpu.attention_forward(atty, att, qkv, Bq, Tq, NH)
        dm.A.qkv[0].copy_to_device(qkv)
        if impl == "strided":
            zero = put(np.zeros(3 * Cq, f32))
            tc.qkv_bias_permute(dm.A.qkv[0], zero, dm.qkvp[0], Bq, Tq, NH)
        tc._attention_forward(dm, 0)
        nb = f"{nb}{' shared' if shared else ''}{' strided' if impl == 'strided' else ''}"
        report(f"attention_forward att nb={nb}", dm.att3[0].copy_to_host().reshape(att.shape), att, tol)
        report(f"attention_forward out nb={nb}", dm.A.atty[0].copy_to_host(), atty, tol)
        datty = rand(Bq * Tq, Cq)
        dqkv = np.zeros_like(qkv)
        cpu.attention_backward(dqkv, datty, qkv, att, Bq, Tq, NH)
        dm.dacts.dC.copy_to_device(datty)
        tc._attention_backward(dm, 0)
        got = dm.dacts.d3C.copy_to_host()
        report(f"attention_backward dq nb={nb}", got[:, :Cq], dqkv[:, :Cq], tol)
        report(f"attention_backward dk nb={nb}", got[:, Cq:2 * Cq], dqkv[:, Cq:2 * Cq], tol)
        report(f"attention_backward dv nb={nb}", got[:, 2 * Cq:], dqkv[:, 2 * Cq:], tol)
        del dm
    tc.SOFTMAX_SHARED = False

    # global norm + AdamW (through gpt2_update_cuda) vs cpu.gpt2_update
    for mode, wd, clip in (("matrices", 0.1, 0.0), ("all", 0.01, 1e-3), ("matrices", 0.0, 1e9)):
        m_cpu = cpu.gpt2_init_random(cfg, 3)
        cpu.ensure_activations(m_cpu, Bq, Tq)
        cpu.ensure_training_buffers(m_cpu)
        dm = tc.to_device(m_cpu, Bq, Tq, tf32=False)
        for step in range(2):
            m_cpu.grads_memory[:] = rand(m_cpu.num_parameters, scale=0.01)
            dm.grads_memory.copy_to_device(m_cpu.grads_memory)
            norm_ref = cpu.gpt2_update(m_cpu, 1e-3, 0.9, 0.95, 1e-8, wd, mode, clip)
            norm = tc.read_norm(tc.gpt2_update_cuda(dm, 1e-3, 0.9, 0.95, 1e-8, wd, mode, clip))
            report(f"grad norm {mode} clip={clip:g} s{step}", norm, norm_ref, 1e-6)
            report(f"adamw params {mode} clip={clip:g} s{step}", dm.params_memory.copy_to_host(), m_cpu.params_memory, tol)
            mm_, vv_ = tc.optimizer_state_to_host(dm)
            report(f"adamw m {mode} clip={clip:g} s{step}", mm_, m_cpu.m_memory, tol)
            report(f"adamw v {mode} clip={clip:g} s{step}", vv_, m_cpu.v_memory, tol)
        del dm

    # full steps: CUDA path vs CPU path
    full_step_parity(cpu, tc, cfg, Bq, Tq, steps=args.steps, tf32=False, seed=11, tol_logits=tol, tol_grads=args.grad_tol,
                     verbose=True)

    # API semantics
    dm = tc.to_device(cpu.gpt2_init_random(cfg, 5), Bq, Tq, tf32=False)
    xx = rng.integers(0, cfg.vocab_size, size=(Bq, Tq)).astype(np.int32)
    api = []
    try:
        tc.gpt2_backward_cuda(dm)
        api.append("backward before forward did not raise")
    except RuntimeError:
        pass
    tc.gpt2_forward_cuda(dm, xx)
    if tc.mean_loss_cuda(dm) is not None:
        api.append("mean_loss after a forward without targets is not None")
    for bad in (xx[:, :4], np.full((Bq, Tq), cfg.vocab_size, np.int32)):
        try:
            tc.gpt2_forward_cuda(dm, bad)
            api.append(f"bad inputs {bad.shape} accepted")
        except ValueError:
            pass
    tc.gpt2_forward_cuda(dm, xx, np.full((Bq, Tq), -1, np.int32))
    if tc.mean_loss_cuda(dm) != 0.0:
        api.append("all-masked loss is not 0")
    tc.gpt2_backward_cuda(dm)
    if np.any(tc.grads_to_host(dm)[:cfg.padded_vocab_size * cfg.channels] != 0):
        api.append("all-masked targets give a nonzero wte gradient")
    m0, v0 = rand(dm.num_parameters), rand(dm.num_parameters)
    tc.optimizer_state_from_host(dm, m0, v0, 7)
    m1, v1 = tc.optimizer_state_to_host(dm)
    if dm.step != 7 or not (np.array_equal(m0, m1) and np.array_equal(v0, v1)):
        api.append("optimizer state round trip")
    print(f"CHECK {'API semantics':28s} {'; '.join(api) or ''} {'FAIL' if api else 'OK'}", flush=True)
    if api:
        FAILS.append("API")
    finish()


def full_step_parity(cpu, tc, cfg, B, T, steps, tf32, seed, tol_logits, tol_grads, verbose, recipe=None, data=None):
    """forward, backward (plus an accumulating micro-step), update: CPU vs CUDA."""
    rng = np.random.default_rng(seed)
    V = cfg.vocab_size
    m_cpu = cpu.gpt2_init_random(cfg, seed)
    dm = tc.to_device(m_cpu, B, T, tf32=tf32)
    if data is None:
        x = rng.integers(0, V, size=(B, T)).astype(np.int32)
        y = rng.integers(0, V, size=(B, T)).astype(np.int32)
        y[0, :2] = -1
        y2 = rng.integers(0, V, size=(B, T)).astype(np.int32)
    else:
        x, y = data
        y2 = None
    recipe = recipe or dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, weight_decay_mode="matrices",
                            grad_clip=1.0)
    offsets = cpu.parameter_offsets(cfg)
    losses = []
    for step in range(steps):
        loss_ref = cpu.gpt2_forward(m_cpu, x, y)
        tc.gpt2_forward_cuda(dm, x, y)
        loss = tc.mean_loss_cuda(dm)
        losses.append((loss, loss_ref))
        if step == 0 or verbose:
            report(f"s{step} logits", tc.logits_to_host(dm), m_cpu.acts.logits, tol_logits)
        report(f"s{step} loss", loss, loss_ref, tol_logits)
        cpu.gpt2_backward(m_cpu)
        tc.gpt2_backward_cuda(dm)
        if y2 is not None and step == 1:
            # a second, accumulating micro-step with a loss scale
            cpu.gpt2_forward(m_cpu, x, y2)
            tc.gpt2_forward_cuda(dm, x, y2)
            cpu.gpt2_backward(m_cpu, accumulate=True, loss_scale=0.5)
            tc.gpt2_backward_cuda(dm, accumulate=True, loss_scale=0.5)
        if step == 0 or verbose:
            g = tc.grads_to_host(dm)
            for name, s0, s1 in offsets:
                report(f"s{step} grad {name}{' (acc)' if step == 1 and y2 is not None else ''}", g[s0:s1],
                       m_cpu.grads_memory[s0:s1], tol_grads)
        norm_ref = cpu.gpt2_update(m_cpu, **recipe)
        norm = tc.read_norm(tc.gpt2_update_cuda(dm, **recipe))
        report(f"s{step} grad norm", norm, norm_ref, tol_grads)
        if verbose:
            report(f"s{step} params", dm.params_memory.copy_to_host(), m_cpu.params_memory, tol_grads)
    # final losses after the last update
    loss_ref = cpu.gpt2_forward(m_cpu, x, y)
    tc.gpt2_forward_cuda(dm, x, y)
    losses.append((tc.mean_loss_cuda(dm), loss_ref))
    return losses


# -----------------------------------------------------------------------------
# parity on a real-size model


def cmd_parity(args):
    import train_gpt2 as cpu
    import train_gpt2_cuda as tc

    cfg = cpu.config_from_depth(f"d{args.depth}") if args.depth else \
        cpu.GPT2Config(max_seq_len=16, vocab_size=60, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)
    B, T = args.B, args.T
    name = f"d{args.depth}" if args.depth else "tiny"
    rng = np.random.default_rng(args.seed)
    if args.tokens and os.path.exists(args.tokens) and args.depth:
        toks = cpu.read_token_file(args.tokens)[:B * T + 1].astype(np.int32)
        x, y = toks[:-1].reshape(B, T), toks[1:].reshape(B, T)
    else:
        x = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
        y = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    V = cfg.vocab_size
    recipe = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, weight_decay_mode="all", grad_clip=0.0)
    # CPU reference: logits, loss, gradients of one pass; losses of llm.c's 10-step test recipe
    t0 = time.time()
    model = cpu.gpt2_init_random(cfg, args.seed)
    ref_loss = cpu.gpt2_forward(model, x, y)
    ref_logits = model.acts.logits[:, :V].copy()
    cpu.gpt2_backward(model)
    ref_grads = model.grads_memory.copy()
    model = cpu.gpt2_init_random(cfg, args.seed)
    ref_steps = []
    for step in range(args.steps):
        ref_steps.append(cpu.gpt2_forward(model, x, y))
        cpu.gpt2_backward(model)
        cpu.gpt2_update(model, **recipe)
    print(f"CPU reference {name} B={B} T={T}: {time.time() - t0:.1f} s; losses {' '.join(f'{v:.6f}' for v in ref_steps)}",
          flush=True)
    out = []
    for tf32 in [int(v) for v in str(args.tf32).split(",")]:
        tag = f"{name} B={B} T={T} {'tf32' if tf32 else 'fp32'}"
        lt, gt = (args.logit_tol_tf32, args.grad_tol_tf32) if tf32 else (args.logit_tol, args.grad_tol)
        model = cpu.gpt2_init_random(cfg, args.seed)
        dm = tc.to_device(model, B, T, tf32=bool(tf32))
        tc.gpt2_forward_cuda(dm, x, y)
        logits = tc.logits_to_host(dm)[:, :V]
        loss = tc.mean_loss_cuda(dm)
        tc.gpt2_backward_cuda(dm)
        g = tc.grads_to_host(dm)
        errs = {"logits": float(np.max(np.abs(logits - ref_logits))), "loss": abs(loss - ref_loss)}
        report(f"{tag} logits", logits, ref_logits, lt, absolute=True)
        report(f"{tag} loss", loss, ref_loss, lt, absolute=True)
        for pname, s0, s1 in cpu.parameter_offsets(cfg):
            report(f"{tag} grad {pname}", g[s0:s1], ref_grads[s0:s1], gt, absolute=True)
            errs["grad " + pname] = float(np.max(np.abs(g[s0:s1] - ref_grads[s0:s1])))
        del dm
        dm = tc.to_device(model, B, T, tf32=bool(tf32))
        losses = []
        for step in range(args.steps):
            tc.gpt2_forward_cuda(dm, x, y)
            losses.append(tc.mean_loss_cuda(dm))
            tc.gpt2_backward_cuda(dm)
            tc.gpt2_update_cuda(dm, **recipe)
        del dm
        diffs = [abs(a - b) for a, b in zip(losses, ref_steps)]
        print(f"  {tag} step losses {' '.join(f'{v:.6f}' for v in losses)}", flush=True)
        report(f"{tag} {args.steps} step losses", np.array(losses), np.array(ref_steps), lt, absolute=True)
        errs["step losses"] = max(diffs)
        out.append({"tag": tag, "errors": errs})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    finish()


# -----------------------------------------------------------------------------
# benchmarks


def load_batches(cpu, path, B, T, V, seed=0):
    if path and os.path.exists(path):
        loader = cpu.DataLoader(path, B, T, V)
        return lambda: tuple(a.copy() for a in loader.next_batch()), os.path.basename(path)
    rng = np.random.default_rng(seed)

    def nxt():
        toks = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
        return toks[:, :-1].copy(), toks[:, 1:].copy()
    return nxt, "random tokens"


def cmd_bench(args):
    import train_gpt2 as cpu
    import train_gpt2_cuda as tc
    from numba import cuda

    cfg = cpu.config_from_depth(f"d{args.depth}")
    B, T = args.B, args.T
    tf32 = bool(args.tf32)
    prec = "tf32" if tf32 else "fp32"
    model = cpu.gpt2_init_random(cfg, 0)
    nxt, data_name = load_batches(cpu, args.tokens, B, T, cfg.vocab_size)
    result = {"system": "ours (numba.cuda + cuBLAS)", "precision": prec, "B": B, "T": T, "data": data_name}

    def run(dm, steps, label, log=True):
        times, losses = [], []
        tc.synchronize()
        for step in range(steps):
            x, y = nxt()
            t0 = time.perf_counter()
            tc.gpt2_forward_cuda(dm, x, y)
            tc.gpt2_backward_cuda(dm)
            norm = tc.gpt2_update_cuda(dm, args.lr, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)
            loss = tc.mean_loss_cuda(dm)  # waits for the step
            dt = time.perf_counter() - t0
            times.append(dt)
            losses.append(loss)
            if log:
                print(f"  [{label}] step {step:2d} loss {loss:.4f} norm {tc.read_norm(norm):.3f} {dt * 1e3:8.1f} ms "
                      f"{B * T / dt / 1e3:7.1f}k tok/s", flush=True)
        return times, losses

    t0 = time.time()
    dm = tc.to_device(model, B, T, tf32=tf32, attention_blocks=args.attention_blocks or None)
    print(f"== ours {prec} B={B} T={T}: to_device {time.time() - t0:.1f} s, attention blocks {len(dm.attn_blocks)}",
          flush=True)
    t0 = time.time()
    times, losses = run(dm, args.steps, prec)
    warm = args.warmup
    med = float(np.median(times[warm:]))
    result.update(steps=args.steps, losses=losses, step_ms=[t * 1e3 for t in times], median_ms=med * 1e3,
                  tok_per_s=B * T / med, mem_bytes=tc.device_memory_used(),
                  loss_falls=bool(losses[-1] < losses[0] - 0.5))
    print(f"RESULT ours {prec}: median {med * 1e3:.1f} ms/step, {B * T / med / 1e3:.1f}k tok/s, "
          f"device memory in use {result['mem_bytes'] / 2**30:.2f} GiB, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
          flush=True)

    # phase breakdown (events around forward, backward, update)
    ev = [cuda.event() for _ in range(4)]
    phase = []
    for _ in range(3):
        x, y = nxt()
        tc.synchronize()
        ev[0].record()
        tc.gpt2_forward_cuda(dm, x, y)
        ev[1].record()
        tc.gpt2_backward_cuda(dm)
        ev[2].record()
        tc.gpt2_update_cuda(dm, args.lr, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)
        ev[3].record()
        ev[3].synchronize()
        phase.append([cuda.event_elapsed_time(ev[i], ev[i + 1]) for i in range(3)])
    ph = np.median(np.array(phase), axis=0)
    result["phase_ms"] = {"forward": ph[0], "backward": ph[1], "update": ph[2]}
    print(f"  phases (ms): forward {ph[0]:.1f} backward {ph[1]:.1f} update {ph[2]:.1f}", flush=True)

    if args.profile:
        profile_step(tc, dm, nxt, args, prec)

    # variants: "NB[:shared][:strided]": number of causal query blocks; the softmax kernels
    # staging rows in shared memory; head-major copies and strided batched GEMMs instead of
    # pointer arrays
    variants = {}
    for spec in [v for v in args.variants.split(",") if v]:
        nb = int(spec.split(":")[0])
        del dm
        gc.collect()
        try:
            cuda.current_context().deallocations.clear()
        except Exception as e:  # pragma: no cover
            print("  (deallocations.clear failed:", e, ")")
        tc.SOFTMAX_SHARED = ":shared" in spec
        dm = tc.to_device(model, B, T, tf32=tf32, attention_blocks=nb,
                          attention="strided" if ":strided" in spec else "pointers")
        tv, _ = run(dm, args.variant_steps, f"{prec} {spec}", log=False)
        mv = float(np.median(tv[2:]))
        variants[spec] = B * T / mv
        print(f"  variant {spec:8s}: {mv * 1e3:.1f} ms/step {B * T / mv / 1e3:.1f}k tok/s", flush=True)
    tc.SOFTMAX_SHARED = False
    result["variants_tok_per_s"] = variants
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def profile_step(tc, dm, nxt, args, prec):
    """Per-kernel device time of one training step (CUPTI through torch.profiler)."""
    import re
    import torch
    from torch.profiler import ProfilerActivity, profile
    x, y = nxt()
    tc.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tc.gpt2_forward_cuda(dm, x, y)
        tc.gpt2_backward_cuda(dm)
        tc.gpt2_update_cuda(dm, args.lr, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)
        tc.mean_loss_cuda(dm)
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t <= 0:
            continue
        m = re.search(r"(k_[a-z0-9_]+)", e.key)
        name = m.group(1) if m else e.key[:70]
        c, tt = rows.get(name, (0, 0.0))
        rows[name] = (c + e.count, tt + t)
    total = sum(t for _, t in rows.values())
    print(f"  profile {prec}: {total / 1e3:.1f} ms of device time in one step", flush=True)
    for name, (c, t) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:args.profile_rows]:
        print(f"    {t / 1e3:8.2f} ms {100 * t / total:5.1f}% {c:5d}x  {name}", flush=True)


def cmd_bench_torch(args):
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(ROOT, "dev"))
    import torch_reference as tr
    import train_gpt2 as cpu

    dev = "cuda"
    B, T = args.B, args.T
    L, NH, C = {12: (12, 12, 768), 24: (24, 16, 1024)}.get(args.depth, (args.depth, args.depth, 64 * args.depth))
    cfg = tr.GPT2Config(1024, 50257, 50304, L, NH, C)
    nxt, data_name = load_batches(cpu, args.tokens, B, T, 50257)
    results = []

    def sdpa_forward(self, x):
        Bx, Tx, Cx = x.shape
        nh, hs = self.n_head, Cx // self.n_head
        q, k, v = self.c_attn(x).split(Cx, dim=2)
        q = q.view(Bx, Tx, nh, hs).transpose(1, 2)
        k = k.view(Bx, Tx, nh, hs).transpose(1, 2)
        v = v.view(Bx, Tx, nh, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(Bx, Tx, Cx))

    manual_forward = tr.CausalSelfAttention.forward
    for prec in ("fp32", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        torch.backends.cudnn.allow_tf32 = prec == "tf32"
        for attn in ("manual", "sdpa"):
            tr.CausalSelfAttention.forward = sdpa_forward if attn == "sdpa" else manual_forward
            torch.manual_seed(0)
            model = tr.init_llmc(tr.GPT2(cfg), 0).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
            torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            for step in range(args.steps):
                x, y = nxt()
                xt = torch.from_numpy(x.astype(np.int64)).to(dev)
                yt = torch.from_numpy(y.astype(np.int64)).to(dev)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                _, loss = model(xt, yt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                lv = loss.item()
                dt = time.perf_counter() - t0
                times.append(dt)
                losses.append(lv)
            med = float(np.median(times[args.warmup:]))
            r = {"system": f"pytorch {torch.__version__} eager ({attn} attention, fused AdamW)", "precision": prec,
                 "B": B, "T": T, "median_ms": med * 1e3, "tok_per_s": B * T / med,
                 "mem_bytes": torch.cuda.max_memory_allocated(), "losses": losses}
            results.append(r)
            print(f"RESULT torch {prec} {attn}: median {med * 1e3:.1f} ms/step, {B * T / med / 1e3:.1f}k tok/s, "
                  f"peak allocated {r['mem_bytes'] / 2**30:.2f} GiB, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
            del model, opt
            torch.cuda.empty_cache()
    tr.CausalSelfAttention.forward = manual_forward
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def cmd_table(args):
    rows, parity = [], []
    for path in sorted(glob.glob(os.path.join(args.dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        for r in (data if isinstance(data, list) else [data]):
            if "errors" in r:
                parity.append(r)
            elif "tok_per_s" in r:
                rows.append(r)
    if parity:
        print("\nParity (max abs error vs the CPU path)")
        for p in parity:
            e = p["errors"]
            worst_grad = max(v for k, v in e.items() if k.startswith("grad "))
            print(f"  {p['tag']:28s} logits {e['logits']:.2e}  loss {e['loss']:.2e}  worst grad {worst_grad:.2e}  "
                  f"10 step losses {e['step losses']:.2e}")
    if rows:
        print(f"\n{'system':58s} {'prec':5s} {'ms/step':>8s} {'tok/s':>9s} {'memory':>9s}")
        for r in sorted(rows, key=lambda r: (r["precision"], -r["tok_per_s"])):
            mem = f"{r['mem_bytes'] / 2**30:.1f} GiB" if r.get("mem_bytes") else "?"
            print(f"{r['system'][:58]:58s} {r['precision']:5s} {r['median_ms']:8.1f} {r['tok_per_s'] / 1e3:8.1f}k {mem:>9s}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--tol", type=float, default=1e-5)
    k.add_argument("--grad-tol", type=float, default=1e-4)
    k.add_argument("--steps", type=int, default=3)
    k.add_argument("--attention-blocks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 3, 8])
    p = sub.add_parser("parity")
    p.add_argument("--depth", type=int, default=12, help="0: the tiny config")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--tf32", default="0,1", help="comma list of 0 (strict fp32) / 1 (TF32)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tokens", default="")
    p.add_argument("--logit-tol", type=float, default=1e-3)
    p.add_argument("--grad-tol", type=float, default=1e-3)
    p.add_argument("--logit-tol-tf32", type=float, default=5e-2)
    p.add_argument("--grad-tol-tf32", type=float, default=2e-2)
    p.add_argument("--json", default="")
    for name in ("bench", "bench-torch"):
        b = sub.add_parser(name)
        b.add_argument("--depth", type=int, default=12)
        b.add_argument("--B", type=int, default=16)
        b.add_argument("--T", type=int, default=1024)
        b.add_argument("--tf32", type=int, default=1)
        b.add_argument("--steps", type=int, default=12)
        b.add_argument("--warmup", type=int, default=3)
        b.add_argument("--lr", type=float, default=6e-4)
        b.add_argument("--tokens", default="")
        b.add_argument("--attention-blocks", type=int, default=0)
        b.add_argument("--variants", default="")
        b.add_argument("--variant-steps", type=int, default=6)
        b.add_argument("--json", default="")
        b.add_argument("--profile", action="store_true")
        b.add_argument("--profile-rows", type=int, default=24)
    t = sub.add_parser("table")
    t.add_argument("dir")
    args = ap.parse_args()
    {"kernels": cmd_kernels, "parity": cmd_parity, "bench": cmd_bench, "bench-torch": cmd_bench_torch,
     "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
