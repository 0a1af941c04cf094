"""Tests for prepro_tinyshakespeare.py (offline; uses /work/shared/data as the mirror)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import tiktoken
import tiktoken.load

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "prepro_tinyshakespeare.py"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

sys.path.insert(0, str(REPO_ROOT))
import prepro_tinyshakespeare as prepro  # noqa: E402
from conftest import FakeResponse, assert_help_documents_every_flag, reference_encoding  # noqa: E402

needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "tinyshakespeare.txt").is_file() or not (SHARED_DATA / "gpt2.tiktoken").is_file(),
    reason=f"shared data dir {SHARED_DATA} with tinyshakespeare.txt and gpt2.tiktoken is absent",
)

# Known-good values (llm.c docs, and sha256 of the outputs of llm.c's own recipe, see test_matches_llmc_recipe_bytes).
VAL_TOKENS = 32_768
TRAIN_TOKENS = 305_260
FIRST_TOKENS = [50256, 5962, 22307, 25, 198]
VAL_SHA256 = "fe99db720dc7c83e694806d4e047a952909411da1daccde4ccc2e55f40882a62"
TRAIN_SHA256 = "8a70606be574040c26d225694f5f9759973b419852d22f7fe5c118e1b359dcc8"
TEXT_MD5 = "6fb458f1232090904fb40fe944165e91"
HOW_TO_SUPPLY_PARTS = ["--mirror", "DATA_MIRROR", "data/tinyshakespeare/tiny_shakespeare.txt"]


# ---------------------------------------------------------------- helpers

def llmc_reference_tokens(text, enc):
    """llm.c's original recipe: EOT at the start and after every blank line, encoded as one string."""
    text = "<|endoftext|>" + text.replace("\n\n", "\n\n<|endoftext|>")
    return enc.encode(text, allowed_special={"<|endoftext|>"})


def llmc_reference_file_bytes(tokens):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    return header.tobytes() + np.array(tokens, dtype=np.uint16).tobytes()


def read_tokens(path):
    raw = Path(path).read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    tokens = np.frombuffer(raw[1024:], dtype="<u2")
    return header, tokens


