"""Shared fixtures for the train_gpt2 / test_gpt2 suites.

Everything is tiny (L=2, NH=2, C=32, V=64, Vp=128, maxT=16, B=2, T=8) so that the
Numba kernels compile once and every test runs in well under a second afterwards.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
TORCH_REFERENCE = REPO_ROOT / "dev" / "torch_reference.py"
TEST_GPT2 = REPO_ROOT / "test_gpt2.py"

for _p in (str(REPO_ROOT), str(REPO_ROOT / "dev"), str(REPO_ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import gpt2_common as common  # noqa: E402

pytest_plugins = ["ci_skips"]  # under CI=true, a skip fails the run

# The tiny model every model-level test uses.
TINY = dict(max_seq_len=16, vocab_size=64, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)
TINY_B, TINY_T = 2, 8
REFERENCE_SEED = 1337

# Header layout of llm.c files, written here from the format notes (not from the code under test).
HEADER_BYTES = 256 * 4
CHECKPOINT_MAGIC = 20240326
STATE_MAGIC = 20240327
TOKENS_MAGIC = 20240520


def subprocess_env():
    """Environment for child processes: the repo importable, same thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_python(args, cwd=REPO_ROOT, timeout=300):
    """Run `python args...` and return the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=str(cwd), env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def write_token_file(path, tokens, magic=TOKENS_MAGIC, version=1, ntok=None):
    """An llm.c token file: 256 int32 header (magic, version, count), then uint16 tokens."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = magic, version, tokens.size if ntok is None else ntok
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    return path


@pytest.fixture(scope="session")
def tiny_cfg():
    return common.GPT2Config(**TINY)


@pytest.fixture
def tiny_model(tiny_cfg):
    """A fresh random-init tiny model (llm.c init scheme, seed 0)."""
    return common.gpt2_init_random(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """A tiny PyTorch reference (checkpoint, debug state, recipe sidecar) dumped once
    per session by dev/torch_reference.py."""
    out = tmp_path_factory.mktemp("reference")
    checkpoint, state = out / "tiny.bin", out / "tiny_state.bin"
    proc = run_python([TORCH_REFERENCE, "--layers", TINY["num_layers"], "--heads", TINY["num_heads"],
                       "--channels", TINY["channels"], "--vocab-size", TINY["vocab_size"],
                       "--max-seq-len", TINY["max_seq_len"], "--B", TINY_B, "--T", TINY_T,
                       "--seed", REFERENCE_SEED, "--steps", 10,
                       "--out-checkpoint", checkpoint, "--out-state", state])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recipe = Path(str(state) + ".json")
    assert checkpoint.is_file() and state.is_file() and recipe.is_file()
    return {"dir": out, "checkpoint": checkpoint, "state": state, "recipe": recipe,
            "recipe_data": json.loads(recipe.read_text())}


def read_state_file(path, V, num_parameters):
    """Parse a debug state from the documented layout: header, x, y (int32 B*T),
    logits (B*T*V float32), loss, grads. Returns a dict plus byte offsets."""
    raw = Path(path).read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[0] == STATE_MAGIC and header[1] == 2
    B, T = int(header[2]), int(header[3])
    off = HEADER_BYTES
    x = np.frombuffer(raw, dtype="<i4", count=B * T, offset=off).reshape(B, T)
    off += 4 * B * T
    y = np.frombuffer(raw, dtype="<i4", count=B * T, offset=off).reshape(B, T)
    off += 4 * B * T
    logits_offset = off
    logits = np.frombuffer(raw, dtype="<f4", count=B * T * V, offset=off).reshape(B * T, V)
    off += 4 * B * T * V
    loss = float(np.frombuffer(raw, dtype="<f4", count=1, offset=off)[0])
    off += 4
    grads_offset = off
    grads = np.frombuffer(raw, dtype="<f4", count=num_parameters, offset=off)
    assert off + 4 * num_parameters == len(raw)
    return {"B": B, "T": T, "x": x, "y": y, "logits": logits, "loss": loss, "grads": grads,
            "logits_offset": logits_offset, "grads_offset": grads_offset}


def llmc_layout(max_seq_len, vocab_size, padded_vocab_size, num_layers, num_heads, channels):
    """(name, shape, start, end) of the 16 checkpoint tensors, from llm.c's documented order."""
    C, L, Vp, maxT = channels, num_layers, padded_vocab_size, max_seq_len
    shapes = [("wte", (Vp, C)), ("wpe", (maxT, C)), ("ln1w", (L, C)), ("ln1b", (L, C)),
              ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)),
              ("ln2w", (L, C)), ("ln2b", (L, C)), ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
              ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)), ("lnfw", (C,)), ("lnfb", (C,))]
    out, off = [], 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out.append((name, shape, off, off + n))
        off += n
    return out


def load_torch_reference_model(checkpoint, dtype=None):
    """The PyTorch model of dev/torch_reference.py with a checkpoint's weights."""
    import torch_reference
    model = torch_reference.load_llmc_checkpoint(str(checkpoint))
    return model.to(dtype) if dtype is not None else model


def torch_grads_flat(model):
    """Gradients of a torch_reference.GPT2 in llm.c checkpoint order, float64 numpy."""
    import torch_reference
    return np.concatenate([t.detach().double().reshape(-1).numpy()
                           for _, t in torch_reference.llmc_tensors(model, grads=True)])


LLMC_DATA_DIR = SHARED / "anchors" / "llmc" / "dev" / "data"  # llm.c's dev/data scripts: the real writers


# the prepro tests read the offline GPT-2 ranks and tinyshakespeare, and compare with llm.c's own writers
needs_shared_data_and_llmc = pytest.mark.skipif(
    not (SHARED_DATA / "gpt2.tiktoken").is_file() or not (SHARED_DATA / "tinyshakespeare.txt").is_file()
    or not (LLMC_DATA_DIR / "data_common.py").is_file(),
    reason=f"needs {SHARED_DATA} (gpt2.tiktoken, tinyshakespeare.txt) and llm.c's {LLMC_DATA_DIR}",
)


def reference_encoding():
    """The GPT-2 encoding built from the documented recipe (shared/docs/llmc-facts.md), not
    through the code under test."""
    import tiktoken
    import tiktoken.load
    return tiktoken.Encoding(
        name="gpt2_reference",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(SHARED_DATA / "gpt2.tiktoken")),
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


def llmc_data_common():
    """llm.c's dev/data/data_common.py (write_datafile, write_evalfile), imported from the anchors."""
    if str(LLMC_DATA_DIR) not in sys.path:
        sys.path.insert(0, str(LLMC_DATA_DIR))
    import data_common
    return data_common


class FakeResponse:
    """A requests response standing in for a download: the payload in chunks."""

    def __init__(self, payload):
        self.payload = payload
        self.headers = {"content-length": str(len(payload))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        for start in range(0, len(self.payload), chunk_size):
            yield self.payload[start:start + chunk_size]


def assert_help_documents_every_flag(result, parser, needles):
    """A script's --help run (result) exits 0 and names every option of its parser, each
    with a help text, and each of needles."""
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for action in parser._actions:
        assert action.help, action.option_strings
        for option in action.option_strings:
            assert option in help_text
    for needle in needles:
        assert needle in help_text


@pytest.fixture(scope="session")
def shared_data():
    """/work/shared/data (the offline mirror: tinyshakespeare.txt, gpt2.tiktoken), found
    relative to the checkout."""
    return SHARED_DATA
