"""Tokenize FineWeb / FineWeb-Edu, or local jsonl/parquet/txt documents, into llm.c token shards.

Sources:
  streamed   --type classic|edu --version 10B|100B: HuggingFaceFW/fineweb or HuggingFaceFW/fineweb-edu,
             config sample-10BT or sample-100BT, read through Hugging Face `datasets` with streaming=True
             (nothing is downloaded ahead of the tokenizer; pip install -r requirements-data.txt)
  local      --input PATTERN [PATTERN ...]: .jsonl (the "text" field of each line), .parquet (the "text"
             column, via pyarrow) or .txt (the whole file is one document); globs allowed, files sorted by
             name within each pattern, patterns in the order given

Every document becomes [50256] + GPT-2 BPE tokens (tiktoken's encode_ordinary), tokenized in a process
pool. The token stream is cut into shards exactly as llm.c's dev/data/fineweb.py cuts it: every shard but
the last holds exactly --shard-size tokens (a document crossing a boundary is split across it, a document
longer than a shard spreads over several), the last holds the rest. Shard 0 is val, the others train:
  <output-dir>/<name>_val_000000.bin, <name>_train_000001.bin, ...
each an llm.c token file (256 little-endian int32 header: 20240520, 1, ntokens; then uint16 tokens),
byte-identical to llm.c's output for the same documents.

Each shard is written through a temp file and renamed into place; after each, <name>_progress.json in the
output dir records the shards done, the documents fully consumed and the tokens of the next document already
written, with the settings. A rerun (after a crash, Ctrl-C, a lost connection or --max-shards) continues
after the last complete shard and gives the same bytes as an uninterrupted run; a rerun with other settings
refuses unless --force.

Exit codes: 0 done (or already done, or stopped at --max-shards), 1 runtime failure (bad input, missing
package, disk full), 2 bad arguments.
"""

import argparse
import collections
import glob
import json
import multiprocessing
import os
import re
import signal
import sys
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prepro_tinyshakespeare import (
    EOT_TOKEN,
    HEADER_INTS,
    TOKEN_MAGIC,
    PreproError,
    add_vocab_argument,
    run_cli,
    load_gpt2_encoding,
    resolve_mirror,
    token_file_count,
    write_via_temp,
)

