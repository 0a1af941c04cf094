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
from types import SimpleNamespace

import numpy as np

import train_gpt2 as gpt

REL_TOL = {"logits": 2e-5, "loss": 1e-6, "grad": 2e-5, "step_loss": 1e-4}
ABS_CAP = {"logits": 1e-3, "loss": 1e-3, "grad": 2e-3, "step_loss": 1e-3}
TF32_LOOSENING = 30.0  # --tf32 multiplies the tolerances: TF32 matmuls carry ~10 bits of mantissa


def read_debug_state(path, cfg):
    """x, y (B, T) int32, logits (B*T, V), loss, grads (flat, checkpoint layout)."""
    if not os.path.isfile(path):
        raise gpt.UserError(f"debug state not found: {path} (run `make reference`)")
    with open(path, "rb") as f:
        header = gpt.read_header(f, path, gpt.STATE_MAGIC, (gpt.STATE_VERSION,))
        B, T = int(header[2]), int(header[3])
        V = cfg.vocab_size
        num_parameters = gpt.buffer_size(gpt.parameter_shapes(cfg))
        expected = gpt.HEADER_INTS * 4 + 4 * (2 * B * T + B * T * V + 1 + num_parameters)
        actual = os.path.getsize(path)
        if B <= 0 or T <= 0 or actual != expected:
            raise gpt.UserError(f"{path}: size {actual} bytes, but B={B}, T={T} and the checkpoint's model need {expected}: "
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
        raise gpt.UserError(f"{path}: not a valid recipe sidecar ({e})")
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


def device_ops(model, B, T, device, tf32):
    """forward(x, y) -> loss, backward(), update(**recipe), logits() and grads() as host
    arrays: the same five operations on the CPU module or the CUDA one."""
    if device == "cpu":
        return SimpleNamespace(
            forward=lambda x, y: gpt.gpt2_forward(model, x, y),
            backward=lambda: gpt.gpt2_backward(model),
            update=lambda **opt: gpt.gpt2_update(model, **opt),
            logits=lambda: model.acts.logits,
            grads=lambda: model.grads_memory)
    import train_gpt2_cuda as gcu
    dm = gcu.to_device(model, B, T, tf32=tf32)

    def forward(x, y):
        gcu.gpt2_forward_cuda(dm, x, y)
        return gcu.mean_loss_cuda(dm)
    return SimpleNamespace(
        forward=forward,
        backward=lambda: gcu.gpt2_backward_cuda(dm),
        update=lambda **opt: gcu.gpt2_update_cuda(dm, **opt),
        logits=lambda: gcu.logits_to_host(dm),
        grads=lambda: gcu.grads_to_host(dm))


def run_check(model, x, y, recipe, report, ref_logits, ref_loss, ref_grads, device, tf32):
    V = model.cfg.vocab_size
    ops = device_ops(model, x.shape[0], x.shape[1], device, tf32)
    loss = ops.forward(x, y)
    report.compare("logits", "logits", ops.logits()[:, :V], ref_logits)
    report.compare("loss", "loss", loss, ref_loss)
    ops.backward()
    grads = ops.grads()
    for name, start, end in gpt.parameter_offsets(model.cfg):
        report.compare(f"grad {name}", "grad", grads[start:end], ref_grads[start:end])
    if recipe is None:
        return
    opt = recipe["optimizer"]
    losses = [loss]
    for step in range(1, len(recipe["losses"])):
        ops.update(lr=opt["lr"], beta1=opt["beta1"], beta2=opt["beta2"], eps=opt["eps"],
                   weight_decay=opt["weight_decay"], weight_decay_mode=opt["weight_decay_mode"],
                   grad_clip=opt["grad_clip"])
        losses.append(ops.forward(x, y))
        ops.backward()
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
    parser.add_argument("--tf32", action="store_true",
                        help=f"cuda only: TF32 matmuls, tolerances {TF32_LOOSENING:g}x looser (default: strict fp32)")
    args = parser.parse_args(argv)
    if args.tf32 and args.device != "cuda":
        parser.error("--tf32 needs --device cuda")
    try:
        t0 = time.perf_counter()
        if args.device == "cuda":
            import train_gpt2_cuda as gcu
            if not gcu.cuda_available():
                raise gpt.UserError("--device cuda: no CUDA GPU found (is numba-cuda installed and a driver present?)")
        model = gpt.read_checkpoint(args.checkpoint)
        cfg = model.cfg
        x, y, ref_logits, ref_loss, ref_grads = read_debug_state(args.state, cfg)
        gpt.check_tokens(x, cfg.vocab_size, f"{args.state} inputs")
        gpt.check_tokens(y, cfg.vocab_size, f"{args.state} targets")
        if x.shape[1] > cfg.max_seq_len:
            raise gpt.UserError(f"{args.state}: T={x.shape[1]} exceeds the checkpoint's max_seq_len={cfg.max_seq_len}")
        recipe = read_recipe(args.state)
        print(f"model: L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} V={cfg.vocab_size} Vp={cfg.padded_vocab_size} "
              f"({model.num_parameters:,} parameters); batch B={x.shape[0]} T={x.shape[1]}; device {args.device}"
              f"{' (TF32)' if args.tf32 else ''}")
        print("recipe: " + (json.dumps(recipe["optimizer"]) + f", {len(recipe['losses'])} steps" if recipe
                            else "none (plain llm.c state): checking step 0 only"))
        report = Report(TF32_LOOSENING if args.tf32 else 1.0)
        run_check(model, x, y, recipe, report, ref_logits, ref_loss, ref_grads, args.device, args.tf32)
    except gpt.UserError as e:
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
