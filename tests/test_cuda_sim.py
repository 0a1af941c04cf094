"""train_gpt2_cuda.py under numba's CUDA simulator (no GPU needed).

The simulator must be switched on before numba is imported, so each check runs
dev/cuda_check.py in a subprocess with NUMBA_ENABLE_CUDASIM=1; the CPU tests in the same
pytest session keep the real Numba CPU JIT. Tiny shapes (L=2, NH=2, C=32, V=60, Vp=128,
maxT=16, B=2, T=8; kernels alone on ragged N=18, C=40): every kernel against its CPU twin in
train_gpt2 (encoder+layernorm, residual+bias+layernorm, bias, bias+GELU, causal softmax and
pointer-array attention forward/backward for several query-block counts, fused classifier
forward/backward with masked targets, loss statistics, layernorm backward, bias and GELU
backward, the deterministic encoder backward, global norm + clipping, AdamW in both decay
modes), the cuBLAS call plumbing through its column-major numpy emulation (every transpose
combination, strided sub-matrices, bounds-checked); then, through the gpt2_common.Device
interface, full forward/backward/update steps of train_gpt2_cuda.CUDA against
train_gpt2.CPU (with an accumulating micro-step and a loss scale), main()'s training loop
with gradient accumulation on both targets (losses, norms, final parameters and AdamW
state), the state_to_host / state_from_host round trip and an exact resume, and the API's
errors. Then the bf16 path (`cuda_check.py bf16`) against the float32 CPU target with
bf16-sized tolerances: the bf16 load/store conversions inside kernels, the cuBLASLt
contract (every epilogue, transposes, float32 outputs, accumulation; numpy emulation here)
against float64 numpy, the fused attention (emulated here) against train_gpt2's, full steps
with an accumulating micro-step, a training loop, the state round trip, an exact resume,
and every recompute level giving the same bits. The same script checks a real GPU
(dev/gpu_check.sh).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECK = REPO_ROOT / "dev" / "cuda_check.py"


def _simulator_available():
    try:
        import numba  # noqa: F401
        from numba.cuda import simulator  # noqa: F401
    except Exception:
        return False
    return True


pytestmark = pytest.mark.skipif(not _simulator_available(), reason="numba's CUDA simulator is not available")


def start_sim(*args):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1")
    env.pop("NUMBA_DISABLE_JIT", None)
    return subprocess.Popen([sys.executable, str(CHECK), *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_sim(proc, timeout=1500):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    failed = [line for line in out.splitlines() if line.startswith("CHECK") and not line.endswith(" OK")]
    assert proc.returncode == 0 and "RESULT OK" in out and not failed, "\n".join(failed) or out[-4000:]
    return out


@pytest.fixture(scope="module")
def sim_runs():
    """Both simulator runs start together (each is one single-threaded Python process, and
    they take minutes): the tests below wait for their own."""
    runs = {"kernels": start_sim("kernels", "--steps", "2", "--attention-blocks", "1,3"),
            "bf16": start_sim("bf16", "--steps", "2"),
            "shapes": start_sim("shapes", "--count", "1", "--steps", "2"),
            "fp8": start_sim("fp8", "--steps", "2")}
    yield runs
    for proc in runs.values():
        if proc.poll() is None:
            proc.kill()


def test_kernels_and_steps_match_cpu(sim_runs):
    out = finish_sim(sim_runs["kernels"])
    assert "simulator=True" in out
    checks = [line for line in out.splitlines() if line.startswith("CHECK")]
    assert len(checks) >= 125, f"only {len(checks)} checks ran"
    for name in ("encoder+layernorm ln", "residual+layernorm ln", "bias+gelu_forward gelu",
                 "attention_forward att nb=3", "attention_backward dk nb=3", "attention_backward dv nb=1",
                 "crossentropy_backward", "layernorm_backward dw acc", "gelu_backward + fc bias",
                 "encoder_backward dwte acc", "encoder buckets order", "gemm tA=1 tB=1", "adamw params all",
                 "adamw v matrices",
                 "s1 grad wte (acc)", "s1 params", "train loop final params", "train loop final m",
                 "state round trip params,m,v", "state round trip step", "state from a fresh host m,v",
                 "resumed params", "API semantics"):
        assert any(line[6:].startswith(name) for line in checks), f"no check named {name!r}"


def test_bf16_matches_fp32_cpu_within_bf16_rounding(sim_runs):
    out = finish_sim(sim_runs["bf16"])
    checks = [line for line in out.splitlines() if line.startswith("CHECK")]
    assert len(checks) >= 100, f"only {len(checks)} checks ran"
    for name in ("bf16 widen", "bf16 round to nearest even", "cublasLt tA=0 tB=1 gelu aux", "cublasLt tA=0 tB=1 dgelu",
                 "cublasLt tA=1 tB=1 fp32 add", "cublasLt tA=0 tB=0 fp32 acc", "attention backward dk (bf16)",
                 "s1 grad qkvw (acc)", "s1 params", "train loop final m", "state round trip params,m,v",
                 "resumed params", "recompute 2 vs 1 grads", "recompute 0 vs 1 params",
                 "bias+GELU epilogue only on multiples of 64",
                 "fused gelu s0 grad fcw", "fused gelu s0 logits"):
        assert any(line[6:].startswith(name) for line in checks), f"no check named {name!r}"


def test_fp8_casts_matmuls_and_steps(sim_runs):
    """--precision fp8 (cuda_check.py fp8): the cast kernel's codes against cuda_fp8.encode
    (every fp8 value, random values over the ranges, the transpose, the GELU on the way),
    the amax and scale update, each fp8 matmul form against numpy on the decoded operands,
    then steps against bf16's, a seeded repeat and an exact resume through run_state."""
    out = finish_sim(sim_runs["fp8"])
    checks = [line for line in out.splitlines() if line.startswith("CHECK")]
    for name in ("fp8 cast E4M3 codes", "fp8 cast E5M2 transposed", "fp8 cast E4M3 every value",
                 "fp8 cast of the GELU", "fp8 scale from the history", "fp8 matmul + residual + bias",
                 "fp8 matmul accumulating", "fp8 matmul * gelu'(aux)", "fp8 vs bf16 gradients",
                 "fp8 first step: inputs and gradients cast at scale 1", "fp8 vs bf16 first-step gradients",
                 "fp8 seeded run repeats: gradients", "fp8 -r 2 as -r 1: gradients",
                 "fp8 buffers: cast scratch in the logits, ln transposes at -r 1 only", "fp8 resume: next gradients"):
        assert any(line[6:].startswith(name) for line in checks), f"no check named {name!r}"


