"""Tokenize tinyshakespeare (or any UTF-8 text) with GPT-2 BPE into llm.c token files.

Outputs, byte-identical to llm.c's dev/data/tinyshakespeare.py:
  data/tinyshakespeare/tiny_shakespeare_val.bin    32,768 tokens
  data/tinyshakespeare/tiny_shakespeare_train.bin  305,260 tokens
  data/gpt2_tokenizer.bin                          llm.c's tokenizer file (if missing)
  data/gpt2.tiktoken                               the GPT-2 BPE ranks (if missing), where this script,
                                                   train_gpt2.py and prepro_fineweb.py find them offline

Token file: 256 little-endian int32 header (20240520, 1, ntokens, 0...), then uint16 tokens.
Tokenizer file: header (20240328, 2, 50257, 50256, 0...), then per token a uint8 length and its bytes.

Exit codes: 0 done (or already done), 1 runtime failure (missing/corrupt file, offline), 2 bad arguments.
"""

import argparse
import base64
import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import requests
import tiktoken
import tiktoken.load
from tqdm import tqdm

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SIZE = 1_115_394
TINYSHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
TINYSHAKESPEARE_VAL_TOKENS = 32_768
TINYSHAKESPEARE_TRAIN_TOKENS = 305_260
MIRROR_TEXT_NAME = "tinyshakespeare.txt"
MIRROR_VOCAB_NAME = "gpt2.tiktoken"
DOWNLOAD_TIMEOUT_S = (10, 60)  # (connect, read)

DEFAULT_DATA_DIR = Path("data")
DEFAULT_TEXT_PATH = DEFAULT_DATA_DIR / "tinyshakespeare" / "tiny_shakespeare.txt"
DEFAULT_OUT_DIR = DEFAULT_DATA_DIR / "tinyshakespeare"
DEFAULT_VOCAB_PATH = DEFAULT_DATA_DIR / "gpt2.tiktoken"
DEFAULT_TOKENIZER_PATH = DEFAULT_DATA_DIR / "gpt2_tokenizer.bin"
DEFAULT_VAL_FRACTION = 0.1

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_MAGIC = 20240520
TOKEN_VERSION = 1
TOKENIZER_MAGIC = 20240328
TOKENIZER_VERSION = 2
GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

HOW_TO_SUPPLY_TEXT = (
    "supply the text offline: pass --mirror DIR (a directory holding tinyshakespeare.txt), "
    f"set DATA_MIRROR=DIR, or put the file at {DEFAULT_TEXT_PATH}"
)
HOW_TO_SUPPLY_VOCAB = (
    "supply the GPT-2 BPE ranks offline: pass --vocab FILE, put gpt2.tiktoken in the "
    f"--mirror/DATA_MIRROR directory, or put it at {DEFAULT_VOCAB_PATH}"
)


class PreproError(Exception):
    """A failure with a message meant for the user (printed as 'error: ...')."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- tokenizer

def load_gpt2_encoding(vocab_path=None, mirror=None):
    """GPT-2 tiktoken Encoding: vocab_path, else <mirror>/gpt2.tiktoken, else data/gpt2.tiktoken, else tiktoken's own."""
    if vocab_path is not None:
        ranks_path = Path(vocab_path)
        if not ranks_path.is_file():
            raise PreproError(f"vocab file not found: {ranks_path}")
    elif mirror is not None and (Path(mirror) / MIRROR_VOCAB_NAME).is_file():
        ranks_path = Path(mirror) / MIRROR_VOCAB_NAME
    elif DEFAULT_VOCAB_PATH.is_file():
        ranks_path = DEFAULT_VOCAB_PATH
    else:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as exc:
            raise PreproError(f"could not load the GPT-2 tokenizer ({type(exc).__name__}); {HOW_TO_SUPPLY_VOCAB}") from exc

    try:
        mergeable_ranks = tiktoken.load.load_tiktoken_bpe(str(ranks_path))
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens={"<|endoftext|>": EOT_TOKEN},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )
    except Exception as exc:
        raise PreproError(f"{ranks_path} is not a valid gpt2.tiktoken file ({type(exc).__name__}: {exc})") from exc


def write_vocab_file(path, enc):
    """The GPT-2 BPE ranks in tiktoken's own file format (base64 of a token's bytes, a space,
    its rank; one a line): byte-identical to OpenAI's gpt2.tiktoken, whichever source enc
    was loaded from, so later runs load the encoding offline."""
    payload = b"".join(base64.b64encode(enc.decode_single_token_bytes(rank)) + b" %d\n" % rank
                       for rank in range(EOT_TOKEN))

    def check(tmp_path):
        if len(tiktoken.load.load_tiktoken_bpe(str(tmp_path))) != EOT_TOKEN:
            raise PreproError(f"{path}: the written BPE ranks do not read back ({EOT_TOKEN} expected); not kept")

    write_via_temp(path, lambda f: f.write(payload), check=check)


