"""Hugging Face interop checked against the real client, transformers (CPU): our
--export-hf folder loads with GPT2LMHeadModel.from_pretrained and gives our logits, and a
folder that save_pretrained wrote (float32 and bfloat16) loads with -e and gives
transformers' loss. Also: files that are not models, and HF weights with missing or
misshapen tensors, end in one line of error.
"""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt2_common as common
import train_gpt2 as gpt
from conftest import REPO_ROOT, subprocess_env, write_token_file

transformers = pytest.importorskip("transformers")  # a test requirement: absent means a broken install
from safetensors.torch import save_file  # noqa: E402  (transformers depends on safetensors)

V, MAXT, L, NH, C = 64, 32, 2, 4, 32   # 4 heads: not what C // 64 would guess, so n_head must travel
B, T = 2, 16


def run_train(args, cwd):
    return subprocess.run([sys.executable, "-u", str(REPO_ROOT / "train_gpt2.py"), *map(str, args)], cwd=str(cwd),
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


def one_line_error(proc, fragment):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr


def val_loss(stdout):
    return float(re.search(r"^val loss ([\d.]+)", stdout, re.M).group(1))


@pytest.fixture(scope="module")
def val_tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tokens")
    tokens = (np.arange(B * T * 3 + 1) * 5 % V).astype(np.int64)
    write_token_file(d / "val.bin", tokens)
    return d / "val.bin", tokens


def hf_model(seed):
    """A transformers GPT-2 with every tensor random (biases and LayerNorms too)."""
    config = transformers.GPT2Config(vocab_size=V, n_positions=MAXT, n_embd=C, n_layer=L, n_head=NH,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=V - 1, eos_token_id=V - 1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if re.search(r"ln_.\.weight$", name) else 0.0))
    return model.eval()


def hf_loss(model, tokens):
    """transformers' mean loss over the same 3 val batches that --eval-only -m 3 reads."""
    losses = []
    with torch.no_grad():
        for k in range(3):
            chunk = torch.from_numpy(tokens[k * B * T:(k + 1) * B * T + 1])
            x, y = chunk[:-1].view(B, T), chunk[1:].view(B, T)
            logits = model(x).logits.double()
            losses.append(float(torch.nn.functional.cross_entropy(logits.view(-1, V), y.reshape(-1))))
    return float(np.mean(losses))


