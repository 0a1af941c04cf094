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

tf32 and bf16 (--device cuda --precision tf32|bf16) are judged against PyTorch computing
the same model and batch the same way, run here (on the GPU when PyTorch sees one, else on
the CPU, where PyTorch has no TF32): with TF32 matmuls, or under its bf16 autocast. For
the logits, the loss, every gradient tensor and every step loss, our relative error
||ours - ref|| / ||ref|| against the fp32 reference must be at most TORCH_FACTOR times
PyTorch's, plus TORCH_FLOOR (a scalar's error can be near zero by luck).

fp8 (--precision fp8: bf16 with the layers' matmuls in E4M3 and E5M2) has no PyTorch twin
here; its errors stand beside PyTorch's bf16 autocast's, and each must be at most
FP8_FACTOR times autocast's (plus TORCH_FLOOR): 32, the unit roundoff of E5M2 (2^-3) over
bf16's (2^-8), the error that fp8's roundings alone would add.
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
TORCH_FACTOR, TORCH_FLOOR = 1.1, 1e-4  # tf32, bf16: ours <= 1.1 x PyTorch's relative error + 1e-4
FP8_FACTOR = 32  # fp8: ours <= 32 x PyTorch bf16 autocast's relative error + 1e-4


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
    """Prints a table row per tensor and keeps the names of those that fail."""

    def __init__(self):
        self.failures = []
        print(f"{'tensor':<16}{'max |ref|':>12}{'max |err|':>12}{'err/max|ref|':>14}{'tolerance':>12}  verdict")

    def compare(self, name, kind, ours, ref):
        ours = np.asarray(ours, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        biggest = float(np.max(np.abs(ref))) if ref.size else 0.0
        err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
        if not np.all(np.isfinite(ours)):
            err = float("inf")
        tolerance = min(REL_TOL[kind] * biggest, ABS_CAP[kind])
        if biggest == 0.0:
            tolerance = 1e-12  # an all-zero reference must be matched exactly (to rounding)
        ok = err <= tolerance
        relative = err / biggest if biggest else err
        print(f"{name:<16}{biggest:>12.4e}{err:>12.3e}{relative:>14.2e}{tolerance:>12.2e}  {'ok' if ok else 'FAIL'}")
        if not ok:
            self.failures.append(name)


def relative_error(ours, ref):
    """||ours - ref|| / ||ref|| (float64; inf when ours is not finite)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(ours)):
        return float("inf")
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


class TorchReport:
    """tf32's and bf16's verdicts: each tensor's relative error beside PyTorch's, computing
    the same batch in the same precision."""

    def __init__(self, torch_errors, precision, factor=TORCH_FACTOR):
        self.torch_errors = torch_errors
        self.failures = []
        self.factor = factor
        print(f"{'tensor':<16}{'ours':>12}{'PyTorch':>12}  verdict (ours <= {factor:g} x PyTorch {precision} + "
              f"{TORCH_FLOOR:g})")

    def compare(self, name, kind, ours, ref):
        err, theirs = relative_error(ours, ref), self.torch_errors[name]
        ok = err <= self.factor * theirs + TORCH_FLOOR
        print(f"{name:<16}{err:>12.3e}{theirs:>12.3e}  {'ok' if ok else 'FAIL'}")
        if not ok:
            self.failures.append(name)


def torch_errors(precision, checkpoint, x, y, ref_logits, ref_loss, ref_grads, recipe, cfg):
    """The relative errors of PyTorch in `precision` (tf32: TF32 matmuls; bf16: its bf16
    autocast over float32 master weights) against the fp32 reference, with the recipe's
    AdamW: the logits, the loss and every gradient of step 0, and every step loss. On the
    GPU when PyTorch sees one, else on the CPU."""
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dev"))
    import torch_reference as tr
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    model = tr.load_llmc_checkpoint(checkpoint).to(device)
    xt = torch.from_numpy(x.astype(np.int64)).to(device)
    yt = torch.from_numpy(y.astype(np.int64)).to(device)
    steps = len(recipe["losses"]) if recipe else 1
    opt = None
    if recipe:
        o = recipe["optimizer"]
        opt = tr.configure_adamw(model, o["lr"], (o["beta1"], o["beta2"]), o["eps"], o["weight_decay"],
                                 o["weight_decay_mode"])
    errors, V = {}, cfg.vocab_size
    try:
        for step in range(steps):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits, loss = model(xt, yt)
            loss.backward()
            if step == 0:
                errors["logits"] = relative_error(
                    logits.detach().float().cpu().numpy().reshape(-1, logits.shape[-1])[:, :V], ref_logits)
                errors["loss"] = relative_error(float(loss.detach()), ref_loss)
                grads = dict(tr.llmc_tensors(model, grads=True))
                for name, start, end in common.parameter_offsets(cfg):
                    errors[f"grad {name}"] = relative_error(grads[name].float().cpu().numpy().reshape(-1),
                                                            ref_grads[start:end])
            if recipe:
                errors[f"step {step} loss"] = relative_error(float(loss.detach()), recipe["losses"][step])
                if recipe["optimizer"]["grad_clip"] > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["optimizer"]["grad_clip"], foreach=False)
                opt.step()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    return errors


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
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16", "fp8"], default="fp32",
                        help=f"cuda only: tf32 (TF32 matmuls) or bf16 (mixed precision), each within {TORCH_FACTOR:g}x "
                             f"the error of PyTorch computing the same way + {TORCH_FLOOR:g} (needs PyTorch); fp8 "
                             f"within {FP8_FACTOR:g}x PyTorch bf16's (default: strict fp32)")
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
        if args.precision == "fp32":
            report = Report()
        else:
            like = "bf16" if args.precision == "fp8" else args.precision  # PyTorch's nearest
            report = TorchReport(torch_errors(like, args.checkpoint, x, y, ref_logits, ref_loss, ref_grads, recipe, cfg),
                                 like, FP8_FACTOR if args.precision == "fp8" else TORCH_FACTOR)
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
