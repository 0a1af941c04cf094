#!/usr/bin/env bash
# Checks and benchmarks train_gpt2_cuda.py on an NVIDIA GPU (the device machine).
# From the repository root:
#   bash dev/gpu_check.sh [all|check|parity|bf16|fp8|train|bench|curve|determinism|hellaswag|overlap|anchors|dp1|dp]
#   check: every kernel vs its CPU twin (tiny shapes), training steps and state round trips
#          through the CUDA target vs the CPU target (train_gpt2_cuda.CUDA, train_gpt2.CPU),
#          then strict-fp32 and TF32 parity of the two targets on a tiny config and on
#          GPT-2 124M (B=4, T=64); test_gpt2.py in fp32, tf32 and bf16 on odd shapes (every
#          device tensor aligned; bf16 refuses a head size cuDNN cannot take, in one line);
#          one NCCL rank: every collective, in a CUDA graph too; then dp1
#   hellaswag: the full-size HellaSwag eval timed at 124M (10,042 synthetic examples of its shape, bf16 and
#          fp32); on a 124M model trained 200 steps on tinyshakespeare (curve's fp32 run, made if missing),
#          fp32 and bf16 pick the same ending in at least 99% of 1,000 synthetic examples
#   overlap: one NCCL rank at 124M, B=16, T=1024: step time of a plain run, of gradient sums by buckets
#          during the backward, and of one sum in the update (what the overlap costs or saves)
#   dp1:   one rank through torchrun (NCCL, gradient sums by buckets during the backward)
#          at -z 0 and -z 1, bf16 and fp32: the losses and norms equal a plain run's bit for
#          bit, and the one-rank run's checkpoint resumes in a plain run, bit for bit
#   determinism: 10 seeded bf16 steps, twice at -r 1 and once at -r 2: losses and norms identical
#   bf16:  dev/cuda_check.py bf16 (cuBLASLt's calls, cuDNN attention, steps against the CPU target, the
#          classifier in chunks against one chunk), test_gpt2.py --precision bf16, and the bf16 benchmarks
#          (with the device memory buffer by buffer)
#   fp8:   dev/cuda_check.py fp8 (the casts against cuda_fp8.encode, each fp8 matmul form, steps against
#          bf16's, a seeded repeat, an exact resume), test_gpt2.py --precision fp8 (its errors beside
#          PyTorch bf16 autocast's), and the fp8 benchmark beside bf16's
#   parity: PyTorch references (tiny, and GPT-2 124M on the first val batch), then
#          python test_gpt2.py --device cuda on each, strict fp32; and bf16 on 124M against
#          PyTorch's bf16 autocast on the same batch
#   train: python train_gpt2.py --device cuda, GPT-2 124M from scratch at B=16, T=1024
#   bench: train GPT-2 124M at B=16, T=1024 through the CUDA target (loss must fall),
#          tokens/s in strict fp32 and TF32, ours vs PyTorch eager measured in the same
#          run, device memory
#   dp (not part of all; on a machine with several GPUs): GPT-2 124M at B=16, T=1024 per
#          GPU, 20 steps, on 1 GPU and on every GPU through torchrun (NCCL; the id over TCP),
#          -z 0 and -z 1; tokens/s, scaling, AdamW memory per rank, and the loss against one
#          GPU accumulating the same global batch (dev/cuda_check.py dp-table)
# Needs: numba-cuda, CuPy, PyTorch (bench only). Wheels in .whl/ (e.g. numpy<2.5, which
# numba-cuda 0.30 needs) are installed into /tmp/site first. Token files are read from
# .device_data/ when present (tinyshakespeare), else random tokens are used.
# Logs and JSON results go to $OUT (default /tmp/gpu_check); a summary table is printed last.
set -u
what=${1:-all}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
TRAIN=.device_data/tiny_shakespeare_train.bin
VAL=.device_data/tiny_shakespeare_val.bin
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
python3 -c "import sys, numpy, numba, cupy; from numba import cuda; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__, 'cupy', cupy.__version__, 'gpu', cuda.get_current_device().name)"

status=0
step() {
    echo "### $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$OUT/log.txt" | grep -v ' OK$'   # the full log keeps the OK lines
    local s=${PIPESTATUS[0]}
    echo "### done in $((SECONDS - t0)) s, exit $s: $*"
    [ "$s" -ne 0 ] && status=1
    return 0
}

