"""Tokenize HellaSwag (val and/or train) with GPT-2 BPE into llm.c's eval file, and read such files back.

Input, first found: --input FILE.jsonl; data/hellaswag/hellaswag_<split>.jsonl; <mirror>/hellaswag_<split>.jsonl
(--mirror DIR or $DATA_MIRROR); else a download of the official file llm.c uses,
https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_<split>.jsonl (streamed with a
timeout and a progress bar into data/hellaswag/, kept only if complete). The official files are checked to
hold all their examples (val 10,042, train 39,905).

Rendering, as llm.c's dev/data/hellaswag.py: context tokens = encode(ctx), ending tokens = encode(" " + ending)
for the 4 endings, and the label (index of the right ending).

Output: data/hellaswag/hellaswag_<split>.bin (--output), byte-identical to llm.c's write_evalfile:
  header: 256 little-endian int32 (20240522, version 1, number of examples, longest example in bytes)
  then per example a uint16 stream: 65535, example bytes, example index, label, 4 (endings),
  context length, context tokens, then per ending its length and tokens.
Written through a temp file, renamed into place.

For the trainer: read_eval_file(path) returns the examples (label, ctx_tokens, ending_tokens) after checking
every header and length field, and example_rows(example) gives the 4 token rows (context + ending) with the
span of each ending, the tokens to score. llm.c's acc_norm: the ending with the lowest mean cross-entropy over
its tokens, each predicted from the tokens before it, is the model's answer.

Exit codes: 0 done (or already done), 1 runtime failure (missing/corrupt input, offline), 2 bad arguments.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import requests

from prepro_tinyshakespeare import (
    DOWNLOAD_TIMEOUT_S,
    HEADER_INTS,
    PreproError,
    add_vocab_argument,
    run_cli,
    load_gpt2_encoding,
    resolve_mirror,
    stream_to_file,
    write_via_temp,
)

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
OFFICIAL_EXAMPLE_COUNTS = {"val": 10_042, "train": 39_905}
DEFAULT_DIR = Path("data") / "hellaswag"

HEADER_BYTES = HEADER_INTS * 4
EVAL_MAGIC = 20240522
EVAL_VERSION = 1
EXAMPLE_DELIMITER = 2**16 - 1
NUM_ENDINGS = 4
MAX_EXAMPLES = 2**16 - 1          # the example index is a uint16
MAX_EXAMPLE_BYTES = 2**16 - 1     # the example's byte count is a uint16
MAX_TOKEN = 2**16 - 2             # 65535 is the delimiter


def jsonl_name(split):
    return f"hellaswag_{split}.jsonl"


def how_to_supply(split):
    return (f"supply it offline: pass --input FILE, pass --mirror DIR (a directory holding {jsonl_name(split)}), "
            f"set DATA_MIRROR=DIR, or put the file at {DEFAULT_DIR / jsonl_name(split)}")


# ---------------------------------------------------------------- getting the jsonl

def count_lines(path):
    """Non-blank lines of a file."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def check_official_file(path, split, what, hint):
    count = count_lines(path)
    if count != OFFICIAL_EXAMPLE_COUNTS[split]:
        raise PreproError(f"{what} has {count:,} examples, expected {OFFICIAL_EXAMPLE_COUNTS[split]:,}; {hint}")


def download_hellaswag(split, dest):
    """Stream the official jsonl into a temp file beside dest; rename it into place only if complete."""
    url = HELLASWAG_URL.format(split=split)
    try:
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
            response.raise_for_status()
            write_via_temp(dest, lambda out: stream_to_file(response, out, dest.name),
                           check=lambda tmp: check_official_file(tmp, split, f"download from {url}",
                                                                 f"not kept; {how_to_supply(split)}"))
    except requests.RequestException as exc:
        raise PreproError(f"could not download {url} ({type(exc).__name__}); {how_to_supply(split)}") from exc


def find_jsonl(split, input_path, mirror):
    """Path of the split's jsonl: --input, else data/hellaswag/, else the mirror, else downloaded."""
    if input_path is not None:
        if not Path(input_path).is_file():
            raise PreproError(f"input file not found: {input_path}")
        return Path(input_path)
    local = DEFAULT_DIR / jsonl_name(split)
    if local.is_file():
        check_official_file(local, split, f"local copy {local}", "replace or delete it")
        print(f"using local copy {local}")
        return local
    if mirror is not None:
        mirrored = Path(mirror) / jsonl_name(split)
        if mirrored.is_file():
            check_official_file(mirrored, split, f"mirror file {mirrored}", "replace it")
            print(f"using mirror file {mirrored}")
            return mirrored
        print(f"mirror {mirror} has no {jsonl_name(split)}; downloading")
    print(f"downloading {HELLASWAG_URL.format(split=split)} -> {local}")
    download_hellaswag(split, local)
    return local


# ---------------------------------------------------------------- rendering

