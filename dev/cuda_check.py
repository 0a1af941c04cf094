#!/usr/bin/env python
"""Checks and benchmarks of train_gpt2_cuda.py (the CUDA twin of train_gpt2.py).

Subcommands:
  kernels      every CUDA kernel (and the cuBLAS plumbing) against its CPU twin on tiny
               shapes, then full training steps through the two targets
               (train_gpt2_cuda.CUDA vs train_gpt2.CPU: per step, and main()'s loop with
               gradient accumulation), the state_to_host / state_from_host round trip and
               resume, and the API's errors. Runs in numba's simulator too
               (NUMBA_ENABLE_CUDASIM=1): tests/test_cuda_sim.py.
  parity       CUDA target vs CPU target on a real-size model (default GPT-2 124M, B=4,
               T=64, random init): max abs error of logits, loss, all 16 gradients and
               the 10 step losses of llm.c's test recipe; --tf32 0/1.
  bench        train at B=16, T=1024 on tinyshakespeare (or random tokens) through the
               CUDA target, as train_gpt2.py does: loss per step, median tokens/s, peak
               device memory; --variants: other causal query-block counts; JSON to --json.
  bench-torch  the same step in PyTorch eager (dev/torch_reference.py's model, fused
               AdamW), manual attention and SDPA; JSON to --json.
  shapes       test_gpt2.py --device cuda in fp32, tf32 and bf16 on PyTorch references of
               odd shapes (tensors of odd lengths: every device tensor must be aligned);
               bf16 must refuse, in one line, a head size cuDNN cannot take.
  nccl         one NCCL rank, launched as torchrun does: every collective of
               distributed.NCCLGroup, in a CUDA graph too, and abort.
  hellaswag    the full-size HellaSwag eval timed at 124M (10,042 synthetic examples);
               with --checkpoint, fp32 and bf16 picking the same endings (>= 99%).
  generate     greedy generation with the KV cache on the GPU against the CPU's (fp32: the
               same tokens), tokens/s; an evaluation view's per-position losses.
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

import gpt2_common as common  # noqa: E402  (numpy only: no numba, no GPU)

FAILS = []


def report(name, got, ref, tol, absolute=False, norm=False):
    """rel: the largest error over the largest reference value; with norm (bf16 against
    float32, where single roundings scatter), ||got - ref|| / ||ref||."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        print(f"CHECK {name:28s} shape {got.shape} != {ref.shape} FAIL", flush=True)
        FAILS.append(name)
        return
    err = float(np.max(np.abs(got - ref))) if got.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = err / scale if scale > 0 else err
    if norm:
        rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
    bad = not np.all(np.isfinite(got)) or (err if absolute else rel) > tol
    print(f"CHECK {name:28s} maxabs={err:.3e} {'normrel' if norm else 'rel'}={rel:.3e} tol={tol:.0e}"
          f"{' abs' if absolute else ''} {'FAIL' if bad else 'OK'}", flush=True)
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
            d = tc.alloc(x.size)
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
    d_g = put(fch * 0)
    tc.gelu_forward(d_g, put(ref_h))
    report("gelu_forward", d_g.copy_to_host(), ref_g, tol)

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
    # (and the column sums of the new dinp: the bias gradient of the matmul before it)
    lnb = tc.layernorm_backward_scratch(C)
    for acc in (False, True):
        dinp0, dw0, db0, dbias0 = rand(N, C), rand(C), rand(C), rand(C)
        dinp, dw, db = dinp0.copy(), dw0.copy(), db0.copy()
        cpu.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, acc)
        dbias = dinp.sum(0, dtype=np.float64) + (dbias0 if acc else 0.0)
        d_dinp, d_dw, d_db, d_dbias = put(dinp0), put(dw0), put(db0), put(dbias0)
        d_inp, d_dout, d_mean, d_rstd = put(inp), put(dout), put(mean), put(rstd)
        tc.layernorm_backward(lnb, d_dinp, d_dout, d_inp, put(w), d_mean, d_rstd, False, d_dw, d_db, acc,
                              dbias=d_dbias)
        report(f"layernorm_backward dinp{' acc' if acc else ''}", d_dinp.copy_to_host(), dinp, tol)
        report(f"layernorm_backward dw{' acc' if acc else ''}", d_dw.copy_to_host(), dw, tol)
        report(f"layernorm_backward db{' acc' if acc else ''}", d_db.copy_to_host(), db, tol)
        report(f"layernorm_backward dbias{' acc' if acc else ''}", d_dbias.copy_to_host(), dbias, tol)
    dinp = np.zeros((N, C), f32)
    cpu.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, False)
    d_dinp, d_dw, d_db = put(rand(N, C)), put(rand(C)), put(rand(C))
    tc.layernorm_backward(lnb, d_dinp, put(dout), put(inp), put(w), put(mean), put(rstd), True, d_dw, d_db, False)
    report("layernorm_backward dinp =", d_dinp.copy_to_host(), dinp, tol)
    report("layernorm_backward dw =", d_dw.copy_to_host(), dw, tol)
    part = tc.colsum_scratch(N, 4 * C)

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
    tc.colsum(part, d_db, d_d4, False, aux=put(h), mode=1)
    report("gelu_backward", d_d4.copy_to_host(), ref, tol)
    report("gelu_backward + fc bias", d_db.copy_to_host(), db, tol)

    # encoder backward (deterministic wte scatter through host-built buckets: positions
    # grouped by token, increasing within a group, the most frequent token first)
    order, btok, bstart = tc.encoder_buckets(np.array([5, 3, 5, 7, 3, 5], np.int32))
    same = (order.tolist(), btok.tolist(), bstart.tolist()) == ([0, 2, 5, 1, 4, 3], [5, 3, 7], [0, 3, 5, 6])
    report("encoder buckets order", float(not same), 0.0, 0.0, absolute=True)
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
    big = tc.alloc(4096)
    big.copy_to_device(rand(4096))
    host = big.copy_to_host()
    base = tc.addr(big)
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
    cfg = common.GPT2Config(max_seq_len=16, vocab_size=60, padded_vocab_size=128, num_layers=2, num_heads=2,
                            channels=32)
    model = common.gpt2_init_random(cfg, 7)
    Bq, Tq = 2, 8
    NH, Cq = cfg.num_heads, cfg.channels
    for nb in args.attention_blocks:
        dm = tc.to_device(model, Bq, Tq, tf32=False, attention_blocks=nb)
        qkv = rand(Bq * Tq, 3 * Cq)
        att = np.zeros((Bq, NH, Tq, Tq), f32)
        atty = np.zeros((Bq * Tq, Cq), f32)
        cpu.attention_forward(atty, att, qkv, Bq, Tq, NH)
        dm.A.qkv[0].copy_to_device(qkv)
        tc.attention_forward(dm, 0)
        report(f"attention_forward att nb={nb}", dm.att3[0].copy_to_host().reshape(att.shape), att, tol)
        report(f"attention_forward out nb={nb}", dm.A.atty[0].copy_to_host(), atty, tol)
        datty = rand(Bq * Tq, Cq)
        dqkv = np.zeros_like(qkv)
        cpu.attention_backward(dqkv, datty, qkv, att, Bq, Tq, NH)
        dm.dacts.dC.copy_to_device(datty)
        tc.attention_backward(dm, 0)
        got = dm.dacts.d3C.copy_to_host()
        report(f"attention_backward dq nb={nb}", got[:, :Cq], dqkv[:, :Cq], tol)
        report(f"attention_backward dk nb={nb}", got[:, Cq:2 * Cq], dqkv[:, Cq:2 * Cq], tol)
        report(f"attention_backward dv nb={nb}", got[:, 2 * Cq:], dqkv[:, 2 * Cq:], tol)
        tc._free(dm)

    # global norm + AdamW (CUDA.update) vs cpu.gpt2_update, on the same random gradients
    for mode, wd, clip in (("matrices", 0.1, 0.0), ("all", 0.01, 1e-3), ("matrices", 0.0, 1e9)):
        m_cpu = common.gpt2_init_random(cfg, 3)
        cpu.ensure_activations(m_cpu, Bq, Tq)
        cpu.ensure_training_buffers(m_cpu)
        m_gpu = clone_host(m_cpu)
        dev = tc.CUDA(m_gpu, Bq, Tq, precision="fp32")
        for step in range(2):
            m_cpu.grads_memory[:] = rand(m_cpu.num_parameters, scale=0.01)
            dev.dm.layout.to_device(m_cpu.grads_memory, dev.dm.grads_memory)  # no interface sets gradients
            norm_ref = cpu.gpt2_update(m_cpu, 1e-3, 0.9, 0.95, 1e-8, wd, mode, clip)
            norm = dev.update(1e-3, 0.9, 0.95, 1e-8, wd, mode, clip)
            dev.state_to_host()
            report(f"grad norm {mode} clip={clip:g} s{step}", norm, norm_ref, 1e-6)
            report(f"adamw params {mode} clip={clip:g} s{step}", m_gpu.params_memory, m_cpu.params_memory, tol)
            report(f"adamw m {mode} clip={clip:g} s{step}", m_gpu.m_memory, m_cpu.m_memory, tol)
            report(f"adamw v {mode} clip={clip:g} s{step}", m_gpu.v_memory, m_cpu.v_memory, tol)
        dev.free()

    # full steps, through the two targets (train_gpt2.CPU, train_gpt2_cuda.CUDA)
    full_step_parity(cpu, tc, cfg, Bq, Tq, steps=args.steps, precision="fp32", seed=11, tol_logits=tol,
                     tol_grads=args.grad_tol)
    train_loop_parity(cpu, tc, cfg, Bq, Tq, steps=args.steps, tol=args.grad_tol)
    state_round_trip(tc, cfg, Bq, Tq)

    # API semantics (the target built as train_gpt2.py's main() builds it)
    dev = cpu.build_device("cuda", common.gpt2_init_random(cfg, 5), Bq, Tq, precision="fp32")
    xx = rng.integers(0, cfg.vocab_size, size=(Bq, Tq)).astype(np.int32)
    api = []
    if not isinstance(dev, tc.CUDA) or not isinstance(dev, common.Device):
        api.append(f"build_device('cuda') gave a {type(dev).__name__}")
    try:
        dev.backward()
        api.append("backward before forward did not raise")
    except RuntimeError:
        pass
    if dev.forward(xx) is not None:
        api.append("the loss of a forward without targets is not None")
    try:
        dev.backward()
        api.append("backward after a forward without targets did not raise")
    except RuntimeError:
        pass
    for bad in (xx[:, :4], np.full((Bq, Tq), cfg.vocab_size, np.int32)):
        try:
            dev.forward(bad)
            api.append(f"bad inputs {bad.shape} accepted")
        except ValueError:
            pass
    if dev.forward(xx, np.full((Bq, Tq), -1, np.int32)) != 0.0:
        api.append("all-masked loss is not 0")
    dev.backward()
    if np.any(dev.grads_to_host()[:cfg.padded_vocab_size * cfg.channels] != 0):
        api.append("all-masked targets give a nonzero wte gradient")
    if dev.logits_to_host().shape != (Bq * Tq, cfg.padded_vocab_size):
        api.append("logits_to_host shape")
    peak = dev.peak_flops()
    if not (isinstance(peak, float) and peak >= 0.0):
        api.append(f"peak_flops {peak!r}")
    dev.free()
    dev.free()  # twice is harmless
    if dev.dm is not None:
        api.append("free kept the device buffers")
    print(f"CHECK {'API semantics':28s} {'; '.join(api) or ''} {'FAIL' if api else 'OK'}", flush=True)
    if api:
        FAILS.append("API")
    finish()


