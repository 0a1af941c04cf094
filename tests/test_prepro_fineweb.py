"""Tests for prepro_fineweb.py: shards byte-identical to llm.c's fineweb.py, resume, bad input (offline).

The reference is llm.c's own writer (dev/data/data_common.py's write_datafile, imported from the anchors
checkout) fed by llm.c's shard loop, restated below from fineweb.py's documented logic, with documents
tokenized by a GPT-2 encoding built here from gpt2.tiktoken. The streamed path runs against a fake
`datasets` package put on PYTHONPATH, so nothing is downloaded.
"""

import errno
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import conftest
import prepro_fineweb

REPO_ROOT = conftest.REPO_ROOT
SCRIPT = REPO_ROOT / "prepro_fineweb.py"
SHARED_DATA = conftest.SHARED_DATA
VOCAB = SHARED_DATA / "gpt2.tiktoken"
LLMC_DATA_DIR = conftest.LLMC_DATA_DIR

pytestmark = conftest.needs_shared_data_and_llmc

EOT = 50256


# ---------------------------------------------------------------- references

ENC = conftest.reference_encoding() if VOCAB.is_file() else None


def llmc_write_datafile():
    """llm.c's write_datafile from its dev/data/data_common.py."""
    return conftest.llmc_data_common().write_datafile


def document_tokens(texts):
    """Each document as llm.c's tokenize_gpt2 makes it: EOT, then encode_ordinary(text), as uint16."""
    return [np.array([EOT] + ENC.encode_ordinary(text), dtype=np.uint16) for text in texts]


def shard_name(name, index):
    return f"{name}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


def llmc_shards(texts, shard_size, name, out_dir):
    """llm.c fineweb.py's loop, restated: a document that fits below shard_size is appended; otherwise the
    shard is topped up with the document's head, written with write_datafile (tolist()), and the tail starts
    the next shard; whatever is left at the end is the last shard. (llm.c cannot take a document longer
    than a shard; the documents here are all shorter.)"""
    write_datafile = llmc_write_datafile()
    out_dir.mkdir(parents=True, exist_ok=True)
    shard = np.empty(shard_size, dtype=np.uint16)
    count, index = 0, 0
    for tokens in document_tokens(texts):
        assert len(tokens) < shard_size, "the llm.c loop needs documents shorter than a shard"
        if count + len(tokens) < shard_size:
            shard[count:count + len(tokens)] = tokens
            count += len(tokens)
            continue
        room = shard_size - count
        shard[count:] = tokens[:room]
        write_datafile(str(out_dir / shard_name(name, index)), shard.tolist())
        index += 1
        tail = tokens[room:]
        shard[:len(tail)] = tail
        count = len(tail)
    if count:
        write_datafile(str(out_dir / shard_name(name, index)), shard[:count].tolist())
    return bin_files(out_dir)


def chunked_shards(texts, shard_size, name, out_dir):
    """The definition the script follows for any document length: all documents' tokens, end to end,
    cut every shard_size tokens; each piece written with llm.c's write_datafile."""
    write_datafile = llmc_write_datafile()
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = np.concatenate(document_tokens(texts))
    for index, start in enumerate(range(0, len(stream), shard_size)):
        write_datafile(str(out_dir / shard_name(name, index)), stream[start:start + shard_size].tolist())
    return bin_files(out_dir)


def bin_files(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.bin"))}


def all_files(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def make_documents(count, seed=0, max_paragraphs=6):
    """Documents from tinyshakespeare's paragraphs, with unicode, an empty and a whitespace-only one."""
    paragraphs = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")
    rng = random.Random(seed)
    extras = ["", "  \n", "naïve café — 日本語のテキスト 😀🚀 ünïcødé\r\n", "Ελληνικά\tκείμενο", "<|endoftext|> as text"]
    documents = []
    for i in range(count):
        text = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(1, max_paragraphs)))
        if i % 7 == 3:
            text += extras[i % len(extras)]
        documents.append(text)
    documents[5] = ""
    documents[9] = "  \n"
    return documents


def write_jsonl(path, texts, extra_fields=True):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            record = {"text": text, "id": f"<urn:uuid:{i}>", "token_count": 0} if extra_fields else {"text": text}
            f.write(json.dumps(record, ensure_ascii=i % 2 == 0) + "\n")
    return path