def read_examples(path):
    """The examples of a HellaSwag jsonl file, each checked to have ctx, 4 endings and a label 0..3."""
    examples = []
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                example = json.loads(line)
            except UnicodeDecodeError as exc:
                raise PreproError(f"{where}: not UTF-8 ({exc.reason})") from exc
            except json.JSONDecodeError as exc:
                raise PreproError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(example, dict):
                raise PreproError(f"{where}: not a JSON object")
            if not isinstance(example.get("ctx"), str):
                raise PreproError(f"{where}: no 'ctx' string")
            endings = example.get("endings")
            endings_ok = isinstance(endings, list) and len(endings) == NUM_ENDINGS
            if not endings_ok or not all(isinstance(ending, str) for ending in endings):
                raise PreproError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
            label = example.get("label")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
                raise PreproError(f"{where}: 'label' must be an integer 0..{NUM_ENDINGS - 1}, got {label!r}")
            examples.append((where, example))
    if not examples:
        raise PreproError(f"{path} holds no examples")
    return examples


def render_example(example, enc):
    """llm.c's rendering: {label, ctx_tokens: encode(ctx), ending_tokens: [encode(" " + ending) x 4]}."""
    return {
        "label": example["label"],
        "ctx_tokens": enc.encode(example["ctx"]),
        "ending_tokens": [enc.encode(" " + ending) for ending in example["endings"]],
    }


def render_examples(examples, enc):
    rendered = []
    for where, example in examples:
        try:
            rendered.append(render_example(example, enc))
        except ValueError as exc:  # tiktoken refuses special-token text such as <|endoftext|>
            raise PreproError(f"{where}: cannot tokenize ({str(exc).splitlines()[0]})") from exc
    return rendered


# ---------------------------------------------------------------- the eval file

def eval_file_bytes(rendered):
    """llm.c's eval file for a list of {label, ctx_tokens, ending_tokens} (see the module docstring)."""
    if not 0 < len(rendered) <= MAX_EXAMPLES:
        raise PreproError(f"an eval file holds 1 to {MAX_EXAMPLES:,} examples, got {len(rendered):,}")
    stream = []
    longest_bytes = 0
    for index, example in enumerate(rendered):
        ending_tokens = example["ending_tokens"]
        if len(ending_tokens) != NUM_ENDINGS:
            raise PreproError(f"example {index} has {len(ending_tokens)} endings, expected {NUM_ENDINGS}")
        fields = [EXAMPLE_DELIMITER, 0, index, example["label"], NUM_ENDINGS,
                  len(example["ctx_tokens"]), *example["ctx_tokens"]]
        for tokens in ending_tokens:
            fields.append(len(tokens))
            fields.extend(tokens)
        example_bytes = 2 * len(fields)
        if example_bytes > MAX_EXAMPLE_BYTES:
            raise PreproError(f"example {index} takes {example_bytes:,} bytes, more than an eval file allows "
                              f"({MAX_EXAMPLE_BYTES:,})")
        if any(not 0 <= t <= MAX_TOKEN for t in fields[6:]):
            raise PreproError(f"example {index} has a token outside 0..{MAX_TOKEN}")
        fields[1] = example_bytes
        longest_bytes = max(longest_bytes, example_bytes)
        stream.extend(fields)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = EVAL_MAGIC
    header[1] = EVAL_VERSION
    header[2] = len(rendered)
    header[3] = longest_bytes
    return header.tobytes() + np.array(stream, dtype="<u2").tobytes()


def write_eval_file(path, rendered):
    payload = eval_file_bytes(rendered)
    write_via_temp(path, lambda f: f.write(payload))


