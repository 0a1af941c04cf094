"""File formats (checkpoints, token files, debug states), input validation and the
DataLoader, checked against the llm.c layouts written out here by hand."""

import shutil
from pathlib import Path

import numpy as np
import pytest

import test_gpt2
import gpt2_common as common
import train_gpt2 as gpt
from conftest import (CHECKPOINT_MAGIC, HEADER_BYTES, TEST_GPT2, TINY, TINY_B, TINY_T, llmc_layout,
                      run_python, write_token_file)


def num_params_by_formula(maxT, V, Vp, L, NH, C):
    """wte + wpe + L * (ln1 2C, qkv 3C^2+3C, attproj C^2+C, ln2 2C, fc 4C^2+4C, fcproj 4C^2+C) + lnf 2C."""
    return Vp * C + maxT * C + L * (12 * C * C + 13 * C) + 2 * C


def test_parameter_count_and_layout_match_llmc():
    assert num_params_by_formula(1024, 50257, 50304, 12, 12, 768) == 124_475_904  # GPT-2 124M, padded
    cfg = common.GPT2Config(**TINY)
    model = common.GPT2(cfg)
    assert model.num_parameters == num_params_by_formula(*(TINY[k] for k in (
        "max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels")))
    ours = [(name, tuple(shape)) for name, shape in common.parameter_shapes(cfg)]
    assert ours == [(name, shape) for name, shape, _, _ in llmc_layout(**TINY)]
    assert common.padded_vocab(50257) == 50304 and common.padded_vocab(64) == 128 and common.padded_vocab(128) == 128


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tiny_model, tmp_path):
    path = tmp_path / "ckpt.bin"
    tiny_model.params_memory[:] = np.random.default_rng(3).standard_normal(tiny_model.num_parameters)
    common.write_checkpoint(tiny_model, str(path))
    # the bytes on disk, read by hand: 256-int32 header, then the float32 buffer
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:8]) == [CHECKPOINT_MAGIC, 3, 16, 64, 2, 2, 32, 128]
    assert np.all(header[8:] == 0)
    assert len(raw) == HEADER_BYTES + 4 * tiny_model.num_parameters
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<f4").tobytes() == tiny_model.params_memory.tobytes()
    # and back
    loaded = common.read_checkpoint(str(path))
    assert loaded.cfg == tiny_model.cfg
    assert loaded.params_memory.dtype == np.float32
    assert loaded.params_memory.tobytes() == tiny_model.params_memory.tobytes()
    assert not list(tmp_path.glob("*.tmp*")), "no temp file left behind"


def test_bf16_training_checkpoint_is_llmc_v5_and_resumes_exactly(tiny_model, tmp_path):
    """A bf16 run's checkpoint: the weights file is llm.c's version 5 (bf16, what llm.c's
    bf16 trainer writes and reads), the state file (version 2) carries the float32 master
    weights, and loading the pair gives back the exact float32 weights, m, v and step."""
    rng = np.random.default_rng(8)
    n = tiny_model.num_parameters
    tiny_model.params_memory[:] = rng.standard_normal(n)
    common.ensure_optimizer_buffers(tiny_model)
    tiny_model.m_memory[:], tiny_model.v_memory[:] = rng.standard_normal(n), rng.random(n)
    tiny_model.step = 5
    out = tmp_path / "o"
    out.mkdir()
    path = common.save_training_checkpoint(tiny_model, str(out), 5, {"note": "x"}, keep_last=2, bfloat16=True)
    raw = Path(path).read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:2]) == [CHECKPOINT_MAGIC, 5] and len(raw) == HEADER_BYTES + 2 * n
    assert np.array_equal(np.frombuffer(raw[HEADER_BYTES:], dtype="<u2"),
                          common.float32_to_bfloat16(tiny_model.params_memory))
    state = (out / "state_00000005.bin").read_bytes()
    assert list(np.frombuffer(state[:20], dtype="<i4")) == [common.STATE_FILE_MAGIC, 2, n, len(state) - HEADER_BYTES -
                                                            12 * n, 1]
    loaded, extra = common.load_training_checkpoint(str(out))
    assert extra["note"] == "x" and loaded.step == 5
    for got, want in ((loaded.params_memory, tiny_model.params_memory), (loaded.m_memory, tiny_model.m_memory),
                      (loaded.v_memory, tiny_model.v_memory)):
        assert got.tobytes() == want.tobytes()
    # the weights file alone is a bf16 model (what -e takes): the master weights rounded
    alone = common.read_checkpoint(path)
    assert np.array_equal(alone.params_memory, common.bfloat16_to_float32(common.float32_to_bfloat16(
        tiny_model.params_memory)))