def clone_host(model):
    """A second host model with the same parameters (a target writes into its own)."""
    twin = common.GPT2(model.cfg)
    twin.params_memory[:] = model.params_memory
    return twin


def full_step_parity(cpu, tc, cfg, B, T, steps, precision, seed, tol_logits, tol_grads, label="", **options):
    """forward, backward (plus an accumulating micro-step with a loss scale at step 1),
    update: train_gpt2.CPU vs train_gpt2_cuda.CUDA from the same initial parameters;
    logits, loss, every gradient, norm and parameters at every step."""
    rng = np.random.default_rng(seed)
    V = cfg.vocab_size
    by_norm = precision == "bf16"  # bf16: ||error|| / ||reference||
    host = common.gpt2_init_random(cfg, seed)
    gpu = tc.CUDA(clone_host(host), B, T, precision=precision, **options)
    ref = cpu.CPU(host, B, T)
    x = rng.integers(0, V, size=(B, T)).astype(np.int32)
    y = rng.integers(0, V, size=(B, T)).astype(np.int32)
    y[0, :2] = -1
    y2 = rng.integers(0, V, size=(B, T)).astype(np.int32)
    recipe = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, weight_decay_mode="matrices",
                  grad_clip=1.0)
    offsets = common.parameter_offsets(cfg)
    for step in range(steps):
        loss_ref = ref.forward(x, y)
        loss = gpu.forward(x, y)
        report(f"{label}s{step} logits", gpu.logits_to_host(), ref.logits_to_host(), tol_logits, norm=by_norm)
        report(f"{label}s{step} loss", loss, loss_ref, tol_logits, norm=by_norm)
        ref.backward()
        gpu.backward()
        acc = step == 1
        if acc:  # a second, accumulating micro-step with a loss scale
            ref.forward(x, y2)
            gpu.forward(x, y2)
            ref.backward(accumulate=True, loss_scale=0.5)
            gpu.backward(accumulate=True, loss_scale=0.5)
        g, g_ref = gpu.grads_to_host(), ref.grads_to_host()
        for name, s0, s1 in offsets:
            report(f"{label}s{step} grad {name}{' (acc)' if acc else ''}", g[s0:s1], g_ref[s0:s1], tol_grads,
                   norm=by_norm)
        norm_ref = ref.update(**recipe)
        norm = gpu.update(**recipe)
        report(f"{label}s{step} grad norm", norm, norm_ref, tol_grads, norm=by_norm)
        gpu.params_to_host()
        report(f"{label}s{step} params", gpu.model.params_memory, host.params_memory, tol_grads, norm=by_norm)
    gpu.free()


def train_loop(device, batches, accum_steps, recipe):
    """train_gpt2.main()'s step: accum_steps micro-steps (loss scale 1/accum_steps), then
    the update. Returns the step losses and the gradient norms."""
    losses, norms = [], []
    it = iter(batches)
    for _ in range(len(batches) // accum_steps):
        loss = 0.0
        for micro in range(accum_steps):
            x, y = next(it)
            loss += device.forward(x, y) / accum_steps
            device.backward(micro > 0, 1.0 / accum_steps)
        losses.append(loss)
        norms.append(device.update(**recipe))
    return losses, norms


def train_loop_parity(cpu, tc, cfg, B, T, steps, tol, precision="fp32"):
    """A few training steps as main() runs them (2 micro-steps each, a new batch each,
    gradient clipping), through CUDA and through train_gpt2.CPU from the same host
    parameters: losses, norms, and the final parameters, AdamW state and step count
    (CUDA's through state_to_host)."""
    rng = np.random.default_rng(21)
    accum = 2
    batches = []
    for _ in range(steps * accum):
        toks = rng.integers(0, cfg.vocab_size, size=(B, T + 1)).astype(np.int32)
        batches.append((toks[:, :-1].copy(), toks[:, 1:].copy()))
    recipe = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, weight_decay_mode="matrices",
                  grad_clip=0.5)
    by_norm = precision == "bf16"  # bf16: ||error|| / ||reference||
    host = common.gpt2_init_random(cfg, 17)
    gpu = tc.CUDA(clone_host(host), B, T, precision=precision)
    losses, norms = train_loop(gpu, batches, accum, recipe)
    gpu.state_to_host()
    ref = cpu.CPU(host, B, T)
    losses_ref, norms_ref = train_loop(ref, batches, accum, recipe)
    ref.state_to_host()
    got = gpu.model
    report(f"train loop {steps} step losses", losses, losses_ref, tol, norm=by_norm)
    report(f"train loop {steps} norms", norms, norms_ref, tol, norm=by_norm)
    report("train loop final params", got.params_memory, host.params_memory, tol, norm=by_norm)
    report("train loop final m", got.m_memory, host.m_memory, tol, norm=by_norm)
    report("train loop final v", got.v_memory, host.v_memory, tol, norm=by_norm)
    report("train loop step count", got.step, host.step, 0.0, absolute=True)
    gpu.free()


def state_round_trip(tc, cfg, B, T, precision="fp32"):
    """state_from_host then state_to_host gives back the same bits (params, m, v, step);
    without host optimizer buffers, state_from_host starts a fresh AdamW state; and a
    target resumed from a saved state (main()'s --resume: build, then state_from_host)
    continues exactly like the one that kept going."""
    rng = np.random.default_rng(5)
    host = common.gpt2_init_random(cfg, 9)
    dev = tc.CUDA(host, B, T, precision=precision)
    n = host.num_parameters
    common.ensure_optimizer_buffers(host)  # a host state unlike the one the device was built from
    host.params_memory[:] = rng.standard_normal(n).astype(np.float32)
    host.m_memory[:] = rng.standard_normal(n).astype(np.float32)
    host.v_memory[:] = rng.random(n).astype(np.float32)
    host.step = 7
    saved = [host.params_memory.copy(), host.m_memory.copy(), host.v_memory.copy()]
    dev.state_from_host()
    for a in (host.params_memory, host.m_memory, host.v_memory):
        a[:] = np.nan
    host.step = 0
    dev.state_to_host()
    same = all(np.array_equal(a, b) for a, b in zip((host.params_memory, host.m_memory, host.v_memory), saved))
    report("state round trip params,m,v", float(not same), 0.0, 0.0, absolute=True)
    report("state round trip step", host.step, 7, 0.0, absolute=True)
    # a host model without optimizer buffers (a plain checkpoint): a fresh AdamW state
    host.grads_memory = host.m_memory = host.v_memory = host.grads = None
    host.step = 0
    dev.state_from_host()
    dev.state_to_host()
    report("state from a fresh host m,v", np.abs(host.m_memory).max() + np.abs(host.v_memory).max(), 0.0, 0.0,
           absolute=True)
    report("state from a fresh host step", host.step, 0, 0.0, absolute=True)
    dev.free()

    # resume: A trains a step, saves; B is built from the saved state; both take step 2
    recipe = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, weight_decay_mode="matrices",
                  grad_clip=1.0)
    batches = [tuple(rng.integers(0, cfg.vocab_size, size=(2, B, T)).astype(np.int32)) for _ in range(2)]
    a = tc.CUDA(common.gpt2_init_random(cfg, 12), B, T, precision=precision)
    train_loop(a, batches[:1], 1, recipe)
    a.state_to_host()
    saved = clone_host(a.model)  # what a checkpoint keeps: params, m, v, step
    common.ensure_optimizer_buffers(saved)
    saved.m_memory[:], saved.v_memory[:], saved.step = a.model.m_memory, a.model.v_memory, a.model.step
    b = tc.CUDA(saved, B, T, precision=precision)
    b.state_from_host()
    la, na = train_loop(a, batches[1:], 1, recipe)
    lb, nb = train_loop(b, batches[1:], 1, recipe)
    a.state_to_host()
    b.state_to_host()
    report("resumed step loss", lb, la, 0.0, absolute=True)
    report("resumed step norm", nb, na, 0.0, absolute=True)
    report("resumed params", b.model.params_memory, a.model.params_memory, 0.0, absolute=True)
    report("resumed m, v", np.concatenate([b.model.m_memory, b.model.v_memory]),
           np.concatenate([a.model.m_memory, a.model.v_memory]), 0.0, absolute=True)
    report("resumed step count", b.model.step, 2, 0.0, absolute=True)
    a.free()
    b.free()


# -----------------------------------------------------------------------------
# bf16


