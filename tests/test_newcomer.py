"""A newcomer's first hour (issue 22): a run's folder is its own, converting without
training, prompts offline by the same rule as the prepro script, saying what is
happening (first compile, long evaluations), an MFU against a cached reference, and
counts and rates that refuse negatives.

Runs use a tiny llm.c checkpoint (L=2, NH=2, C=32, V=64, maxT=32) and token files of a
few hundred ids below 64, as tests/test_trainer.py does.
"""

import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt2_common as common
import train_gpt2 as gpt
from conftest import REPO_ROOT, SHARED_DATA, subprocess_env
from test_trainer import params_of, tensor  # the same tiny config, so the same checkpoint layout

TRAIN_GPT2 = REPO_ROOT / "train_gpt2.py"
PREPRO = REPO_ROOT / "prepro_tinyshakespeare.py"
VOCAB = SHARED_DATA / "gpt2.tiktoken"
CFG = dict(max_seq_len=32, vocab_size=64, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)
B, T = 2, 16
CONV1D = {"qkvw", "attprojw", "fcw", "fcprojw"}  # HF keeps these as (in, out): our (out, in) transposed
HF_NAMES = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvw": "attn.c_attn.weight", "qkvb": "attn.c_attn.bias",
            "attprojw": "attn.c_proj.weight", "attprojb": "attn.c_proj.bias", "ln2w": "ln_2.weight",
            "ln2b": "ln_2.bias", "fcw": "mlp.c_fc.weight", "fcb": "mlp.c_fc.bias", "fcprojw": "mlp.c_proj.weight",
            "fcprojb": "mlp.c_proj.bias"}  # save_pretrained's GPT-2 names within block l


# -----------------------------------------------------------------------------
# helpers