if [ "$what" = all ] || [ "$what" = check ]; then
    step python3 dev/cuda_check.py kernels
    step python3 dev/cuda_check.py parity --depth 0 --B 2 --T 8 --tf32 0,1 --json "$OUT/parity_tiny.json"
    step python3 dev/cuda_check.py parity --depth 12 --B 4 --T 64 --tf32 0,1 --tokens "$VAL" --json "$OUT/parity_d12.json"
    step python3 dev/cuda_check.py shapes --count 3 --big
    step python3 dev/cuda_check.py nccl
    step python3 dev/cuda_check.py generate --depth 12 --tokens 32
fi
if [ "$what" = all ] || [ "$what" = check ] || [ "$what" = dp1 ]; then
    # one NCCL rank through torchrun against a plain run: losses and norms bit for bit; the one-rank
    # ZeRO-1 run's step-3 checkpoint continued by a plain run, bit for bit
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
    dp1=(train_gpt2.py --device cuda -i "$TRAIN" -j "" -b 4 -t 256 -x 6 -v 0 -s 0 -l 6e-4 -u 2 --seed 1337 -n 3)
    for prec in bf16 fp32; do
        rm -rf "$OUT"/dp1_*_$prec
        step python3 "${dp1[@]}" --precision $prec -o "$OUT/dp1_plain_$prec"
        for z in 0 1; do
            step torchrun --standalone --nproc-per-node=1 "${dp1[@]}" --precision $prec -z $z -o "$OUT/dp1_z${z}_$prec"
        done
        mkdir -p "$OUT/dp1_resume_$prec"
        cp "$OUT/dp1_z1_$prec"/model_00000003.bin "$OUT/dp1_z1_$prec"/state_00000003.bin "$OUT/dp1_z1_$prec"/log.jsonl \
            "$OUT/dp1_resume_$prec"/
        step python3 "${dp1[@]}" --precision $prec -o "$OUT/dp1_resume_$prec" --resume
    done
    python3 - "$OUT" <<'PY' || status=1
import json, sys
def steps(name):
    return [(r["step"], r["loss"], r["norm"]) for r in map(json.loads, open(f"{sys.argv[1]}/{name}/log.jsonl"))
            if r.get("type") == "train"]
bad = 0
for prec in ("bf16", "fp32"):
    plain = steps(f"dp1_plain_{prec}")
    for run in ("z0", "z1", "resume"):
        same = steps(f"dp1_{run}_{prec}") == plain and len(plain) == 6
        bad += not same
        print(f"CHECK one NCCL rank {run:6s} {prec}: 6 steps' losses and norms {'identical to' if same else 'DIFFER from'} "
              f"a plain run's {'OK' if same else 'FAIL'}")