def test_export_hf_folder_loads_in_transformers_with_our_logits(tmp_path):
    model = common.gpt2_init_random(common.GPT2Config(MAXT, V, 128, L, NH, C), seed=4)
    rng = np.random.default_rng(0)
    model.params_memory[:] = rng.normal(0, 0.1, model.params_memory.size).astype(np.float32)
    model.params.wte[V:] = 0.0
    init = tmp_path / "init.bin"
    common.write_checkpoint(model, str(init))
    out = tmp_path / "hf"
    proc = run_train(["-e", init, "--sample", "-g", 1, "--export-hf", out, "--tokenizer", "none"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]

    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    cfg = loaded.config
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (V, MAXT, C, L, NH)
    assert cfg.activation_function == "gelu_new" and cfg.tie_word_embeddings
    idx = rng.integers(0, V, size=(B, MAXT)).astype(np.int32)
    gpt.gpt2_forward(model, idx)
    ours = model.acts.logits.reshape(B, MAXT, -1)[:, :, :V]
    with torch.no_grad():
        theirs = loaded(torch.from_numpy(idx).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    # and -e reads the folder back to the same bytes
    assert common.gpt2_from_hf(str(out)).params_memory.tobytes() == model.params_memory.tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_pretrained_folder_and_file_load_with_transformers_loss(tmp_path, val_tokens, dtype):
    val_path, tokens = val_tokens
    model = hf_model(seed=7).to(dtype)
    folder = tmp_path / "pretrained"
    model.save_pretrained(str(folder))
    expected = hf_loss(model.float(), tokens)  # the stored values, widened exactly to float32
    for init in (folder, folder / "model.safetensors"):
        proc = run_train(["-e", init, "-j", val_path, "--eval-only", "-m", 3, "-b", B, "-t", T, "--tokenizer", "none"],
                         tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "NH=4" in proc.stdout  # n_head came from config.json
        assert val_loss(proc.stdout) == pytest.approx(expected, abs=2e-5)


def test_bfloat16_safetensors_are_widened_exactly(tmp_path):
    values = torch.randn(5, 7).to(torch.bfloat16)
    save_file({"x": values}, str(tmp_path / "x.safetensors"))
    got = common.read_safetensors(str(tmp_path / "x.safetensors"))["x"]
    assert got.dtype == np.float32 and np.array_equal(got, values.float().numpy())


@pytest.mark.parametrize("content", [b"to be or not to be\n" * 20, b"", b"abc", bytes(range(256)) * 8],
                         ids=["text", "empty", "three bytes", "binary"])
def test_init_of_a_file_that_is_not_a_model_is_one_line_error(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    one_line_error(run_train(["-e", path, "--eval-only", "--tokenizer", "none"], tmp_path), "not a model file")


def test_init_of_a_token_file_or_missing_path_is_one_line_error(tmp_path, val_tokens):
    one_line_error(run_train(["-e", val_tokens[0], "--eval-only"], tmp_path), "not a model file")
    one_line_error(run_train(["-e", tmp_path / "nope.bin", "--eval-only"], tmp_path), "checkpoint not found")


@pytest.mark.parametrize("damage", ["missing", "misshapen", "truncated", "config"])
def test_hf_weights_with_bad_tensors_name_them(tmp_path, damage):
    folder = tmp_path / "hf"
    hf_model(seed=1).save_pretrained(str(folder))
    weights = folder / "model.safetensors"
    sd = common.read_safetensors(str(weights))
    name = "transformer.h.1.mlp.c_fc.weight"
    if damage == "missing":
        del sd[name]
        fragment = "tensor h.1.mlp.c_fc.weight is missing"
    elif damage == "misshapen":
        sd[name] = sd[name][:, :5]
        fragment = f"tensor h.1.mlp.c_fc.weight has shape [{C}, 5], expected [{C}, {4 * C}]"
    elif damage == "config":
        (folder / "config.json").write_text((folder / "config.json").read_text().replace(f'"n_layer": {L}', '"n_layer": 3'))
        fragment = "config.json says n_layer=3, the tensors say 2"
    common.write_safetensors(str(weights), {k: v for k, v in sd.items()})
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        fragment = "truncated or corrupt"
    one_line_error(run_train(["-e", folder, "--eval-only", "--tokenizer", "none"], tmp_path), fragment)


def test_makefile_runs_every_target_in_a_virtual_environment():
    """Without an active venv, make creates .venv and installs and runs through it (a
    system Python may refuse pip); with one active, it uses that one."""
    env = {k: v for k, v in subprocess_env().items() if k != "VIRTUAL_ENV"}

    def dry_run(*targets):
        return subprocess.run(["make", "-n", *targets], cwd=str(REPO_ROOT), env=env, capture_output=True,
                              text=True).stdout

    assert "python3 -m venv .venv" in dry_run("-B", "venv")
    out = dry_run("pytest")
    commands = [l for l in out.splitlines() if " -m pip " in l or " -m pytest " in l]
    assert commands and all(".venv/bin/python" in l for l in commands), out
    env["VIRTUAL_ENV"] = "/opt/somewhere"
    out = dry_run("pytest")
    assert "/opt/somewhere/bin/python -m pytest" in out and ".venv/bin/python" not in out, out


def test_weights_are_told_by_their_bytes_not_their_name(tmp_path):
    """A safetensors file named like a torch file, and a torch file named like anything."""
    model = hf_model(seed=3)
    folder = tmp_path / "pretrained"
    model.save_pretrained(str(folder))
    expected = common.gpt2_from_hf(str(folder)).params_memory
    (tmp_path / "weights.bin").write_bytes((folder / "model.safetensors").read_bytes())
    torch.save(model.state_dict(), str(tmp_path / "state.pt"))
    for name in ("weights.bin", "state.pt"):
        loaded = common.load_model(str(tmp_path / name), seed=0)
        assert np.array_equal(loaded.params_memory, expected), name