def cmd_bf16(args):
    """The bf16 path against the float32 CPU target, with bf16-sized tolerances: the
    storage conversions (every bf16 bit pattern widened, random and special values
    rounded), the cuBLASLt contract (each epilogue, transposes, float32 outputs,
    accumulation) against float64 numpy on the same bf16 operands, the fused attention
    against train_gpt2's attention forward/backward, full steps and a training loop
    through the Device interface, the state round trip and an exact resume, and every
    recompute level (-r 0, 1, 2) giving the same bits."""
    global cuda  # a module global: the simulator swaps a kernel's global `cuda` for its own
    import train_gpt2 as cpu
    import train_gpt2_cuda as tc
    import cuda_kernels as ck
    from numba import cuda

    print(f"simulator={tc.SIM}", flush=True)
    rng = np.random.default_rng(4321)
    f32 = np.float32
    tol = args.tol

    @cuda.jit
    def k_convert(out32, in16, out16, in32):
        i = cuda.grid(1)
        if i < in16.shape[0]:
            ck.st(out32, i, ck.ld(in16, i))
        if i < in32.shape[0]:
            ck.st(out16, i, ck.ld(in32, i))

    # every pattern on the GPU; a strided sample under the simulator (a Python thread per
    # element there), whose conversions are gpt2_common's, tested exhaustively in tests/
    bits = np.arange(0, 65536, 61 if tc.SIM else 1, dtype=np.uint16)
    n_rand = 512 if tc.SIM else 1 << 20
    vals = (rng.standard_normal(n_rand) * 10.0 ** rng.integers(-30, 30, n_rand)).astype(f32)
    vals = np.concatenate([vals, np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.0e38, -3.4e38, 1e-40, -1e-45], f32)])
    vals[:64] = common.bfloat16_to_float32(rng.integers(0, 65536, 64).astype(np.uint16)) * f32(1.0 + 2.0 ** -8)  # ties
    d32, d16 = cuda.device_array(bits.size, f32), cuda.device_array(vals.size, np.uint16)
    threads = 64 if tc.SIM else 256
    k_convert[(max(bits.size, vals.size) + threads - 1) // threads, threads](d32, cuda.to_device(bits), d16,
                                                                             cuda.to_device(vals))
    wide, ref = d32.copy_to_host(), common.bfloat16_to_float32(bits)
    bad = ~((wide.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(wide) & np.isnan(ref)))
    report(f"bf16 widen, {bits.size} patterns", float(bad.sum()), 0.0, 0.0, absolute=True)
    narrow, refn = d16.copy_to_host(), common.float32_to_bfloat16(vals)
    report(f"bf16 round to nearest even, {vals.size} values", float((narrow != refn).sum()), 0.0, 0.0, absolute=True)

    # cuBLASLt: row-major C[M, N] = op(A) @ op(B) (+ bias, GELU, ...) against float64 numpy
    def bf(x):
        return common.float32_to_bfloat16(np.ascontiguousarray(x, f32))

    def wide64(x):
        return common.bfloat16_to_float32(x).astype(np.float64)

    def gelu64(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    def dgelu64(x):
        th = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x * x)

    lt = tc.Lt(0)

    kept = []  # every device operand stays alive until the end (matmuls take raw addresses)

    def dev(x):
        d = tc.alloc(x.size, x.dtype)
        d.copy_to_device(x.reshape(-1))
        kept.append(d)
        return d

    for tA in (False, True):
        for tB in (False, True):
            for case in ("plain", "bias", "gelu", "dgelu", "fp32 acc", "fp32 add"):
                # ragged shapes, except for the bias + GELU epilogue, which the trainer uses only on
                # multiples of 64 and untransposed activations (train_gpt2_cuda.fuses_gelu, Lt.matmul)
                if case == "gelu" and (tA, tB) != (False, True):
                    continue
                M, N, K = (64, 128, 64) if case == "gelu" else (24, 40, 56)
                a = bf(rng.standard_normal((K, M) if tA else (M, K)))
                b = bf(rng.standard_normal((N, K) if tB else (K, N)) * 0.2)
                opa = wide64(a).T if tA else wide64(a)
                opb = wide64(b).T if tB else wide64(b)
                ref = opa @ opb
                out32 = case.startswith("fp32")
                c0 = rng.standard_normal((M, N)).astype(f32)
                c = dev(c0 if out32 else bf(c0))
                kw = {}
                bias = bf(rng.standard_normal(N))
                if case in ("bias", "gelu"):
                    kw["bias"] = tc.addr(dev(bias))
                    ref = ref + wide64(bias)
                if case == "gelu":
                    aux = dev(np.zeros(M * N, np.uint16))
                    kw["gelu_aux"] = tc.addr(aux)
                    pre = ref
                    ref = gelu64(ref)
                if case == "dgelu":
                    pre16 = bf(rng.standard_normal((M, N)))
                    kw["dgelu_aux"] = tc.addr(dev(pre16))
                    ref = ref * dgelu64(wide64(pre16))
                if case == "fp32 acc":
                    kw["accumulate"] = True
                    ref = ref + c0
                if case == "fp32 add":
                    other = rng.standard_normal((M, N)).astype(f32)
                    kw["add"] = tc.addr(dev(other))
                    ref = ref + other
                lt.matmul(tA, tB, M, N, K, tc.addr(dev(a)), M if tA else K, tc.addr(dev(b)), K if tB else N,
                          tc.addr(c), N, out_fp32=out32, **kw)
                tc.synchronize()
                got = c.copy_to_host().reshape(M, N)
                got = got.astype(np.float64) if out32 else wide64(got)
                err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
                report(f"cublasLt tA={int(tA)} tB={int(tB)} {case}", err, 0.0, 1e-2 if not out32 else 1e-4,
                       absolute=True)
                if case == "gelu":
                    got_pre = wide64(aux.copy_to_host().reshape(M, N))
                    report(f"cublasLt tA={int(tA)} tB={int(tB)} gelu aux", np.linalg.norm(got_pre - pre) /
                           np.linalg.norm(pre), 0.0, 1e-2, absolute=True)

    # fused attention vs train_gpt2's attention, on bf16-rounded inputs
    Bq, Tq, NH, HS = 2, 8, 2, 16
    Cq = NH * HS
    att = tc.Attention(Bq, NH, Tq, HS, 0)
    qkv16 = bf(rng.standard_normal((Bq * Tq, 3 * Cq)))
    d_qkv, d_out = dev(qkv16), dev(np.zeros(Bq * Tq * Cq, np.uint16))
    d_stats = dev(np.zeros(Bq * NH * Tq, f32))
    att.forward(tc.addr(d_qkv), tc.addr(d_out), tc.addr(d_stats))
    qkv = common.bfloat16_to_float32(qkv16)
    ref_att, ref_out = np.zeros((Bq, NH, Tq, Tq), f32), np.zeros((Bq * Tq, Cq), f32)
    cpu.attention_forward(ref_out, ref_att, qkv, Bq, Tq, NH)
    tc.synchronize()
    report("attention forward (bf16)", common.bfloat16_to_float32(d_out.copy_to_host()).reshape(Bq * Tq, Cq),
           ref_out, 1e-2, norm=True)
    dout16 = bf(rng.standard_normal((Bq * Tq, Cq)))
    d_dqkv = dev(np.zeros(Bq * Tq * 3 * Cq, np.uint16))
    att.backward(tc.addr(d_qkv), tc.addr(d_out), tc.addr(dev(dout16)), tc.addr(d_stats), tc.addr(d_dqkv))
    ref_dqkv = np.zeros_like(qkv)
    cpu.attention_backward(ref_dqkv, common.bfloat16_to_float32(dout16), qkv, ref_att, Bq, Tq, NH)
    tc.synchronize()
    got = common.bfloat16_to_float32(d_dqkv.copy_to_host()).reshape(Bq * Tq, 3 * Cq)
    for i, name in enumerate("qkv"):
        report(f"attention backward d{name} (bf16)", got[:, i * Cq:(i + 1) * Cq], ref_dqkv[:, i * Cq:(i + 1) * Cq],
               1e-2, norm=True)

    # whole steps through the Device interface, against the float32 CPU target
    cfg = common.GPT2Config(max_seq_len=16, vocab_size=60, padded_vocab_size=128, num_layers=2, num_heads=2,
                            channels=32)
    Bq, Tq = 2, 8
    full_step_parity(cpu, tc, cfg, Bq, Tq, steps=args.steps, precision="bf16", seed=11, tol_logits=tol,
                     tol_grads=tol)
    train_loop_parity(cpu, tc, cfg, Bq, Tq, steps=args.steps, tol=tol, precision="bf16")
    state_round_trip(tc, cfg, Bq, Tq, precision="bf16")

    # the tiny config's shapes take the unfused bias + GELU (above), a GPT-2-like one the fused epilogue
    wide = common.GPT2Config(max_seq_len=64, vocab_size=60, padded_vocab_size=128, num_layers=1, num_heads=2,
                             channels=64)
    report("bias+GELU epilogue only on multiples of 64", float(tc.fuses_gelu(Bq * Tq, cfg.channels)) +
           float(not tc.fuses_gelu(2 * 32, wide.channels)), 0.0, 0.0, absolute=True)
    full_step_parity(cpu, tc, wide, 2, 32, steps=1, precision="bf16", seed=13, tol_logits=tol, tol_grads=tol,
                     label="fused gelu ")

    # every recompute level, bit for bit, over two steps with an accumulating backward: on
    # the tiny config the forward's GELU, as the recompute, starts from the stored bf16
    # pre-activation; -r 2's layernorm outputs come from the stored statistics and its
    # residual2 from the attention projection's matmul again
    x = rng.integers(0, cfg.vocab_size, size=(Bq, Tq)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, size=(Bq, Tq)).astype(np.int32)
    results = {}
    for recompute in (0, 1, 2):
        d = tc.CUDA(common.gpt2_init_random(cfg, 3), Bq, Tq, precision="bf16", recompute=recompute)
        losses = []
        for _ in range(2):
            losses.append(d.forward(x, y))
            d.backward(loss_scale=0.5)
            losses.append(d.forward(y, x))
            d.backward(accumulate=True, loss_scale=0.5)
            d.update(1e-3, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)
        d.params_to_host()
        results[recompute] = (losses, d.grads_to_host(), d.model.params_memory.copy())
        d.free()
    for recompute in (0, 2):
        for i, what in enumerate(("losses", "grads", "params")):
            report(f"recompute {recompute} vs 1 {what}", results[recompute][i], results[1][i], 0.0, absolute=True)
    classifier_chunks(tc, cfg, Bq, Tq, rng)
    finish()