def test_torch_reference_checkpoint_loads(reference):
    import torch_reference
    model = common.read_checkpoint(str(reference["checkpoint"]))
    assert model.cfg == common.GPT2Config(**reference["recipe_data"]["config"])
    assert model.cfg == common.GPT2Config(**TINY)
    # the same weights as PyTorch's llm.c init with the same seed, tensor by tensor
    tm = torch_reference.init_llmc(torch_reference.GPT2(torch_reference.GPT2Config(**TINY)), 1337)
    for (name, tensor), (lname, shape, start, end) in zip(torch_reference.llmc_tensors(tm), llmc_layout(**TINY)):
        assert name == lname
        np.testing.assert_array_equal(model.params_memory[start:end].reshape(shape), tensor.numpy(), err_msg=name)
    assert np.all(model.params.wte[TINY["vocab_size"]:] == 0.0)


def test_random_init_follows_llmc_scheme(tiny_cfg):
    model = common.gpt2_init_random(tiny_cfg, seed=0)
    p, L = model.params, tiny_cfg.num_layers
    for name in ("ln1w", "ln2w", "lnfw"):
        assert np.all(getattr(p, name) == 1.0), name
    for name in ("ln1b", "ln2b", "lnfb", "qkvb", "attprojb", "fcb", "fcprojb"):
        assert np.all(getattr(p, name) == 0.0), name
    assert np.all(p.wte[tiny_cfg.vocab_size:] == 0.0)
    for name, std in (("wte", 0.02), ("qkvw", 0.02), ("fcw", 0.02), ("fcprojw", 0.02 / np.sqrt(2 * L)),
                      ("attprojw", 0.02 / np.sqrt(2 * L))):
        w = getattr(p, name)
        w = w[:tiny_cfg.vocab_size] if name == "wte" else w
        assert abs(float(np.std(w)) - std) < 0.1 * std, name


def write_checkpoint_bytes(path, header_values, num_floats):
    header = np.zeros(256, dtype="<i4")
    header[:len(header_values)] = header_values
    Path(path).write_bytes(header.tobytes() + np.zeros(num_floats, dtype="<f4").tobytes())
    return path


TINY_HEADER = [CHECKPOINT_MAGIC, 3, 16, 64, 2, 2, 32, 128]
TINY_FLOATS = num_params_by_formula(16, 64, 128, 2, 2, 32)


@pytest.mark.parametrize("case,header,floats,message", [
    ("wrong magic", [20240327] + TINY_HEADER[1:], TINY_FLOATS, "bad magic number 20240327"),
    ("unsupported version", [CHECKPOINT_MAGIC, 4] + TINY_HEADER[2:], TINY_FLOATS, "unsupported version 4"),
    ("bfloat16", [CHECKPOINT_MAGIC, 5] + TINY_HEADER[2:], TINY_FLOATS, "bfloat16"),
    ("truncated", TINY_HEADER, TINY_FLOATS - 1, "truncated"),
    ("too long", TINY_HEADER, TINY_FLOATS + 1, "corrupt"),
    ("heads do not divide channels", TINY_HEADER[:5] + [3] + TINY_HEADER[6:], TINY_FLOATS, "impossible model"),
])
def test_bad_checkpoint_raises_user_error(tmp_path, case, header, floats, message):
    path = write_checkpoint_bytes(tmp_path / "bad.bin", header, floats)
    with pytest.raises(common.UserError) as info:
        common.read_checkpoint(str(path))
    assert message in str(info.value) and str(path) in str(info.value)


