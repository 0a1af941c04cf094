"""Probe of the bf16 step's matmuls and its layernorm backward on the GPU machine (run
there, one call): `python dev/step_probe.py [lnb|mm|all]`. mm: every cuBLASLt matmul
shape of a GPT-2 124M step at B=16, T=1024, each of the heuristic's first 8 algorithms
timed (what Lt's tuning chooses among), and the bias-gradient epilogues (BGRADB on the
weight-gradient matmuls, DGELU_BGRAD on the fc input gradient; their bias gradients
checked against column sums). Its descriptors are its own (they also take the bias-
gradient epilogues, which Lt never uses) and set no alignment preferences, so a shape's
candidate list can differ from the one Lt times. lnb: the layernorm backward at
16384 x 768 over a range of grids. Prints timings."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cuda_kernels as tg  # noqa: E402
from numba import cuda  # noqa: E402
from cuda_kernels import quads  # noqa: E402
from cuda_libraries import addr as _addr, R_16BF, R_32F, COMPUTE_32F, LT_WORKSPACE  # noqa: E402
import gpt2_common as common  # noqa: E402


def timeit(fn, reps=20):
    for _ in range(3):
        fn()
    evs = []
    for _ in range(reps):
        e0, e1 = cuda.event(), cuda.event()
        e0.record()
        fn()
        e1.record()
        evs.append((e0, e1))
    cuda.synchronize()
    return float(np.median([cuda.event_elapsed_time(a, b) for a, b in evs]))


def probe_lnb():
    BT, C = 16384, 768
    rng = np.random.default_rng(0)
    inp = common.float32_to_bfloat16(rng.standard_normal((BT, C)).astype(np.float32))
    dout = common.float32_to_bfloat16((rng.standard_normal((BT, C)) * 0.01).astype(np.float32))
    w = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    x = common.bfloat16_to_float32(inp)
    mean = x.mean(1).astype(np.float32)
    rstd = (1 / np.sqrt(x.var(1) + 1e-5)).astype(np.float32)
    dinp0 = (rng.standard_normal((BT, C)) * 0.01).astype(np.float32)
    d_inp, d_dout, d_w, d_mean, d_rstd = (cuda.to_device(v) for v in (inp, dout, w, mean, rstd))
    ref = None
    for blocks, overwrite in [(132 * g, 0) for g in (4, 8, 10, 12, 16, 24)] + [(tg.LNB_BLOCKS, 1)]:
        d_dinp = cuda.to_device(dinp0)
        d_shadow = cuda.device_array((BT, C), np.uint16)
        part = cuda.device_array((blocks, 3 * C), np.float32)
        launch = tg.k_layernorm_backward[blocks, C // 4]
        args = (quads(d_dinp), quads(d_dout), quads(d_inp), quads(d_w), d_mean, d_rstd, overwrite, quads(d_shadow), 1,
                quads(part))
        launch(*args)
        cuda.synchronize()
        out = (d_dinp.copy_to_host(), part.copy_to_host().sum(0))
        ms = timeit(lambda: launch(*args))
        if ref is None:
            ref = out
        err = max(float(np.abs(out[0] - ref[0]).max()), float(np.abs(out[1] - ref[1]).max() / np.abs(ref[1]).max()))
        print(f"layernorm backward, {blocks} blocks, overwrite={overwrite}: {ms * 1e3:7.1f} us  (largest difference "
              f"from the first grid's {err:.2e})", flush=True)


def probe_matmuls():
    from nvmath.bindings import cublasLt as lt
    handle = lt.create()
    ws = cuda.device_array(LT_WORKSPACE, dtype=np.uint8)
    E = lt.Epilogue
    attrs = lt.MatmulDescAttribute
    prefs = lt.MatmulPreferenceAttribute
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    B, C, Vp = 16 * 1024, 768, 50304
    rng = np.random.default_rng(1)
    bufs = {}

    def buf(name, n, dtype=np.uint16, scale=0.02):
        if name not in bufs:
            x = (rng.standard_normal(n) * scale).astype(np.float32)
            bufs[name] = cuda.to_device(common.float32_to_bfloat16(x) if dtype == np.uint16 else x)
        return bufs[name]

    def plan(tA, tB, M, N, K, out_type, epilogue, bias_type=None, n_algos=8):
        # row-major C[M, N] = op(A) op(B), cuBLAS column-major: C^T = op(B)^T op(A)^T
        ta, tb, m, n, k = tB, tA, N, M, K
        lda_c = N if not tB else K  # cuBLAS A = our B: stored K x N row-major (N ld) or N x K (K ld)
        ldb_c = K if not tA else M
        desc = lt.matmul_desc_create(COMPUTE_32F, R_32F)

        def set_attr(attr, value, dtype):
            b = np.array([value], dtype=dtype)
            lt.matmul_desc_set_attribute(desc, attr, b.ctypes.data, b.itemsize)
        set_attr(attrs.TRANSA, int(ta), np.int32)
        set_attr(attrs.TRANSB, int(tb), np.int32)
        set_attr(attrs.EPILOGUE, int(epilogue), np.uint32)
        if bias_type is not None:
            set_attr(attrs.BIAS_DATA_TYPE, bias_type, np.int32)
        if epilogue in (E.DGELU, E.DGELU_BGRAD, E.GELU_AUX_BIAS):
            set_attr(attrs.EPILOGUE_AUX_LD, m, np.int64)
        la = lt.matrix_layout_create(R_16BF, k if ta else m, m if ta else k, lda_c)
        lb = lt.matrix_layout_create(R_16BF, n if tb else k, k if tb else n, ldb_c)
        lc = lt.matrix_layout_create(out_type, m, n, m)
        pref = lt.matmul_preference_create()
        b = np.array([LT_WORKSPACE], dtype=np.uint64)
        lt.matmul_preference_set_attribute(pref, prefs.MAX_WORKSPACE_BYTES, b.ctypes.data, 8)
        res = np.zeros(n_algos, dtype=lt.matmul_heuristic_result_dtype)
        cnt = np.zeros(1, dtype=np.int32)
        lt.matmul_algo_get_heuristic(handle, desc, la, lb, lc, lc, pref, n_algos, res.ctypes.data, cnt.ctypes.data)
        return desc, la, lb, lc, res[:cnt[0]], set_attr, (m, n, k)

    def run_all(label, tA, tB, M, N, K, out_fp32=False, epilogue=None, accumulate=False, bias_type=None,
                check_bias=None):
        epilogue = E.DEFAULT if epilogue is None else epilogue
        out_type = R_32F if out_fp32 else R_16BF
        try:
            desc, la, lb, lc, res, set_attr, (m, n, k) = plan(tA, tB, M, N, K, out_type, epilogue, bias_type)
        except Exception as e:  # noqa: BLE001
            print(f"{label}: plan failed {type(e).__name__} {e}", flush=True)
            return None
        if len(res) == 0:
            print(f"{label}: no algorithm", flush=True)
            return None
        A = buf(f"A{M}x{K}", M * K)
        Bm = buf(f"B{K}x{N}", K * N)
        Cm = buf(f"C{M}x{N}{out_fp32}", M * N, np.float32 if out_fp32 else np.uint16)
        aux = buf(f"aux{M}x{N}", M * N, scale=1.0)
        bias = buf(f"bias{max(M, N)}_{bias_type}", max(M, N), np.float32 if bias_type != R_16BF else np.uint16)
        if epilogue in (E.BIAS, E.GELU_AUX_BIAS, E.BGRADB, E.DGELU_BGRAD):
            set_attr(attrs.BIAS_POINTER, _addr(bias), np.intp)
        if epilogue in (E.DGELU, E.DGELU_BGRAD, E.GELU_AUX_BIAS):
            set_attr(attrs.EPILOGUE_AUX_POINTER, _addr(aux), np.intp)
        beta = one if accumulate else zero
        flops = 2 * M * N * K
        times = []
        for j in range(len(res)):
            r = res[j:j + 1]

            def call():
                lt.matmul(handle, desc, one.ctypes.data, _addr(Bm), la, _addr(A), lb, beta.ctypes.data, _addr(Cm), lc,
                          _addr(Cm), lc, r.ctypes.data, _addr(ws), LT_WORKSPACE, 0)
            try:
                ms = timeit(call)
            except Exception as e:  # noqa: BLE001
                print(f"{label} algo {j}: {type(e).__name__} {str(e)[:60]}", flush=True)
                break
            times.append(ms)
        if not times:
            return None
        best = int(np.argmin(times))
        print(f"{label:44s} heur0 {times[0] * 1e3:7.1f} us ({flops / times[0] / 1e9:4.0f} TF)  best #{best} "
              f"{times[best] * 1e3:7.1f} us ({flops / times[best] / 1e9:4.0f} TF)  of {len(times)}  "
              f"[{' '.join(f'{t * 1e3:.0f}' for t in times)}]", flush=True)
        if check_bias is not None:
            # the bias gradient: column sums (over the reduced K or M rows) of check_bias's operand
            cuda.synchronize()
            got = bias.copy_to_host()
            got = common.bfloat16_to_float32(got) if got.dtype == np.uint16 else got
            src = {"A": (A, K, M) if tA else (A, M, K), "B": (Bm, K, N), "C": (Cm, M, N)}[check_bias]
            arr = src[0].copy_to_host()
            arr = (common.bfloat16_to_float32(arr) if arr.dtype == np.uint16 else arr).reshape(src[1], src[2])
            ref = arr.sum(0)
            nb = ref.size
            e = float(np.abs(got[:nb] - ref).max() / np.abs(ref).max())
            print(f"    bias gradient vs column sums of {check_bias}: rel max err {e:.2e}", flush=True)
        return times

    BT = B
    shapes = [
        ("fwd qkv +bias", False, True, BT, 3 * C, C, False, E.BIAS),
        ("fwd attproj fp32 +bias", False, True, BT, C, C, True, E.BIAS),
        ("fwd fc gelu", False, True, BT, 4 * C, C, False, E.GELU_AUX_BIAS),
        ("fwd fcproj fp32 +bias", False, True, BT, C, 4 * C, True, E.BIAS),
        ("fwd logits", False, True, BT, Vp, C, False, E.DEFAULT),
        ("bwd dlnf", False, False, BT, C, Vp, False, E.DEFAULT),
        ("bwd gwte fp32", True, False, Vp, C, BT, True, E.DEFAULT),
        ("bwd gfcprojw fp32", True, False, C, 4 * C, BT, True, E.DEFAULT),
        ("bwd dfch DGELU", False, False, BT, 4 * C, C, False, E.DGELU),
        ("bwd dfch plain", False, False, BT, 4 * C, C, False, E.DEFAULT),
        ("bwd dC from d4C", False, False, BT, C, 4 * C, False, E.DEFAULT),
        ("bwd gfcw fp32", True, False, 4 * C, C, BT, True, E.DEFAULT),
        ("bwd dC from dres", False, False, BT, C, C, False, E.DEFAULT),
        ("bwd gattprojw fp32", True, False, C, C, BT, True, E.DEFAULT),
        ("bwd dC from d3C", False, False, BT, C, 3 * C, False, E.DEFAULT),
        ("bwd gqkvw fp32", True, False, 3 * C, C, BT, True, E.DEFAULT),
    ]
    for label, tA, tB, M, N, K, of, epi in shapes:
        run_all(label, tA, tB, M, N, K, of, epi)
    # bias-gradient epilogues
    run_all("bwd dfch DGELU_BGRAD", False, False, BT, 4 * C, C, False, E.DGELU_BGRAD, check_bias="C")
    run_all("bwd gfcw BGRADB fp32", True, False, 4 * C, C, BT, True, E.BGRADB, check_bias="A")
    run_all("bwd gfcw BGRADB fp32 acc", True, False, 4 * C, C, BT, True, E.BGRADB, accumulate=True)
    run_all("bwd gqkvw BGRADB fp32", True, False, 3 * C, C, BT, True, E.BGRADB, check_bias="A")
    run_all("bwd gattprojw BGRADB fp32", True, False, C, C, BT, True, E.BGRADB, check_bias="A")
    run_all("bwd gfcprojw BGRADB fp32", True, False, C, 4 * C, BT, True, E.BGRADB, check_bias="A")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("all", "lnb"):
        probe_lnb()
    if what in ("all", "mm"):
        probe_matmuls()
