"""Whole-model tests: parity with PyTorch through test_gpt2.py, gradient accumulation,
masked targets, determinism (in-process and across processes) and KV-cache sampling.

A whole-model float64 finite-difference check is not possible: the model allocates
float32 buffers. The PyTorch parity below (every gradient, tolerances ~1e-6 of each
tensor's largest value) stands in for it; the layer gradient checks are in test_layers.py.
"""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2_common as common
import train_gpt2 as gpt
from conftest import (TEST_GPT2, TINY, TINY_B, TINY_T, TORCH_REFERENCE, llmc_layout,
                      load_torch_reference_model, read_state_file, run_python, torch_grads_flat)

PARAM_NAMES = [name for name, *_ in llmc_layout(**TINY)]
NUM_PARAMETERS = llmc_layout(**TINY)[-1][3]
REPORT_LINE = re.compile(r"^(logits|loss|grad \w+|step \d+ loss)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(ok|FAIL)\s*$")


def parse_report(stdout):
    """{tensor name: verdict} from test_gpt2.py's table."""
    verdicts = {}
    for line in stdout.splitlines():
        m = REPORT_LINE.match(line)
        if m:
            assert m.group(1) not in verdicts, f"tensor reported twice: {m.group(1)}"
            verdicts[m.group(1)] = m.group(6)
    return verdicts


def expected_names(steps):
    return {"logits", "loss"} | {f"grad {n}" for n in PARAM_NAMES} | {f"step {i} loss" for i in range(steps)}


def run_parity(checkpoint, state):
    return run_python([TEST_GPT2, "--checkpoint", checkpoint, "--state", state])


def copy_reference(reference, dest, with_recipe=True):
    dest = Path(dest)
    ckpt, state = dest / "model.bin", dest / "state.bin"
    shutil.copy(reference["checkpoint"], ckpt)
    shutil.copy(reference["state"], state)
    if with_recipe:
        shutil.copy(reference["recipe"], str(state) + ".json")
    return ckpt, state


def random_batch(seed, B, T, V=TINY["vocab_size"]):
    r = np.random.default_rng(seed)
    tokens = r.integers(0, V, size=B * T + 1).astype(np.int32)
    return tokens[:-1].reshape(B, T).copy(), tokens[1:].reshape(B, T).copy()


def torch_loss_and_grads(checkpoint, x, y, dtype=torch.float64):
    """Loss and llm.c-ordered gradients from the PyTorch reference (float64 by default)."""
    model = load_torch_reference_model(checkpoint, dtype)
    logits, loss = model(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)))
    loss.backward()
    return float(loss.detach()), torch_grads_flat(model), logits.detach().double().numpy()


def assert_grads_match(ours, ref, rel=2e-5, what=""):
    """Each of the 16 tensors within rel * its max |ref| (float32 vs float64 reference)."""
    for name, _, start, end in llmc_layout(**TINY):
        o, r = np.asarray(ours[start:end], np.float64), ref[start:end]
        tol = rel * max(float(np.max(np.abs(r))), 1e-8)
        err = float(np.max(np.abs(o - r)))
        assert err <= tol, f"{what} grad {name}: max err {err:.3e} > {tol:.3e}"


# ----------------------------------------------------------------------------- (a) parity