def test_checkpoint_shorter_than_header(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(np.array(TINY_HEADER, dtype="<i4").tobytes())
    with pytest.raises(common.UserError, match="too short"):
        common.read_checkpoint(str(path))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(common.UserError, match="checkpoint not found"):
        common.read_checkpoint(str(tmp_path / "nope.bin"))


# ----------------------------------------------------------------------------- token files


def test_read_token_file(tmp_path):
    tokens = np.array([50256, 5962, 22307, 25, 198, 0, 65535], dtype=np.uint16)
    path = write_token_file(tmp_path / "t.bin", tokens)
    got = common.read_token_file(str(path))
    np.testing.assert_array_equal(np.asarray(got), tokens)


@pytest.mark.parametrize("case,kwargs,cut,message", [
    ("wrong magic", dict(magic=20240326), 0, "bad magic number"),
    ("unsupported version", dict(version=2), 0, "unsupported version 2"),
    ("truncated", {}, 2, "truncated"),
    ("count larger than file", dict(ntok=11), 0, "truncated"),
    ("zero tokens", dict(ntok=0), 20, "0 tokens"),
])
def test_bad_token_file(tmp_path, case, kwargs, cut, message):
    path = write_token_file(tmp_path / "t.bin", np.arange(10), **kwargs)
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(common.UserError, match=message):
        common.read_token_file(str(path), 64)


def test_token_id_outside_vocab(tmp_path):
    path = write_token_file(tmp_path / "t.bin", [1, 2, 64, 3])
    with pytest.raises(common.UserError, match="token id 64 is outside the vocabulary"):
        common.read_token_file(str(path), 64)
    assert common.read_token_file(str(path), 65) is not None


def test_missing_token_file(tmp_path):
    with pytest.raises(common.UserError, match="token file not found"):
        common.read_token_file(str(tmp_path / "none.bin"))
    with pytest.raises(common.UserError, match="no token file matches"):
        common.DataLoader(str(tmp_path / "none_*.bin"), 2, 4, 64)


def test_token_file_too_small_for_a_batch(tmp_path):
    path = write_token_file(tmp_path / "t.bin", np.arange(8))  # 7 // 4 = 1 sample < B=2
    with pytest.raises(common.UserError, match="too few for one batch"):
        common.DataLoader(str(path), 2, 4, 64)


# ----------------------------------------------------------------------------- sequence length


def test_sequence_longer_than_max_seq_len(tiny_model):
    T = TINY["max_seq_len"] + 1
    with pytest.raises(common.UserError, match=f"T={T} exceeds the model's max_seq_len=16"):
        gpt.ensure_activations(tiny_model, 1, T)
    with pytest.raises(common.UserError, match="max_seq_len"):
        gpt.gpt2_forward(tiny_model, np.zeros((1, T), np.int32), np.zeros((1, T), np.int32))
    with pytest.raises(common.UserError, match="max_seq_len"):
        gpt.generate(tiny_model, [1, 2, 3], 14)
    gpt.gpt2_forward(tiny_model, np.zeros((1, T - 1), np.int32))  # T == max_seq_len is fine


# ----------------------------------------------------------------------------- debug state


def test_read_debug_state_matches_layout(reference):
    from conftest import read_state_file
    cfg = common.GPT2Config(**TINY)
    x, y, logits, loss, grads = test_gpt2.read_debug_state(str(reference["state"]), cfg)
    mine = read_state_file(reference["state"], TINY["vocab_size"], llmc_layout(**TINY)[-1][3])
    assert (mine["B"], mine["T"]) == (TINY_B, TINY_T)
    np.testing.assert_array_equal(x, mine["x"])
    np.testing.assert_array_equal(y, mine["y"])
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    np.testing.assert_array_equal(logits, mine["logits"])
    assert loss == mine["loss"] == pytest.approx(reference["recipe_data"]["losses"][0], rel=1e-7)
    np.testing.assert_array_equal(grads, mine["grads"])


def test_missing_debug_state(tmp_path):
    with pytest.raises(common.UserError, match="debug state not found"):
        test_gpt2.read_debug_state(str(tmp_path / "none.bin"), common.GPT2Config(**TINY))


# ----------------------------------------------------------------------------- the CLI's errors


def assert_cli_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def other_shape_checkpoint(tmp_path_factory):
    """A checkpoint of another shape (C=16): the tiny debug state does not fit it."""
    path = tmp_path_factory.mktemp("other") / "c16.bin"
    common.write_checkpoint(common.gpt2_init_random(common.GPT2Config(16, 64, 128, 2, 2, 16), seed=1), str(path))
    return path


def test_cli_mismatched_state(reference, other_shape_checkpoint):
    proc = run_python([TEST_GPT2, "--checkpoint", other_shape_checkpoint, "--state", reference["state"]])
    assert_cli_error(proc, str(reference["state"]), "wrong pair of files")


@pytest.mark.parametrize("case", ["missing checkpoint", "missing state", "bad magic", "truncated state",
                                  "token out of vocab"])
def test_cli_bad_inputs(reference, tmp_path, case):
    ckpt, state = tmp_path / "m.bin", tmp_path / "s.bin"
    shutil.copy(reference["checkpoint"], ckpt)
    shutil.copy(reference["state"], state)
    expect = []
    if case == "missing checkpoint":
        ckpt.unlink()
        expect = ["checkpoint not found", str(ckpt)]
    elif case == "missing state":
        state.unlink()
        expect = ["debug state not found", str(state)]
    elif case == "bad magic":
        raw = bytearray(ckpt.read_bytes())
        raw[:4] = np.array([12345], "<i4").tobytes()
        ckpt.write_bytes(bytes(raw))
        expect = ["bad magic number 12345"]
    elif case == "truncated state":
        state.write_bytes(state.read_bytes()[:-4])
        expect = [str(state), "truncated"]
    elif case == "token out of vocab":
        raw = bytearray(state.read_bytes())
        raw[HEADER_BYTES:HEADER_BYTES + 4] = np.array([TINY["vocab_size"]], "<i4").tobytes()  # x[0, 0]
        state.write_bytes(bytes(raw))
        expect = [f"token id {TINY['vocab_size']} is outside the vocabulary"]
    proc = run_python([TEST_GPT2, "--checkpoint", ckpt, "--state", state])
    assert_cli_error(proc, *expect)


# ----------------------------------------------------------------------------- DataLoader


def test_loader_checks_a_shard_when_first_read_and_names_it(tmp_path):
    """Opening many shards reads only their headers; a shard's ids are checked when a
    batch first comes from it, and a bad one is named in one line then (not at start)."""
    good = write_token_file(tmp_path / "data_000001.bin", np.arange(40) % 64)
    bad = write_token_file(tmp_path / "data_000002.bin", list(np.arange(39) % 64) + [64])
    loader = common.DataLoader(str(tmp_path / "data_*.bin"), 2, 4, 64)  # opens: the bad id is not read yet
    assert loader.paths == [str(good), str(bad)] and loader.num_batches() == 2 * 4
    for _ in range(4):
        loader.next_batch()  # the good shard
    with pytest.raises(common.UserError, match=f"{bad}: token id 64 is outside the vocabulary"):
        loader.next_batch()


LV = 1000  # the loader tests' vocabulary


def make_tokens(tmp_path, n, name="t.bin", start=0):
    tokens = (np.arange(n) * 7 + start) % LV  # all distinct for n < LV: shifts are visible
    return write_token_file(tmp_path / name, tokens), tokens


def collect(loader, n):
    return [tuple(a.copy() for a in loader.next_batch()) for _ in range(n)]


def test_dataloader_sequential_matches_llmc_chunks(tmp_path):
    B, T = 2, 4
    path, tokens = make_tokens(tmp_path, 3 * B * T + 3)  # 3 full batches, a few tokens left over
    loader = common.DataLoader(str(path), B, T, LV)
    assert loader.num_batches() == 3
    batches = collect(loader, 7)
    for i, (x, y) in enumerate(batches):
        j = i % 3  # wraps around after 3 batches
        assert x.dtype == np.int32 and x.shape == (B, T)
        np.testing.assert_array_equal(x.reshape(-1), tokens[j * B * T: j * B * T + B * T], err_msg=f"batch {i}")
        np.testing.assert_array_equal(y.reshape(-1), tokens[j * B * T + 1: j * B * T + B * T + 1], err_msg=f"batch {i}")


def test_dataloader_shuffle_is_a_seeded_permutation(tmp_path):
    B, T = 2, 4
    path, tokens = make_tokens(tmp_path, 20 * T + 1)  # 20 samples, 10 batches
    rows = lambda batches: [tuple(x[r]) + (int(y[r, -1]),) for x, y in batches for r in range(B)]  # noqa: E731
    sequential = rows(collect(common.DataLoader(str(path), B, T, LV), 10))
    a = rows(collect(common.DataLoader(str(path), B, T, LV, shuffle=True, seed=1), 10))
    b = rows(collect(common.DataLoader(str(path), B, T, LV, shuffle=True, seed=1), 10))
    c = rows(collect(common.DataLoader(str(path), B, T, LV, shuffle=True, seed=2), 10))
    assert sorted(a) == sorted(sequential) and len(set(a)) == 20
    assert sorted(c) == sorted(sequential)
    assert a == b
    assert a != c
    assert a != sequential
    # every shuffled sample is still a contiguous window with its target shifted by one
    for x, y in collect(common.DataLoader(str(path), B, T, LV, shuffle=True, seed=3), 10):
        for r in range(B):
            np.testing.assert_array_equal(x[r, 1:], y[r, :-1])
            assert (int(y[r, -1]) - int(x[r, -1])) % LV == 7
    # the second epoch is again a permutation of all samples
    loader = common.DataLoader(str(path), B, T, LV, shuffle=True, seed=1)
    two_epochs = rows(collect(loader, 20))
    assert sorted(two_epochs[20:]) == sorted(sequential)


@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloader_state_resumes_exact_next_batch(tmp_path, shuffle):
    B, T = 2, 4
    path_a, _ = make_tokens(tmp_path, 6 * T + 1, "shard_000.bin")
    path_b, _ = make_tokens(tmp_path, 8 * T + 1, "shard_001.bin", start=3)
    pattern = str(tmp_path / "shard_*.bin")
    reference = common.DataLoader(pattern, B, T, LV, shuffle=shuffle, seed=9)
    assert reference.num_batches() == 3 + 4
    expected = collect(reference, 20)  # crosses both files and two epochs
    for k in (0, 2, 3, 6, 7, 11):
        loader = common.DataLoader(pattern, B, T, LV, shuffle=shuffle, seed=9)
        collect(loader, k)
        saved = dict(loader.state())
        resumed = common.DataLoader(pattern, B, T, LV, shuffle=shuffle, seed=9)
        resumed.set_state(saved)
        for i, (x, y) in enumerate(collect(resumed, 20 - k)):
            np.testing.assert_array_equal(x, expected[k + i][0], err_msg=f"resume at {k}, batch {k + i}")
            np.testing.assert_array_equal(y, expected[k + i][1], err_msg=f"resume at {k}, batch {k + i}")


def test_dataloader_visits_files_in_order(tmp_path):
    B, T = 2, 4
    _, ta = make_tokens(tmp_path, 2 * B * T + 1, "shard_000.bin")
    _, tb = make_tokens(tmp_path, 1 * B * T + 1, "shard_001.bin", start=5)
    loader = common.DataLoader(str(tmp_path / "shard_*.bin"), B, T, LV)
    got = [x.reshape(-1) for x, _ in collect(loader, 4)]
    np.testing.assert_array_equal(got[0], ta[:8])
    np.testing.assert_array_equal(got[1], ta[8:16])
    np.testing.assert_array_equal(got[2], tb[:8])
    np.testing.assert_array_equal(got[3], ta[:8])


def test_dataloader_checks_vocab(tmp_path):
    path = write_token_file(tmp_path / "t.bin", [1, 2, 3, 4, 5, 6, 7, 8, 99])
    loader = common.DataLoader(str(path), 1, 4, 64)
    with pytest.raises(common.UserError, match="token id 99"):
        loader.next_batch()


def test_torch_reference_tokens_option(tmp_path):
    """dev/torch_reference.py --tokens takes x = first B*T tokens, y = tokens 1..B*T."""
    path = write_token_file(tmp_path / "t.bin", (np.arange(40) * 7) % 64)
    ckpt, state = tmp_path / "m.bin", tmp_path / "s.bin"
    proc = run_python([Path(__file__).resolve().parents[1] / "dev" / "torch_reference.py", "--layers", 1,
                       "--heads", 2, "--channels", 16, "--vocab-size", 64, "--max-seq-len", 16, "--B", 2, "--T", 8,
                       "--steps", 1, "--tokens", path, "--out-checkpoint", ckpt, "--out-state", state])
    assert proc.returncode == 0, proc.stderr
    cfg = common.read_checkpoint(str(ckpt)).cfg
    x, y, *_ = test_gpt2.read_debug_state(str(state), cfg)
    loader = common.DataLoader(str(path), 2, 8, 64)
    lx, ly = loader.next_batch()
    np.testing.assert_array_equal(x, lx)
    np.testing.assert_array_equal(y, ly)


# ----------------------------------------------------------------------------- train_gpt2.py's CLI

TRAIN = Path(__file__).resolve().parents[1] / "train_gpt2.py"


def val_file_from_state(reference, path):
    """A token file whose first B*T+1 tokens are the reference state's batch."""
    from conftest import read_state_file
    st = read_state_file(reference["state"], TINY["vocab_size"], llmc_layout(**TINY)[-1][3])
    x, y = st["x"], st["y"]
    assert np.array_equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])  # contiguous B*T+1 tokens
    return write_token_file(path, np.concatenate([x.reshape(-1), y.reshape(-1)[-1:]]))