# llm.c's names: (--type, --version) -> (Hugging Face repo, config, output name, output dir under data/)
STREAM_SOURCES = {
    ("classic", "10B"): ("HuggingFaceFW/fineweb", "sample-10BT", "fineweb", "fineweb10B"),
    ("classic", "100B"): ("HuggingFaceFW/fineweb", "sample-100BT", "fineweb", "fineweb100B"),
    ("edu", "10B"): ("HuggingFaceFW/fineweb-edu", "sample-10BT", "edu_fineweb", "edu_fineweb10B"),
    ("edu", "100B"): ("HuggingFaceFW/fineweb-edu", "sample-100BT", "edu_fineweb", "edu_fineweb100B"),
}
DEFAULT_TYPE = "classic"
DEFAULT_VERSION = "10B"
DEFAULT_DATA_DIR = Path("data")
DEFAULT_SHARD_SIZE = 10**8
MAX_SHARD_SIZE = 2**31 - 1        # the header's int32 token count
INPUT_KINDS = {".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
PROGRESS_FORMAT = 1
BATCH_DOCS = 512                  # documents per task sent to a worker ...
BATCH_CHARS = 1 << 20             # ... or fewer, once they hold this many characters
TASKS_PER_WORKER = 4              # tasks in flight per worker (bounds the read-ahead)
PARQUET_BATCH_ROWS = 4096
HOW_TO_INSTALL = "pip install -r requirements-data.txt"


# ---------------------------------------------------------------- tokenizing (runs in the workers)

WORKER_ENCODING = None


def init_worker(vocab_path, mirror):
    """Pool initializer: load the GPT-2 encoding once per worker; Ctrl-C is the parent's to handle."""
    global WORKER_ENCODING
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    WORKER_ENCODING = load_gpt2_encoding(vocab_path, mirror)


def encode_ordinary_array(enc, text):
    """enc.encode_ordinary(text) as a uint32 array, straight from tiktoken's buffer where it can (0.8+).

    encode_to_numpy with no special tokens allowed or disallowed is encode_ordinary without the Python list;
    text with lone surrogates goes through encode_ordinary, which repairs them (as llm.c's call does).
    """
    if hasattr(enc, "encode_to_numpy"):
        try:
            return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:
            pass
    return np.array(enc.encode_ordinary(text), dtype=np.uint32)


def encode_documents(texts, enc=None):
    """Tokens of a batch of documents, each [EOT] + encode_ordinary(text): (flat uint16 array, lengths)."""
    enc = enc or WORKER_ENCODING
    eot = np.array([EOT_TOKEN], dtype=np.uint32)
    lengths = np.empty(len(texts), dtype=np.int64)
    pieces = []
    for i, text in enumerate(texts):
        tokens = encode_ordinary_array(enc, text)
        pieces.append(eot)
        pieces.append(tokens)
        lengths[i] = tokens.size + 1
    return np.concatenate(pieces).astype(np.uint16), lengths


def encoded_batches(text_batches, workers, vocab_path, mirror, enc):
    """(tokens, lengths) per batch, in order: in a pool of `workers` processes, or here when workers is 0.

    A read error (PreproError) is raised after the batches read before it, so their shards get written.
    """
    if workers == 0:
        for texts in text_batches:
            yield encode_documents(texts, enc)
        return
    max_in_flight = workers * TASKS_PER_WORKER
    with multiprocessing.Pool(workers, initializer=init_worker, initargs=(vocab_path, mirror)) as pool:
        pending = collections.deque()
        read_error = None
        batches = iter(text_batches)
        while True:
            try:
                texts = next(batches)
            except StopIteration:
                break
            except PreproError as exc:
                read_error = exc
                break
            pending.append(pool.apply_async(encode_documents, (texts,)))
            if len(pending) >= max_in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        if read_error is not None:
            raise read_error


def batch_texts(texts):
    """Group a stream of documents into lists of up to BATCH_DOCS documents / about BATCH_CHARS characters.

    On a read error the documents read before it still come out, as a last batch, before the error.
    """
    batch, chars = [], 0
    try:
        for text in texts:
            batch.append(text)
            chars += len(text)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    except PreproError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


# ---------------------------------------------------------------- reading documents

def expand_inputs(patterns):
    """Files matched by each pattern (sorted by name within a pattern, patterns in order, each file once)."""
    paths, seen = [], set()
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise PreproError(f"no input file matches {pattern}")
        for match in matches:
            path = Path(match)
            if path.suffix not in INPUT_KINDS:
                raise PreproError(f"{path}: unsupported input kind, expected one of {', '.join(INPUT_KINDS)}")
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    return paths


def first_line(exc):
    """'Type: first line of the message', for one-line errors from other libraries."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def import_pyarrow_parquet():
    try:
        import pyarrow.parquet
    except Exception as exc:  # missing, or a broken install
        raise PreproError(f"parquet input needs pyarrow ({first_line(exc)}); {HOW_TO_INSTALL}") from exc
    return pyarrow.parquet


def open_parquet(path):
    """pyarrow ParquetFile with a string 'text' column, or PreproError naming the problem."""
    import pyarrow
    parquet = import_pyarrow_parquet()
    try:
        parquet_file = parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise PreproError(f"{path}: not a readable parquet file ({first_line(exc)})") from exc
    schema = parquet_file.schema_arrow
    if "text" not in schema.names:
        raise PreproError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
    text_type = schema.field("text").type
    if not (pyarrow.types.is_string(text_type) or pyarrow.types.is_large_string(text_type)):
        raise PreproError(f"{path}: the 'text' column holds {text_type}, not strings")
    return parquet_file


def count_documents(path):
    """Documents in a local file, counted without parsing (for skipping whole files on a rerun)."""
    kind = INPUT_KINDS[path.suffix]
    if kind == "txt":
        return 1
    if kind == "parquet":
        return open_parquet(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def read_jsonl(path, skip):
    """The 'text' of every non-blank line of a jsonl file, after skipping `skip` records unparsed."""
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if skip:
                skip -= 1
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError as exc:
                raise PreproError(f"{path}:{line_number}: not UTF-8 ({exc.reason})") from exc
            except json.JSONDecodeError as exc:
                raise PreproError(f"{path}:{line_number}: not JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(record, dict) or "text" not in record:
                raise PreproError(f"{path}:{line_number}: record has no 'text' field")
            if not isinstance(record["text"], str):
                raise PreproError(f"{path}:{line_number}: 'text' is {type(record['text']).__name__}, not a string")
            yield record["text"]


def read_parquet(path, skip):
    """The 'text' column of a parquet file, row by row, skipping the first `skip` rows (whole row groups unread)."""
    parquet_file = open_parquet(path)
    row_index = 0
    for group in range(parquet_file.num_row_groups):
        group_rows = parquet_file.metadata.row_group(group).num_rows
        if skip >= group_rows:
            skip -= group_rows
            row_index += group_rows
            continue
        for batch in parquet_file.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=["text"]):
            for text in batch.column(0).to_pylist():
                if skip:
                    skip -= 1
                elif text is None:
                    raise PreproError(f"{path}: row {row_index} has no text (null)")
                else:
                    yield text
                row_index += 1


def read_txt(path, skip):
    if skip:
        return
    try:
        yield path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PreproError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "txt": read_txt}


def local_documents(paths, skip):
    """Texts of the local files in order, after the first `skip` documents."""
    for path in paths:
        if skip:
            file_documents = count_documents(path)
            if skip >= file_documents:
                skip -= file_documents
                continue
        yield from READERS[INPUT_KINDS[path.suffix]](path, skip)
        skip = 0


def import_datasets():
    try:
        import datasets
    except Exception as exc:  # missing, or a broken install
        raise PreproError(f"streaming FineWeb needs Hugging Face datasets ({first_line(exc)}); "
                          f"{HOW_TO_INSTALL}") from exc
    return datasets


def streamed_documents(repo, config, skip):
    """Texts of a Hugging Face dataset's train split, streamed (no full download), after `skip` records."""
    datasets = import_datasets()
    count = skip
    try:
        dataset = datasets.load_dataset(repo, name=config, split="train", streaming=True)
        if skip:
            dataset = dataset.skip(skip) if hasattr(dataset, "skip") else islice(dataset, skip, None)
        for record in dataset:
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise PreproError(f"{repo} ({config}) record {count} has no 'text' string")
            count += 1
            yield record["text"]
    except PreproError:
        raise
    except Exception as exc:  # network, hub or parsing failures inside datasets: one line, the rerun resumes
        raise PreproError(f"streaming {repo} ({config}) failed at record {count} ({first_line(exc)}); "
                          "rerun to continue after the last complete shard") from exc


# ---------------------------------------------------------------- shards and progress

def shard_path(output_dir, name, index):
    split = "val" if index == 0 else "train"
    return Path(output_dir) / f"{name}_{split}_{index:06d}.bin"


def progress_path(output_dir, name):
    return Path(output_dir) / f"{name}_progress.json"


def existing_shards(output_dir, name):
    """Shard files of this name already in output_dir."""
    pattern = re.compile(rf"{re.escape(name)}_(val|train)_\d{{6}}\.bin")
    if not Path(output_dir).is_dir():
        return []
    return sorted(p for p in Path(output_dir).iterdir() if pattern.fullmatch(p.name))


def remove_stale_temps(output_dir, name):
    """Temp files a killed run left behind (write_via_temp names them .<dest name>.<pid>.tmp)."""
    if not Path(output_dir).is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(name)}_((val|train)_\d{{6}}\.bin|progress\.json)\.\d+\.tmp")
    for path in Path(output_dir).iterdir():
        if pattern.fullmatch(path.name):
            path.unlink()


