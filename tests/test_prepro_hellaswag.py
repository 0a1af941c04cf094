"""Tests for prepro_hellaswag.py: eval files byte-identical to llm.c's write_evalfile, the reader, offline use.

The reference is llm.c's own dev/data/data_common.py write_evalfile (imported from the anchors checkout), fed
with examples rendered as llm.c's hellaswag.py renders them (encode(ctx), encode(" " + ending)) by a GPT-2
encoding built here from gpt2.tiktoken. Nothing is downloaded: the download is a fake requests.get.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import conftest
import prepro_hellaswag
from prepro_tinyshakespeare import PreproError

REPO_ROOT = conftest.REPO_ROOT
SCRIPT = REPO_ROOT / "prepro_hellaswag.py"
SHARED_DATA = conftest.SHARED_DATA
VOCAB = SHARED_DATA / "gpt2.tiktoken"
LLMC_DATA_DIR = conftest.LLMC_DATA_DIR

pytestmark = conftest.needs_shared_data_and_llmc


# ---------------------------------------------------------------- references

ENC = conftest.reference_encoding() if VOCAB.is_file() else None


def llmc_write_evalfile():
    return conftest.llmc_data_common().write_evalfile


def llmc_rendered(examples):
    """What llm.c's hellaswag.py hands write_evalfile for each example."""
    return [{"label": ex["label"], "ctx_tokens": ENC.encode(ex["ctx"]),
             "ending_tokens": [ENC.encode(" " + end) for end in ex["endings"]]} for ex in examples]


def llmc_eval_bytes(examples, tmp_dir):
    path = Path(tmp_dir) / "llmc_reference.bin"
    llmc_write_evalfile()(str(path), llmc_rendered(examples))
    return path.read_bytes()


def make_examples(count, seed=0, split="val"):
    """HellaSwag-shaped examples from tinyshakespeare lines, with unicode and an empty context."""
    lines = [line for line in (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines() if line]
    rng = random.Random(seed)
    unicode_bits = ["café", "naïve — 日本語", "😀🚀", "Ελληνικά", "Ünïcødé\u00a0space", "tab\tand\nnewline"]
    examples = []
    for i in range(count):
        ctx = " ".join(rng.choice(lines) for _ in range(rng.randint(1, 4)))
        if i % 3 == 1:
            ctx += " " + rng.choice(unicode_bits)
        endings = [rng.choice(lines) + (" " + rng.choice(unicode_bits) if rng.random() < 0.3 else "") for _ in range(4)]
        examples.append({"ind": 1000 + i, "activity_label": "Acting", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                         "split": split, "split_type": "indomain", "label": rng.randrange(4),
                         "endings": endings, "source_id": f"tiny~{i}"})
    examples[2]["ctx"] = ""
    examples[3]["endings"][1] = ""
    return examples


def write_jsonl(path, examples):
    with open(path, "w", encoding="utf-8") as f:
        for i, example in enumerate(examples):
            f.write(json.dumps(example, ensure_ascii=i % 2 == 0) + "\n")
    return path


def run_script(args, cwd, env_extra=None):
    env = conftest.subprocess_env()
    env.pop("DATA_MIRROR", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *parts, exit_code=1):
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], result.stderr
    for part in parts:
        assert part in lines[-1], lines[-1]
    return lines[-1]