def test_parity_with_pytorch(reference):
    proc = run_parity(reference["checkpoint"], reference["state"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verdicts = parse_report(proc.stdout)
    assert set(verdicts) == expected_names(10)
    assert all(v == "ok" for v in verdicts.values()), verdicts
    assert "OK: every tensor within tolerance" in proc.stdout


@pytest.fixture(scope="module")
def reference_clip_matrices(tmp_path_factory):
    """A second reference with the other optimizer options: decay of matrices only,
    gradient clipping (active: the tiny model's grad norm is ~3), beta2 0.95."""
    out = tmp_path_factory.mktemp("reference_clip")
    ckpt, state = out / "m.bin", out / "s.bin"
    proc = run_python([TORCH_REFERENCE, "--layers", TINY["num_layers"], "--heads", TINY["num_heads"],
                       "--channels", TINY["channels"], "--vocab-size", TINY["vocab_size"],
                       "--max-seq-len", TINY["max_seq_len"], "--B", TINY_B, "--T", TINY_T, "--seed", 7,
                       "--steps", 6, "--lr", 3e-3, "--beta2", 0.95, "--weight-decay", 0.1,
                       "--weight-decay-mode", "matrices", "--grad-clip", 1.0,
                       "--out-checkpoint", ckpt, "--out-state", state])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ckpt, state


def test_parity_with_pytorch_clipping_and_matrix_decay(reference_clip_matrices):
    ckpt, state = reference_clip_matrices
    proc = run_parity(ckpt, state)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verdicts = parse_report(proc.stdout)
    assert set(verdicts) == expected_names(6)
    assert all(v == "ok" for v in verdicts.values()), verdicts


# ----------------------------------------------------------------------------- (b) tampered references


@pytest.mark.parametrize("target", ["grad wte", "grad ln1b", "grad fcprojw", "logits"])
def test_tampered_reference_fails(reference, tmp_path, target):
    ckpt, state = copy_reference(reference, tmp_path)
    parsed = read_state_file(state, TINY["vocab_size"], NUM_PARAMETERS)
    raw = bytearray(state.read_bytes())
    if target == "logits":
        values, base = parsed["logits"].reshape(-1), parsed["logits_offset"]
        index = 5
    else:
        name = target.split()[1]
        _, _, start, end = next(t for t in llmc_layout(**TINY) if t[0] == name)
        values, base = parsed["grads"][start:end], parsed["grads_offset"] + 4 * start
        index = int(np.argmax(np.abs(values) > 0))  # an entry inside the real vocab rows for wte
    bump = np.float32(0.01 * np.max(np.abs(values)))
    assert bump > 0
    new = np.float32(values[index] + bump)
    raw[base + 4 * index: base + 4 * index + 4] = new.tobytes()
    state.write_bytes(bytes(raw))

    proc = run_parity(ckpt, state)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    verdicts = parse_report(proc.stdout)
    assert set(verdicts) == expected_names(10)
    assert {k for k, v in verdicts.items() if v == "FAIL"} == {target}
    assert re.search(rf"^FAIL: 1 tensor\(s\) out of tolerance: {target} ", proc.stdout, re.M), proc.stdout


# ----------------------------------------------------------------------------- (c) no recipe sidecar


def test_parity_without_recipe_checks_step_zero_only(reference, tmp_path):
    ckpt, state = copy_reference(reference, tmp_path, with_recipe=False)
    proc = run_parity(ckpt, state)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verdicts = parse_report(proc.stdout)
    assert set(verdicts) == expected_names(0)
    assert all(v == "ok" for v in verdicts.values())
    assert "checking step 0 only" in proc.stdout


# ----------------------------------------------------------------------------- forward/backward vs PyTorch in-process


def test_forward_backward_match_pytorch_float64(reference):
    """Loss, logits (padding columns included) and every gradient against a float64
    PyTorch run of the same weights on a new batch."""
    model = common.read_checkpoint(str(reference["checkpoint"]))
    x, y = random_batch(11, 3, 7)
    loss = gpt.gpt2_forward(model, x, y)
    ref_loss, ref_grads, ref_logits = torch_loss_and_grads(reference["checkpoint"], x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(model.acts.logits, ref_logits.reshape(-1, TINY["padded_vocab_size"]),
                               rtol=0, atol=2e-6)
    assert np.all(model.acts.logits[:, TINY["vocab_size"]:] == 0.0)  # zero padded wte rows
    gpt.gpt2_backward(model)
    assert_grads_match(model.grads_memory, ref_grads)


# ----------------------------------------------------------------------------- (e) gradient accumulation


def test_gradient_accumulation_equals_full_batch(reference):
    x, y = random_batch(21, 4, TINY_T)
    ref_loss, ref_grads, _ = torch_loss_and_grads(reference["checkpoint"], x, y)

    model = common.read_checkpoint(str(reference["checkpoint"]))
    full_loss = gpt.gpt2_forward(model, x, y)
    gpt.gpt2_backward(model, accumulate=False, loss_scale=1.0)
    full = model.grads_memory.copy()
    assert full_loss == pytest.approx(ref_loss, rel=1e-6)
    assert_grads_match(full, ref_grads, what="full batch")

    model.grads_memory[:] = 7.0  # garbage: accumulate=False must overwrite every entry
    loss1 = gpt.gpt2_forward(model, x[:2], y[:2])
    gpt.gpt2_backward(model, accumulate=False, loss_scale=0.5)
    loss2 = gpt.gpt2_forward(model, x[2:], y[2:])
    gpt.gpt2_backward(model, accumulate=True, loss_scale=0.5)
    assert 0.5 * (loss1 + loss2) == pytest.approx(full_loss, rel=1e-6)
    assert_grads_match(model.grads_memory, ref_grads, what="accumulated")
    for name, _, start, end in llmc_layout(**TINY):
        scale = float(np.max(np.abs(full[start:end])))
        np.testing.assert_allclose(model.grads_memory[start:end], full[start:end], rtol=0, atol=1e-5 * scale,
                                   err_msg=name)


# ----------------------------------------------------------------------------- (f) masked targets


def test_masked_targets_contribute_nothing(reference):
    x, y = random_batch(31, TINY_B, TINY_T)
    mask = np.zeros_like(y, dtype=bool)
    mask[0, [1, 4, 7]] = True
    mask[1, [0, 2]] = True
    y_masked = np.where(mask, -1, y).astype(np.int32)

    model = common.read_checkpoint(str(reference["checkpoint"]))
    loss = gpt.gpt2_forward(model, x, y_masked)
    # independently: mean over the unmasked positions of -log softmax(logits[:V])[target]
    # with PyTorch's logits in float64
    ref_loss, ref_grads, ref_logits = torch_loss_and_grads(reference["checkpoint"], x, y_masked)
    z = ref_logits.reshape(-1, TINY["padded_vocab_size"])[:, :TINY["vocab_size"]]
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    flat_y, keep = y.reshape(-1), ~mask.reshape(-1)
    manual = float(np.mean((lse - z[np.arange(z.shape[0]), flat_y])[keep]))
    assert ref_loss == pytest.approx(manual, rel=1e-12)
    assert loss == pytest.approx(manual, rel=1e-6)
    unmasked_loss = gpt.gpt2_forward(common.read_checkpoint(str(reference["checkpoint"])), x, y)
    assert abs(unmasked_loss - loss) > 1e-4  # the mask did change something

    gpt.gpt2_forward(model, x, y_masked)
    gpt.gpt2_backward(model)
    assert_grads_match(model.grads_memory, ref_grads, what="masked")


def test_all_targets_masked_gives_zero_loss_and_gradient(reference):
    x, _ = random_batch(41, TINY_B, TINY_T)
    model = common.read_checkpoint(str(reference["checkpoint"]))
    loss = gpt.gpt2_forward(model, x, np.full_like(x, -1))
    assert loss == 0.0
    gpt.gpt2_backward(model)
    assert np.all(model.grads_memory == 0.0)


# ----------------------------------------------------------------------------- (g) determinism

DETERMINISM_SCRIPT = """
import sys
import numpy as np
import gpt2_common as common
import train_gpt2 as gpt


def run(ckpt):
    r = np.random.default_rng(5)
    tokens = r.integers(0, 64, size=2 * 8 + 1).astype(np.int32)
    x, y = tokens[:-1].reshape(2, 8), tokens[1:].reshape(2, 8)
    model = common.read_checkpoint(ckpt)
    losses = []
    for step in range(3):
        losses.append(gpt.gpt2_forward(model, x, y))
        gpt.gpt2_backward(model)
        gpt.gpt2_update(model, 1e-3, 0.9, 0.95, 1e-8, 0.1, "matrices", 1.0)
    return dict(losses=np.array(losses), params=model.params_memory, m=model.m_memory, v=model.v_memory)


if __name__ == "__main__":
    np.savez(sys.argv[2], **run(sys.argv[1]))
"""


def determinism_run(ckpt):
    namespace = {"__name__": "determinism"}
    exec(compile(DETERMINISM_SCRIPT, "determinism", "exec"), namespace)
    return namespace["run"](str(ckpt))


def test_training_steps_are_bit_identical_in_process_and_across_processes(reference, tmp_path):
    first = determinism_run(reference["checkpoint"])
    second = determinism_run(reference["checkpoint"])
    assert first["losses"][0] > first["losses"][-1]  # the steps did train
    script = tmp_path / "det.py"
    script.write_text(DETERMINISM_SCRIPT)
    proc = run_python([script, reference["checkpoint"], tmp_path / "det.npz"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    third = dict(np.load(tmp_path / "det.npz"))
    for other in (second, third):
        for key in ("losses", "params", "m", "v"):
            assert np.asarray(first[key]).tobytes() == np.asarray(other[key]).tobytes(), key


# ----------------------------------------------------------------------------- (h) KV-cache generation


def xorshift_f32(state):
    """llm.c's random_f32, written from its definition: xorshift*, (u32 >> 8) / 2^24."""
    mask = (1 << 64) - 1
    state ^= state >> 12
    state = (state ^ (state << 25)) & mask
    state ^= state >> 27
    u32 = ((state * 0x2545F4914F6CDD1D) & mask) >> 32
    return (u32 >> 8) / 16777216.0, state


def reference_sample(logits, V, temperature, top_k, coin):
    z = np.asarray(logits[:V], dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(z))
    z = z / temperature
    if 0 < top_k < V:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    cdf = 0.0
    for i in range(V):  # llm.c's sample_mult
        cdf += p[i]
        if coin < cdf:
            return i
    return V - 1


@pytest.fixture(scope="module")
def peaky_model(reference):
    """The reference weights with wte scaled up, so next-token distributions are peaked and
    a wrong logit would change the sampled tokens."""
    model = common.read_checkpoint(str(reference["checkpoint"]))
    model.params.wte[...] *= 4.0  # top token probability ~0.2 instead of ~0.02
    return model


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.7, 0), (1.0, 5), (1.3, 3)])
def test_generate_kv_cache_matches_full_recompute(peaky_model, temperature, top_k):
    prompt, n = [3, 17, 42], 12
    with_cache, state_a = gpt.generate(peaky_model, prompt, n, temperature, top_k, 1337, use_kv_cache=True)
    without, state_b = gpt.generate(peaky_model, prompt, n, temperature, top_k, 1337, use_kv_cache=False)
    assert with_cache == without
    assert state_a == state_b

    # independently: PyTorch logits of the growing sequence and llm.c's sampler
    tmodel = load_torch_reference_model_from(peaky_model)
    seq, state, expected = list(prompt), 1337, []
    for _ in range(n):
        with torch.no_grad():
            logits, _ = tmodel(torch.tensor([seq]))
        coin, state = xorshift_f32(state)
        tok = reference_sample(logits[0, -1].double().numpy(), TINY["vocab_size"], temperature, top_k, coin)
        expected.append(tok)
        seq.append(tok)
    assert with_cache == expected
    assert state_a == state
    if temperature > 0:
        assert len(set(expected)) > 1


def load_torch_reference_model_from(model):
    import torch_reference
    cfg = torch_reference.GPT2Config(**TINY)
    tensors = {name: torch.from_numpy(np.array(model.params_memory[s:e]).reshape(shape))
               for name, shape, s, e in llmc_layout(**TINY)}
    return torch_reference.set_llmc_tensors(torch_reference.GPT2(cfg), tensors)


def test_decode_step_logits_match_forward(peaky_model):
    seq = np.array([[5, 9, 60, 1, 33, 33, 7, 2, 48, 11]], dtype=np.int32)
    scratch = common.GPT2(peaky_model.cfg)  # fresh buffers, same parameters
    scratch.params_memory[:] = peaky_model.params_memory
    gpt.gpt2_forward(scratch, seq)
    full = scratch.acts.logits.copy()
    cache = gpt.KVCache(peaky_model.cfg)
    for pos, tok in enumerate(seq[0]):
        step_logits = gpt.gpt2_decode_step(peaky_model, cache, int(tok))
        scale = float(np.max(np.abs(full[pos])))
        np.testing.assert_allclose(step_logits, full[pos], rtol=0, atol=1e-5 * scale, err_msg=f"position {pos}")