def tokenize_sections(text, enc):
    """llm.c's scheme: split on blank lines, EOT before each section, '\\n\\n' kept on all but the last."""
    sections = text.split("\n\n")
    tokens = []
    for i, section in enumerate(sections):
        tokens.append(EOT_TOKEN)
        padded = section + "\n\n" if i != len(sections) - 1 else section
        tokens.extend(enc.encode_ordinary(padded))
    return tokens


# ---------------------------------------------------------------- file writing

def write_via_temp(dest, write_contents, check=None):
    """Write dest through a temp file beside it: write_contents(file), optional check(temp path), then os.replace.

    On any failure the temp file and any directories created for it are removed.
    """
    dest = Path(dest)
    created = make_dirs(dest.parent)
    tmp_path = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            write_contents(f)
        if check is not None:
            check(tmp_path)
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        remove_empty_dirs(created)
        raise


def make_dirs(path):
    """mkdir -p, returning the directories it created (outermost first) so a failure can remove them."""
    missing = []
    current = Path(path)
    while not current.exists():
        missing.append(current)
        current = current.parent
    missing.reverse()
    for directory in missing:
        directory.mkdir()
    return missing


def remove_empty_dirs(created):
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            break


def write_token_file(path, tokens):
    """Write an llm.c token file: 256 int32 header (magic, version 1, ntokens), then uint16 tokens."""
    tokens_int = np.asarray(tokens, dtype=np.int64)
    if tokens_int.ndim != 1:
        raise ValueError("tokens must be a flat sequence")
    if tokens_int.size and (tokens_int.min() < 0 or tokens_int.max() >= 2**16):
        raise ValueError("every token must be in [0, 2**16) to fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = TOKEN_MAGIC
    header[1] = TOKEN_VERSION
    header[2] = tokens_int.size
    payload = header.tobytes() + tokens_int.astype("<u2").tobytes()
    write_via_temp(path, lambda f: f.write(payload))


def token_file_count(path):
    """Number of tokens in a valid llm.c uint16 token file, or None if missing/invalid."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size < HEADER_BYTES:
        return None
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != TOKEN_MAGIC or header[1] != TOKEN_VERSION or header[2] < 0:
        return None
    if path.stat().st_size != HEADER_BYTES + 2 * int(header[2]):
        return None
    return int(header[2])


def write_tokenizer_file(path, enc):
    """Write llm.c's tokenizer file: header (magic, version 2, vocab size, EOT), then length-prefixed token bytes."""
    n_vocab = enc.max_token_value + 1
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = TOKENIZER_MAGIC
    header[1] = TOKENIZER_VERSION
    header[2] = n_vocab
    header[3] = enc.eot_token
    chunks = [header.tobytes()]
    for token in range(n_vocab):
        token_bytes = enc.decode_single_token_bytes(token)
        if len(token_bytes) >= 256:
            raise ValueError(f"token {token} is {len(token_bytes)} bytes, too long for a uint8 length")
        chunks.append(bytes([len(token_bytes)]))
        chunks.append(token_bytes)
    payload = b"".join(chunks)
    write_via_temp(path, lambda f: f.write(payload))


def tokenizer_file_is_valid(path):
    path = Path(path)
    if not path.is_file() or path.stat().st_size < HEADER_BYTES:
        return False
    header = np.fromfile(path, dtype="<i4", count=4)
    return header[0] == TOKENIZER_MAGIC and header[1] == TOKENIZER_VERSION


# ---------------------------------------------------------------- getting the text

def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_tinyshakespeare_file(path, what, hint="replace or delete it"):
    """Raise PreproError unless path has tinyshakespeare's size and md5; what names the file in the message."""
    size = Path(path).stat().st_size
    if size != TINYSHAKESPEARE_SIZE:
        raise PreproError(f"{what} has {size:,} bytes, expected {TINYSHAKESPEARE_SIZE:,}; {hint}")
    md5 = file_md5(path)
    if md5 != TINYSHAKESPEARE_MD5:
        raise PreproError(f"{what} has md5 {md5}, expected {TINYSHAKESPEARE_MD5}; {hint}")


def copy_from_mirror(source, dest):
    check_tinyshakespeare_file(source, f"mirror file {source}")
    with open(source, "rb") as src:
        write_via_temp(dest, lambda out: shutil.copyfileobj(src, out),
                       check=lambda tmp: check_tinyshakespeare_file(tmp, f"copy of {source}", "copy not kept"))


def stream_to_file(response, out, label):
    total = int(response.headers.get("content-length", 0)) or None
    with tqdm(total=total, unit="B", unit_scale=True, desc=label) as bar:
        for chunk in response.iter_content(chunk_size=1 << 16):
            out.write(chunk)
            bar.update(len(chunk))


def download_tinyshakespeare(dest, url=None):
    """Stream url into a temp file beside dest; rename it into place only if size and md5 match."""
    url = url or TINYSHAKESPEARE_URL
    try:
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
            response.raise_for_status()
            write_via_temp(dest, lambda out: stream_to_file(response, out, dest.name),
                           check=lambda tmp: check_tinyshakespeare_file(tmp, f"download from {url}", f"not kept; {HOW_TO_SUPPLY_TEXT}"))
    except requests.RequestException as exc:
        raise PreproError(f"could not download {url} ({type(exc).__name__}); {HOW_TO_SUPPLY_TEXT}") from exc


def fetch_tinyshakespeare(mirror):
    """Path of a checked tinyshakespeare text: local copy, else mirror copy, else download."""
    dest = DEFAULT_TEXT_PATH
    if dest.is_file():
        check_tinyshakespeare_file(dest, f"local copy {dest}")
        print(f"using local copy {dest}")
        return dest
    if mirror is not None:
        source = Path(mirror) / MIRROR_TEXT_NAME
        if source.is_file():
            copy_from_mirror(source, dest)
            print(f"copied {source} -> {dest}")
            return dest
        print(f"mirror {mirror} has no {MIRROR_TEXT_NAME}; downloading")
    print(f"downloading {TINYSHAKESPEARE_URL} -> {dest}")
    download_tinyshakespeare(dest)
    return dest


def read_utf8_text(path):
    """Exact text of a UTF-8 file (no newline translation, so decoding the tokens gives it back)."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PreproError(f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


# ---------------------------------------------------------------- command line

def build_arg_parser():
    parser = argparse.ArgumentParser(
        description=(
            "Tokenize tinyshakespeare (default) or any UTF-8 text (--input) with GPT-2 BPE into llm.c token "
            "files (256 int32 header, then uint16 tokens). Also writes llm.c's tokenizer file if missing. "
            "Paths are relative to the current directory."
        ),
    )
    parser.add_argument(
        "--mirror", metavar="DIR",
        help="directory holding tinyshakespeare.txt (and optionally gpt2.tiktoken) to use instead of "
             "downloading; default: $DATA_MIRROR",
    )
    parser.add_argument(
        "--input", metavar="FILE",
        help="tokenize this UTF-8 text file instead of tinyshakespeare; writes <stem>_train.bin and <stem>_val.bin",
    )
    parser.add_argument(
        "--val-fraction", type=float, metavar="F",
        help=f"with --input: fraction of tokens (from the start) for validation, 0 < F < 1 "
             f"(default {DEFAULT_VAL_FRACTION}); tinyshakespeare always uses llm.c's first {TINYSHAKESPEARE_VAL_TOKENS:,} tokens",
    )
    parser.add_argument(
        "--out-dir", metavar="DIR",
        help=f"where to write the .bin files (default {DEFAULT_OUT_DIR}, or data/<input stem> with --input)",
    )
    add_vocab_argument(parser)
    parser.add_argument(
        "--tokenizer-out", metavar="FILE", default=str(DEFAULT_TOKENIZER_PATH),
        help="where to write llm.c's tokenizer file if missing (default %(default)s)",
    )
    parser.add_argument(
        "--vocab-out", metavar="FILE", default=str(DEFAULT_VOCAB_PATH),
        help="where to write the GPT-2 BPE ranks (gpt2.tiktoken) if missing, so that later runs of this script "
             "and train_gpt2.py --prompt find them offline; '' for nowhere (default %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="redo the work even if valid outputs already exist")
    return parser


def resolve_mirror(flag_value):
    """--mirror, else $DATA_MIRROR, else None; a named directory must exist."""
    if flag_value:
        mirror, source = flag_value, "--mirror"
    elif os.environ.get("DATA_MIRROR"):
        mirror, source = os.environ["DATA_MIRROR"], "DATA_MIRROR"
    else:
        return None
    if not Path(mirror).is_dir():
        raise PreproError(f"{source} directory not found: {mirror}", exit_code=2)
    return Path(mirror)


def output_paths(args):
    """(val path, train path, expected (val, train) counts or None) for this run."""
    if args.input:
        stem = Path(args.input).stem
        out_dir = Path(args.out_dir) if args.out_dir else DEFAULT_DATA_DIR / stem
        return out_dir / f"{stem}_val.bin", out_dir / f"{stem}_train.bin", None
    out_dir = Path(args.out_dir) if args.out_dir else DEFAULT_OUT_DIR
    expected = (TINYSHAKESPEARE_VAL_TOKENS, TINYSHAKESPEARE_TRAIN_TOKENS)
    return out_dir / "tiny_shakespeare_val.bin", out_dir / "tiny_shakespeare_train.bin", expected


def outputs_done(val_path, train_path, expected_counts):
    val_count, train_count = token_file_count(val_path), token_file_count(train_path)
    if val_count is None or train_count is None:
        return False
    if expected_counts is not None:
        return (val_count, train_count) == expected_counts
    return val_count > 0 and train_count > 0


def validate_args(args):
    if args.val_fraction is not None:
        if not args.input:
            raise PreproError("--val-fraction only applies with --input (tinyshakespeare uses llm.c's fixed split)", exit_code=2)
        if not 0.0 < args.val_fraction < 1.0:
            raise PreproError(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}", exit_code=2)
    if args.input and not Path(args.input).is_file():
        raise PreproError(f"input file not found: {args.input}")


def split_input_tokens(tokens, val_fraction):
    """First round(F * n) tokens (at least 1) for val, the rest for train; both must be non-empty."""
    val_count = max(1, round(val_fraction * len(tokens)))
    if val_count >= len(tokens):
        raise PreproError(
            f"input is too short to split: {len(tokens)} tokens with --val-fraction {val_fraction} leaves no train tokens"
        )
    return tokens[:val_count], tokens[val_count:]


def run(args):
    validate_args(args)
    mirror = resolve_mirror(args.mirror)
    val_path, train_path, expected_counts = output_paths(args)
    tokenizer_path = Path(args.tokenizer_out)
    need_tokenizer = args.force or not tokenizer_file_is_valid(tokenizer_path)
    vocab_out = Path(args.vocab_out) if args.vocab_out else None
    need_vocab = vocab_out is not None and (args.force or not vocab_out.is_file())

    if not args.force and outputs_done(val_path, train_path, expected_counts):
        print(f"already done: {val_path} and {train_path} exist with valid headers (use --force to redo)")
        if need_tokenizer or need_vocab:
            enc = load_gpt2_encoding(args.vocab, mirror)
            for needed, path, write in ((need_tokenizer, tokenizer_path, write_tokenizer_file),
                                        (need_vocab, vocab_out, write_vocab_file)):
                if needed:
                    write(path, enc)
                    print(f"wrote {path}")
        return 0

    if args.input:
        text_path = Path(args.input)
    else:
        text_path = fetch_tinyshakespeare(mirror)
    text = read_utf8_text(text_path)
    enc = load_gpt2_encoding(args.vocab, mirror)
    tokens = tokenize_sections(text, enc)

    if args.input:
        val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        val_tokens, train_tokens = split_input_tokens(tokens, val_fraction)
    else:
        val_tokens, train_tokens = tokens[:TINYSHAKESPEARE_VAL_TOKENS], tokens[TINYSHAKESPEARE_VAL_TOKENS:]
        if (len(val_tokens), len(train_tokens)) != expected_counts:
            raise PreproError(f"unexpected token counts {len(val_tokens)}/{len(train_tokens)}, expected {expected_counts}")

    write_token_file(val_path, val_tokens)
    write_token_file(train_path, train_tokens)
    if need_tokenizer:
        write_tokenizer_file(tokenizer_path, enc)
    if need_vocab:
        write_vocab_file(vocab_out, enc)

    print(f"text:      {text_path} ({len(text):,} chars, {len(tokens):,} tokens)")
    print(f"val:       {val_path} ({len(val_tokens):,} tokens)")
    print(f"train:     {train_path} ({len(train_tokens):,} tokens)")
    print(f"tokenizer: {tokenizer_path} ({'written' if need_tokenizer else 'already present'})")
    if vocab_out is not None:
        print(f"BPE ranks: {vocab_out} ({'written' if need_vocab else 'already present'})")
    return 0


def add_vocab_argument(parser):
    """The prepro scripts' --vocab flag (load_gpt2_encoding's search order)."""
    parser.add_argument(
        "--vocab", metavar="FILE",
        help=f"gpt2.tiktoken BPE ranks file (default: <mirror>/gpt2.tiktoken, else {DEFAULT_VOCAB_PATH}, "
             "else tiktoken's download)",
    )


def run_cli(parser, run_args, argv=None, interrupted="interrupted"):
    """The prepro scripts' command line: run_args(parsed args) -> exit code; a PreproError
    or OSError is one `error:` line and its exit code, Ctrl-C exit 130."""
    args = parser.parse_args(argv)
    try:
        return run_args(args)
    except PreproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130


def main(argv=None):
    return run_cli(build_arg_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
