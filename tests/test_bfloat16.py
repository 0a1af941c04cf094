"""bfloat16: the rounding helpers against PyTorch's own conversions, over every bfloat16
value and every rounding boundary, and llm.c version-5 (bfloat16) checkpoints: a file
laid out by hand from llm.c's format loads with -e, and ours writes the same bytes.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt2_common as common
from conftest import REPO_ROOT, subprocess_env, write_token_file

ALL_BF16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def torch_bits(values_f32):
    """PyTorch's round-to-nearest-even float32 -> bfloat16, as uint16 bit patterns."""
    return torch.from_numpy(values_f32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_widening_is_exact_for_every_bfloat16_value():
    ours = common.bfloat16_to_float32(ALL_BF16)
    theirs = torch.from_numpy(ALL_BF16.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("low", [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xC000])
def test_rounding_matches_pytorch_for_every_high_half(low):
    """Every float32 whose top 16 bits are anything and whose bottom 16 bits sit at (or
    next to) a rounding boundary: ties to even, carries into the exponent, overflow to
    inf, subnormals, signed zeros."""
    x = ((ALL_BF16.astype(np.uint32) << 16) | np.uint32(low)).view(np.float32)
    ours, theirs = common.float32_to_bfloat16(x), torch_bits(x)
    finite = ~np.isnan(x)
    assert np.array_equal(ours[finite], theirs[finite])
    assert np.isnan(common.bfloat16_to_float32(ours[~finite])).all()  # NaN stays NaN (never rounds to inf)


def test_rounding_matches_pytorch_on_random_floats():
    x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32) * np.float32(1e3)
    assert np.array_equal(common.float32_to_bfloat16(x), torch_bits(x))


CFG = common.GPT2Config(16, 64, 128, 2, 2, 32)


def hand_made_v5(path, values_f32):
    """An llm.c version-5 checkpoint laid out from the format notes: 256 int32 header,
    then every parameter as bfloat16 (PyTorch's rounding)."""
    header = np.zeros(256, dtype="<i4")
    header[:8] = [20240326, 5, CFG.max_seq_len, CFG.vocab_size, CFG.num_layers, CFG.num_heads, CFG.channels,
                  CFG.padded_vocab_size]
    path.write_bytes(header.tobytes() + torch_bits(values_f32).tobytes())


def test_llmc_bfloat16_checkpoint_loads_and_ours_writes_the_same_bytes(tmp_path):
    model = common.gpt2_init_random(CFG, seed=5)
    hand_made_v5(tmp_path / "llmc_bf16.bin", model.params_memory)
    loaded = common.read_checkpoint(str(tmp_path / "llmc_bf16.bin"))
    assert loaded.cfg == CFG
    expected = torch.from_numpy(model.params_memory).to(torch.bfloat16).float().numpy()
    assert np.array_equal(loaded.params_memory, expected)
    common.write_checkpoint(model, str(tmp_path / "ours_bf16.bin"), bfloat16=True)
    assert (tmp_path / "ours_bf16.bin").read_bytes() == (tmp_path / "llmc_bf16.bin").read_bytes()
    # a truncated version-5 file is refused with its expected size
    (tmp_path / "cut.bin").write_bytes((tmp_path / "llmc_bf16.bin").read_bytes()[:-2])
    with pytest.raises(common.UserError, match="truncated or corrupt"):
        common.read_checkpoint(str(tmp_path / "cut.bin"))


def test_eval_only_of_a_bfloat16_checkpoint_equals_its_float32_widening(tmp_path):
    model = common.gpt2_init_random(CFG, seed=6)
    hand_made_v5(tmp_path / "bf16.bin", model.params_memory)
    model.params_memory[:] = common.read_checkpoint(str(tmp_path / "bf16.bin")).params_memory
    common.write_checkpoint(model, str(tmp_path / "f32.bin"))
    write_token_file(tmp_path / "val.bin", (np.arange(200) * 3) % 64)
    losses = []
    for name in ("bf16.bin", "f32.bin"):
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "train_gpt2.py"), "-e", str(tmp_path / name), "-j",
                               str(tmp_path / "val.bin"), "--eval-only", "-b", "2", "-t", "16", "--tokenizer", "none"],
                              env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        losses.append(proc.stdout.split("val loss ")[1].split()[0])
    assert losses[0] == losses[1]
