"""Pretrain, then fine-tune (the README's two commands, small): a d1 model pretrained on
the first 80% of tinyshakespeare's train split (standing in for a large corpus), then
fine-tuned on the rest at a lower learning rate, ends with a lower val loss than the same
fine-tuning steps from scratch."""

import json

import numpy as np

from conftest import REPO_ROOT, SHARED_DATA, run_python, write_token_file

COMMON = ["-b", 8, "-t", 64, "-s", 0, "-v", 1000, "-m", 8, "--peak-tflops", 1, "--tokenizer", "none"]


def final_val_loss(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "val"][-1]["loss"]


def test_pretrained_model_fine_tunes_past_one_from_scratch(tmp_path):
    proc = run_python([REPO_ROOT / "prepro_tinyshakespeare.py", "--mirror", SHARED_DATA, "--out-dir", tmp_path / "ts",
                       "--tokenizer-out", tmp_path / "tok.bin", "--vocab-out", tmp_path / "gpt2.tiktoken"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = (tmp_path / "ts" / "tiny_shakespeare_train.bin").read_bytes()
    tokens = np.frombuffer(raw, dtype="<u2", offset=1024)
    cut = int(0.8 * tokens.size)
    corpus = write_token_file(tmp_path / "corpus.bin", tokens[:cut])
    target = write_token_file(tmp_path / "target.bin", tokens[cut:])
    val = tmp_path / "ts" / "tiny_shakespeare_val.bin"

    def train(out, init, data, steps, lr):
        proc = run_python([REPO_ROOT / "train_gpt2.py", "-e", init, "-i", data, "-j", val, "-x", steps, "-l", lr,
                           "-o", out, *COMMON], cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return final_val_loss(out)

    pretrained = train(tmp_path / "pretrain", "d1", corpus, 120, 3e-3)
    fine_tuned = train(tmp_path / "finetune", tmp_path / "pretrain" / "model_00000120.bin", target, 30, 1e-3)
    from_scratch = train(tmp_path / "scratch", "d1", target, 30, 1e-3)
    print(f"val loss: pretrained {pretrained:.3f}, fine-tuned {fine_tuned:.3f}, from scratch {from_scratch:.3f}")
    assert fine_tuned < from_scratch - 0.2, (pretrained, fine_tuned, from_scratch)