def classifier_chunks(tc, cfg, B, T, rng):
    """The bf16 classifier in chunks of rows (5 rows: chunks 5, 5, 5, 1 of B*T = 16)
    against one chunk of all rows: the losses, the logits computed again on request, and
    the gradients of an accumulating step with a loss scale and masked targets (some
    chunks wholly masked), which the backward applies to the forward's per-target
    gradients; a forward-only evaluator gives the training forward's loss."""
    x = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    y2 = y.copy()
    y2.reshape(-1)[3:12] = -1
    import train_gpt2 as cpu
    ref = cpu.CPU(common.gpt2_init_random(cfg, 8), B, T)  # the float32 CPU target, the same calls
    ref.forward(x, y)
    ref.backward(accumulate=False, loss_scale=0.5)
    ref.forward(x, y2)
    ref.backward(accumulate=True, loss_scale=0.5)
    out = {}
    for rows in (B * T, 5):
        d = tc.CUDA(common.gpt2_init_random(cfg, 8), B, T, precision="bf16", classifier_rows=rows)
        got = [d.forward(x, y)]
        got.append(d.logits_to_host()[:, :cfg.vocab_size].copy())
        d.backward(accumulate=False, loss_scale=0.5)
        got.append(d.forward(x, y2))
        d.backward(accumulate=True, loss_scale=0.5)
        got.append(d.grads_to_host().copy())
        d.update(1e-3, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)
        got.append(d.forward(x, y))
        got.append(d.evaluator(B, T).forward(x, y))
        out[rows] = got
        d.free()
    # the same sums but for the matmuls' row counts, which a BLAS (or cuBLASLt) may sum in
    # another order: a float32 last bit can flip a bf16 rounding, so norms, with room for a few
    one, chunked = out[B * T], out[5]
    report("classifier chunks: loss", chunked[0], one[0], 1e-4, norm=True)
    report("classifier chunks: logits", chunked[1], one[1], 1e-3, norm=True)
    report("classifier chunks: masked loss", chunked[2], one[2], 1e-4, norm=True)
    report("classifier chunks: grads", chunked[3], one[3], 1e-3, norm=True)
    report("classifier chunks: next loss", chunked[4], one[4], 1e-3, norm=True)
    report("classifier chunks: evaluator", chunked[5], chunked[4], 0.0, absolute=True)
    report("classifier chunks: grads vs CPU fp32", chunked[3], ref.grads_to_host(), 5e-2, norm=True)
    d = cpu.build_device("cuda", common.gpt2_init_random(cfg, 8), B, T, "bf16", deterministic=0)
    report("--deterministic 0 reaches the attention", float(d.dm.deterministic or d.dm.attention.deterministic), 0.0,
           0.0, absolute=True)
    d.free()


def cmd_fp8(args):
    """The fp8 path: the cast kernel against cuda_fp8.encode (every code, random values
    over the formats' ranges, the transpose, the amax) and the scale update; each fp8
    matmul form of the step (the forward with a bias, the float32 forward that adds to
    the residual stream, the weight gradient accumulating in float32, the input gradient
    through the GELU backward) against numpy on the decoded operands; then fp8 training
    steps against bf16's on a tiny model (losses, gradients), a seeded fp8 run that
    repeats bit for bit, and an exact resume through run_state."""
    import cuda_fp8 as f8
    import train_gpt2_cuda as tc
    from cuda_libraries import R_8F_E4M3, R_8F_E5M2, addr

    print(f"simulator={tc.SIM}", flush=True)
    if not f8.supported():
        print("RESULT FAIL: this GPU has no fp8 tensor cores", flush=True)
        sys.exit(1)
    rng = np.random.default_rng(88)
    rows, cols = (24, 40) if tc.SIM else (1000, 776)  # not whole tiles
    meta_host = np.zeros((2, f8.HISTORY + f8.FP8_HISTORY), np.float32)
    meta_host[:, f8.SCALE] = [0.25, 64.0]
    meta_host[:, f8.SCALE_INV] = 1 / meta_host[:, f8.SCALE]
    meta_host[:, f8.FP8_MAX] = [f8.largest(f8.E4M3), f8.largest(f8.E5M2)]
    meta = tc.alloc(meta_host.size).reshape(meta_host.shape)
    meta.copy_to_device(meta_host)
    x = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-14, 10, (rows, cols)))).astype(np.float32)
    x.reshape(-1)[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -448.0, 57344.0]
    x16 = common.float32_to_bfloat16(x)
    xw = common.bfloat16_to_float32(x16)
    xd = tc.alloc(x.size, np.uint16).reshape(rows, cols)
    xd.copy_to_device(x16)
    out = tc.alloc(x.size, np.uint8).reshape(rows, cols)
    out_t = tc.alloc(x.size, np.uint8).reshape(cols, rows)
    for fmt in (f8.E4M3, f8.E5M2):
        f8.cast(xd, meta, fmt, fmt, out=out, out_t=out_t)
        ref = f8.encode(xw * meta_host[fmt, f8.SCALE], fmt)
        got, got_t = out.copy_to_host(), out_t.copy_to_host()
        report(f"fp8 cast {f8.FORMAT_NAMES[fmt]} codes", (got != ref).sum(), 0, 0, absolute=True)
        report(f"fp8 cast {f8.FORMAT_NAMES[fmt]} transposed", (got_t != ref.T).sum(), 0, 0, absolute=True)
    from cuda_libraries import _gelu_np
    moderate = np.clip(xw, -20, 20)  # the GELU's input range in practice
    xd.copy_to_device(common.float32_to_bfloat16(moderate))
    f8.cast(xd, meta, 0, f8.E4M3, out_t=out_t, with_gelu=True)
    ref = f8.encode(_gelu_np(common.bfloat16_to_float32(common.float32_to_bfloat16(moderate))) * meta_host[0, f8.SCALE],
                    f8.E4M3)  # (a float32 tanh may differ by an ulp: a rare code across a rounding boundary)
    report("fp8 cast of the GELU, transposed", np.mean(out_t.copy_to_host() != ref.T), 0.0, 1e-3, absolute=True)
    xd.copy_to_device(x16)
    every = np.arange(256, dtype=np.uint8)
    for fmt in (f8.E4M3, f8.E5M2):  # each finite value casts to its own code (scale 1)
        vals = f8.decode(every, fmt)
        keep = every[np.isfinite(vals)]
        v16 = common.float32_to_bfloat16(f8.decode(keep, fmt))  # every E4M3 / E5M2 value is a bf16 value
        n = keep.size - keep.size % 4
        vd = tc.alloc(n, np.uint16).reshape(1, n)
        vd.copy_to_device(v16[:n])
        o = tc.alloc(n, np.uint8).reshape(1, n)
        m1 = meta_host.copy()
        m1[:, f8.SCALE] = m1[:, f8.SCALE_INV] = 1.0
        meta.copy_to_device(m1)
        f8.cast(vd, meta, fmt, fmt, out=o)
        report(f"fp8 cast {f8.FORMAT_NAMES[fmt]} every value", (o.copy_to_host()[0] != keep[:n]).sum(), 0, 0,
               absolute=True)
    meta.copy_to_device(meta_host)
    f8.cast(xd, meta, 0, f8.E4M3, out=out)
    f8.update_scales(meta)
    m = meta.copy_to_host()
    finite = np.abs(xw[np.isfinite(xw)])
    report("fp8 amax of values with an infinity is inf", float(m[0, f8.HISTORY] == np.inf), 1.0, 0, absolute=True)
    report("fp8 an infinite amax keeps the scale", m[0, f8.SCALE], meta_host[0, f8.SCALE], 0, absolute=True)
    meta.copy_to_device(meta_host)
    xd.copy_to_device(common.float32_to_bfloat16(np.where(np.isfinite(xw), xw, 0)))
    f8.cast(xd, meta, 0, f8.E4M3, out=out)
    f8.update_scales(meta)
    m = meta.copy_to_host()
    want = 2.0 ** np.floor(np.log2(448.0 / finite.max()))
    report("fp8 scale from the history", m[0, f8.SCALE], want, 0, absolute=True)
    report("fp8 1 / scale", m[0, f8.SCALE_INV] * m[0, f8.SCALE], 1.0, 0, absolute=True)

    # the step's fp8 matmul forms against numpy on the decoded operands (sums of exact
    # products in float64). The tensor cores do not sum fp8 products in full float32: on an
    # H100 the float32 outputs were 1.0e-4 off (||error|| / ||ref||) with the precise
    # accumulation and 4.4e-4 with the fast one; the bf16 outputs 1.7e-3 (their rounding).
    # A wrong scale, operand or layout is off by O(1).
    lt = tc.Lt(0)
    M, N, K = (32, 48, 64) if tc.SIM else (512, 768, 1024)
    scales = tc.alloc(8)  # (16-byte aligned, as cuBLASLt's scale pointers must be)
    scales.copy_to_device(np.array([0.5, 0, 0, 0, 0.125, 0, 0, 0], np.float32))

    def operand(shape, fmt):
        codes = f8.encode(rng.standard_normal(shape).astype(np.float32) * 8, fmt)
        d = tc.alloc(codes.size, np.uint8).reshape(shape)
        d.copy_to_device(codes)
        return d, f8.decode(codes, fmt).astype(np.float64)

    def dev(a, dtype):
        d = tc.alloc(a.size, dtype).reshape(a.shape)
        d.copy_to_device(common.float32_to_bfloat16(a) if dtype == np.uint16 else a.astype(np.float32))
        return d

    a_d, a = operand((M, K), f8.E5M2)
    b_d, b = operand((N, K), f8.E4M3)
    sa, sb = (R_8F_E5M2, addr(scales)), (R_8F_E4M3, addr(scales) + 16)
    ref = (a @ b.T) * 0.5 * 0.125
    bias = rng.standard_normal(N).astype(np.float32)
    bias16 = common.float32_to_bfloat16(bias)
    bias_w = common.bfloat16_to_float32(bias16).astype(np.float64)
    c16 = tc.alloc(M * N, np.uint16).reshape(M, N)
    for fast in (False, True):
        lt.matmul(False, True, M, N, K, addr(a_d), K, addr(b_d), K, addr(c16), N, bias=addr(dev(bias, np.uint16)),
                  a8=sa, b8=sb, fast_accum=fast)
        report(f"fp8 matmul + bias, bf16 out{' (fast)' if fast else ''}",
               common.bfloat16_to_float32(c16.copy_to_host()), ref + bias_w, 1e-2, norm=True)
    add = rng.standard_normal((M, N)).astype(np.float32)
    add_d, c32 = dev(add, np.float32), tc.alloc(M * N).reshape(M, N)
    lt.matmul(False, True, M, N, K, addr(a_d), K, addr(b_d), K, addr(c32), N, out_fp32=True, add=addr(add_d),
              bias=addr(dev(bias, np.uint16)), a8=sa, b8=sb, fast_accum=True)
    report("fp8 matmul + residual + bias, f32", c32.copy_to_host(), ref + add + bias_w, 2e-3, norm=True)
    c32.copy_to_device(add)
    lt.matmul(False, True, M, N, K, addr(a_d), K, addr(b_d), K, addr(c32), N, out_fp32=True, accumulate=True,
              a8=sa, b8=sb)
    report("fp8 matmul accumulating, f32", c32.copy_to_host(), ref + add, 5e-4, norm=True)
    pre = rng.standard_normal((M, N)).astype(np.float32)
    pre16 = common.float32_to_bfloat16(pre)
    from cuda_libraries import _gelu_grad_np
    lt.matmul(False, True, M, N, K, addr(a_d), K, addr(b_d), K, addr(c16), N, dgelu_aux=addr(dev(pre, np.uint16)),
              a8=sa, b8=sb)
    report("fp8 matmul * gelu'(aux), bf16", common.bfloat16_to_float32(c16.copy_to_host()),
           ref * _gelu_grad_np(common.bfloat16_to_float32(pre16)), 1e-2, norm=True)

    # training: fp8 against bf16 on a tiny model (the same data and init; a padded vocabulary
    # whose logits buffer holds the casts' scratch, as GPT-2's does)
    cfg = common.GPT2Config(max_seq_len=16, vocab_size=60, padded_vocab_size=256, num_layers=2, num_heads=2,
                            channels=32)
    B, T = 2, 8
    x = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    runs, first, unscaled, layout = {}, {}, 0, {}
    for name, prec, r in (("bf16", "bf16", 1), ("fp8", "fp8", 1), ("fp8 again", "fp8", 1), ("fp8 -r 2", "fp8", 2)):
        d = tc.CUDA(common.gpt2_init_random(cfg, 3), B, T, precision=prec, recompute=r)
        losses = []
        for step in range(args.steps):
            losses.append(d.forward(x, y))
            if step == 0 and prec == "fp8":  # the first step's casts: every input and gradient slot has a scale
                layout[r] = (d.dm.fp8.scratch_memory is None, d.dm.fp8.inputs_t_memory is not None)
                m = d.dm.fp8.meta.copy_to_host()
                kinds = np.arange(m.shape[0]) % 3
                unscaled += int(((kinds != f8.WEIGHT) & (m[:, f8.HISTORY] == 0)).sum())
            d.backward()
            if step == 0:
                first[name] = d.grads_to_host()
            if step + 1 < args.steps:
                d.update(1e-3, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)
        runs[name] = (losses, d.grads_to_host())
        if name == "fp8":
            d.state_to_host()
            saved = (d.model.params_memory.copy(), d.model.m_memory.copy(), d.model.v_memory.copy(), d.model.step,
                     d.run_state())
            d.update(1e-3, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)
            after = [d.forward(x, y)]
            d.backward()
            after.append(d.grads_to_host())
        d.free()
    # at scale 1 every one of these slots would count (16 a run); their scales come from a bf16 pass first
    report("fp8 first step: inputs and gradients cast at scale 1", unscaled, 0, 0, absolute=True)
    report("fp8 vs bf16 first-step gradients", first["fp8"], first["bf16"], args.tol, norm=True)
    report("fp8 vs bf16 losses", runs["fp8"][0], runs["bf16"][0], 2e-2, norm=True)
    report("fp8 vs bf16 gradients", runs["fp8"][1], runs["bf16"][1], args.tol, norm=True)
    report("fp8 seeded run repeats: losses", runs["fp8 again"][0], runs["fp8"][0], 0.0, absolute=True)
    report("fp8 seeded run repeats: gradients", runs["fp8 again"][1], runs["fp8"][1], 0.0, absolute=True)
    # -r 2 casts the recomputed layernorm outputs in the backward, -r 1 keeps their transposes from the forward
    report("fp8 buffers: cast scratch in the logits, ln transposes at -r 1 only",
           int(layout != {1: (True, True), 2: (True, False)}), 0, 0, absolute=True)
    report("fp8 -r 2 as -r 1: gradients", runs["fp8 -r 2"][1], runs["fp8"][1], 0.0, absolute=True)
    model = common.gpt2_init_random(cfg, 3)
    d = tc.CUDA(model, B, T, precision="fp8")
    common.ensure_optimizer_buffers(model)
    model.params_memory[:], model.m_memory[:], model.v_memory[:], model.step = saved[:4]
    d.state_from_host()
    d.set_run_state(saved[4])
    # the backward that saved state left its gradients; the resumed target needs them too
    d.forward(x, y)
    d.backward()
    d.update(1e-3, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)
    resumed = [d.forward(x, y)]
    d.backward()
    resumed.append(d.grads_to_host())
    report("fp8 resume: next loss", resumed[0], after[0], 0.0, absolute=True)
    report("fp8 resume: next gradients", resumed[1], after[1], 0.0, absolute=True)
    d.free()
    finish()