def all_files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def run_script(args, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "DATA_MIRROR"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in-process inside an empty tmp dir with no DATA_MIRROR."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def mirror_run(tmp_path_factory):
    """One real CLI run from the shared mirror; tests below only read its outputs."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data dir {SHARED_DATA} is absent")
    workdir = tmp_path_factory.mktemp("mirror_run")
    result = run_script(["--mirror", str(SHARED_DATA)], cwd=workdir)
    return workdir, result


# ---------------------------------------------------------------- the real tinyshakespeare run

@needs_shared_data
def test_mirror_run_counts_sizes_headers(mirror_run):
    workdir, result = mirror_run
    assert result.returncode == 0, result.stderr
    out = workdir / "data" / "tinyshakespeare"
    val_path, train_path = out / "tiny_shakespeare_val.bin", out / "tiny_shakespeare_train.bin"
    assert val_path.stat().st_size == 1024 + 2 * VAL_TOKENS == 66_560
    assert train_path.stat().st_size == 1024 + 2 * TRAIN_TOKENS == 611_544
    for path, count in [(val_path, VAL_TOKENS), (train_path, TRAIN_TOKENS)]:
        header, tokens = read_tokens(path)
        assert list(header[:3]) == [20240520, 1, count]
        assert not header[3:].any()
        assert len(tokens) == count
    _, val_tokens = read_tokens(val_path)
    assert list(val_tokens[:5]) == FIRST_TOKENS
    # the text was copied into place and matches the canonical checksum
    text_copy = out / "tiny_shakespeare.txt"
    assert hashlib.md5(text_copy.read_bytes()).hexdigest() == TEXT_MD5
    assert "32,768" in result.stdout and "305,260" in result.stdout
    # the BPE ranks are kept where later runs look for them: OpenAI's file, byte for byte
    assert (workdir / "data" / "gpt2.tiktoken").read_bytes() == (SHARED_DATA / "gpt2.tiktoken").read_bytes()
    # no temp files left anywhere
    assert all_files(workdir) == [
        "data/gpt2.tiktoken",
        "data/gpt2_tokenizer.bin",
        "data/tinyshakespeare/tiny_shakespeare.txt",
        "data/tinyshakespeare/tiny_shakespeare_train.bin",
        "data/tinyshakespeare/tiny_shakespeare_val.bin",
    ]


@needs_shared_data
def test_matches_llmc_recipe_bytes(mirror_run):
    workdir, result = mirror_run
    assert result.returncode == 0, result.stderr
    out = workdir / "data" / "tinyshakespeare"
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokens = llmc_reference_tokens(text, reference_encoding())
    assert len(tokens) == VAL_TOKENS + TRAIN_TOKENS
    val_bytes = (out / "tiny_shakespeare_val.bin").read_bytes()
    train_bytes = (out / "tiny_shakespeare_train.bin").read_bytes()
    assert val_bytes == llmc_reference_file_bytes(tokens[:VAL_TOKENS])
    assert train_bytes == llmc_reference_file_bytes(tokens[VAL_TOKENS:])
    assert hashlib.sha256(val_bytes).hexdigest() == VAL_SHA256
    assert hashlib.sha256(train_bytes).hexdigest() == TRAIN_SHA256


@needs_shared_data
def test_round_trip_decode_gives_text(mirror_run):
    workdir, result = mirror_run
    assert result.returncode == 0, result.stderr
    out = workdir / "data" / "tinyshakespeare"
    _, val_tokens = read_tokens(out / "tiny_shakespeare_val.bin")
    _, train_tokens = read_tokens(out / "tiny_shakespeare_train.bin")
    all_tokens = np.concatenate([val_tokens, train_tokens]).tolist()
    decoded = reference_encoding().decode(all_tokens)
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    assert decoded.startswith("<|endoftext|>First Citizen:\n")
    assert decoded.count("<|endoftext|>") == all_tokens.count(50256) == text.count("\n\n") + 1
    assert decoded.replace("<|endoftext|>", "") == text


@needs_shared_data
def test_tokenizer_file(mirror_run):
    workdir, result = mirror_run
    assert result.returncode == 0, result.stderr
    raw = (workdir / "data" / "gpt2_tokenizer.bin").read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:4]) == [20240328, 2, 50257, 50256]
    assert not header[4:].any()
    entries, pos = [], 1024
    while pos < len(raw):
        length = raw[pos]
        entries.append(raw[pos + 1:pos + 1 + length])
        pos += 1 + length
    assert pos == len(raw)
    assert len(entries) == 50257
    assert entries[15496] == b"Hello"
    assert entries[995] == b" world"
    assert entries[198] == b"\n"
    assert entries[628] == b"\n\n"
    assert entries[0] == b"!"
    assert entries[50256] == b"<|endoftext|>"
    enc = reference_encoding()
    assert all(entries[i] == enc.decode_single_token_bytes(i) for i in range(50257))
    # decoding a real token sequence through the file reproduces tiktoken's bytes
    sample = [50256, 5962, 22307, 25, 198, 8421, 356, 5120, 597, 2252]
    assert b"".join(entries[t] for t in sample) == enc.decode_bytes(sample)
    assert b"".join(entries[t] for t in sample) == b"<|endoftext|>First Citizen:\nBefore we proceed any further"


@needs_shared_data
def test_skip_if_done_and_force(mirror_run, tmp_path):
    workdir, result = mirror_run
    assert result.returncode == 0, result.stderr
    out = workdir / "data" / "tinyshakespeare"
    outputs = [out / "tiny_shakespeare_val.bin", out / "tiny_shakespeare_train.bin", workdir / "data" / "gpt2_tokenizer.bin"]
    for path in outputs:
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    again = run_script(["--mirror", str(SHARED_DATA)], cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stdout
    assert [p.stat().st_mtime_ns for p in outputs] == [1_000_000_000] * 3

    forced = run_script(["--mirror", str(SHARED_DATA), "--force"], cwd=workdir)
    assert forced.returncode == 0, forced.stderr
    assert "already done" not in forced.stdout
    assert all(p.stat().st_mtime_ns != 1_000_000_000 for p in outputs)
    assert hashlib.sha256(outputs[0].read_bytes()).hexdigest() == VAL_SHA256
    assert hashlib.sha256(outputs[1].read_bytes()).hexdigest() == TRAIN_SHA256


@needs_shared_data
def test_invalid_existing_output_is_redone(in_tmp):
    assert prepro.main(["--mirror", str(SHARED_DATA)]) == 0
    train_path = in_tmp / "data" / "tinyshakespeare" / "tiny_shakespeare_train.bin"
    with open(train_path, "r+b") as f:
        f.truncate(5000)  # header says 305,260 tokens but the file is short
    assert prepro.main(["--mirror", str(SHARED_DATA)]) == 0
    assert hashlib.sha256(train_path.read_bytes()).hexdigest() == TRAIN_SHA256


@needs_shared_data
def test_data_mirror_env_and_out_dir(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("DATA_MIRROR", str(SHARED_DATA))
    assert prepro.main(["--out-dir", "elsewhere"]) == 0
    assert hashlib.sha256((in_tmp / "elsewhere" / "tiny_shakespeare_val.bin").read_bytes()).hexdigest() == VAL_SHA256
    assert (in_tmp / "data" / "tinyshakespeare" / "tiny_shakespeare.txt").is_file()
    assert (in_tmp / "data" / "gpt2_tokenizer.bin").is_file()


# ---------------------------------------------------------------- --input

@needs_shared_data
def test_input_small_text_hard_coded_tokens(in_tmp):
    (in_tmp / "hello.txt").write_text("Hello world\n\nHello world", encoding="utf-8")
    code = prepro.main(["--input", "hello.txt", "--val-fraction", "0.3", "--vocab", str(SHARED_DATA / "gpt2.tiktoken")])
    assert code == 0
    # 7 tokens: EOT Hello world \n\n EOT Hello world; val = round(0.3 * 7) = 2
    val_header, val_tokens = read_tokens(in_tmp / "data" / "hello" / "hello_val.bin")
    train_header, train_tokens = read_tokens(in_tmp / "data" / "hello" / "hello_train.bin")
    assert list(val_header[:3]) == [20240520, 1, 2]
    assert list(train_header[:3]) == [20240520, 1, 5]
    assert val_tokens.tolist() == [50256, 15496]
    assert train_tokens.tolist() == [995, 628, 50256, 15496, 995]


@needs_shared_data
def test_input_round_trip_and_val_fraction(in_tmp):
    text = "".join(f"Speaker {i}:\nLine number {i}, with caf\u00e9 and \u2014 dashes.\n\n" for i in range(40)) + "The end.\n"
    (in_tmp / "play.txt").write_bytes(text.encode("utf-8"))
    code = prepro.main(["--input", "play.txt", "--val-fraction", "0.25", "--out-dir", "out",
                        "--mirror", str(SHARED_DATA), "--tokenizer-out", "tok.bin", "--vocab-out", "ranks.tiktoken"])
    assert code == 0
    _, val_tokens = read_tokens(in_tmp / "out" / "play_val.bin")
    _, train_tokens = read_tokens(in_tmp / "out" / "play_train.bin")
    expected = llmc_reference_tokens(text, reference_encoding())
    assert len(val_tokens) == round(0.25 * len(expected))
    assert val_tokens.tolist() + train_tokens.tolist() == expected
    decoded = reference_encoding().decode(val_tokens.tolist() + train_tokens.tolist())
    assert decoded.replace("<|endoftext|>", "") == text
    assert (in_tmp / "tok.bin").is_file()
    assert (in_tmp / "ranks.tiktoken").read_bytes() == (SHARED_DATA / "gpt2.tiktoken").read_bytes()
    assert not (in_tmp / "data").exists()


@needs_shared_data
def test_input_default_val_fraction(in_tmp):
    # 20 sections of "a" -> 2 tokens each ("a\n\n" -> EOT, 'a', '\n\n' = 3, last one 2)
    text = "\n\n".join(["a"] * 20)
    (in_tmp / "as.txt").write_text(text, encoding="utf-8")
    assert prepro.main(["--input", "as.txt", "--mirror", str(SHARED_DATA)]) == 0
    _, val_tokens = read_tokens(in_tmp / "data" / "as" / "as_val.bin")
    _, train_tokens = read_tokens(in_tmp / "data" / "as" / "as_train.bin")
    assert len(val_tokens) + len(train_tokens) == 59  # 19 * 3 + 2
    assert len(val_tokens) == 6  # round(0.1 * 59)
    assert val_tokens.tolist() == [50256, 64, 628, 50256, 64, 628]


@needs_shared_data
def test_input_too_short_is_clear_error(in_tmp, capsys):
    (in_tmp / "empty.txt").write_text("", encoding="utf-8")
    assert prepro.main(["--input", "empty.txt", "--mirror", str(SHARED_DATA)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "too short" in err
    assert all_files(in_tmp) == ["empty.txt"]


def test_missing_input_is_clear_error(tmp_path):
    result = run_script(["--input", "nope.txt"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: input file not found: nope.txt"
    assert all_files(tmp_path) == []


def test_non_utf8_input_is_clear_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    result = run_script(["--input", "latin1.txt"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: latin1.txt is not valid UTF-8")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    ["--input", "x.txt", "--val-fraction", "1.5"],
    ["--input", "x.txt", "--val-fraction", "0"],
    ["--val-fraction", "0.2"],
    ["--mirror", "/nonexistent/mirror/dir"],
])
def test_bad_arguments_exit_2(tmp_path, args):
    (tmp_path / "x.txt").write_text("hello\n\nworld", encoding="utf-8")
    result = run_script(args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert all_files(tmp_path) == ["x.txt"]


def test_help_documents_every_flag(tmp_path):
    assert_help_documents_every_flag(run_script(["--help"], cwd=tmp_path), prepro.build_arg_parser(),
                                     ["--mirror", "--input", "--val-fraction", "--out-dir", "--vocab",
                                      "--tokenizer-out", "--vocab-out", "--force", "DATA_MIRROR"])


# ---------------------------------------------------------------- bad or missing copies, downloads

@needs_shared_data
def test_corrupt_mirror_file_same_size_wrong_md5(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    text = bytearray((SHARED_DATA / "tinyshakespeare.txt").read_bytes())
    text[1000] ^= 0x01
    (mirror / "tinyshakespeare.txt").write_bytes(bytes(text))
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = run_script(["--mirror", str(mirror)], cwd=workdir)
    assert result.returncode == 1
    assert result.stderr.startswith("error: mirror file")
    assert "md5" in result.stderr and "6fb458f1232090904fb40fe944165e91" in result.stderr
    assert "Traceback" not in result.stderr
    assert all_files(workdir) == []


@needs_shared_data
def test_corrupt_local_copy_is_error(in_tmp, capsys):
    local = in_tmp / "data" / "tinyshakespeare" / "tiny_shakespeare.txt"
    local.parent.mkdir(parents=True)
    local.write_text("not shakespeare", encoding="utf-8")
    assert prepro.main(["--mirror", str(SHARED_DATA)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: local copy") and "1,115,394" in err
    assert all_files(in_tmp) == ["data/tinyshakespeare/tiny_shakespeare.txt"]


def test_offline_download_to_closed_port_fails_cleanly(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(prepro, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    assert prepro.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not download http://127.0.0.1:9/input.txt")
    assert len(err.strip().splitlines()) == 1
    for part in HOW_TO_SUPPLY_PARTS:
        assert part in err
    assert list(in_tmp.iterdir()) == []  # no temp files, no .bin, not even empty dirs


def test_offline_connection_error_fails_cleanly(in_tmp, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise requests.ConnectionError("no network in this test")

    monkeypatch.setattr(requests, "get", refuse)
    (in_tmp / "data").mkdir()  # an existing data dir must survive, empty
    assert prepro.main([]) == 1
    err = capsys.readouterr().err
    assert "ConnectionError" in err
    for part in HOW_TO_SUPPLY_PARTS:
        assert part in err
    assert all_files(in_tmp) == []
    assert (in_tmp / "data").is_dir() and not (in_tmp / "data" / "tinyshakespeare").exists()


@needs_shared_data
def test_download_with_bad_content_leaves_nothing(in_tmp, monkeypatch, capsys):
    bad = bytearray((SHARED_DATA / "tinyshakespeare.txt").read_bytes())
    bad[-1] ^= 0x01
    monkeypatch.setattr(requests, "get", lambda *a, **k: FakeResponse(bytes(bad)))
    assert prepro.main(["--vocab", str(SHARED_DATA / "gpt2.tiktoken")]) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()  # tqdm's bar also goes to stderr
    assert err_lines[-1].startswith("error: download from https://raw.githubusercontent.com/")
    assert "md5" in err_lines[-1] and "not kept" in err_lines[-1] and "--mirror" in err_lines[-1]
    assert list(in_tmp.iterdir()) == []


@needs_shared_data
def test_download_with_good_content_succeeds(in_tmp, monkeypatch):
    good = (SHARED_DATA / "tinyshakespeare.txt").read_bytes()
    seen = {}

    def fake_get(url, **kwargs):
        seen["url"], seen["kwargs"] = url, kwargs
        return FakeResponse(good)

    monkeypatch.setattr(requests, "get", fake_get)
    assert prepro.main(["--vocab", str(SHARED_DATA / "gpt2.tiktoken")]) == 0
    assert seen["url"] == "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    assert seen["kwargs"].get("stream") is True and seen["kwargs"].get("timeout")
    out = in_tmp / "data" / "tinyshakespeare"
    assert hashlib.md5((out / "tiny_shakespeare.txt").read_bytes()).hexdigest() == TEXT_MD5
    assert hashlib.sha256((out / "tiny_shakespeare_train.bin").read_bytes()).hexdigest() == TRAIN_SHA256


# ---------------------------------------------------------------- tokenizer loading and token files

@needs_shared_data
def test_load_gpt2_encoding_sources(in_tmp):
    by_path = prepro.load_gpt2_encoding(vocab_path=SHARED_DATA / "gpt2.tiktoken")
    assert by_path.encode_ordinary("Hello world") == [15496, 995]
    assert by_path.n_vocab == 50257 and by_path.eot_token == 50256
    by_mirror = prepro.load_gpt2_encoding(mirror=SHARED_DATA)
    assert by_mirror.encode_ordinary("Hello world") == [15496, 995]
    (in_tmp / "data").mkdir()
    (in_tmp / "data" / "gpt2.tiktoken").write_bytes((SHARED_DATA / "gpt2.tiktoken").read_bytes())
    by_default_path = prepro.load_gpt2_encoding()
    assert by_default_path.encode("Hi<|endoftext|>", allowed_special="all") == [17250, 50256]


def test_load_gpt2_encoding_offline_error(in_tmp, monkeypatch):
    def offline(name):
        raise requests.ConnectionError("offline")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(prepro.PreproError, match="gpt2.tiktoken"):
        prepro.load_gpt2_encoding()
    with pytest.raises(prepro.PreproError, match="vocab file not found"):
        prepro.load_gpt2_encoding(vocab_path=in_tmp / "missing.tiktoken")


def test_write_token_file_layout_and_range_check(tmp_path):
    path = tmp_path / "t.bin"
    prepro.write_token_file(path, [0, 1, 65535, 50256])
    raw = path.read_bytes()
    assert len(raw) == 1024 + 8
    assert raw[:12] == (20240520).to_bytes(4, "little") + (1).to_bytes(4, "little") + (4).to_bytes(4, "little")
    assert raw[12:1024] == bytes(1012)
    assert raw[1024:] == bytes([0, 0, 1, 0, 0xFF, 0xFF, 0x50, 0xC4])
    with pytest.raises(ValueError):
        prepro.write_token_file(tmp_path / "big.bin", [1, 65536])
    with pytest.raises(ValueError):
        prepro.write_token_file(tmp_path / "neg.bin", [-1])
    assert all_files(tmp_path) == ["t.bin"]