def test_gpu_samples_greedy_as_the_cpu(tmp_path):
    """--sample --device cuda generates on the GPU (its KV cache, here under the simulator):
    in fp32 and greedy (temperature 0), the CPU's tokens; bf16 runs too."""
    import gpt2_common as common
    from conftest import TINY
    checkpoint = tmp_path / "tiny.bin"
    common.write_checkpoint(common.gpt2_init_random(common.GPT2Config(**TINY), seed=4), str(checkpoint))
    outputs = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1" if device == "cuda" else "0", PYTHONUNBUFFERED="1")
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "train_gpt2.py"), "-e", str(checkpoint), "--sample",
                               "--temperature", "0", "-g", "8", "--device", device, "--precision", precision,
                               "--tokenizer", "none"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs[device, precision] = proc.stdout.strip().splitlines()[-1]
    assert len(outputs["cpu", "fp32"].split()) == 8
    assert outputs["cuda", "fp32"] == outputs["cpu", "fp32"]
    assert len(outputs["cuda", "bf16"].split()) == 8


def test_odd_shapes_in_every_precision(sim_runs):
    """test_gpt2.py --device cuda on references of odd shapes (the device aligns every
    tensor): C/4 odd with 3 heads in fp32 and tf32, which bf16 refuses in one line (a head
    size of 4), and a shape bf16 takes, in all three (tf32 and bf16 judged against
    PyTorch computing the same way)."""
    out = finish_sim(sim_runs["shapes"])
    checks = [line for line in out.splitlines() if line.startswith("CHECK shape")]
    assert len(checks) == 6, out[-3000:]
    assert sum("passed OK" in line for line in checks) == 5 and sum("refused" in line for line in checks) == 1
    assert any(" C12 " in line and "bf16 refused" in line and "head size" in line for line in checks)


def test_fp8_lays_out_no_more_memory_than_bf16():
    """cuda_check.py memory (the layouts alone, no GPU): at GPT-2 124M, B=16, T=1024, -r 1,
    fp8's buffers (its E4M3 weights and transposes, the layernorm outputs' transposes
    instead of their bf16 copies, the casts' scratch in the logits buffer) total no more
    than bf16's."""
    totals = {}
    for precision in ("bf16", "fp8"):
        proc = subprocess.run([sys.executable, str(CHECK), "memory", "--precision", precision], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        total = [line for line in proc.stdout.splitlines() if line.strip().endswith("x)") and "total" in line]
        assert len(total) == 1, proc.stdout
        totals[precision] = float(total[0].split()[0])
        if precision == "fp8":
            assert "fp8 transposes of ln1, ln2" in proc.stdout and "in the logits buffer" in proc.stdout
    assert totals["fp8"] <= totals["bf16"], totals