# -----------------------------------------------------------------------------
# parity on a real-size model


def run_recipe(device, x, y, steps, recipe, V):
    """test_gpt2's check through a target: step 0's logits, loss and gradients, then
    the losses of `steps` steps (an update before each after the first)."""
    loss = device.forward(x, y)
    logits = device.logits_to_host()[:, :V].copy()
    device.backward()
    grads = device.grads_to_host().copy()
    losses = [loss]
    for _ in range(1, steps):
        device.update(**recipe)
        losses.append(device.forward(x, y))
        device.backward()
    return logits, loss, grads, losses


def cmd_parity(args):
    import train_gpt2 as cpu
    import train_gpt2_cuda as tc

    cfg = common.config_from_depth(f"d{args.depth}") if args.depth else \
        common.GPT2Config(max_seq_len=16, vocab_size=60, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)
    B, T = args.B, args.T
    name = f"d{args.depth}" if args.depth else "tiny"
    rng = np.random.default_rng(args.seed)
    if args.tokens and os.path.exists(args.tokens) and args.depth:
        toks = common.read_token_file(args.tokens)[:B * T + 1].astype(np.int32)
        x, y = toks[:-1].reshape(B, T), toks[1:].reshape(B, T)
    else:
        x = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
        y = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    V = cfg.vocab_size
    recipe = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, weight_decay_mode="all", grad_clip=0.0)
    # CPU reference (train_gpt2.CPU): logits, loss, gradients of one pass; losses of llm.c's 10-step test recipe
    t0 = time.time()
    ref_logits, ref_loss, ref_grads, ref_steps = run_recipe(cpu.CPU(common.gpt2_init_random(cfg, args.seed), B, T),
                                                            x, y, args.steps, recipe, V)
    print(f"CPU reference {name} B={B} T={T}: {time.time() - t0:.1f} s; losses {' '.join(f'{v:.6f}' for v in ref_steps)}",
          flush=True)
    out = []
    for tf32 in [int(v) for v in str(args.tf32).split(",")]:
        tag = f"{name} B={B} T={T} {'tf32' if tf32 else 'fp32'}"
        lt, gt = (args.logit_tol_tf32, args.grad_tol_tf32) if tf32 else (args.logit_tol, args.grad_tol)
        dev = tc.CUDA(common.gpt2_init_random(cfg, args.seed), B, T, precision="tf32" if tf32 else "fp32")
        logits, loss, g, losses = run_recipe(dev, x, y, args.steps, recipe, V)
        dev.free()
        errs = {"logits": float(np.max(np.abs(logits - ref_logits))), "loss": abs(loss - ref_loss)}
        report(f"{tag} logits", logits, ref_logits, lt, absolute=True)
        report(f"{tag} loss", loss, ref_loss, lt, absolute=True)
        for pname, s0, s1 in common.parameter_offsets(cfg):
            report(f"{tag} grad {pname}", g[s0:s1], ref_grads[s0:s1], gt, absolute=True)
            errs["grad " + pname] = float(np.max(np.abs(g[s0:s1] - ref_grads[s0:s1])))
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


def load_batches(path, B, T, V, seed=0):
    if path and os.path.exists(path):
        loader = common.DataLoader(path, B, T, V)
        return lambda: tuple(a.copy() for a in loader.next_batch()), os.path.basename(path)
    rng = np.random.default_rng(seed)

    def nxt():
        toks = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
        return toks[:, :-1].copy(), toks[:, 1:].copy()
    return nxt, "random tokens"