sys.exit(1 if bad else 0)
PY
    rm -f "$OUT"/dp1_*/*.bin
fi
if [ "$what" = all ] || [ "$what" = parity ]; then
    mkdir -p data
    step python3 dev/torch_reference.py --layers 2 --heads 2 --channels 32 --vocab-size 64 --padded-vocab-size 128 \
        --max-seq-len 16 --B 2 --T 8 --out-checkpoint data/tiny.bin --out-state data/tiny_debug_state.bin
    step python3 test_gpt2.py --device cuda --checkpoint data/tiny.bin --state data/tiny_debug_state.bin
    step python3 dev/torch_reference.py --depth 12 --tokens "$VAL"
    step python3 test_gpt2.py --device cuda
fi
if [ "$what" = all ] || [ "$what" = parity ] || [ "$what" = bf16 ]; then
    step python3 dev/cuda_check.py bf16
    [ -f data/gpt2_124M_debug_state.bin ] || step python3 dev/torch_reference.py --depth 12 --tokens "$VAL"
    step python3 test_gpt2.py --device cuda --precision bf16
fi
if [ "$what" = all ] || [ "$what" = fp8 ]; then
    step python3 dev/cuda_check.py fp8
    [ -f data/gpt2_124M_debug_state.bin ] || step python3 dev/torch_reference.py --depth 12 --tokens "$VAL"
    step python3 test_gpt2.py --device cuda --precision fp8
    for prec in fp8 bf16; do
        step python3 dev/cuda_check.py bench --precision $prec --steps 30 --warmup 5 --tokens "$TRAIN" --memory \
            --json "$OUT/bench_ours_${prec}_vs.json"
    done
fi
if [ "$what" = all ] || [ "$what" = train ]; then
    step python3 train_gpt2.py --device cuda -i "$TRAIN" -j "$VAL" --tokenizer .device_data/gpt2_tokenizer.bin \
        -b 16 -t 1024 -x 30 -v 10 -m 4 -s 15 -g 48 -l 6e-4 -u 10 --lr-schedule cosine -q 0.1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    # VARIANTS_*: comma lists of other causal query-block counts (e.g. "2,4"), timed after
    # the main run; PROFILE=1: per-kernel device times
    step python3 dev/cuda_check.py bench --precision fp32 --steps 10 --tokens "$TRAIN" --variants "${VARIANTS_FP32:-}" \
        ${PROFILE:+--profile} --json "$OUT/bench_ours_fp32.json"
    step python3 dev/cuda_check.py bench --precision tf32 --steps 20 --tokens "$TRAIN" --variants "${VARIANTS_TF32:-}" \
        ${PROFILE:+--profile} --json "$OUT/bench_ours_tf32.json"
fi
if [ "$what" = all ] || [ "$what" = bench ] || [ "$what" = bf16 ]; then
    step python3 dev/cuda_check.py bench --precision bf16 --steps 30 --warmup 5 --tokens "$TRAIN" --memory \
        ${PROFILE:+--profile} --json "$OUT/bench_ours_bf16.json"
    step python3 dev/cuda_check.py bench --precision bf16 --B 4 --T 64 --steps 60 --warmup 10 --tokens "$TRAIN" \
        --json "$OUT/bench_ours_bf16_small.json"
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    step python3 dev/cuda_check.py bench-torch --steps 10 --tokens "$TRAIN" --json "$OUT/bench_torch.json"
fi
if [ "$what" = all ] || [ "$what" = curve ]; then
    # bf16 and fp8 against strict fp32 (and fp8 against bf16): GPT-2 124M from scratch on tinyshakespeare, 200
    # steps, the same seed and data; the val loss (all val batches) after step 200 must be within 1%
    for prec in fp32 bf16 fp8; do
        step python3 train_gpt2.py --device cuda --precision $prec -i "$TRAIN" -j "$VAL" -b 8 -t 1024 -x 200 -v 200 \
            -m 0 -s 0 -l 6e-4 -u 20 --lr-schedule cosine -q 0.1 --seed 1337 -o "$OUT/curve_$prec"
    done
    python3 - "$OUT" <<'PY' || status=1
import json, sys
val = {}
for prec in ("fp32", "bf16", "fp8"):
    recs = [json.loads(l) for l in open(f"{sys.argv[1]}/curve_{prec}/log.jsonl")]
    val[prec] = [r for r in recs if r.get("type") == "val"][-1]
bad = 0
for a, b in (("bf16", "fp32"), ("fp8", "fp32"), ("fp8", "bf16")):
    d = abs(val[a]["loss"] / val[b]["loss"] - 1)
    bad += d > 0.01
    print(f"loss curve: val loss after step {val['fp32']['step']}: {b} {val[b]['loss']:.4f}, {a} "
          f"{val[a]['loss']:.4f} ({100 * d:.2f}% apart) {'OK' if d <= 0.01 else 'FAIL'}")
sys.exit(1 if bad else 0)
PY
fi
if [ "$what" = all ] || [ "$what" = determinism ]; then
    # the same seed twice: every step's loss and norm must repeat exactly (bf16, CUDA graphs, cuDNN attention);
    # the first run times the matmul algorithms into a fresh tuning cache, the second reads its choices; a third
    # run at -r 2 (layernorm outputs and residual2 recomputed) must repeat them too
    rm -f "$OUT/determinism_tuning.json"
    for run in 1 2 3; do
        recompute=1; [ $run = 3 ] && recompute=2
        GPT2PY_TUNING_CACHE="$OUT/determinism_tuning.json" step python3 train_gpt2.py --device cuda --precision bf16 \
            -i "$TRAIN" -j "" -b 16 -t 1024 -x 10 -v 0 -s 0 -l 6e-4 -u 5 --seed 1337 -r $recompute \
            -o "$OUT/determinism_$run"
    done
    python3 - "$OUT" <<'PY' || status=1
import json, sys
runs = [[(r["loss"], r["norm"]) for r in map(json.loads, open(f"{sys.argv[1]}/determinism_{i}/log.jsonl"))
         if r.get("type") == "train"] for i in (1, 2, 3)]
same = runs[0] == runs[1] == runs[2] and len(runs[0]) == 10
print(f"determinism: 10 bf16 steps, losses and norms of two runs and a -r 2 run "
      f"{'identical' if same else 'DIFFER'}: {runs[0][-1]} {runs[1][-1]} {runs[2][-1]} {'OK' if same else 'FAIL'}")
sys.exit(0 if same else 1)
PY
    rm -f "$OUT"/determinism_*/*.bin