def offline_env(tmp_path, **extra):
    """A child's environment with no way to the GPT-2 BPE ranks but what the command
    names: no DATA_MIRROR, HOME, XDG and tiktoken caches in an empty folder, and every
    download sent to a closed port."""
    empty = tmp_path / "empty_home"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in subprocess_env().items() if k != "DATA_MIRROR"}
    closed = "http://127.0.0.1:9"
    env.update(HOME=str(empty), XDG_CACHE_HOME=str(empty), TIKTOKEN_CACHE_DIR=str(empty), DATA_GYM_CACHE_DIR=str(empty),
               TMPDIR=str(empty), HTTP_PROXY=closed, HTTPS_PROXY=closed, http_proxy=closed, https_proxy=closed,
               GPT2PY_CPU_PEAK_CACHE=str(tmp_path / "cpu_peak.json"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(script, args, cwd, env=None):
    env = env if env is not None else dict(subprocess_env(), GPT2PY_CPU_PEAK_CACHE=str(Path(cwd) / "cpu_peak.json"))
    return subprocess.run([sys.executable, "-u", str(script), *map(str, args)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=300)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_line_error(proc, code, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def ckpt(out_dir, step, kind="model"):
    return Path(out_dir) / f"{kind}_{step:08d}.bin"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from prepro_tinyshakespeare import write_token_file
    d = tmp_path_factory.mktemp("newcomer_files")
    common.write_checkpoint(common.gpt2_init_random(common.GPT2Config(**CFG), seed=3), str(d / "init.bin"))
    r = np.random.default_rng(1)
    write_token_file(d / "train.bin", ((np.arange(600) * 7 + r.integers(0, 3, 600)) % 64).tolist())
    write_token_file(d / "val.bin", ((np.arange(400) * 7 + r.integers(0, 3, 400)) % 64).tolist())
    return {"init": d / "init.bin", "train": d / "train.bin", "val": d / "val.bin"}


def tiny(files, *flags, peak=True):
    return ["-e", files["init"], "-i", files["train"], "-j", files["val"], "-b", B, "-t", T, "-s", 0, "-v", 0,
            *(["--peak-tflops", 1] if peak else []), "--tokenizer", "none", *flags]


def sampled_text(stdout):
    """What --sample prints after its '[with KV cache: ...]' line."""
    return stdout.split(" tokens/s]\n", 1)[1]


# -----------------------------------------------------------------------------
# 1. A run's folder is its own


def test_second_run_into_a_folder_is_refused_overwrite_starts_clean_resume_continues(files, tmp_path):
    """The issue's sequence: a 5-step run, then a 2-step run into the same folder. The
    second is refused and changes nothing; with --overwrite it starts clean (only our
    files go); --resume then continues it like an uninterrupted run."""
    out = tmp_path / "run"
    ok(run(TRAIN_GPT2, tiny(files, "-x", 5, "-v", 5, "-o", out), tmp_path))
    (out / "notes.txt").write_text("mine")  # files that are not the run's stay
    (out / "loss.png").write_bytes(b"png")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = run(TRAIN_GPT2, tiny(files, "-x", 2, "-o", out), tmp_path)
    line = one_line_error(refused, 1, str(out), "checkpoints up to step 5", "log.jsonl", "--resume", "-o",
                          "--overwrite")
    assert "step " not in refused.stdout, refused.stdout  # refused before any training
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, line

    (out / "model_00000007.bin.tmp.4242").write_bytes(b"partial")  # a killed save's leftover goes too
    fresh = ok(run(TRAIN_GPT2, tiny(files, "-x", 2, "-v", 2, "-o", out, "--overwrite"), tmp_path))
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "loss.png", "model_00000002.bin", "notes.txt",
                                                     "state_00000002.bin"]
    # the checkpoint line names both files it wrote, and both are there
    assert f"checkpoint: {ckpt(out, 2)}" in fresh.stdout and "+ state_00000002.bin" in fresh.stdout
    records = read_log(out)
    assert [(r["type"], r["step"]) for r in records] == [("val", 0), ("train", 1), ("train", 2), ("val", 2)]

    ok(run(TRAIN_GPT2, tiny(files, "-x", 4, "-v", 2, "-o", out, "--resume"), tmp_path))
    straight = tmp_path / "straight"
    ok(run(TRAIN_GPT2, tiny(files, "-x", 4, "-v", 2, "-o", straight), tmp_path))
    assert [(r["type"], r["step"]) for r in read_log(out)] == [(r["type"], r["step"]) for r in read_log(straight)]
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(straight)]
    assert ckpt(out, 4).read_bytes() == ckpt(straight, 4).read_bytes()
    assert (out / "notes.txt").read_text() == "mine"


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path, tiny_model):
    """Keep the newest K of the run's checkpoints up to the one just written: that one
    always survives, even below the steps of checkpoints already there."""
    out = tmp_path / "o"
    out.mkdir()
    common.ensure_optimizer_buffers(tiny_model)
    for step in (5, 40):
        common.save_training_checkpoint(tiny_model, str(out), step, {}, keep_last=0)
    path = common.save_training_checkpoint(tiny_model, str(out), 2, {}, keep_last=2)
    assert Path(path).is_file() and common.list_checkpoint_steps(str(out)) == [2, 5, 40]
    common.save_training_checkpoint(tiny_model, str(out), 3, {}, keep_last=2)
    assert common.list_checkpoint_steps(str(out)) == [2, 3, 5, 40]
    common.save_training_checkpoint(tiny_model, str(out), 4, {}, keep_last=2)
    assert common.list_checkpoint_steps(str(out)) == [3, 4, 5, 40]  # 2 went: the newest 2 up to step 4 stay
    common.save_training_checkpoint(tiny_model, str(out), 6, {}, keep_last=1)
    assert common.list_checkpoint_steps(str(out)) == [6, 40]


# -----------------------------------------------------------------------------
# 2. Converting without training


def test_export_hf_with_no_training_writes_that_checkpoint(files, tmp_path):
    """-e CHECKPOINT -x 0 --export-hf DIR: no training, no checkpoint, no training data
    needed; the safetensors tensors are the checkpoint's (read with the safetensors
    library, mapped by Hugging Face's names)."""
    from safetensors.numpy import load_file
    trained = tmp_path / "trained"
    ok(run(TRAIN_GPT2, tiny(files, "-x", 3, "-l", 1e-2, "-o", trained), tmp_path))
    checkpoint = ckpt(trained, 3)
    workdir = tmp_path / "work"  # no data/ here: the default -i does not exist
    workdir.mkdir()
    out = ok(run(TRAIN_GPT2, ["-e", checkpoint, "-x", 0, "--export-hf", "hf3", "--tokenizer", "none"], workdir))
    assert "step " not in out.stdout and "wrote hf3" in out.stdout
    assert sorted(p.name for p in workdir.iterdir()) == ["hf3"]
    assert sorted(p.name for p in (workdir / "hf3").iterdir()) == ["config.json", "generation_config.json",
                                                                   "model.safetensors"]
    exported = load_file(str(workdir / "hf3" / "model.safetensors"))
    flat = params_of(checkpoint)
    assert not np.array_equal(flat, params_of(files["init"]))  # the trained weights, not the init's
    expected = {"transformer.wte.weight": tensor(flat, "wte")[:CFG["vocab_size"]],
                "transformer.wpe.weight": tensor(flat, "wpe"),
                "transformer.ln_f.weight": tensor(flat, "lnfw"), "transformer.ln_f.bias": tensor(flat, "lnfb")}
    for ours, theirs in HF_NAMES.items():
        for layer in range(CFG["num_layers"]):
            value = tensor(flat, ours)[layer]
            expected[f"transformer.h.{layer}.{theirs}"] = value.T if ours in CONV1D else value
    assert sorted(exported) == sorted(expected)
    for name, value in expected.items():
        assert exported[name].dtype == np.float32 and np.array_equal(exported[name], value), name
    # --help says how
    help_text = " ".join(ok(run(TRAIN_GPT2, ["--help"], workdir)).stdout.split())
    assert "-e FILE -x 0 --export-hf DIR converts FILE" in help_text


# -----------------------------------------------------------------------------
# 3. Offline, by the same rule everywhere


def decoding_table(path):
    from prepro_tinyshakespeare import load_gpt2_encoding, write_tokenizer_file
    write_tokenizer_file(path, load_gpt2_encoding(vocab_path=VOCAB))
    return path


def test_sample_with_a_prompt_offline_with_vocab_or_mirror(tmp_path):
    """--sample --prompt with no DATA_MIRROR, empty HOME and caches and no network: the
    documented --vocab FILE (or --mirror DIR) is all it needs. Without them it fails in
    one line that names only options train_gpt2.py has."""
    table = decoding_table(tmp_path / "gpt2_tokenizer.bin")
    command = ["-e", "d2", "--sample", "--prompt", "ROMEO:", "-g", 4, "--tokenizer", table]
    for source in (["--vocab", VOCAB], ["--mirror", SHARED_DATA]):
        out = ok(run(TRAIN_GPT2, command + source, tmp_path, env=offline_env(tmp_path)))
        assert sampled_text(out.stdout).startswith("ROMEO:"), out.stdout
    failed = run(TRAIN_GPT2, command, tmp_path, env=offline_env(tmp_path))
    line = one_line_error(failed, 1, "GPT-2", "--vocab")
    named = set(re.findall(r"--[a-z][a-z-]+", line))
    assert named >= {"--vocab", "--mirror"}
    help_text = ok(run(TRAIN_GPT2, ["--help"], tmp_path)).stdout
    assert all(flag in help_text for flag in named), named


def test_make_data_leaves_the_bpe_ranks_where_later_commands_find_them(tmp_path):
    """prepro (here on a small --input text, offline with --vocab) writes
    data/gpt2.tiktoken, byte-identical to OpenAI's file; afterwards prepro and
    train_gpt2.py --prompt work offline from that folder with no option at all."""
    (tmp_path / "story.txt").write_text("\n\n".join(f"Line {i} of a short story." for i in range(40)))
    ok(run(PREPRO, ["--input", "story.txt", "--vocab", VOCAB], tmp_path, env=offline_env(tmp_path)))
    assert (tmp_path / "data" / "gpt2.tiktoken").read_bytes() == VOCAB.read_bytes()
    (tmp_path / "other.txt").write_text("Another text.\n\nWith two sections.")
    ok(run(PREPRO, ["--input", "other.txt"], tmp_path, env=offline_env(tmp_path)))
    out = ok(run(TRAIN_GPT2, ["-e", "d2", "--sample", "--prompt", "Line 41", "-g", 3], tmp_path,
                 env=offline_env(tmp_path)))
    assert sampled_text(out.stdout).startswith("Line 41"), out.stdout  # decoded with data/gpt2_tokenizer.bin


def test_bpe_ranks_written_from_tiktokens_own_encoding(tmp_path, monkeypatch):
    """Online, with no file anywhere, the encoding comes from tiktoken itself; the ranks
    written from it are OpenAI's file, byte for byte."""
    import tiktoken
    import prepro_tinyshakespeare as prepro
    reference = prepro.load_gpt2_encoding(vocab_path=VOCAB)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: reference)
    (tmp_path / "t.txt").write_text("Hello world\n\nHello again")
    assert prepro.main(["--input", "t.txt"]) == 0
    assert (tmp_path / "data" / "gpt2.tiktoken").read_bytes() == VOCAB.read_bytes()