def run_script(args, cwd, env_extra=None, pythonpath_first=None):
    env = conftest.subprocess_env()
    env.pop("DATA_MIRROR", None)
    if pythonpath_first:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath_first), env["PYTHONPATH"]])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *parts, exit_code=1):
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == error_lines[0]
    for part in parts:
        assert part in error_lines[0], error_lines[0]
    return error_lines[0]


def progress(directory, name):
    return json.loads((Path(directory) / f"{name}_progress.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """200 documents in one jsonl, and llm.c's shards of them at shard size 2048."""
    root = tmp_path_factory.mktemp("corpus")
    texts = make_documents(200)
    texts[10] += " a lone surrogate \ud800 (tiktoken repairs it)"  # an even line: written with ensure_ascii
    jsonl = write_jsonl(root / "corpus.jsonl", texts)
    expected = llmc_shards(texts, 2048, "corpus", root / "llmc")
    assert len(expected) >= 10
    return {"root": root, "texts": texts, "jsonl": jsonl, "expected": expected}


# ---------------------------------------------------------------- byte identity with llm.c

def test_jsonl_shards_match_llmc(corpus, tmp_path):
    result = run_script(["--input", corpus["jsonl"], "--shard-size", 2048, "--vocab", VOCAB, "--workers", 2,
                         "--output-dir", tmp_path / "out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert bin_files(tmp_path / "out") == corpus["expected"]
    assert all_files(tmp_path / "out") == sorted([*corpus["expected"], "corpus_progress.json"])
    state = progress(tmp_path / "out", "corpus")
    assert state["complete"] and state["shards_done"] == len(corpus["expected"]) and state["docs_done"] == 200
    assert "tok/s" in result.stderr  # the progress bar counts tokens
    # header and contents, read back independently
    raw = (tmp_path / "out" / "corpus_val_000000.bin").read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 2048] and not header[3:].any()
    assert list(np.frombuffer(raw[1024:1034], dtype="<u2")) == [EOT] + ENC.encode_ordinary(corpus["texts"][0])[:4]


@pytest.mark.parametrize("batch_docs", [1, 3, 17])
def test_same_bytes_for_any_batching(corpus, tmp_path, monkeypatch, batch_docs):
    """In this process (--workers 0, no fork of the test runner): batch boundaries change nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    monkeypatch.setattr(prepro_fineweb, "BATCH_DOCS", batch_docs)
    rc = prepro_fineweb.main(["--input", str(corpus["jsonl"]), "--shard-size", "2048", "--vocab", str(VOCAB),
                              "--workers", "0"])
    assert rc == 0
    # default name: the first input's stem; default dir: data/<name>
    assert bin_files(tmp_path / "data" / "corpus") == corpus["expected"]


@pytest.mark.parametrize("workers", [1, 3])
def test_many_batches_through_the_pool_stay_in_order(tmp_path, workers):
    texts = make_documents(2000, seed=7, max_paragraphs=3)  # 4 batches of BATCH_DOCS documents, in flight at once
    assert len(texts) > 3 * prepro_fineweb.BATCH_DOCS
    write_jsonl(tmp_path / "many.jsonl", texts)
    expected = llmc_shards(texts, 50_000, "many", tmp_path / "expected")
    result = run_script(["--input", "many.jsonl", "--shard-size", 50_000, "--vocab", VOCAB, "--workers", workers],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert bin_files(tmp_path / "data" / "many") == expected


def test_long_documents_span_several_shards(tmp_path):
    """A document longer than a whole shard (llm.c would crash) spreads over several; boundaries that fall
    exactly on a document's end start the next shard with the next document."""
    texts = make_documents(30, seed=1)
    texts[4] = "\n\n".join(make_documents(40, seed=2))  # several shards long
    first_doc_tokens = len(document_tokens(texts[:1])[0])
    shard_size = first_doc_tokens  # shard 0 ends exactly at the end of document 0
    expected = chunked_shards(texts, shard_size, "long", tmp_path / "expected")
    assert len(document_tokens(texts[4:5])[0]) > 3 * shard_size
    write_jsonl(tmp_path / "long.jsonl", texts)
    result = run_script(["--input", tmp_path / "long.jsonl", "--shard-size", shard_size, "--vocab", VOCAB,
                         "--output-dir", tmp_path / "out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert bin_files(tmp_path / "out") == expected
    first_tokens = np.frombuffer((tmp_path / "out" / "long_train_000001.bin").read_bytes()[1024:1026], dtype="<u2")
    assert first_tokens[0] == EOT


# ---------------------------------------------------------------- resume

def test_resume_after_max_shards_is_byte_identical(tmp_path):
    texts = make_documents(60, seed=3)
    texts[20] = "\n\n".join(make_documents(60, seed=4))  # one document over several shards
    shard_size = 1000
    expected = chunked_shards(texts, shard_size, "web", tmp_path / "expected")
    write_jsonl(tmp_path / "web.jsonl", texts)
    lengths = [len(t) for t in document_tokens(texts)]
    ends = np.cumsum(lengths)
    args = ["--input", tmp_path / "web.jsonl", "--shard-size", shard_size, "--vocab", VOCAB, "--output-dir", tmp_path / "out"]

    # stop inside the long document, twice, then finish
    long_start, long_end = int(ends[19]), int(ends[20])
    stop_one = long_start // shard_size + 1          # the shard that ends inside the long document
    stop_two = stop_one + 2
    assert stop_two * shard_size < long_end
    first = run_script(args + ["--max-shards", stop_one], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "stopped after" in first.stdout
    state = progress(tmp_path / "out", "web")
    assert state["shards_done"] == stop_one and not state["complete"]
    assert state["docs_done"] == 20 and state["doc_tokens_done"] == stop_one * shard_size - long_start
    assert sorted(bin_files(tmp_path / "out")) == sorted(shard_name("web", i) for i in range(stop_one))

    second = run_script(args + ["--max-shards", 2], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"skipping 20 documents and {stop_one * shard_size - long_start:,} tokens of the next" in second.stdout
    state = progress(tmp_path / "out", "web")
    assert state["shards_done"] == stop_two and state["docs_done"] == 20
    assert state["doc_tokens_done"] == stop_two * shard_size - long_start > shard_size

    third = run_script(args, cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert bin_files(tmp_path / "out") == expected
    assert progress(tmp_path / "out", "web")["complete"]

    again = run_script(args, cwd=tmp_path)
    assert again.returncode == 0 and "already done" in again.stdout


def test_disk_full_keeps_complete_shards_and_rerun_finishes(corpus, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing shard 2: one line, no temp file, shards 0-1 and the progress kept; a rerun
    continues and the result equals the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    real_write = prepro_fineweb.write_shard_contents
    calls = []

    def failing_write(f, tokens):
        calls.append(len(tokens))
        if len(calls) == 3:
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(f, tokens)

    monkeypatch.setattr(prepro_fineweb, "write_shard_contents", failing_write)
    args = ["--input", str(corpus["jsonl"]), "--shard-size", "2048", "--vocab", str(VOCAB), "--workers", "0",
            "--output-dir", "out"]
    assert prepro_fineweb.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not write out/corpus_train_000002.bin (No space left on device); "
                              "2 complete shard(s) kept")
    assert all_files(tmp_path / "out") == ["corpus_progress.json", "corpus_train_000001.bin", "corpus_val_000000.bin"]
    assert progress(tmp_path / "out", "corpus")["shards_done"] == 2

    monkeypatch.setattr(prepro_fineweb, "write_shard_contents", real_write)
    assert prepro_fineweb.main(args) == 0
    assert bin_files(tmp_path / "out") == corpus["expected"]


def test_stale_temp_files_are_removed_on_rerun(corpus, tmp_path):
    args = ["--input", corpus["jsonl"], "--shard-size", 2048, "--vocab", VOCAB, "--output-dir", tmp_path / "out"]
    assert run_script(args + ["--max-shards", 1], cwd=tmp_path).returncode == 0
    stale = tmp_path / "out" / ".corpus_train_000001.bin.99999.tmp"
    stale.write_bytes(b"half a shard")
    assert run_script(args, cwd=tmp_path).returncode == 0
    assert not stale.exists()
    assert bin_files(tmp_path / "out") == corpus["expected"]


def test_other_settings_refused_then_force_starts_over(corpus, tmp_path):
    out = tmp_path / "out"
    base = ["--input", corpus["jsonl"], "--vocab", VOCAB, "--output-dir", out]
    assert run_script(base + ["--shard-size", 1000, "--max-shards", 3], cwd=tmp_path).returncode == 0
    refused = run_script(base + ["--shard-size", 2048], cwd=tmp_path)
    assert_one_line_error(refused, "shard_size was 1000, now 2048", "--force")
    assert len(bin_files(out)) == 3
    forced = run_script(base + ["--shard-size", 2048, "--force"], cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert bin_files(out) == corpus["expected"]  # no shard of the 1000-token run left over
    # a changed input file is another setting too
    os.utime(corpus["jsonl"], ns=(1, 1))
    changed = run_script(base + ["--shard-size", 2048], cwd=tmp_path)
    assert_one_line_error(changed, "files was", "--force")


def test_shards_without_progress_file_are_not_overwritten(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "corpus_val_000000.bin").write_bytes(b"someone else's shard")
    result = run_script(["--input", corpus["jsonl"], "--vocab", VOCAB, "--output-dir", out], cwd=tmp_path)
    assert_one_line_error(result, "no corpus_progress.json", "--force")
    assert (out / "corpus_val_000000.bin").read_bytes() == b"someone else's shard"


def test_damaged_done_shard_is_reported(corpus, tmp_path):
    out = tmp_path / "out"
    args = ["--input", corpus["jsonl"], "--shard-size", 2048, "--vocab", VOCAB, "--output-dir", out]
    assert run_script(args + ["--max-shards", 2], cwd=tmp_path).returncode == 0
    (out / "corpus_train_000001.bin").write_bytes(b"\0" * 10)
    assert_one_line_error(run_script(args, cwd=tmp_path), "corpus_train_000001.bin is missing or damaged")


# ---------------------------------------------------------------- local inputs: txt, patterns, parquet

def test_txt_files_and_pattern_order(tmp_path):
    """Patterns are read in the order given, files sorted by name within each; a .txt is one document."""
    texts = make_documents(12, seed=5)
    (tmp_path / "in").mkdir()
    for i, name in enumerate(["b2.txt", "b10.txt", "b1.txt"]):
        (tmp_path / "in" / name).write_bytes(texts[i].encode("utf-8"))
    write_jsonl(tmp_path / "in" / "a.jsonl", texts[3:])
    order = [texts[2], texts[1], texts[0]]  # b1, b10, b2: sorted by name
    expected = llmc_shards(order + texts[3:], 1024, "b1", tmp_path / "expected")
    result = run_script(["--input", "in/b*.txt", "in/a*.jsonl", "in/b1.txt", "--shard-size", 1024, "--vocab", VOCAB],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert bin_files(tmp_path / "data" / "b1") == expected  # default name: the first file's stem; each file once


def write_parquet(path, texts, row_group_size):
    import pyarrow
    import pyarrow.parquet
    table = pyarrow.table({"id": list(range(len(texts))), "text": texts})
    pyarrow.parquet.write_table(table, path, row_group_size=row_group_size)


def test_parquet_matches_llmc_and_resumes_across_row_groups(tmp_path):
    texts = make_documents(90, seed=6)
    write_parquet(tmp_path / "part_0.parquet", texts[:50], row_group_size=7)
    write_parquet(tmp_path / "part_1.parquet", texts[50:], row_group_size=11)
    expected = llmc_shards(texts, 1500, "fw", tmp_path / "expected")
    args = ["--input", tmp_path / "part_*.parquet", "--name", "fw", "--shard-size", 1500, "--vocab", VOCAB,
            "--output-dir", tmp_path / "out"]
    whole = run_script(args + ["--output-dir", tmp_path / "whole"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert bin_files(tmp_path / "whole") == expected
    for _ in range(3):
        step = run_script(args + ["--max-shards", 4], cwd=tmp_path)
        assert step.returncode == 0, step.stderr
    assert run_script(args, cwd=tmp_path).returncode == 0
    assert bin_files(tmp_path / "out") == expected


# ---------------------------------------------------------------- bad input

def write_bad_input(directory, case):
    """Write the input of one bad case; returns (the --input argument, parts the one-line error must contain)."""
    good = json.dumps({"text": "fine"})
    if case == "no_text":
        (directory / "no_text.jsonl").write_text(f"{good}\n{good}\n{json.dumps({'content': 'x'})}\n")
        return "no_text.jsonl", ["no_text.jsonl:3", "no 'text' field"]
    if case == "not_json":
        (directory / "not_json.jsonl").write_text(f"{good}\n\n{{oops\n")
        return "not_json.jsonl", ["not_json.jsonl:3", "not JSON"]
    if case == "text_not_string":
        (directory / "number.jsonl").write_text(json.dumps({"text": 5}) + "\n")
        return "number.jsonl", ["number.jsonl:1", "not a string"]
    if case == "unknown_kind":
        (directory / "table.csv").write_text("text\nhello\n")
        return "table.csv", ["table.csv", "unsupported input kind"]
    if case == "not_utf8":
        (directory / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
        return "latin1.txt", ["latin1.txt", "not UTF-8"]
    if case == "no_documents":
        (directory / "empty.jsonl").write_text("\n")
        return "empty.jsonl", ["no documents"]
    if case == "no_match":
        return "missing_*.jsonl", ["no input file matches missing_*.jsonl"]
    # parquet cases: these need pyarrow
    import pyarrow
    import pyarrow.parquet
    if case == "not_parquet":
        (directory / "fake.parquet").write_text(good)
        return "fake.parquet", ["fake.parquet", "not a readable parquet file"]
    if case == "no_text_column":
        pyarrow.parquet.write_table(pyarrow.table({"body": ["a", "b"]}), directory / "no_column.parquet")
        return "no_column.parquet", ["no_column.parquet", "no 'text' column"]
    if case == "null_text":
        pyarrow.parquet.write_table(pyarrow.table({"text": ["a", None]}), directory / "null.parquet")
        return "null.parquet", ["null.parquet", "row 1 has no text"]
    raise ValueError(case)


BAD_CASES = ["no_text", "not_json", "text_not_string", "unknown_kind", "not_utf8", "no_documents", "no_match",
             "not_parquet", "no_text_column", "null_text"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    file_name, parts = write_bad_input(tmp_path, case)
    result = run_script(["--input", file_name, "--vocab", VOCAB, "--shard-size", 1000, "--output-dir", "out"], cwd=tmp_path)
    assert_one_line_error(result, *parts)
    leftovers = all_files(tmp_path / "out") if (tmp_path / "out").exists() else []
    assert not [name for name in leftovers if name.endswith((".bin", ".tmp"))]


def test_bad_record_late_in_input_keeps_only_complete_shards(corpus, tmp_path):
    lines = corpus["jsonl"].read_text(encoding="utf-8").splitlines()
    lines[150] = '{"txt": "a typo"}'
    (tmp_path / "late.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_script(["--input", "late.jsonl", "--shard-size", 2048, "--vocab", VOCAB, "--output-dir", "out"],
                        cwd=tmp_path)
    assert_one_line_error(result, "late.jsonl:151", "no 'text' field")
    shards = bin_files(tmp_path / "out")
    expected = renamed(corpus["expected"], "corpus", "late")
    assert shards and all(raw == expected[name] and len(raw) == 1024 + 2 * 2048 for name, raw in shards.items())
    assert not [n for n in all_files(tmp_path / "out") if n.endswith(".tmp")]
    assert not progress(tmp_path / "out", "late")["complete"]


@pytest.mark.parametrize("args, message", [
    (["--shard-size", "0"], "--shard-size must be between 1"),
    (["--shard-size", str(2**31)], "--shard-size must be between 1"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--max-shards", "0"], "--max-shards must be 1 or more"),
    (["--name", "a/b"], "--name must be"),
    (["--type", "edu"], "do not apply with --input"),
])
def test_bad_arguments_exit_2(corpus, tmp_path, args, message):
    result = run_script(["--input", corpus["jsonl"], *args], cwd=tmp_path)
    assert_one_line_error(result, message, exit_code=2)
    assert all_files(tmp_path) == []


def test_help_documents_every_flag(tmp_path):
    conftest.assert_help_documents_every_flag(
        run_script(["--help"], cwd=tmp_path), prepro_fineweb.build_arg_parser(),
        ["classic", "edu", "10B", "100B", ".jsonl", ".parquet", ".txt", "tiktoken", "DATA_MIRROR"])


# ---------------------------------------------------------------- streamed FineWeb (fake datasets package)

FAKE_DATASETS = '''
"""A stand-in for Hugging Face datasets: load_dataset(streaming=True) yields the records of a jsonl file."""
import json, os

def log(entry):
    with open(os.environ["FAKE_DATASETS_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

class FakeStream:
    def __init__(self, records, first=0):
        self.records, self.first = records, first
    def skip(self, n):
        log({"skip": n})
        return FakeStream(self.records[n:], self.first + n)
    def __iter__(self):
        fail_at = int(os.environ.get("FAKE_DATASETS_FAIL_AT", "-1"))
        for i, record in enumerate(self.records):
            if self.first + i == fail_at:
                raise ConnectionError("Connection reset by peer\\nsecond line of a long message")
            yield record

def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    log({"path": path, "name": name, "split": split, "streaming": streaming})
    if not streaming:
        raise RuntimeError("the fake refuses a full download")
    with open(os.environ["FAKE_DATASETS_RECORDS"]) as f:
        return FakeStream([json.loads(line) for line in f])
'''


@pytest.fixture
def fake_datasets(corpus, tmp_path):
    package = tmp_path / "fake_site" / "datasets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_DATASETS))
    log = tmp_path / "datasets_log.jsonl"
    env = {"FAKE_DATASETS_LOG": str(log), "FAKE_DATASETS_RECORDS": str(corpus["jsonl"])}
    work = tmp_path / "work"
    work.mkdir()

    def run(args, **env_extra):
        return run_script(args, cwd=work, env_extra={**env, **env_extra}, pythonpath_first=package.parent)

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return {"run": run, "calls": calls, "work": work}


def renamed(shards, old, new):
    return {name.replace(old, new): raw for name, raw in shards.items()}


@pytest.mark.parametrize("flags, repo, config, out_dir, name", [
    ([], "HuggingFaceFW/fineweb", "sample-10BT", "fineweb10B", "fineweb"),
    (["--type", "edu", "--version", "100B"], "HuggingFaceFW/fineweb-edu", "sample-100BT", "edu_fineweb100B", "edu_fineweb"),
])
def test_streamed_fineweb_matches_llmc(corpus, fake_datasets, flags, repo, config, out_dir, name):
    result = fake_datasets["run"]([*flags, "--shard-size", 2048, "--vocab", VOCAB])
    assert result.returncode == 0, result.stderr
    assert fake_datasets["calls"]() == [{"path": repo, "name": config, "split": "train", "streaming": True}]
    assert bin_files(fake_datasets["work"] / "data" / out_dir) == renamed(corpus["expected"], "corpus", name)


def test_streamed_resume_skips_consumed_records(corpus, fake_datasets):
    args = ["--shard-size", 2048, "--vocab", VOCAB]
    assert fake_datasets["run"](args + ["--max-shards", 4]).returncode == 0
    docs_done = progress(fake_datasets["work"] / "data" / "fineweb10B", "fineweb")["docs_done"]
    assert docs_done > 0
    # the connection drops mid-stream: one line, the shards so far kept
    dropped = fake_datasets["run"](args, FAKE_DATASETS_FAIL_AT=str(docs_done + 60))
    assert_one_line_error(dropped, f"failed at record {docs_done + 60}", "ConnectionError: Connection reset by peer",
                          "rerun to continue")
    finished = fake_datasets["run"](args)
    assert finished.returncode == 0, finished.stderr
    skips = [call["skip"] for call in fake_datasets["calls"]() if "skip" in call]
    assert skips[0] == docs_done and len(skips) == 2 and skips[1] > docs_done
    assert bin_files(fake_datasets["work"] / "data" / "fineweb10B") == renamed(corpus["expected"], "corpus", "fineweb")


def test_missing_optional_packages_say_how_to_install(tmp_path):
    fake_site = tmp_path / "fake_site"
    for package in ["datasets", "pyarrow"]:
        (fake_site / package).mkdir(parents=True)
        (fake_site / package / "__init__.py").write_text(f"raise ImportError('No module named {package}')\n")
    streamed = run_script(["--vocab", VOCAB], cwd=tmp_path, pythonpath_first=fake_site)
    assert_one_line_error(streamed, "Hugging Face datasets", "pip install -r requirements-data.txt")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    parquet = run_script(["--input", "x.parquet", "--vocab", VOCAB], cwd=tmp_path, pythonpath_first=fake_site)
    assert_one_line_error(parquet, "pyarrow", "pip install -r requirements-data.txt")
    assert not (tmp_path / "data").exists()