def cmd_bench(args):
    """Training steps as train_gpt2.py's main() runs them: through the CUDA target,
    forward (loss read back), backward, update (norm read back)."""
    import train_gpt2_cuda as tc
    from numba import cuda

    cfg = common.config_from_depth(f"d{args.depth}")
    B, T = args.B, args.T
    prec = args.precision
    model = common.gpt2_init_random(cfg, 0)
    nxt, data_name = load_batches(args.tokens, B, T, cfg.vocab_size)
    result = {"system": "ours (numba.cuda + " + ("cuBLASLt + cuDNN)" if prec in tc.MIXED else "cuBLAS)"), "precision": prec,
              "recompute": args.recompute, "B": B, "T": T, "data": data_name}
    opt = (args.lr, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)

    dist = None
    if args.nccl:  # one NCCL rank, as a one-rank torchrun launch has it: the gradient sums run
        import socket  # by buckets beside the backward (or, with --reduce-in-update, in the update)
        import distributed
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port - 1))
        dist = distributed.setup("cuda")
        result["nccl"] = "reduce in update" if args.reduce_in_update else "buckets during backward"
    last = not args.reduce_in_update

    def run(device, steps, label, log=True):
        times, losses = [], []
        tc.synchronize()
        for step in range(steps):
            x, y = nxt()
            t0 = time.perf_counter()
            loss = device.forward(x, y)
            device.backward(last_micro_step=last)
            norm = device.update(*opt)  # waits for the step
            dt = time.perf_counter() - t0
            times.append(dt)
            losses.append(loss)
            if log:
                print(f"  [{label}] step {step:2d} loss {loss:.4f} norm {norm:.3f} {dt * 1e3:8.1f} ms "
                      f"{B * T / dt / 1e3:7.1f}k tok/s", flush=True)
        return times, losses

    t0 = time.time()
    cuda.current_context()
    memory_before = tc.device_memory_used()  # the CUDA context and the libraries loaded so far
    device = tc.CUDA(model, B, T, precision=prec, attention_blocks=args.attention_blocks or None,
                     graphs=not args.no_graphs, recompute=args.recompute, dist=dist,
                     deterministic=bool(args.deterministic), classifier_rows=args.classifier_rows or tc.CLASSIFIER_ROWS)
    memory_built = tc.device_memory_used()
    blocks = f"attention blocks {len(device.dm.attn_blocks)}" if prec not in tc.MIXED else \
        f"cuDNN attention ({'deterministic' if device.dm.attention.deterministic else 'atomic dq'} backward), " \
        f"CUDA graphs {'off' if args.no_graphs else 'on'}, recompute {args.recompute}, classifier rows " \
        f"{device.dm.acts.logits.shape[0]}"
    if prec in tc.MIXED:
        result.update(deterministic=bool(args.deterministic), classifier_rows=int(device.dm.acts.logits.shape[0]))
    print(f"== ours {prec} B={B} T={T}: built in {time.time() - t0:.1f} s, {blocks}"
          f"{', one NCCL rank, ' + result['nccl'] if dist else ''}", flush=True)
    t0 = time.time()
    times, losses = run(device, args.steps, prec)
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
        device.forward(x, y)
        ev[1].record()
        device.backward(last_micro_step=last)
        ev[2].record()
        device.update(*opt)
        ev[3].record()
        ev[3].synchronize()
        phase.append([cuda.event_elapsed_time(ev[i], ev[i + 1]) for i in range(3)])
    ph = np.median(np.array(phase), axis=0)
    result["phase_ms"] = {"forward": ph[0], "backward": ph[1], "update": ph[2]}
    print(f"  phases (ms): forward {ph[0]:.1f} backward {ph[1]:.1f} update {ph[2]:.1f}", flush=True)
    if args.memory:
        result["memory"] = memory_table(device.dm, memory_before, memory_built, result["mem_bytes"])

    if args.profile:
        profile_step(tc, device, nxt, opt, args, prec)

    # variants: other numbers of causal query blocks
    variants = {}
    for spec in [v for v in args.variants.split(",") if v]:
        nb = int(spec)
        device.free()
        gc.collect()
        try:
            cuda.current_context().deallocations.clear()
        except Exception as e:  # pragma: no cover
            print("  (deallocations.clear failed:", e, ")")
        device = tc.CUDA(model, B, T, precision=prec, attention_blocks=nb)
        tv, _ = run(device, args.variant_steps, f"{prec} {spec}", log=False)
        mv = float(np.median(tv[2:]))
        variants[spec] = B * T / mv
        print(f"  variant {spec:8s}: {mv * 1e3:.1f} ms/step {B * T / mv / 1e3:.1f}k tok/s", flush=True)
    device.free()
    result["variants_tok_per_s"] = variants
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def memory_table(dm, before, built, running):
    """Where the device memory of a run goes: each buffer the target allocated (the
    activations tensor by tensor), what the CUDA context held before it, and the rest
    (the libraries' handles and workspaces, CUDA graphs, allocator slack): printed in
    GiB, returned as {name: bytes}."""
    rows = {}
    for name in ("params_memory", "params16_memory", "grads_memory", "m_memory", "v_memory", "wte_grad_pending",
                 "acts_memory", "dacts_memory"):
        x = getattr(dm, name, None)
        if x is not None:
            rows[name] = x.nbytes
    layered = {}
    for name, x in vars(dm.acts).items():
        layered[name] = sum(v.nbytes for v in x) if isinstance(x, list) else x.nbytes
    for name in ("acts16_memory", "acts32_memory"):
        x = getattr(dm, name, None)
        if x is not None:
            rows[name] = x.nbytes
    if getattr(dm, "fp8", None) is not None:
        rows["fp8 weights (and transposes)"] = dm.fp8.weights_memory.nbytes
        if dm.fp8.inputs_t_memory is not None:
            rows["fp8 transposes of ln1 and ln2"] = dm.fp8.inputs_t_memory.nbytes
        if dm.fp8.scratch_memory is not None:  # (else in the logits buffer)
            rows["fp8 cast scratch"] = dm.fp8.scratch_memory.nbytes
    scratch = [dm.colsum_scratch.part, dm.layernorm_scratch.part, dm.staging]
    if dm.precision in ("bf16", "fp8"):  # cuBLASLt's and cuDNN's workspaces
        scratch += [dm.lt.workspace, dm.attention.workspace]
    rows["scratch and library workspaces"] = sum(x.nbytes for x in scratch)
    ours = sum(rows.values())
    rows["context before the target"] = before
    rows["other (handles, graphs, allocator)"] = running - before - ours
    print(f"  memory: {running / 2**30:.2f} GiB in use while training ({built / 2**30:.2f} after building the target)")
    for name, n in rows.items():
        print(f"    {n / 2**30:7.3f} GiB  {name}")
    print("    activations, tensor by tensor:")
    for name, n in sorted(layered.items(), key=lambda kv: -kv[1]):
        if n >= 2**20:
            x = getattr(dm.acts, name)
            shape = (len(x),) + tuple(x[0].shape) if isinstance(x, list) else tuple(x.shape)
            print(f"      {n / 2**30:7.3f} GiB  {name} {shape}")
    rows.update({"activation " + k: v for k, v in layered.items()})
    return rows


def cmd_memory(args):
    """The buffers of a bf16 (or fp8) training run, from the layouts alone (no GPU
    needed): ours against llm.c's train_gpt2.cu (bf16, cuDNN attention, its default -r 1:
    the GELU recomputed) at the same shape, ours at --recompute's level, row by row, in
    GiB. What neither counts: the CUDA context, the libraries' handles and workspaces,
    CUDA graphs (bench --memory measures those on a GPU)."""
    import cuda_fp8
    import train_gpt2_cuda as tc
    cfg = common.config_from_depth(f"d{args.depth}")
    B, T = args.B, args.T
    L, C, Vp, NH, BT = cfg.num_layers, cfg.channels, cfg.padded_vocab_size, cfg.num_heads, B * T
    N = tc.parameter_layout(cfg).size  # ours: every tensor 256-byte aligned
    N_llmc = common.buffer_size(common.parameter_shapes(cfg))
    fp8 = args.precision == "fp8"
    bf16, f32 = tc.bf16_activation_shapes(cfg, B, T, args.recompute, tc.CLASSIFIER_ROWS, fp8)
    ours = {name: int(np.prod(shape)) * 2 for name, shape in bf16}
    ours.update({name: int(np.prod(shape)) * 4 for name, shape in f32})
    lnstats = 4 * L * BT * 4  # ln1, ln2 mean and rstd (float32), both
    rows = [  # (what, ours, llm.c) in bytes
        ("float32 master weights", 4 * N, 4 * N_llmc),
        ("bf16 weights", 2 * N, 2 * N_llmc),
        ("AdamW m, v (float32)", 8 * N, 8 * N_llmc),
        ("parameter gradients (ours float32, llm.c bf16)", 4 * N, 2 * N_llmc),
        ("wte gradient per target (float32; ours: the chunked classifier)", 4 * Vp * C, 0),
        ("residual stream: residual2, residual3 (ours float32, llm.c bf16)",
         ours["residual2"] + ours["residual3"], 2 * 2 * L * BT * C),
        ("layernorm outputs ln1, ln2 (bf16)", ours["ln1"] + ours["ln2"], 2 * 2 * L * BT * C),
        ("qkv (bf16)", ours["qkv"], 2 * 3 * L * BT * C),
        ("atty (bf16)", ours["atty"], 2 * L * BT * C),
        ("fch, the GELU's input (bf16)", ours["fch"], 2 * 4 * L * BT * C),
        ("fch_gelu (bf16; recomputed: one layer's)", ours["fch_gelu"], 2 * 4 * BT * C),
        ("logits (ours: one chunk of rows; llm.c: all)", ours["logits"], 2 * BT * max(3 * C, NH * T, Vp)),
        ("backward scratch (ours: d4C, dC, dresidual, dresidual16; llm.c: bt4c, btc)",
         sum(ours[n] for n in ("dresidual", "dresidual16", "dC", "d4C")), 2 * 5 * BT * C),
        ("encoded, lnf (ours: encoded float32)", ours["encoded"] + ours["lnf"], 2 * 2 * BT * C),
        ("statistics: layernorms, attention, losses (float32)",
         sum(ours[n] for n in ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd", "losses",
                               "logsumexp", "att_stats")), lnstats + 4 * (3 * BT + L * B * NH * T)),
    ]
    if fp8:  # cuda_fp8.Fp8State's buffers (its cast scratch lives in the logits buffer where it fits)
        matmul_weights = sum(int(np.prod(shape)) for name, shape in common.parameter_shapes(cfg)
                             if name in cuda_fp8.MATMUL_WEIGHTS)
        kept_t = tc.fp8_keeps_inputs_t(args.recompute)
        scratch = cuda_fp8.scratch_bytes(BT, C)
        own = scratch > ours["logits"]
        rows += [("fp8 weights and their transposes (E4M3)", 2 * matmul_weights, 0),
                 ("fp8 transposes of ln1, ln2 (E4M3; -r 2: none)", len(cuda_fp8.INPUTS_T) * L * BT * C * kept_t, 0),
                 ("fp8 cast scratch" if own else "fp8 cast scratch (none: in the logits buffer)", scratch * own, 0)]
    print(f"memory of a{' fp8' if fp8 else ' bf16'} training run, d{args.depth} B={B} T={T}, ours at -r "
          f"{args.recompute}, llm.c (bf16) at -r 1, from the layouts (GiB):")
    print(f"  {'ours':>7s} {'llm.c':>7s} {'ours - llm.c':>12s}  buffer")
    for what, a, b in rows:
        print(f"  {a / 2**30:7.3f} {b / 2**30:7.3f} {(a - b) / 2**30:+12.3f}  {what}")
    ta, tb = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"  {ta / 2**30:7.3f} {tb / 2**30:7.3f} {(ta - tb) / 2**30:+12.3f}  total (ours / llm.c: {ta / tb:.3f}x)")
    return rows


def profile_step(tc, device, nxt, opt, args, prec):
    """Per-kernel device time of one training step (CUPTI through torch.profiler)."""
    import re
    import torch
    from torch.profiler import ProfilerActivity, profile
    x, y = nxt()
    tc.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        device.forward(x, y)
        device.backward()
        device.update(*opt)
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

    dev = "cuda"
    B, T = args.B, args.T
    L, NH, C = {12: (12, 12, 768), 24: (24, 16, 1024)}.get(args.depth, (args.depth, args.depth, 64 * args.depth))
    cfg = tr.GPT2Config(1024, 50257, 50304, L, NH, C)
    nxt, data_name = load_batches(args.tokens, B, T, 50257)
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


