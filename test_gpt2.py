"""
Parity check against PyTorch: python test_gpt2.py [--checkpoint PATH] [--state PATH]

Loads a checkpoint and a debug state (llm.c formats) written from PyTorch GPT-2 by
dev/torch_reference.py (`make reference`), runs our forward and backward on the
state's batch, and compares logits, loss and all 16 parameter gradients. If the
recipe sidecar (<state>.json) is there, it then takes the same optimizer steps
and compares every step's loss. Prints each tensor's error; exits 1 on any failure.

Tolerances. Each tensor passes when its max absolute error is at most
REL_TOL[kind] times the largest absolute value of its reference, and also under
ABS_CAP[kind] (10x tighter than llm.c's 1e-2 / 2e-2). The relative tolerances sit
10x to 20x above the float32 error measured against PyTorch on GPT-2 124M (about
1e-6 of each tensor's largest value; the README lists it), and far below 1e-2, so a
single entry off by 1% of its tensor's largest value fails.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

import gpt2_common as common
import train_gpt2 as gpt

REL_TOL = {"logits": 2e-5, "loss": 1e-6, "grad": 2e-5, "step_loss": 1e-4}
ABS_CAP = {"logits": 1e-3, "loss": 1e-3, "grad": 2e-3, "step_loss": 1e-3}
TF32_LOOSENING = 30.0  # --precision tf32 multiplies the tolerances: TF32 matmuls carry ~10 bits of mantissa
# --precision bf16 (8 bits of mantissa) is judged by dev/cuda_check.py bf16-parity instead, against PyTorch's own
# bf16 autocast on the same batch; here it must stay within this many times the fp32 tolerances
BF16_LOOSENING = 1000.0


def read_debug_state(path, cfg):
    """x, y (B, T) int32, logits (B*T, V), loss, grads (flat, checkpoint layout)."""
    if not os.path.isfile(path):
        raise common.UserError(f"debug state not found: {path} (run `make reference`)")
    with open(path, "rb") as f:
        header = common.read_header(f, path, common.STATE_MAGIC, (common.STATE_VERSION,))
        B, T = int(header[2]), int(header[3])
        V = cfg.vocab_size
        num_parameters = common.buffer_size(common.parameter_shapes(cfg))
        expected = common.HEADER_INTS * 4 + 4 * (2 * B * T + B * T * V + 1 + num_parameters)
        actual = os.path.getsize(path)
        if B <= 0 or T <= 0 or actual != expected:
            raise common.UserError(f"{path}: size {actual} bytes, but B={B}, T={T} and the checkpoint's model need {expected}: "
                                "wrong pair of files, or a truncated one")
        x = np.fromfile(f, dtype="<i4", count=B * T).reshape(B, T)
        y = np.fromfile(f, dtype="<i4", count=B * T).reshape(B, T)
        logits = np.fromfile(f, dtype="<f4", count=B * T * V).reshape(B * T, V)
        loss = float(np.fromfile(f, dtype="<f4", count=1)[0])
        grads = np.fromfile(f, dtype="<f4", count=num_parameters)
    return x, y, logits, loss, grads


def read_recipe(state_path):
    path = state_path + ".json"
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            recipe = json.load(f)
        recipe["optimizer"]["lr"], recipe["losses"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise common.UserError(f"{path}: not a valid recipe sidecar ({e})")
    return recipe


class Report:
    def __init__(self, tolerance_scale):
        self.scale = tolerance_scale
        self.failures = []
        print(f"{'tensor':<16}{'max |ref|':>12}{'max |err|':>12}{'err/max|ref|':>14}{'tolerance':>12}  verdict")

    def compare(self, name, kind, ours, ref):
        ours = np.asarray(ours, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        biggest = float(np.max(np.abs(ref))) if ref.size else 0.0
        err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
        if not np.all(np.isfinite(ours)):
            err = float("inf")
        tolerance = min(REL_TOL[kind] * biggest, ABS_CAP[kind]) * self.scale
        if biggest == 0.0:
            tolerance = 1e-12  # an all-zero reference must be matched exactly (to rounding)
        ok = err <= tolerance
        relative = err / biggest if biggest else err
        print(f"{name:<16}{biggest:>12.4e}{err:>12.3e}{relative:>14.2e}{tolerance:>12.2e}  {'ok' if ok else 'FAIL'}")
        if not ok:
            self.failures.append(name)


def run_check(device, cfg, x, y, recipe, report, ref_logits, ref_loss, ref_grads):
    """Step 0's logits, loss and gradients, then the recipe's steps, through the device
    interface that training uses (train_gpt2.CPU or train_gpt2_cuda.CUDA)."""
    V = cfg.vocab_size
    loss = device.forward(x, y)
    report.compare("logits", "logits", device.logits_to_host()[:, :V], ref_logits)
    report.compare("loss", "loss", loss, ref_loss)
    device.backward()
    grads = device.grads_to_host()
    for name, start, end in common.parameter_offsets(cfg):
        report.compare(f"grad {name}", "grad", grads[start:end], ref_grads[start:end])
    if recipe is None:
        return
    opt = recipe["optimizer"]
    losses = [loss]
    for step in range(1, len(recipe["losses"])):
        device.update(opt["lr"], opt["beta1"], opt["beta2"], opt["eps"], opt["weight_decay"], opt["weight_decay_mode"],
                      opt["grad_clip"])
        losses.append(device.forward(x, y))
        device.backward()
    compare_step_losses(report, losses, recipe["losses"])


def compare_step_losses(report, losses, expected):
    print("step losses (ours / reference):")
    for i, (ours, ref) in enumerate(zip(losses, expected)):
        print(f"  step {i}: {ours:.6f} {ref:.6f}")
    for i, (ours, ref) in enumerate(zip(losses, expected)):
        report.compare(f"step {i} loss", "step_loss", ours, ref)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="data/gpt2_124M.bin", help="llm.c v3 checkpoint (default: %(default)s)")
    parser.add_argument("--state", default="data/gpt2_124M_debug_state.bin",
                        help="llm.c debug state; its recipe sidecar is <state>.json (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: %(default)s)")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                        help=f"cuda only: tf32 (TF32 matmuls, tolerances {TF32_LOOSENING:g}x looser) or bf16 (mixed "
                             f"precision, {BF16_LOOSENING:g}x) (default: strict fp32)")
    args = parser.parse_args(argv)
    if args.precision != "fp32" and args.device != "cuda":
        parser.error(f"--precision {args.precision} needs --device cuda")
    try:
        t0 = time.perf_counter()
        if args.device == "cuda":
            gpt.check_device("cuda")  # before any output
        model = common.read_checkpoint(args.checkpoint)
        cfg = model.cfg
        x, y, ref_logits, ref_loss, ref_grads = read_debug_state(args.state, cfg)
        common.check_tokens(x, cfg.vocab_size, f"{args.state} inputs")
        common.check_tokens(y, cfg.vocab_size, f"{args.state} targets")
        if x.shape[1] > cfg.max_seq_len:
            raise common.UserError(f"{args.state}: T={x.shape[1]} exceeds the checkpoint's max_seq_len={cfg.max_seq_len}")
        recipe = read_recipe(args.state)
        device = gpt.build_device(args.device, model, x.shape[0], x.shape[1], args.precision)
        print(f"model: L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} V={cfg.vocab_size} Vp={cfg.padded_vocab_size} "
              f"({model.num_parameters:,} parameters); batch B={x.shape[0]} T={x.shape[1]}; device {args.device}"
              f"{'' if args.precision == 'fp32' else ' (' + args.precision + ')'}")
        print("recipe: " + (json.dumps(recipe["optimizer"]) + f", {len(recipe['losses'])} steps" if recipe
                            else "none (plain llm.c state): checking step 0 only"))
        report = Report({"fp32": 1.0, "tf32": TF32_LOOSENING, "bf16": BF16_LOOSENING}[args.precision])
        run_check(device, cfg, x, y, recipe, report, ref_logits, ref_loss, ref_grads)
    except common.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    if report.failures:
        print(f"FAIL: {len(report.failures)} tensor(s) out of tolerance: {', '.join(report.failures)} ({seconds:.1f} s)")
        return 1
    print(f"OK: every tensor within tolerance ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
