"""Probe of the bf16 building blocks on the GPU machine (run there, one call), the
measurements behind the choice of libraries (README, "Libraries, and why"): cuBLASLt bf16
matmuls with and without epilogues through nvmath-python, cuDNN's fused attention (forward
and backward) through cudnn-frontend, the launch overhead of Numba kernels, and CUDA graph
capture of Numba kernels and cuDNN on one stream. (The bf16 conversions inside kernels are
checked by dev/cuda_check.py bf16.)
Prints one line per check; exits non-zero on a failed check."""
import os
import sys
import time

import numpy as np

FAIL = []
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def report(name, ok, detail=""):
    print(f"{'OK  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAIL.append(name)


def main():
    import cupy as cp
    import numba
    from numba import cuda
    print("numba", numba.__version__, "cupy", cp.__version__, flush=True)
    for mod in ("numba_cuda", "cuda.bindings", "cuda.core", "cuda.pathfinder"):
        try:
            m = __import__(mod, fromlist=["x"])
            print(mod, getattr(m, "__version__", "?"))
        except Exception as e:  # noqa: BLE001
            print(mod, "missing", e)

    import gpt2_common as common

    # ---- 2. cuBLASLt through nvmath-python
    from nvmath.bindings import cublasLt as lt
    print("cublasLt version", lt.get_version())
    handle = lt.create()
    R16BF, R32F, COMPUTE_32F = 14, 0, 68
    A = lt.MatmulDescAttribute
    stream = cp.cuda.Stream(non_blocking=True)
    ws = cp.empty(32 << 20, dtype=cp.uint8)

    def set_attr(desc, attr, value, dtype):
        buf = np.array([value], dtype=dtype)
        lt.matmul_desc_set_attribute(desc, attr, buf.ctypes.data, buf.itemsize)

    def plan(m, n, k, ta, tb, atype, ctype, epilogue=None, bias=None, bias_type=None, aux=None, aux_ld=None,
             aux_type=None):
        """D (m x n, column-major) = op(A) op(B); returns a callable."""
        desc = lt.matmul_desc_create(COMPUTE_32F, R32F)
        set_attr(desc, A.TRANSA, 1 if ta else 0, np.int32)
        set_attr(desc, A.TRANSB, 1 if tb else 0, np.int32)
        if epilogue is not None:
            set_attr(desc, A.EPILOGUE, int(epilogue), np.uint32)
        if bias is not None:
            set_attr(desc, A.BIAS_POINTER, bias, np.intp)
            if bias_type is not None:
                set_attr(desc, A.BIAS_DATA_TYPE, bias_type, np.int32)
        if aux is not None:
            set_attr(desc, A.EPILOGUE_AUX_POINTER, aux, np.intp)
            set_attr(desc, A.EPILOGUE_AUX_LD, aux_ld, np.int64)
            if aux_type is not None:
                set_attr(desc, A.EPILOGUE_AUX_DATA_TYPE, aux_type, np.int32)
        la = lt.matrix_layout_create(atype, k if ta else m, m if ta else k, k if ta else m)
        lb = lt.matrix_layout_create(atype, n if tb else k, k if tb else n, n if tb else k)
        lc = lt.matrix_layout_create(ctype, m, n, m)
        pref = lt.matmul_preference_create()
        wsz = np.array([ws.nbytes], dtype=np.uint64)
        lt.matmul_preference_set_attribute(pref, lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES, wsz.ctypes.data, 8)
        res = np.zeros(1, dtype=lt.matmul_heuristic_result_dtype)
        cnt = np.zeros(1, dtype=np.int32)
        lt.matmul_algo_get_heuristic(handle, desc, la, lb, lc, lc, pref, 1, res.ctypes.data, cnt.ctypes.data)
        if cnt[0] == 0:
            raise RuntimeError("no cuBLASLt algorithm")
        one, zero = np.array([1.0], np.float32), np.array([0.0], np.float32)

        def run(a, b, d, accumulate=False, s=stream.ptr):
            beta = one if accumulate else zero
            lt.matmul(handle, desc, one.ctypes.data, a, la, b, lb, beta.ctypes.data, d, lc, d, lc,
                      res.ctypes.data, ws.data.ptr, ws.nbytes, s)
        run.keep = (one, zero, res, cnt, wsz)
        return run

    def bf(x):
        return cp.asarray(common.float32_to_bfloat16(cp.asnumpy(x).astype(np.float32)))

    def unbf(x):
        return cp.asarray(common.bfloat16_to_float32(cp.asnumpy(x)))

    def timeit(fn, reps=20):
        for _ in range(3):
            fn()
        evs = []
        for _ in range(reps):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            fn()
            e1.record(stream)
            evs.append((e0, e1))
        stream.synchronize()
        return float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in evs]))

    def relerr(x, r):
        return float(cp.linalg.norm((x - r).ravel()) / cp.linalg.norm(r.ravel()))

    BT, C = 16 * 1024, 768
    E = lt.Epilogue
    # forward of a linear layer, row-major out(BT, OC) = inp(BT, C) @ w(OC, C)^T + b
    # column-major: out^T (OC x BT) = w (as C x OC col-major, transposed) x inp^T (C x BT)
    for OC, epi in ((3 * C, "BIAS"), (4 * C, "GELU_AUX_BIAS")):
        inp = cp.random.standard_normal((BT, C), dtype=cp.float32)
        w = cp.random.standard_normal((OC, C), dtype=cp.float32) * 0.02
        b = cp.random.standard_normal(OC, dtype=cp.float32) * 0.1
        inp16, w16, b16 = bf(inp), bf(w), bf(b)
        out16 = cp.empty((BT, OC), dtype=cp.uint16)
        pre16 = cp.empty((BT, OC), dtype=cp.uint16)
        kw = {}
        if epi == "GELU_AUX_BIAS":
            kw = dict(aux=pre16.data.ptr, aux_ld=OC)
        run = plan(OC, BT, C, True, False, R16BF, R16BF, epilogue=getattr(E, epi), bias=b16.data.ptr, **kw)
        run(w16.data.ptr, inp16.data.ptr, out16.data.ptr)
        stream.synchronize()
        ref = unbf(inp16) @ unbf(w16).T + unbf(b16)
        if epi == "GELU_AUX_BIAS":
            pre_err = relerr(unbf(pre16), ref)
            ref = 0.5 * ref * (1 + cp.tanh(0.7978845608 * (ref + 0.044715 * ref ** 3)))
            report(f"cublasLt {epi} aux (pre-GELU)", pre_err < 1e-2, f"relerr {pre_err:.2e}")
        e = relerr(unbf(out16), ref)
        ms = timeit(lambda: run(w16.data.ptr, inp16.data.ptr, out16.data.ptr))
        tf = 2 * BT * C * OC / ms / 1e9
        report(f"cublasLt fwd {epi} BT={BT} C={C} OC={OC}", e < 1e-2, f"relerr {e:.2e}  {ms:.3f} ms {tf:.0f} TFLOP/s")
        # same without epilogue for comparison
        run0 = plan(OC, BT, C, True, False, R16BF, R16BF)
        ms0 = timeit(lambda: run0(w16.data.ptr, inp16.data.ptr, out16.data.ptr))
        print(f"     same matmul without epilogue: {ms0:.3f} ms")

    # backward: dinp (BT, C) = dout (BT, OC) @ w (OC, C); dw (OC, C) += dout^T @ inp, fp32 out with BGRADB
    OC = 4 * C
    dout = bf(cp.random.standard_normal((BT, OC), dtype=cp.float32))
    inp = bf(cp.random.standard_normal((BT, C), dtype=cp.float32))
    w = bf(cp.random.standard_normal((OC, C), dtype=cp.float32) * 0.02)
    dinp = cp.empty((BT, C), dtype=cp.uint16)
    run = plan(C, BT, OC, False, False, R16BF, R16BF)
    run(w.data.ptr, dout.data.ptr, dinp.data.ptr)
    stream.synchronize()
    e = relerr(unbf(dinp), unbf(dout) @ unbf(w))
    ms = timeit(lambda: run(w.data.ptr, dout.data.ptr, dinp.data.ptr))
    report("cublasLt dinp", e < 1e-2, f"relerr {e:.2e} {ms:.3f} ms {2 * BT * C * OC / ms / 1e9:.0f} TFLOP/s")
    # dw^T as column-major (C x OC) = inp^T (C x BT) x dout (BT x OC): A = inp (col-major C x BT), B = dout^T
    dw = cp.zeros((OC, C), dtype=cp.float32)
    dbias = cp.zeros(OC, dtype=cp.float32)
    # BGRADB: bias gradient = sum over k of B... B here is dout^T (k=BT x n=OC), reduced over k gives OC
    try:
        runw = plan(C, OC, BT, False, True, R16BF, R32F, epilogue=E.BGRADB, bias=dbias.data.ptr, bias_type=R32F)
        runw(inp.data.ptr, dout.data.ptr, dw.data.ptr)
        stream.synchronize()
        ref = unbf(dout).T @ unbf(inp)
        e = relerr(dw, ref)
        eb = relerr(dbias, unbf(dout).sum(0))
        ms = timeit(lambda: runw(inp.data.ptr, dout.data.ptr, dw.data.ptr, accumulate=True))
        report("cublasLt dweight fp32 out + BGRADB", e < 1e-2 and eb < 1e-2, f"relerr {e:.2e} dbias {eb:.2e} {ms:.3f} ms")
    except Exception as ex:  # noqa: BLE001
        report("cublasLt dweight fp32 out + BGRADB", False, repr(ex))
    try:
        runw = plan(C, OC, BT, False, True, R16BF, R32F)
        ms = timeit(lambda: runw(inp.data.ptr, dout.data.ptr, dw.data.ptr, accumulate=True))
        print(f"     dweight fp32 out without epilogue: {ms:.3f} ms")
    except Exception as ex:  # noqa: BLE001
        report("cublasLt dweight fp32 out", False, repr(ex))
    # DGELU: d(pre) = dout_gelu * gelu'(pre); dinp of fcproj: (BT, 4C) = dout(BT, C) @ fcprojw (C, 4C)
    try:
        pre = bf(cp.random.standard_normal((BT, OC), dtype=cp.float32))
        doutc = bf(cp.random.standard_normal((BT, C), dtype=cp.float32))
        wp = bf(cp.random.standard_normal((C, OC), dtype=cp.float32) * 0.02)
        dpre = cp.empty((BT, OC), dtype=cp.uint16)
        rund = plan(OC, BT, C, False, False, R16BF, R16BF, epilogue=E.DGELU, aux=pre.data.ptr, aux_ld=OC)
        rund(wp.data.ptr, doutc.data.ptr, dpre.data.ptr)
        stream.synchronize()
        x = unbf(pre)
        t = cp.tanh(0.7978845608 * (x + 0.044715 * x ** 3))
        g = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.7978845608 * (1 + 3 * 0.044715 * x * x)
        ref = (unbf(doutc) @ unbf(wp)) * g
        e = relerr(unbf(dpre), ref)
        ms = timeit(lambda: rund(wp.data.ptr, doutc.data.ptr, dpre.data.ptr))
        report("cublasLt DGELU", e < 2e-2, f"relerr {e:.2e} {ms:.3f} ms")
    except Exception as ex:  # noqa: BLE001
        report("cublasLt DGELU", False, repr(ex))

    # ---- 3. cuDNN fused attention
    try:  # cudnn-frontend dlopens libcudart; make sure the wheel's copy is loaded
        from cuda.pathfinder import load_nvidia_dynamic_lib
        load_nvidia_dynamic_lib("cudart")
    except Exception as ex:  # noqa: BLE001
        print("     cudart preload:", repr(ex))
    import cudnn
    print("cudnn backend", cudnn.backend_version())
    ch = cudnn.create_handle()
    cudnn.set_stream(ch, stream.ptr)
    for (B, NH, T, HS, timed) in ((2, 2, 64, 64, False), (16, 12, 1024, 64, True)):
        C3 = 3 * NH * HS
        Cm = NH * HS
        gf = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                           compute_data_type=cudnn.data_type.FLOAT, handle=ch)
        qkv_strides = [T * C3, HS, C3, 1]
        q = gf.tensor(name="q", dim=[B, NH, T, HS], stride=qkv_strides, data_type=cudnn.data_type.BFLOAT16)
        k = gf.tensor(name="k", dim=[B, NH, T, HS], stride=qkv_strides, data_type=cudnn.data_type.BFLOAT16)
        v = gf.tensor(name="v", dim=[B, NH, T, HS], stride=qkv_strides, data_type=cudnn.data_type.BFLOAT16)
        scale = 1.0 / np.sqrt(HS)
        o, stats = gf.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True, attn_scale=scale, use_causal_mask=True)
        o.set_output(True).set_dim([B, NH, T, HS]).set_stride([T * Cm, HS, Cm, 1])
        stats.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        gb = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                           compute_data_type=cudnn.data_type.FLOAT, handle=ch)
        bq = gb.tensor(name="q", dim=[B, NH, T, HS], stride=qkv_strides, data_type=cudnn.data_type.BFLOAT16)
        bk = gb.tensor(name="k", dim=[B, NH, T, HS], stride=qkv_strides, data_type=cudnn.data_type.BFLOAT16)
        bv = gb.tensor(name="v", dim=[B, NH, T, HS], stride=qkv_strides, data_type=cudnn.data_type.BFLOAT16)
        bo = gb.tensor(name="o", dim=[B, NH, T, HS], stride=[T * Cm, HS, Cm, 1], data_type=cudnn.data_type.BFLOAT16)
        bdo = gb.tensor(name="do", dim=[B, NH, T, HS], stride=[T * Cm, HS, Cm, 1], data_type=cudnn.data_type.BFLOAT16)
        bst = gb.tensor(name="stats", dim=[B, NH, T, 1], stride=[NH * T, T, 1, 1], data_type=cudnn.data_type.FLOAT)
        dq, dk, dv = gb.sdpa_backward(name="sdpa_bwd", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bst, attn_scale=scale,
                                      use_causal_mask=True)
        for t_ in (dq, dk, dv):
            t_.set_output(True).set_dim([B, NH, T, HS]).set_stride(qkv_strides)
        for g in (gf, gb):
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
        wsz = max(gf.get_workspace_size(), gb.get_workspace_size())
        cws = cp.empty(max(wsz, 1), dtype=cp.uint8)
        qkv = bf(cp.random.standard_normal((B, T, C3), dtype=cp.float32))
        out = cp.empty((B, T, Cm), dtype=cp.uint16)
        lse = cp.empty((B, NH, T), dtype=cp.float32)
        dout = bf(cp.random.standard_normal((B, T, Cm), dtype=cp.float32))
        dqkv = cp.empty((B, T, C3), dtype=cp.uint16)
        p0 = qkv.data.ptr
        fpack = {q: p0, k: p0 + 2 * Cm, v: p0 + 4 * Cm, o: out.data.ptr, stats: lse.data.ptr}
        d0 = dqkv.data.ptr
        bpack = {bq: p0, bk: p0 + 2 * Cm, bv: p0 + 4 * Cm, bo: out.data.ptr, bdo: dout.data.ptr, bst: lse.data.ptr,
                 dq: d0, dk: d0 + 2 * Cm, dv: d0 + 4 * Cm}

        def fwd():
            gf.execute(fpack, cws.data.ptr, handle=ch)

        def bwd():
            gb.execute(bpack, cws.data.ptr, handle=ch)
        fwd()
        bwd()
        stream.synchronize()
        if not timed:
            x = unbf(qkv).reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)
            Q, K, V = x[0], x[1], x[2]
            s = Q @ K.transpose(0, 1, 3, 2) * scale
            s = s + cp.triu(cp.full((T, T), -cp.inf, dtype=cp.float32), 1)
            m = s.max(-1, keepdims=True)
            p = cp.exp(s - m)
            lsum = p.sum(-1, keepdims=True)
            p = p / lsum
            y = (p @ V).transpose(0, 2, 1, 3).reshape(B, T, Cm)
            e = relerr(unbf(out), y)
            el = relerr(lse.reshape(B, NH, T, 1), m + cp.log(lsum))
            report("cudnn sdpa fwd (causal, packed qkv)", e < 1e-2 and el < 1e-3, f"relerr {e:.2e} lse {el:.2e}")
            dy = unbf(dout).reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
            dV = p.transpose(0, 1, 3, 2) @ dy
            dp = dy @ V.transpose(0, 1, 3, 2)
            ds = p * (dp - (dp * p).sum(-1, keepdims=True))
            dQ = ds @ K * scale
            dK = ds.transpose(0, 1, 3, 2) @ Q * scale
            ref = cp.stack([dQ, dK, dV]).transpose(1, 3, 0, 2, 4).reshape(B, T, C3)
            e = relerr(unbf(dqkv), ref)
            report("cudnn sdpa bwd", e < 2e-2, f"relerr {e:.2e}")
        else:
            msf, msb = timeit(fwd), timeit(bwd)
            fl = 4 * B * NH * T * T * HS / 2
            print(f"     cudnn sdpa B={B} NH={NH} T={T}: fwd {msf:.3f} ms ({fl / msf / 1e9:.0f} TFLOP/s), "
                  f"bwd {msb:.3f} ms ({2.5 * fl / msb / 1e9:.0f} TFLOP/s), workspace {wsz} B")

    # ---- 4. Numba launch overhead, and CUDA graph capture of numba + cuBLASLt + cuDNN
    @cuda.jit
    def k_axpy(y, x, a, n):
        i = cuda.grid(1)
        if i < n:
            y[i] = y[i] + a * x[i]

    nstream = cuda.external_stream(stream.ptr)
    xs = cuda.to_device(np.ones(1 << 20, np.float32))
    ys = cuda.to_device(np.zeros(1 << 20, np.float32))
    n = 1 << 20
    k_axpy[n // 256, 256, nstream](ys, xs, np.float32(1.0), n)
    stream.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        k_axpy[n // 256, 256, nstream](ys, xs, np.float32(1.0), n)
    t1 = time.perf_counter()
    stream.synchronize()
    print(f"     numba launch (3 args): {(t1 - t0) / 2000 * 1e6:.1f} us per launch on the host")
    # a pre-configured launcher
    launcher = k_axpy[n // 256, 256, nstream]
    t0 = time.perf_counter()
    for _ in range(2000):
        launcher(ys, xs, np.float32(1.0), n)
    t1 = time.perf_counter()
    stream.synchronize()
    print(f"     numba launch, configured once: {(t1 - t0) / 2000 * 1e6:.1f} us per launch")
    t0 = time.perf_counter()
    for _ in range(200):
        fwd()
    t1 = time.perf_counter()
    stream.synchronize()
    print(f"     cudnn execute: {(t1 - t0) / 200 * 1e6:.1f} us per call on the host")

    try:
        ys.copy_to_device(np.zeros(n, np.float32))
        stream.synchronize()
        stream.begin_capture()
        for _ in range(3):
            launcher(ys, xs, np.float32(2.0), n)
        fwd()
        graph = stream.end_capture()
        graph.launch(stream)
        graph.launch(stream)
        stream.synchronize()
        got = ys.copy_to_host()
        report("CUDA graph of numba kernels + cuDNN (cupy capture)", bool(np.all(got == 12.0)), f"y[0]={got[0]}")
    except Exception as ex:  # noqa: BLE001
        report("CUDA graph capture", False, repr(ex))
    print("probe:", "ALL OK" if not FAIL else f"FAILED {FAIL}")
    return 1 if FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
