#!/usr/bin/env bash
# GPT-2 124M reproduced on FineWeb, llm.c's recipe (its scripts/run_gpt2_124M.sh): 10B tokens (19,073 steps of
# 524,288 tokens, T=1024), AdamW lr 6e-4 (betas 0.9, 0.95) with 700 warmup steps then cosine to 0, weight decay 0.1
# on the 2-D weights, gradient clipping at 1.0, val loss every 250 steps over 20 batches with HellaSwag beside it,
# a checkpoint every 5,000 steps, a sample at the end. bf16 on NVIDIA GPUs: one GPU accumulates gradients, N GPUs
# (torchrun, or mpirun when MPI_RANKS is set) split each step. Run it again after an interruption: it resumes from the
# newest checkpoint in OUT.
#
# First make the data:  python prepro_fineweb.py      (data/fineweb10B/, about 20 GB)
#                       python prepro_hellaswag.py    (data/hellaswag/hellaswag_val.bin)
# Settings (environment): GPUS (all of them), B (64 sequences per GPU per micro-step: what an 80 GB GPU holds),
# OUT (data/run_gpt2_124M), DATA (data/fineweb10B), HELLASWAG (data/hellaswag/hellaswag_val.bin), STEPS (19073),
# EXTRA (more train_gpt2.py flags), DRY_RUN=1
# (print the command instead of running it).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
B=${B:-64}
T=1024
TOTAL=524288
OUT=${OUT:-data/run_gpt2_124M}
DATA=${DATA:-data/fineweb10B}
HELLASWAG=${HELLASWAG:-data/hellaswag/hellaswag_val.bin}
STEPS=${STEPS:-19073}
PYTHON=${PYTHON:-python3}
die() { echo "error: $*" >&2; exit 1; }
[ "$GPUS" -ge 1 ] 2>/dev/null || die "no NVIDIA GPU found (nvidia-smi -L lists none); set GPUS=N"
[ $((TOTAL % (B * T * GPUS))) -eq 0 ] || die "$GPUS GPU(s) at B=$B, T=$T cannot split $TOTAL tokens per step evenly: \
pick B and GPUS with $TOTAL divisible by B * $T * GPUS (B=64 fits 1, 2, 4 or 8 GPUs)"
ls $DATA/fineweb_train_*.bin >/dev/null 2>&1 || die "no $DATA/fineweb_train_*.bin: run python prepro_fineweb.py first"
ls $DATA/fineweb_val_*.bin >/dev/null 2>&1 || die "no $DATA/fineweb_val_*.bin: run python prepro_fineweb.py first"
[ -f "$HELLASWAG" ] || die "no $HELLASWAG: run python prepro_hellaswag.py first"
train=(train_gpt2.py --device cuda --precision bf16 -e d12 -i "$DATA/fineweb_train_*.bin" -j "$DATA/fineweb_val_*.bin"
       -o "$OUT" --resume -b "$B" -t "$T" -d "$TOTAL" -x "$STEPS" -r 1 -z 1 -l 6e-4 -u 700 --lr-schedule cosine -q 0.0
       --beta2 0.95 -c 0.1 --grad-clip 1.0 -v 250 -m 20 --hellaswag --hellaswag-data "$HELLASWAG" -n 5000 -s 20000
       ${EXTRA:-})
if [ "$GPUS" -eq 1 ]; then
    launch=("$PYTHON")
elif [ -n "${MPI_RANKS:-}" ]; then
    launch=(mpirun -np "$GPUS" "$PYTHON")
else
    launch=(torchrun --standalone --nproc-per-node="$GPUS")
fi
echo "GPT-2 124M on $GPUS GPU(s), B=$B, $((TOTAL / (B * T * GPUS))) micro-step(s) per step, into $OUT"
if [ -n "${DRY_RUN:-}" ]; then
    echo "${launch[*]} ${train[*]}"
    exit 0
fi
exec "${launch[@]}" "${train[@]}"