def read_eval_file(path):
    """Examples of an llm.c eval file: [{label, ctx_tokens, ending_tokens (4 lists)}], every field checked.

    Raises PreproError (one line naming the file and the problem) for anything that is not a valid eval file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PreproError(f"cannot read eval file {path} ({exc.strerror or exc})") from exc
    if len(raw) < HEADER_BYTES or (len(raw) - HEADER_BYTES) % 2:
        raise PreproError(f"{path}: not an eval file ({len(raw):,} bytes: no header or an odd-sized body)")
    header = np.frombuffer(raw, dtype="<i4", count=HEADER_INTS)
    if header[0] != EVAL_MAGIC:
        raise PreproError(f"{path}: not an eval file (magic {header[0]}, expected {EVAL_MAGIC})")
    if header[1] != EVAL_VERSION:
        raise PreproError(f"{path}: eval file version {header[1]}, expected {EVAL_VERSION}")
    num_examples, longest_bytes = int(header[2]), int(header[3])
    stream = np.frombuffer(raw, dtype="<u2", offset=HEADER_BYTES).tolist()

    examples = []
    position = 0
    seen_longest = 0
    while position < len(stream):
        index = len(examples)
        where = f"{path}: example {index} (uint16 {position} of the body)"
        if len(stream) - position < 6:
            raise PreproError(f"{where}: truncated example header")
        delimiter, example_bytes, stored_index, label, num_endings = stream[position:position + 5]
        if delimiter != EXAMPLE_DELIMITER:
            raise PreproError(f"{where}: delimiter {delimiter}, expected {EXAMPLE_DELIMITER}")
        if stored_index != index:
            raise PreproError(f"{where}: index field {stored_index}, expected {index}")
        if num_endings != NUM_ENDINGS:
            raise PreproError(f"{where}: {num_endings} endings, expected {NUM_ENDINGS}")
        if label >= num_endings:
            raise PreproError(f"{where}: label {label} out of range")
        end = position + example_bytes // 2
        if example_bytes % 2 or end > len(stream):
            raise PreproError(f"{where}: byte count {example_bytes} runs past the file or is odd")
        cursor = position + 5
        spans = []
        for _ in range(1 + num_endings):
            if cursor >= end:
                raise PreproError(f"{where}: lengths overrun its byte count {example_bytes}")
            length = stream[cursor]
            if cursor + 1 + length > end:
                raise PreproError(f"{where}: a length of {length} tokens overruns its byte count {example_bytes}")
            spans.append(stream[cursor + 1:cursor + 1 + length])
            cursor += 1 + length
        if cursor != end:
            raise PreproError(f"{where}: {2 * (end - cursor)} bytes beyond its context and endings")
        if any(len(tokens) == 0 for tokens in spans[1:]):
            raise PreproError(f"{where}: an ending has no tokens")
        examples.append({"label": label, "ctx_tokens": spans[0], "ending_tokens": spans[1:]})
        seen_longest = max(seen_longest, example_bytes)
        position = end
    if len(examples) != num_examples:
        raise PreproError(f"{path}: header says {num_examples} examples, the body holds {len(examples)}")
    if seen_longest != longest_bytes:
        raise PreproError(f"{path}: header says the longest example is {longest_bytes} bytes, it is {seen_longest}")
    return examples


def example_rows(example):
    """The 4 rows to score: [(context + ending tokens, start, end)], the ending being row[start:end].

    Each ending token row[j] is scored by the model's cross-entropy at position j - 1 (the next-token
    prediction from row[:j]); the ending with the lowest mean over j in start..end-1 wins (llm.c's acc_norm).
    With an empty context the first ending token has no prediction and is left out, as llm.c does.
    """
    ctx = list(example["ctx_tokens"])
    return [(ctx + list(ending), len(ctx), len(ctx) + len(ending)) for ending in example["ending_tokens"]]


# ---------------------------------------------------------------- command line

def build_arg_parser():
    parser = argparse.ArgumentParser(
        description=(
            "Tokenize HellaSwag with GPT-2 BPE into llm.c's eval file (data/hellaswag/hellaswag_<split>.bin), "
            "byte-identical to llm.c's dev/data/hellaswag.py. The jsonl comes from --input, "
            "data/hellaswag/, the mirror, or a download. Paths are relative to the current directory."
        ),
    )
    parser.add_argument(
        "--split", nargs="+", choices=["val", "train"], default=["val"],
        help="which split(s) to prepare (default: val)",
    )
    parser.add_argument(
        "--input", metavar="FILE",
        help="HellaSwag-style jsonl to tokenize instead of the official file (one --split only); "
             "its output is always rewritten",
    )
    parser.add_argument(
        "--output", metavar="FILE",
        help=f"eval file to write (one --split only; default {DEFAULT_DIR}/hellaswag_<split>.bin)",
    )
    parser.add_argument(
        "--mirror", metavar="DIR",
        help="directory holding hellaswag_<split>.jsonl (and optionally gpt2.tiktoken) to use instead of "
             "downloading; default: $DATA_MIRROR",
    )
    add_vocab_argument(parser)
    parser.add_argument(
        "--force", action="store_true",
        help="rewrite the eval file even if a valid one with all the official examples exists",
    )
    return parser


def validate_args(args):
    splits = list(dict.fromkeys(args.split))
    if len(splits) > 1 and (args.input or args.output):
        raise PreproError("--input and --output take one --split at a time", exit_code=2)
    return splits


def already_done(output_path, split):
    try:
        return len(read_eval_file(output_path)) == OFFICIAL_EXAMPLE_COUNTS[split]
    except PreproError:
        return False


def run(args):
    splits = validate_args(args)
    mirror = resolve_mirror(args.mirror)
    enc = None
    for split in splits:
        output_path = Path(args.output) if args.output else DEFAULT_DIR / f"hellaswag_{split}.bin"
        if not args.input and not args.force and output_path.is_file() and already_done(output_path, split):
            print(f"already done: {output_path} holds the {OFFICIAL_EXAMPLE_COUNTS[split]:,} {split} examples "
                  "(use --force to redo)")
            continue
        jsonl_path = find_jsonl(split, args.input, mirror)
        examples = read_examples(jsonl_path)
        enc = enc or load_gpt2_encoding(args.vocab, mirror)
        rendered = render_examples(examples, enc)
        write_eval_file(output_path, rendered)
        print(f"{split}: {len(rendered):,} examples from {jsonl_path} -> {output_path}")
    return 0


def main(argv=None):
    return run_cli(build_arg_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