fi
if [ "$what" = hellaswag ]; then
    trained="$OUT/curve_fp32/model_00000200.bin"
    [ -f "$trained" ] || step python3 train_gpt2.py --device cuda --precision fp32 -i "$TRAIN" -j "$VAL" -b 8 -t 1024 \
        -x 200 -v 200 -m 0 -s 0 -l 6e-4 -u 20 --lr-schedule cosine -q 0.1 --seed 1337 -o "$OUT/curve_fp32" --overwrite
    step python3 dev/cuda_check.py hellaswag --checkpoint "$trained" --tokens "$VAL"
fi
if [ "$what" = overlap ]; then
    for round in 1 2; do
        for mode in "" "--nccl" "--nccl --reduce-in-update"; do
            step python3 dev/cuda_check.py bench --precision bf16 --steps 30 --warmup 5 --tokens "$TRAIN" $mode
        done
    done
    grep -h "^RESULT\|^== ours" "$OUT/log.txt"
fi
if [ "$what" = anchors ]; then
    # ours and the peers in one call, alternating (ours, the anchors, ours again): GPT-2 from scratch at DEPTH (12),
    # B (16), T (1024); the peers are ../shared/anchors copied into .anchors/ and carried: llm.c (built here, or
    # LLMC_BIN=DIR of binaries built earlier; KEEP=DIR keeps them) and, with ANCHORS="llmc torch", PyTorch
    export DEPTH=${DEPTH:-12} B=${B:-16} T=${T:-1024}
    ours=(dev/cuda_check.py bench --depth "$DEPTH" --B "$B" --T "$T" --precision bf16 --steps 30 --warmup 5 --tokens "$TRAIN")
    step python3 "${ours[@]}" --json "$OUT/bench_ours_d${DEPTH}_b${B}_t${T}_1.json"
    step timeout "${ANCHORS_TIMEOUT:-480}" bash .anchors/gpu_anchors.sh "$TRAIN" "$VAL" ${ANCHORS:-llmc}
    step python3 "${ours[@]}" --json "$OUT/bench_ours_d${DEPTH}_b${B}_t${T}_2.json"
    grep -h "^anchor\|^RESULT" "$OUT/log.txt"
    echo "gpu_check: $([ $status -eq 0 ] && echo ALL OK || echo SOME STEPS FAILED)"
    exit $status
fi
if [ "$what" = dp ]; then
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}   # no NVLink multicast on shared hosts
    N=$(nvidia-smi -L | wc -l)
    run=(train_gpt2.py --device cuda -i "$TRAIN" -j "" -b 16 -t 1024 -x 20 -v 0 -s 0 -l 6e-4 -u 5 --seed 1337)
    step python3 "${run[@]}" -d $((16 * 1024 * N)) -o "$OUT/dp_1gpu_accum"
    step python3 "${run[@]}" -o "$OUT/dp_1gpu"
    for z in 0 1; do
        step torchrun --standalone --nproc-per-node="$N" "${run[@]}" -z $z -o "$OUT/dp_${N}gpu_z$z"
    done
    python3 dev/cuda_check.py dp-table "$OUT"
    echo "gpu_check: $([ $status -eq 0 ] && echo ALL OK || echo SOME STEPS FAILED)"
    exit $status
fi
python3 dev/cuda_check.py table "$OUT"
echo "gpu_check: $([ $status -eq 0 ] && echo ALL OK || echo SOME STEPS FAILED)"
exit $status