def run_train(*args, cwd):
    return run_python([TRAIN, "--tokenizer", "no_tokenizer.bin", *args], cwd=cwd)


def test_train_cli_eval_only_matches_reference_loss(reference, tmp_path):
    val = val_file_from_state(reference, tmp_path / "val.bin")
    proc = run_train("-e", reference["checkpoint"], "-j", val, "--eval-only", "-b", TINY_B, "-t", TINY_T, "-m", 1,
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("val loss"))
    assert float(line.split()[2]) == pytest.approx(reference["recipe_data"]["losses"][0], abs=2e-6)


@pytest.mark.parametrize("case", ["missing checkpoint", "bad magic", "missing val file", "token out of vocab",
                                  "T > max_seq_len", "truncated val file"])
def test_train_cli_bad_inputs(reference, tmp_path, case):
    ckpt = tmp_path / "m.bin"
    shutil.copy(reference["checkpoint"], ckpt)
    val = val_file_from_state(reference, tmp_path / "val.bin")
    T = TINY_T
    if case == "missing checkpoint":
        ckpt.unlink()
        expect = ["checkpoint not found", str(ckpt)]
    elif case == "bad magic":
        raw = bytearray(ckpt.read_bytes())
        raw[:4] = np.array([777], "<i4").tobytes()
        ckpt.write_bytes(bytes(raw))
        expect = ["bad magic number 777"]
    elif case == "missing val file":
        val.unlink()
        expect = ["no token file matches", str(val)]
    elif case == "token out of vocab":
        write_token_file(val, [1, 2, 3] + [TINY["vocab_size"]] + list(range(20)))
        expect = [f"token id {TINY['vocab_size']} is outside the vocabulary", str(val)]
    elif case == "T > max_seq_len":
        T = TINY["max_seq_len"] + 1
        expect = [f"{T} exceeds the model's max_seq_len={TINY['max_seq_len']}"]
    elif case == "truncated val file":
        val.write_bytes(val.read_bytes()[:-1])
        expect = [str(val), "truncated"]
    proc = run_train("-e", ckpt, "-j", val, "--eval-only", "-b", 1, "-t", T, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in expect:
        assert fragment in lines[0], lines[0]


def test_forward_rejects_out_of_range_ids(tiny_model):
    """The kernels index the embedding with the ids unchecked: gpt2_forward checks them."""
    x = np.zeros((2, 8), dtype=np.int32)
    y = np.zeros((2, 8), dtype=np.int32)
    x[1, 3] = 64  # vocab_size of the tiny config
    with pytest.raises(common.UserError, match="token id 64 is outside the vocabulary"):
        gpt.gpt2_forward(tiny_model, x, y)
    x[1, 3] = -2
    with pytest.raises(common.UserError, match="token id -2"):
        gpt.gpt2_forward(tiny_model, x, y)
    x[1, 3] = 0
    y[0, 0] = -2  # only -1 masks
    with pytest.raises(common.UserError, match="targets"):
        gpt.gpt2_forward(tiny_model, x, y)
    y[0, 0] = -1
    assert np.isfinite(gpt.gpt2_forward(tiny_model, x, y))