# -----------------------------------------------------------------------------
# 4. Saying what is happening


def test_first_run_compile_is_announced_once(files, tmp_path):
    """With an empty NUMBA_CACHE_DIR the kernels compile, and the run says so before
    the wait; the next run finds the cache and says nothing."""
    env = dict(subprocess_env(), NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"))
    notice = "compiling kernels, first run only (about 15 s)"
    first = ok(run(TRAIN_GPT2, tiny(files, "-x", 1), tmp_path, env=env)).stdout
    assert notice in first and first.index(notice) < first.index("step     1/1"), first
    assert list((tmp_path / "numba_cache").rglob("train_gpt2.*.nbi"))
    second = ok(run(TRAIN_GPT2, tiny(files, "-x", 1), tmp_path, env=env)).stdout
    assert notice not in second, second


class FakeDevice:
    def forward(self, x, y):
        return float(x[0, 0])

    def evaluator(self, B, T):
        assert (B, T) == (1, 1)
        return self


class FakeLoader:
    B = T = 1

    def __init__(self, n):
        self.n, self.i = n, 0

    def reset(self):
        self.i = 0

    def num_batches(self):
        return self.n

    def next_batch(self):
        self.i += 1
        return np.full((1, 1), self.i), None


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_long_evaluation_shows_progress_on_a_terminal_only(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert gpt.evaluate(FakeDevice(), FakeLoader(30), 0) == pytest.approx(15.5)
    assert "val:" in terminal.getvalue() and "0/30 " in terminal.getvalue()  # the bar, on stderr
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert gpt.evaluate(FakeDevice(), FakeLoader(30), 5) == pytest.approx(3.0)  # a few batches: no bar
    assert quiet.getvalue() == ""
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    gpt.evaluate(FakeDevice(), FakeLoader(30), 0)
    assert piped.getvalue() == ""  # not a terminal (logs, tests): nothing


def test_eval_only_says_how_much_it_measures(files, tmp_path):
    out = ok(run(TRAIN_GPT2, tiny(files, "--eval-only"), tmp_path))
    assert "eval: 5 of the 12 val batches of B=2 T=16 (-m 0 for all of them)" in out.stdout
    out = ok(run(TRAIN_GPT2, tiny(files, "--eval-only", "-m", 0), tmp_path))
    assert "eval: 12 of the 12 val batches of B=2 T=16\n" in out.stdout
    assert out.stderr == ""


def test_makefile_shows_what_it_installs():
    """pip runs without -q, after a line that says what is being installed."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "$(PIP) install" in line]
    assert len(installs) == 3 and not any(" -q" in line for line in installs), installs
    for requirements in ("requirements.txt", "requirements-test.txt", "requirements-data.txt"):
        assert re.search(rf"echo \"installing .*{re.escape(requirements)}", makefile), requirements


# -----------------------------------------------------------------------------
# 5. MFU against a stable reference


def test_cpu_peak_rate_is_measured_once_and_cached(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "peak" / "cpu_peak.json"
    monkeypatch.setenv("GPT2PY_CPU_PEAK_CACHE", str(cache))
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    rates = iter([2.0e11, 3.0e11, 4.0e11])
    monkeypatch.setattr(gpt, "measure_cpu_peak_flops", lambda: next(rates))
    assert gpt.cpu_peak_flops() == 2.0e11
    assert gpt.cpu_peak_flops() == 2.0e11  # read back, not measured again
    saved = json.loads(cache.read_text())
    assert list(saved) == [gpt.cpu_peak_key()] and saved[gpt.cpu_peak_key()]["flops"] == 2.0e11
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")  # other BLAS kernels: another entry
    assert gpt.cpu_peak_flops() == 3.0e11
    assert len(json.loads(cache.read_text())) == 2
    capsys.readouterr()
    cache.write_text("{not json")
    assert gpt.cpu_peak_flops() == 4.0e11
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and str(cache) in err[0], err
    assert json.loads(cache.read_text())[gpt.cpu_peak_key()]["flops"] == 4.0e11


def test_measured_peak_is_a_long_best_of_run(monkeypatch):
    calls = []
    real = np.matmul

    def counting(a, b, out=None):
        calls.append(a.shape)
        return real(a, b, out=out)

    monkeypatch.setattr(gpt, "PEAK_SECONDS", 0.0, raising=False)  # the minimum number of products only
    monkeypatch.setattr(np, "matmul", counting)
    rate = gpt.measure_cpu_peak_flops()
    assert rate > 0 and len(calls) == 1 + getattr(gpt, "PEAK_MIN_RUNS", 0) >= 11  # a warm-up, then the runs
    assert set(calls) == {(2048, 2048)}


def cpu_peak_cache_with(path, flops):
    path.write_text(json.dumps({gpt.cpu_peak_key(): {"flops": flops}}))


def test_training_mfu_is_against_the_cached_rate(files, tmp_path):
    """A run without --peak-tflops uses the cached rate (no measurement), says so, and
    its MFU is the step's flops over that rate; a step faster than the cached rate
    proves it was measured under load: it is dropped, to be measured again."""
    cache = tmp_path / "cpu_peak.json"
    env = dict(subprocess_env(), GPT2PY_CPU_PEAK_CACHE=str(cache))  # the same CPU key as this process's
    cpu_peak_cache_with(cache, 1.0e15)
    out = ok(run(TRAIN_GPT2, tiny(files, "-x", 3, "-o", tmp_path / "o", peak=False), tmp_path, env=env))
    assert "MFU is against 1000.000 TFLOP/s (numpy's sgemm rate on this machine, cached in" in out.stdout
    assert "measuring" not in out.stdout
    flops_per_step = gpt.flops_per_token(common.GPT2Config(**CFG), T) * B * T
    records = [r for r in read_log(tmp_path / "o") if r["type"] == "train"]
    assert len(records) == 3
    for r in records:
        assert r["mfu"] == pytest.approx(flops_per_step / 1.0e15 / (r["ms"] / 1000), rel=1e-9)
    assert json.loads(cache.read_text()) == {gpt.cpu_peak_key(): {"flops": 1.0e15}}
    cpu_peak_cache_with(cache, 1.0)  # 1 FLOP/s: every step beats it
    out = ok(run(TRAIN_GPT2, tiny(files, "-x", 3, "-o", tmp_path / "o2", peak=False), tmp_path, env=env))
    assert "it is dropped and measured again next run" in out.stdout
    assert json.loads(cache.read_text()) == {}


# -----------------------------------------------------------------------------
# 7. Counts and rates refuse negatives


@pytest.mark.parametrize("flag,bad,least", [
    ("-l", "-1", "0"), ("--peak-tflops", "-1", "0"), ("-u", "-1", "0"), ("-c", "-0.1", "0"), ("-v", "-1", "0"),
    ("-m", "-1", "0"), ("-s", "-1", "0"), ("-g", "0", "1"), ("-n", "-1", "0"), ("--keep-checkpoints", "-1", "0"),
    ("--grad-clip", "-1", "0"), ("-d", "-64", "0"), ("-x", "-1", "0"), ("-q", "-0.1", "0"), ("-q", "1.5", "1"),
    ("--seed", "-1", "0"), ("--temperature", "-1", "0"), ("--top-k", "-1", "0"), ("--dist-timeout", "-1", "0"),
    ("--beta1", "1", "0"), ("--beta2", "-0.1", "0.9999"), ("--eps", "0", "1e-30"), ("-l", "nan", "1e-3"),
    ("-b", "0", "1"), ("-t", "-2", "1"), ("--shuffle", "2", "0"),
])
def test_counts_and_rates_out_of_range_are_refused(flag, bad, least, capsys, monkeypatch):
    """One line, exit 2, naming the flag; the boundary value (0 where it means off, all,
    measured or greedy) is still taken."""
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        gpt.parse_args([flag, bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err
    gpt.parse_args([flag, least])


@pytest.mark.parametrize("flag", ["-l", "--peak-tflops"])
def test_negative_lr_and_peak_refused_from_the_command_line(files, tmp_path, flag):
    proc = run(TRAIN_GPT2, tiny(files, "-x", 1, flag, -1), tmp_path)
    one_line_error(proc, 2, flag, "at least 0", "-1")
    assert proc.stdout == ""


# -----------------------------------------------------------------------------
# The README's commands use options that exist


def readme_commands(program):
    """The README's shell lines that run program (continuations joined, comments cut)."""
    text = (REPO_ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith(f"python {program}"):
            commands.append(shlex.split(line)[2:])
    return commands


def test_readme_train_gpt2_commands_parse(tmp_path, monkeypatch):
    """Every `python train_gpt2.py ...` line of the README is a valid command line
    (run from a checkout where make data has run: data/gpt2.tiktoken exists)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gpt2.tiktoken").write_bytes(b"")
    commands = readme_commands("train_gpt2.py")
    assert any(c[c.index("-x") + 1] == "0" for c in commands if "-x" in c and "--export-hf" in c)
    for argv in commands:
        if "--device" in argv:
            continue  # the GPU section's commands
        gpt.parse_args(argv)