def write_shard_contents(f, tokens):
    """llm.c's token file body: 256 int32 header (magic, version 1, count), then the uint16 tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = TOKEN_MAGIC
    header[1] = 1
    header[2] = tokens.size
    f.write(header.tobytes())
    f.write(tokens.astype("<u2", copy=False).tobytes())


def write_shard(path, tokens, shards_before):
    try:
        write_via_temp(path, lambda f: write_shard_contents(f, tokens))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PreproError(f"could not write {path} ({reason}); {shards_before} complete shard(s) kept, "
                          "rerun to continue after them") from exc


def write_progress(path, progress):
    payload = (json.dumps(progress, indent=1) + "\n").encode()
    try:
        write_via_temp(path, lambda f: f.write(payload))
    except OSError as exc:
        raise PreproError(f"could not write {path} ({exc.strerror or exc}); rerun to continue") from exc


def read_progress(path):
    try:
        progress = json.loads(Path(path).read_text())
        fields = ("format", "settings", "shards_done", "tokens_done", "docs_done", "doc_tokens_done", "complete")
        if not isinstance(progress, dict) or any(field not in progress for field in fields):
            raise ValueError("missing fields")
    except (OSError, ValueError) as exc:
        raise PreproError(f"progress file {path} is unreadable ({exc}); use --force to start over") from exc
    if progress["format"] != PROGRESS_FORMAT:
        raise PreproError(f"progress file {path} has format {progress['format']}, expected {PROGRESS_FORMAT}; "
                          "use --force to start over")
    return progress


def brief_json(value, limit=80):
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def settings_difference(recorded, current):
    """A short description of the first setting that differs, or None."""
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            return f"{key} was {brief_json(recorded.get(key))}, now {brief_json(current.get(key))}"
    return None


def check_done_shards(output_dir, name, progress, shard_size):
    """Every shard the progress file counts done must exist with its token count (the last may be short)."""
    for index in range(progress["shards_done"]):
        path = shard_path(output_dir, name, index)
        if token_file_count(path) != min(shard_size, progress["tokens_done"] - index * shard_size):
            raise PreproError(f"{path} is missing or damaged though the progress file counts it done; "
                              "use --force to start over")


# ---------------------------------------------------------------- the run

def shard_stream(batches, progress, shard_size, output_dir, name, progress_file, max_shards, bar):
    """Cut the batches' tokens into shards, writing each (and the progress) as it fills.

    progress holds shards_done, tokens_done (tokens in them), docs_done (documents whose tokens are all in
    written shards) and doc_tokens_done (tokens of the next document already written); the first batch
    starts at that document.
    Returns 'stopped' when max_shards shards were written in this run, else 'complete'.
    """
    buffer = np.empty(shard_size, dtype=np.uint16)
    fill = 0
    shards_this_run = 0
    batch_first_doc = progress["docs_done"]
    skip_tokens = progress["doc_tokens_done"]
    saw_tokens = progress["shards_done"] > 0
    for tokens, lengths in batches:
        doc_ends = np.cumsum(lengths)
        if skip_tokens and skip_tokens >= lengths[0]:
            raise PreproError(f"document {batch_first_doc} has {lengths[0]} tokens but {skip_tokens} were already "
                              "written: the input changed; use --force to start over")
        position, skip_tokens = skip_tokens, 0
        saw_tokens = saw_tokens or tokens.size > 0
        while position < tokens.size:
            take = min(shard_size - fill, tokens.size - position)
            buffer[fill:fill + take] = tokens[position:position + take]
            fill += take
            position += take
            bar.update(take)
            if fill < shard_size:
                continue
            index = progress["shards_done"]
            path = shard_path(output_dir, name, index)
            write_shard(path, buffer, index)
            fill = 0
            docs_in_batch = int(np.searchsorted(doc_ends, position, side="right"))
            progress["shards_done"] = index + 1
            progress["tokens_done"] = (index + 1) * shard_size
            progress["docs_done"] = batch_first_doc + docs_in_batch
            progress["doc_tokens_done"] = position - (int(doc_ends[docs_in_batch - 1]) if docs_in_batch else 0)
            write_progress(progress_file, progress)
            tqdm.write(f"wrote {path} ({shard_size:,} tokens)")
            shards_this_run += 1
            if max_shards is not None and shards_this_run >= max_shards:
                return "stopped"
        batch_first_doc += len(lengths)
    if not saw_tokens:
        raise PreproError("the input holds no documents")
    if fill:
        index = progress["shards_done"]
        path = shard_path(output_dir, name, index)
        write_shard(path, buffer[:fill], index)
        progress["shards_done"] = index + 1
        progress["tokens_done"] += fill
        tqdm.write(f"wrote {path} ({fill:,} tokens)")
    progress["docs_done"] = batch_first_doc
    progress["doc_tokens_done"] = 0
    progress["complete"] = True
    write_progress(progress_file, progress)
    return "complete"


def source_settings(args):
    """(settings that must match on a rerun, output name, output dir, documents(skip) function)."""
    if args.input:
        paths = expand_inputs(args.input)
        if any(INPUT_KINDS[p.suffix] == "parquet" for p in paths):
            import_pyarrow_parquet()
        name = args.name or paths[0].stem
        output_dir = Path(args.output_dir) if args.output_dir else DEFAULT_DATA_DIR / name
        files = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]
        settings = {"source": "local", "files": files}
        return settings, name, output_dir, lambda skip: local_documents(paths, skip)
    repo, config, default_name, dir_name = STREAM_SOURCES[(args.type or DEFAULT_TYPE, args.version or DEFAULT_VERSION)]
    import_datasets()
    name = args.name or default_name
    output_dir = Path(args.output_dir) if args.output_dir else DEFAULT_DATA_DIR / dir_name
    settings = {"source": "huggingface", "dataset": repo, "config": config}
    return settings, name, output_dir, lambda skip: streamed_documents(repo, config, skip)


def validate_args(args):
    if args.input and (args.type or args.version):
        raise PreproError("--type and --version choose the streamed FineWeb; they do not apply with --input", exit_code=2)
    if not 1 <= args.shard_size <= MAX_SHARD_SIZE:
        raise PreproError(f"--shard-size must be between 1 and {MAX_SHARD_SIZE:,}, got {args.shard_size}", exit_code=2)
    if args.workers < 0:
        raise PreproError(f"--workers must be 0 or more, got {args.workers}", exit_code=2)
    if args.max_shards is not None and args.max_shards < 1:
        raise PreproError(f"--max-shards must be 1 or more, got {args.max_shards}", exit_code=2)
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        raise PreproError(f"--name must be letters, digits, '.', '_' or '-', got {args.name!r}", exit_code=2)


def run(args):
    validate_args(args)
    mirror = resolve_mirror(args.mirror)
    settings, name, output_dir, documents = source_settings(args)
    settings.update({"name": name, "shard_size": args.shard_size})
    progress_file = progress_path(output_dir, name)

    progress = None
    if args.force:
        for path in existing_shards(output_dir, name):
            path.unlink()
        progress_file.unlink(missing_ok=True)
    elif progress_file.exists():
        progress = read_progress(progress_file)
        difference = settings_difference(progress["settings"], settings)
        if difference:
            raise PreproError(f"{output_dir} holds a run with other settings ({difference}); "
                              "use --force to start over, or another --output-dir")
        check_done_shards(output_dir, name, progress, args.shard_size)
        if progress["complete"]:
            print(f"already done: {progress['shards_done']} shard(s) of {name} in {output_dir} (use --force to redo)")
            return 0
    elif existing_shards(output_dir, name):
        raise PreproError(f"{output_dir} holds {name} shards but no {progress_file.name}; "
                          "use --force to overwrite them, or another --output-dir")
    if progress is None:
        progress = {"format": PROGRESS_FORMAT, "settings": settings, "shards_done": 0, "tokens_done": 0,
                    "docs_done": 0, "doc_tokens_done": 0, "complete": False}
    else:
        print(f"resuming after shard {progress['shards_done'] - 1}: skipping {progress['docs_done']:,} documents "
              f"and {progress['doc_tokens_done']:,} tokens of the next")
    remove_stale_temps(output_dir, name)

    enc = load_gpt2_encoding(args.vocab, mirror)
    batches = encoded_batches(batch_texts(documents(progress["docs_done"])), args.workers, args.vocab, mirror, enc)
    shards_before = progress["shards_done"]
    try:
        with tqdm(unit="tok", unit_scale=True, desc=name) as bar:
            outcome = shard_stream(batches, progress, args.shard_size, output_dir, name, progress_file,
                                   args.max_shards, bar)
    finally:
        batches.close()  # stops the pool now, also when stopping early or failing
    written = progress["shards_done"] - shards_before
    if outcome == "stopped":
        print(f"stopped after {written} shard(s) (--max-shards); rerun to continue")
    else:
        print(f"done: {progress['shards_done']} shard(s) of {name} in {output_dir} "
              f"({progress['docs_done']:,} documents)")
    return 0


def build_arg_parser():
    parser = argparse.ArgumentParser(
        description=(
            "Tokenize FineWeb / FineWeb-Edu (streamed from Hugging Face) or local jsonl/parquet/txt documents "
            "with GPT-2 BPE into llm.c token shards (<name>_val_000000.bin, <name>_train_000001.bin, ...), "
            "byte-identical to llm.c's dev/data/fineweb.py. A rerun continues after the last complete shard "
            "(recorded in <output-dir>/<name>_progress.json). "
            "Paths are relative to the current directory."
        ),
    )
    source = parser.add_argument_group("source (streamed FineWeb unless --input)")
    source.add_argument(
        "-t", "--type", choices=["classic", "edu"],
        help=f"streamed FineWeb flavour: classic = HuggingFaceFW/fineweb, edu = HuggingFaceFW/fineweb-edu "
             f"(default {DEFAULT_TYPE})",
    )
    source.add_argument(
        "-v", "--version", choices=["10B", "100B"],
        help=f"streamed sample: 10B = config sample-10BT, 100B = sample-100BT (default {DEFAULT_VERSION})",
    )
    source.add_argument(
        "--input", nargs="+", metavar="PATTERN",
        help="tokenize local files instead: .jsonl (the 'text' field of each line), .parquet (the 'text' "
             "column; needs pyarrow) or .txt (one document per file); globs allowed (quote them), files "
             "sorted by name within each pattern, patterns read in the order given",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--name", metavar="NAME",
        help="shard name prefix (default: fineweb or edu_fineweb as llm.c when streaming, "
             "else the stem of the first input file)",
    )
    output.add_argument(
        "--output-dir", metavar="DIR",
        help="where the shards go (default data/fineweb10B, data/edu_fineweb100B, ... as llm.c's local_dir "
             "when streaming, else data/<name>)",
    )
    output.add_argument(
        "-s", "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
        help="tokens per shard; the last shard holds the rest (default %(default)s)",
    )
    output.add_argument(
        "--max-shards", type=int, metavar="N",
        help="write at most N shards in this run, then stop; a rerun continues (default: no limit)",
    )
    output.add_argument(
        "--force", action="store_true",
        help="start over: delete this name's shards and progress file in the output dir, even from other settings",
    )
    tokenizer = parser.add_argument_group("tokenizer")
    add_vocab_argument(tokenizer)
    tokenizer.add_argument(
        "--mirror", metavar="DIR",
        help="directory holding gpt2.tiktoken to use instead of downloading it; default: $DATA_MIRROR",
    )
    tokenizer.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, metavar="N",
        help="tokenizer processes; 0 tokenizes in this process (default: the CPU count, %(default)s here)",
    )
    return parser


def main(argv=None):
    return run_cli(build_arg_parser(), run, argv, "interrupted; rerun to continue after the last complete shard")


if __name__ == "__main__":
    sys.exit(main())