def cmd_dp_table(args):
    """Scaling of the data-parallel runs that `dev/gpu_check.sh dp` made: median tokens/s
    of each run's steps after the first few, against the one-GPU run, and the largest
    relative loss difference from the one-GPU run that accumulates the same global batch."""
    def steps(name):
        with open(os.path.join(args.dir, name, "log.jsonl")) as f:
            return [r for r in map(json.loads, f) if r["type"] == "train"]

    def tok_per_s(records):
        rates = sorted(r["tokens_per_s"] for r in records[3:] or records)
        return rates[len(rates) // 2]

    one = tok_per_s(steps("dp_1gpu"))
    reference = {r["step"]: r["loss"] for r in steps("dp_1gpu_accum")}
    print(f"\n{'run':16s} {'tok/s':>10s} {'vs 1 GPU':>9s} {'efficiency':>11s} {'max rel loss diff':>18s}")
    print(f"{'1 GPU':16s} {one / 1e3:9.1f}k {1.0:8.2f}x {'':>11s} {'':>18s}")
    for name in sorted(os.listdir(args.dir)):
        if name.startswith("dp_") and "gpu_z" in name:
            records = steps(name)
            gpus = int(name.split("_")[1].rstrip("gpu"))
            rate = tok_per_s(records)
            diff = max(abs(r["loss"] - reference[r["step"]]) / abs(reference[r["step"]]) for r in records)
            print(f"{name[3:]:16s} {rate / 1e3:9.1f}k {rate / one:8.2f}x {rate / one / gpus:10.1%} {diff:18.2e}")


# -----------------------------------------------------------------------------
# odd shapes: test_gpt2.py --device cuda in every precision on references of shapes whose
# tensors pack to odd lengths (the device must align every one of them)

ISSUE_SHAPE = dict(layers=3, heads=3, channels=96, vocab=61, B=3, T=37)  # the case that once crashed on an H100


def odd_shapes(count, seed, big):
    """Shapes to check: C a multiple of 4 with C/4 odd (bf16 cannot take those: their head
    size is no multiple of 8), NH from 1 to 7, odd B and T, V no multiple of 4; then
    shapes bf16 takes (head size 16 or 32: over fewer values the bf16 errors of ours and
    PyTorch's are too noisy to compare within 10%); with big, the issue's C=96, B=3, T=37
    case."""
    rng = np.random.default_rng(seed)
    channels_for = {1: 12, 2: 12, 3: 12, 4: 12, 5: 20, 6: 12, 7: 28}  # 4 x odd, divisible by NH
    shapes = []
    for i in range(count):
        heads = int(rng.integers(1, 8)) if i else 3
        odd = dict(layers=int(rng.integers(1, 3)), heads=heads, channels=channels_for[heads],
                   vocab=int(4 * rng.integers(8, 20) + rng.integers(1, 4)), B=int(2 * rng.integers(0, 2) + 1),
                   T=int(2 * rng.integers(1, 5) + 1))
        bf16_heads = int(rng.integers(1, 4))
        bf16 = dict(odd, heads=bf16_heads, channels=bf16_heads * 16 * int(rng.integers(1, 3)))
        shapes += [odd, bf16]
    return shapes + ([ISSUE_SHAPE] if big else [])


def cmd_shapes(args):
    """For every shape of odd_shapes: a PyTorch reference (dev/torch_reference.py, a recipe
    of --steps steps), then test_gpt2.py --device cuda in each precision; a precision that
    cannot take the shape must refuse it in one line, exit 2, before any work."""
    import subprocess
    import tempfile
    work = tempfile.mkdtemp(prefix="odd_shapes_")
    env = dict(os.environ)
    for i, s in enumerate(odd_shapes(args.count, args.seed, args.big)):
        name = f"L{s['layers']} NH{s['heads']} C{s['channels']} V{s['vocab']} B{s['B']} T{s['T']}"
        ckpt, state = os.path.join(work, f"s{i}.bin"), os.path.join(work, f"s{i}_state.bin")
        ref = subprocess.run([sys.executable, os.path.join(ROOT, "dev", "torch_reference.py"), "--layers", str(s["layers"]),
                              "--heads", str(s["heads"]), "--channels", str(s["channels"]), "--vocab-size",
                              str(s["vocab"]), "--max-seq-len", str(s["T"] + 4), "--B", str(s["B"]), "--T", str(s["T"]),
                              "--seed", str(args.seed + i), "--steps", str(args.steps), "--out-checkpoint", ckpt,
                              "--out-state", state], capture_output=True, text=True, env=env)
        if ref.returncode:
            print(f"CHECK shape {name} reference FAIL\n{ref.stdout[-2000:]}{ref.stderr[-2000:]}", flush=True)
            FAILS.append(f"reference {name}")
            continue
        for precision in args.precisions.split(","):
            run = subprocess.run([sys.executable, os.path.join(ROOT, "test_gpt2.py"), "--device", "cuda", "--precision",
                                  precision, "--checkpoint", ckpt, "--state", state], capture_output=True, text=True,
                                 env=env, cwd=ROOT)
            refused = precision == "bf16" and (s["channels"] // s["heads"]) % 8 != 0
            lines = [line for line in run.stderr.splitlines() if line.strip()]
            if refused:
                ok = run.returncode == 2 and len(lines) == 1 and "head size" in lines[0]
                what = f"refused: {lines[-1] if lines else '(nothing)'}"
            else:
                ok = run.returncode == 0 and "OK: every tensor within tolerance" in run.stdout
                what = "passed" if ok else f"exit {run.returncode}"
            print(f"CHECK shape {name} {precision:4s} {what} {'OK' if ok else 'FAIL'}", flush=True)
            if not ok:
                print(run.stdout[-3000:] + run.stderr[-3000:], flush=True)
                FAILS.append(f"shape {name} {precision}")
    finish()


# -----------------------------------------------------------------------------
# NCCL with one rank: every collective of distributed.NCCLGroup on this GPU


def cmd_nccl(args):
    """One rank launched as torchrun launches it (RANK, WORLD_SIZE, MASTER_ADDR/PORT): the
    id over TCP, the communicator, each collective (all-reduce of a range, the grouped
    reduce onto shard owners, all-gather, the host sums, any, all_equal, barrier), the
    same collectives captured in a CUDA graph on a side stream, and abort. With one rank
    every collective must give back its input exactly."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port - 1))
    import cupy
    import distributed
    from numba import cuda
    dist = distributed.setup("cuda")
    print(f"engine: {dist.engine}, world {dist.world}", flush=True)
    report("nccl engine is NCCL", float(dist.engine.startswith("nccl")), 1.0, 0)
    rng = np.random.default_rng(5)
    host = rng.standard_normal(4096).astype(np.float32)
    arr = cuda.to_device(host)
    dist.allreduce_sum_device(arr, 100, 3000)
    report("nccl allreduce range", arr.copy_to_host(), host, 0, absolute=True)
    dist.reduce_to_owners_device(arr, 8, 4000, 1024)
    report("nccl reduce to owners", arr.copy_to_host(), host, 0, absolute=True)
    dist.allgather_device(arr)
    report("nccl allgather", arr.copy_to_host(), host, 0, absolute=True)
    parts = cuda.to_device(rng.standard_normal(7))
    ref64 = parts.copy_to_host()
    dist.allreduce_sum_device(parts, 0, parts.size)
    report("nccl allreduce float64", parts.copy_to_host(), ref64, 0, absolute=True)
    report("nccl host sum", dist.sum(2.5), 2.5, 0, absolute=True)
    report("nccl any", float(dist.any(True)) + 2 * float(dist.any(False)), 1.0, 0, absolute=True)
    report("nccl all_equal", float(dist.all_equal(12345)), 1.0, 0, absolute=True)
    dist.barrier()
    # the collectives inside a CUDA graph, on a side stream forked from the captured one
    compute, side = cupy.cuda.Stream(non_blocking=False), cupy.cuda.Stream(non_blocking=True)
    fork, join = cupy.cuda.Event(disable_timing=True), cupy.cuda.Event(disable_timing=True)
    compute.begin_capture()
    fork.record(compute)
    side.wait_event(fork)
    dist.allreduce_sum_device(arr, 0, 2048, side.ptr)
    dist.reduce_to_owners_device(arr, 2048, 4096, 4096, side.ptr)
    join.record(side)
    compute.wait_event(join)
    dist.allgather_device(arr, compute.ptr)
    graph = compute.end_capture()
    for _ in range(3):
        graph.launch(compute)
    compute.synchronize()
    report("nccl in a CUDA graph", arr.copy_to_host(), host, 0, absolute=True)
    dist.comm.abort()
    print("CHECK nccl abort returned OK", flush=True)
    finish()


# -----------------------------------------------------------------------------
# generation and evaluation views on the device


def cmd_generate(args):
    """Greedy generation with the KV cache on the GPU (CUDA.decoder) against the CPU's
    (train_gpt2.gpt2_decode_step): in fp32 the same tokens; the logits' largest error per
    step; tokens/s of each precision. Then an evaluation view (CUDA.evaluator) at a shape
    that is not the training's: its per-position losses against the CPU target's."""
    import train_gpt2 as cpu
    import train_gpt2_cuda as tc
    cfg = common.config_from_depth(f"d{args.depth}") if args.depth else \
        common.GPT2Config(max_seq_len=32, vocab_size=61, padded_vocab_size=128, num_layers=2, num_heads=2, channels=16)
    model = common.gpt2_init_random(cfg, args.seed)
    prompt = [int(t) for t in np.random.default_rng(args.seed).integers(0, cfg.vocab_size, 3)]
    cache, tokens, logits_cpu = cpu.KVCache(cfg), list(prompt), []
    t0 = time.perf_counter()
    for i in range(len(prompt) + args.tokens - 1):
        logits = cpu.gpt2_decode_step(model, cache, tokens[i]).copy()
        if i >= len(prompt) - 1:
            tokens.append(int(np.argmax(logits[:cfg.vocab_size])))
            logits_cpu.append(logits)
    cpu_s = time.perf_counter() - t0
    print(f"cpu: {args.tokens} greedy tokens in {cpu_s:.2f} s", flush=True)
    for prec in args.precisions.split(","):
        device = tc.CUDA(model, 1, 1, precision=prec)
        for warm in (True, False):  # the first pass compiles and plans
            decoder, ours = device.decoder(), list(prompt)
            t0 = time.perf_counter()
            for i in range(len(prompt) + args.tokens - 1):  # greedy, on its own tokens
                logits = decoder.step(ours[i])
                if i >= len(prompt) - 1:
                    ours.append(int(np.argmax(logits[:cfg.vocab_size])))
            seconds = time.perf_counter() - t0
        decoder, errors = device.decoder(), []  # the CPU's tokens in, its logits to compare with
        for i in range(len(prompt) + args.tokens - 1):
            logits = decoder.step(tokens[i])
            if i >= len(prompt) - 1:
                ref = logits_cpu[i - len(prompt) + 1][:cfg.vocab_size]
                errors.append(float(np.max(np.abs(logits[:cfg.vocab_size] - ref)) / np.max(np.abs(ref))))
        same = sum(a == b for a, b in zip(ours[len(prompt):], tokens[len(prompt):]))
        print(f"  {prec}: {args.tokens} tokens in {seconds:.2f} s ({args.tokens / seconds:.1f} tokens/s); "
              f"{same}/{args.tokens} tokens as the CPU's; largest logit error {max(errors):.2e}", flush=True)
        if prec == "fp32":
            report("generate fp32 greedy tokens as the CPU's", float(same), float(args.tokens), 0, absolute=True)
            report("generate fp32 logits", max(errors), 0.0, 1e-4, absolute=True)
        else:
            report(f"generate {prec} logits", max(errors), 0.0, 5e-2, absolute=True)
        # an evaluation view: rows of another shape over the same parameters
        Be, Te = 3, min(cfg.max_seq_len, 9)
        view = device.evaluator(Be, Te)
        rng = np.random.default_rng(args.seed + 1)
        x, y = rng.integers(0, cfg.vocab_size, (Be, Te)), rng.integers(0, cfg.vocab_size, (Be, Te))
        y[0, :4] = -1
        view.forward(x, y)
        ref_device = cpu.CPU(model, Be, Te)
        ref_device.forward(x, y)
        report(f"evaluator {prec} per-position losses", view.losses_to_host(), model.acts.losses,
               1e-4 if prec == "fp32" else 3e-2)
        device.free()
    finish()


# -----------------------------------------------------------------------------
# HellaSwag on the GPU


def synthetic_hellaswag(n, seed, tokens=None, vocab=50257):
    """n examples of HellaSwag's shape (a context of 10-100 tokens, 4 endings of 5-60: rows
    a little longer than the real val set's). With tokens (a token stream), the context
    and the correct ending are consecutive spans of it and the other endings spans from
    elsewhere, so a trained model has something to choose by."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        ctx_len, lens = int(rng.integers(10, 101)), [int(x) for x in rng.integers(5, 61, 4)]
        label = int(rng.integers(0, 4))
        if tokens is None:
            ctx = rng.integers(0, vocab, ctx_len).tolist()
            endings = [rng.integers(0, vocab, k).tolist() for k in lens]
        else:
            start = int(rng.integers(0, tokens.size - ctx_len - 61))
            ctx = tokens[start:start + ctx_len].tolist()
            endings = []
            for j, k in enumerate(lens):
                at = start + ctx_len if j == label else int(rng.integers(0, tokens.size - k))
                endings.append(tokens[at:at + k].tolist())
        examples.append({"label": label, "ctx_tokens": [int(t) for t in ctx],
                         "ending_tokens": [[int(t) for t in e] for e in endings]})
    return examples


def cmd_hellaswag(args):
    """The full-size HellaSwag eval on the GPU: 10,042 synthetic examples of HellaSwag's
    shape through train_gpt2's hellaswag_evaluate at GPT-2 124M (a CUDA target built for
    training at B=16, T=1024; the evaluator views its memory), timed per precision (bf16
    must take at most 10 s on an H100); then,
    with --checkpoint (a trained model), 1,000 examples made from --tokens, scored in fp32
    and in bf16: the share of examples where both pick the same ending."""
    import train_gpt2 as gpt
    import train_gpt2_cuda as tc
    from types import SimpleNamespace
    model = common.gpt2_init_random(common.config_from_depth("d12"), 0) if not args.checkpoint else \
        common.read_checkpoint(args.checkpoint)
    shape = SimpleNamespace(batch_size=16, seq_len=1024, device="cuda")
    full = synthetic_hellaswag(10042, 1, vocab=model.cfg.vocab_size)
    longest = max(len(e["ctx_tokens"]) + max(map(len, e["ending_tokens"])) for e in full) - 1
    T, rows = gpt.hellaswag_shape(shape, longest)
    for prec in args.precisions.split(","):
        device = tc.CUDA(model, 16, 1024, precision=prec)
        gpt.hellaswag_evaluate(device, full[:rows // 4 * 2], T, rows)  # compile, plan, capture
        t0 = time.perf_counter()
        correct, total = gpt.hellaswag_evaluate(device, full, T, rows)
        seconds = time.perf_counter() - t0
        print(f"RESULT hellaswag {prec}: {total} examples in {seconds:.2f} s (rows of {T}, {rows} a forward), "
              f"{correct}/{total} right", flush=True)
        if prec == "bf16":  # the GPU's default precision; strict fp32 is the parity check's, and slower
            report("hellaswag bf16 full val set within 10 s", max(0.0, seconds - 10.0), 0.0, 0, absolute=True)
        device.free()
    if not args.checkpoint:
        finish()
        return
    tokens = common.read_token_file(args.tokens) if args.tokens else None
    examples = synthetic_hellaswag(1000, 2, tokens=np.asarray(tokens) if tokens is not None else None)
    longest = max(len(e["ctx_tokens"]) + max(map(len, e["ending_tokens"])) for e in examples) - 1
    T, rows = gpt.hellaswag_shape(shape, longest)
    picks = {}
    for prec in ("fp32", "bf16"):
        device = tc.CUDA(model, 16, 1024, precision=prec)
        picks[prec] = gpt.hellaswag_predictions(device, examples, T, rows)
        right = sum(p == e["label"] for p, e in zip(picks[prec], examples))
        print(f"  {prec}: {right}/1000 right", flush=True)
        device.free()
    same = sum(a == b for a, b in zip(picks["fp32"], picks["bf16"])) / len(examples)
    print(f"RESULT hellaswag agreement: fp32 and bf16 pick the same ending in {100 * same:.1f}% of 1000 examples",
          flush=True)
    report("hellaswag fp32 and bf16 agree on at least 99%", max(0.0, 0.99 - same), 0.0, 0, absolute=True)
    finish()


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
        b.add_argument("--precision", choices=["fp32", "tf32", "bf16", "fp8"], default="tf32")
        b.add_argument("--no-graphs", action="store_true", help="bench, bf16: launch every kernel from Python")
        b.add_argument("--recompute", type=int, choices=[0, 1, 2], default=1,
                       help="bench, bf16: the -r level (what the backward computes again)")
        b.add_argument("--deterministic", type=int, default=1, help="bench, bf16: 0 for cuDNN's atomic dq backward")
        b.add_argument("--classifier-rows", type=int, default=0,
                       help="bench, bf16: rows of logits at a time (0: train_gpt2_cuda.CLASSIFIER_ROWS)")
        b.add_argument("--memory", action="store_true", help="bench: device memory buffer by buffer")
        b.add_argument("--steps", type=int, default=12)
        b.add_argument("--warmup", type=int, default=3)
        b.add_argument("--lr", type=float, default=6e-4)
        b.add_argument("--tokens", default="")
        b.add_argument("--attention-blocks", type=int, default=0)
        b.add_argument("--variants", default="", help="bench: comma list of other causal query-block counts")
        b.add_argument("--variant-steps", type=int, default=6)
        b.add_argument("--json", default="")
        b.add_argument("--nccl", action="store_true", help="bench: as one NCCL rank (gradient sums by buckets)")
        b.add_argument("--reduce-in-update", action="store_true",
                       help="bench --nccl: sum the gradients in the update, after the backward (no overlap)")
        b.add_argument("--profile", action="store_true")
        b.add_argument("--profile-rows", type=int, default=24)
    m = sub.add_parser("memory")
    m.add_argument("--depth", type=int, default=12)
    m.add_argument("--B", type=int, default=16)
    m.add_argument("--T", type=int, default=1024)
    m.add_argument("--recompute", type=int, choices=[0, 1, 2], default=1, help="ours: the -r level")
    m.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    k = sub.add_parser("bf16")
    k.add_argument("--tol", type=float, default=5e-2,
                   help="||error|| / ||reference|| vs the fp32 CPU target (after an update, AdamW turns the bf16 "
                        "noise of near-zero gradients into whole steps: about 2e-2 seen at step 1)")
    k.add_argument("--steps", type=int, default=3)
    k = sub.add_parser("fp8")
    k.add_argument("--tol", type=float, default=0.1, help="fp8 gradients against bf16's, ||error|| / ||bf16||")
    k.add_argument("--steps", type=int, default=3)
    o = sub.add_parser("shapes")
    o.add_argument("--count", type=int, default=2, help="random odd shapes (and as many that bf16 takes)")
    o.add_argument("--seed", type=int, default=7)
    o.add_argument("--steps", type=int, default=3, help="the reference recipe's steps")
    o.add_argument("--precisions", default="fp32,tf32,bf16")
    o.add_argument("--big", action="store_true", help="add the 3-layer, 3-head, C=96, B=3, T=37 case")
    sub.add_parser("nccl")
    h = sub.add_parser("hellaswag")
    h.add_argument("--checkpoint", default="", help="a trained model: fp32 and bf16 must pick alike")
    h.add_argument("--tokens", default="", help="with --checkpoint: the token file the examples come from")
    h.add_argument("--precisions", default="bf16,fp32", help="the timed full-size runs")
    g = sub.add_parser("generate")
    g.add_argument("--depth", type=int, default=0, help="0: a tiny model")
    g.add_argument("--tokens", type=int, default=24)
    g.add_argument("--seed", type=int, default=3)
    g.add_argument("--precisions", default="fp32,bf16")
    t = sub.add_parser("table")
    t.add_argument("dir")
    t = sub.add_parser("dp-table")
    t.add_argument("dir")
    args = ap.parse_args()
    {"kernels": cmd_kernels, "parity": cmd_parity, "bench": cmd_bench, "bench-torch": cmd_bench_torch, "bf16": cmd_bf16,
     "fp8": cmd_fp8, "memory": cmd_memory,
     "shapes": cmd_shapes, "nccl": cmd_nccl, "generate": cmd_generate, "hellaswag": cmd_hellaswag, "table": cmd_table, "dp-table": cmd_dp_table}[args.cmd](args)


if __name__ == "__main__":
    main()