def all_files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """In-process runs inside an empty tmp dir, no DATA_MIRROR, official counts matching the synthetic files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    monkeypatch.setattr(prepro_hellaswag, "OFFICIAL_EXAMPLE_COUNTS", {"val": 25, "train": 40})
    return tmp_path


@pytest.fixture
def mirror(tmp_path):
    directory = tmp_path / "mirror"
    directory.mkdir()
    val, train = make_examples(25, seed=1), make_examples(40, seed=2, split="train")
    write_jsonl(directory / "hellaswag_val.jsonl", val)
    write_jsonl(directory / "hellaswag_train.jsonl", train)
    return {"dir": directory, "val": val, "train": train}


# ---------------------------------------------------------------- byte identity with llm.c

def test_input_matches_llmc_write_evalfile(tmp_path):
    examples = make_examples(30)
    write_jsonl(tmp_path / "synthetic.jsonl", examples)
    result = run_script(["--input", "synthetic.jsonl", "--output", "out/synthetic.bin", "--vocab", VOCAB], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    produced = (tmp_path / "out" / "synthetic.bin").read_bytes()
    assert produced == llmc_eval_bytes(examples, tmp_path)
    header = np.frombuffer(produced[:1024], dtype="<i4")
    assert list(header[:3]) == [20240522, 1, 30] and 0 < header[3] < 2**16 and not header[4:].any()
    assert all_files(tmp_path / "out") == ["synthetic.bin"]


def test_mirror_both_splits_default_paths_and_already_done(in_tmp, mirror, capsys):
    assert prepro_hellaswag.main(["--split", "val", "train", "--mirror", str(mirror["dir"]), "--vocab", str(VOCAB)]) == 0
    out = in_tmp / "data" / "hellaswag"
    assert (out / "hellaswag_val.bin").read_bytes() == llmc_eval_bytes(mirror["val"], in_tmp)
    assert (out / "hellaswag_train.bin").read_bytes() == llmc_eval_bytes(mirror["train"], in_tmp)
    assert "using mirror file" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["hellaswag_train.bin", "hellaswag_val.bin"]

    for path in out.iterdir():
        os.utime(path, ns=(10**9, 10**9))
    assert prepro_hellaswag.main(["--split", "val", "train", "--mirror", str(mirror["dir"])]) == 0
    assert capsys.readouterr().out.count("already done") == 2
    assert all(path.stat().st_mtime_ns == 10**9 for path in out.iterdir())
    assert prepro_hellaswag.main(["--mirror", str(mirror["dir"]), "--vocab", str(VOCAB), "--force"]) == 0
    assert (out / "hellaswag_val.bin").stat().st_mtime_ns != 10**9


def test_data_mirror_env_and_local_copy(in_tmp, mirror, monkeypatch):
    monkeypatch.setenv("DATA_MIRROR", str(mirror["dir"]))
    assert prepro_hellaswag.main(["--output", "val.bin", "--vocab", str(VOCAB)]) == 0
    assert (in_tmp / "val.bin").read_bytes() == llmc_eval_bytes(mirror["val"], in_tmp)
    # a copy in data/hellaswag/ comes before the mirror
    monkeypatch.delenv("DATA_MIRROR")
    local = in_tmp / "data" / "hellaswag"
    local.mkdir(parents=True)
    write_jsonl(local / "hellaswag_val.jsonl", mirror["train"][:25])
    assert prepro_hellaswag.main(["--output", "local.bin", "--vocab", str(VOCAB)]) == 0
    assert (in_tmp / "local.bin").read_bytes() == llmc_eval_bytes(mirror["train"][:25], in_tmp)


def test_incomplete_mirror_file_is_refused(in_tmp, mirror, capsys):
    write_jsonl(mirror["dir"] / "hellaswag_val.jsonl", mirror["val"][:24])
    assert prepro_hellaswag.main(["--mirror", str(mirror["dir"]), "--vocab", str(VOCAB)]) == 1
    assert capsys.readouterr().err.strip() == (f"error: mirror file {mirror['dir'] / 'hellaswag_val.jsonl'} has 24 "
                                               "examples, expected 25; replace it")
    assert all_files(in_tmp) == ["mirror/hellaswag_train.jsonl", "mirror/hellaswag_val.jsonl"]


# ---------------------------------------------------------------- download (fake requests.get)

def test_download_is_streamed_and_checked(in_tmp, monkeypatch, capsys):
    examples = make_examples(25, seed=4)
    body = write_jsonl(in_tmp / "served.jsonl", examples).read_bytes()
    (in_tmp / "served.jsonl").unlink()
    calls = []

    def fake_get(url, stream=False, timeout=None):
        calls.append((url, stream, timeout))
        return conftest.FakeResponse(body)

    monkeypatch.setattr(prepro_hellaswag.requests, "get", fake_get)
    assert prepro_hellaswag.main(["--vocab", str(VOCAB)]) == 0
    assert calls == [("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                      True, prepro_hellaswag.DOWNLOAD_TIMEOUT_S)]
    assert (in_tmp / "data" / "hellaswag" / "hellaswag_val.jsonl").read_bytes() == body
    assert (in_tmp / "data" / "hellaswag" / "hellaswag_val.bin").read_bytes() == llmc_eval_bytes(examples, in_tmp / "data")
    capsys.readouterr()

    # a truncated download is not kept, and leaves no directory or temp file behind
    for path in all_files(in_tmp):
        (in_tmp / path).unlink()
    (in_tmp / "data" / "hellaswag").rmdir()
    (in_tmp / "data").rmdir()
    body = body[:len(body) // 2]
    assert prepro_hellaswag.main(["--vocab", str(VOCAB)]) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err_lines if line.startswith("error:")] == [err_lines[-1]]
    assert err_lines[-1].startswith("error: download from https://raw.githubusercontent.com/")
    partial_lines = sum(1 for line in body.splitlines() if line.strip())  # the last one cut short
    assert f"has {partial_lines} examples, expected 25; not kept" in err_lines[-1]
    assert all_files(in_tmp) == []


def test_offline_with_nothing_available_says_how_to_supply(tmp_path):
    refuse = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    result = run_script(["--vocab", VOCAB], cwd=tmp_path, env_extra=refuse)
    assert_one_line_error(result, "could not download", "--input FILE", "--mirror DIR", "DATA_MIRROR",
                          "data/hellaswag/hellaswag_val.jsonl")
    assert all_files(tmp_path) == []


# ---------------------------------------------------------------- the reader

@pytest.fixture
def eval_file(tmp_path):
    examples = make_examples(12, seed=5)
    path = tmp_path / "eval.bin"
    path.write_bytes(llmc_eval_bytes(examples, tmp_path))
    return path, examples


def test_reader_round_trips_llmc_writer(eval_file):
    path, examples = eval_file
    assert prepro_hellaswag.read_eval_file(path) == llmc_rendered(examples)


def test_example_rows_spans_the_endings(eval_file):
    path, examples = eval_file
    for example, source in zip(prepro_hellaswag.read_eval_file(path), examples):
        rows = prepro_hellaswag.example_rows(example)
        assert len(rows) == 4
        for (tokens, start, end), ending in zip(rows, source["endings"]):
            assert tokens[:start] == ENC.encode(source["ctx"])
            assert tokens[start:end] == ENC.encode(" " + ending) and end == len(tokens)
            # llm.c's mask over the row, shifted by one: the predictions that score the ending
            mask = [0] * start + [1] * (end - start)
            assert [j for j, m in enumerate(mask[1:]) if m] == [j - 1 for j in range(max(start, 1), end)]


def set_u16(raw, index, value):
    """raw with uint16 number `index` of the body replaced."""
    body = bytearray(raw)
    body[1024 + 2 * index:1024 + 2 * index + 2] = int(value).to_bytes(2, "little")
    return bytes(body)


def set_i32(raw, index, value):
    body = bytearray(raw)
    body[4 * index:4 * index + 4] = int(value).to_bytes(4, "little", signed=True)
    return bytes(body)


CORRUPTIONS = {
    "token file magic": (lambda raw: set_i32(raw, 0, 20240520), "magic 20240520"),
    "version": (lambda raw: set_i32(raw, 1, 2), "version 2"),
    "short header": (lambda raw: raw[:1000], "no header"),
    "truncated body": (lambda raw: raw[:-2], "runs past the file"),
    "odd size": (lambda raw: raw[:-1], "odd-sized body"),
    "trailing bytes": (lambda raw: raw + b"\0\0", "truncated example header"),
    "delimiter": (lambda raw: set_u16(raw, 0, 65534), "delimiter 65534"),
    "byte count": (lambda raw: set_u16(raw, 1, int.from_bytes(raw[1026:1028], "little") + 2), "beyond its context"),
    "index": (lambda raw: set_u16(raw, 2, 7), "index field 7"),
    "label": (lambda raw: set_u16(raw, 3, 4), "label 4 out of range"),
    "ending count": (lambda raw: set_u16(raw, 4, 3), "3 endings"),
    "context length": (lambda raw: set_u16(raw, 5, 60000), "overruns its byte count"),
    "example count": (lambda raw: set_i32(raw, 2, 13), "header says 13 examples"),
    "longest": (lambda raw: set_i32(raw, 3, 2), "longest example is 2 bytes"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_reader_rejects_corrupt_file(eval_file, tmp_path, name):
    path, _ = eval_file
    corrupt, expected = CORRUPTIONS[name]
    bad = tmp_path / "bad.bin"
    bad.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(PreproError) as info:
        prepro_hellaswag.read_eval_file(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and expected in message, message


def test_reader_missing_file(tmp_path):
    with pytest.raises(PreproError, match="cannot read eval file"):
        prepro_hellaswag.read_eval_file(tmp_path / "absent.bin")


# ---------------------------------------------------------------- bad input and arguments

BAD_EXAMPLES = {
    "label": ({"label": 4}, "'label' must be an integer 0..3, got 4"),
    "label_string": ({"label": "1"}, "'label' must be an integer"),
    "three_endings": ({"endings": ["a", "b", "c"]}, "'endings' must be a list of 4 strings"),
    "no_ctx": ({"ctx": None}, "no 'ctx' string"),
    "special_token": ({"ctx": "a <|endoftext|> b"}, "cannot tokenize"),
}


@pytest.mark.parametrize("case", list(BAD_EXAMPLES))
def test_bad_example_is_one_line_naming_the_line(tmp_path, case):
    change, message = BAD_EXAMPLES[case]
    examples = make_examples(5, seed=6)
    examples[3].update(change)
    write_jsonl(tmp_path / "bad.jsonl", examples)
    result = run_script(["--input", "bad.jsonl", "--vocab", VOCAB], cwd=tmp_path)
    assert_one_line_error(result, "bad.jsonl:4", message)
    assert all_files(tmp_path) == ["bad.jsonl"]


def test_not_json_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"ctx": "x"\n')
    assert_one_line_error(run_script(["--input", "bad.jsonl", "--vocab", VOCAB], cwd=tmp_path), "bad.jsonl:1: not JSON")
    assert_one_line_error(run_script(["--input", "absent.jsonl", "--vocab", VOCAB], cwd=tmp_path),
                          "input file not found: absent.jsonl")


@pytest.mark.parametrize("args, message", [
    (["--split", "val", "train", "--input", "x.jsonl"], "one --split at a time"),
    (["--split", "val", "train", "--output", "x.bin"], "one --split at a time"),
    (["--split", "test"], "invalid choice"),
    (["--mirror", "no_such_dir"], "--mirror directory not found"),
])
def test_bad_arguments_exit_2(tmp_path, args, message):
    result = run_script(args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr
    assert all_files(tmp_path) == []


def test_help_documents_every_flag(tmp_path):
    conftest.assert_help_documents_every_flag(run_script(["--help"], cwd=tmp_path),
                                              prepro_hellaswag.build_arg_parser(),
                                              ["val", "train", "DATA_MIRROR", "data/hellaswag"])
