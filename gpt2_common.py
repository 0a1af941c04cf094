"""
What the two training targets share, and nothing they do not: the model's shape and
the layout of its buffers, the host model (one float32 parameter buffer in llm.c
checkpoint order), the files we read and write (llm.c checkpoints, token files and
tokenizer, Hugging Face folders, our training state), the data loader, user errors,
and the Device interface that train_gpt2.py's CPU target and train_gpt2_cuda.py's CUDA
target both implement. Both modules import this one; it imports neither.
"""

import glob
import json
import math
import mmap
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

# -----------------------------------------------------------------------------
# File formats shared with llm.c. Each file starts with 256 little-endian int32.

HEADER_INTS = 256
CHECKPOINT_MAGIC, CHECKPOINT_VERSION, CHECKPOINT_VERSION_BF16 = 20240326, 3, 5
STATE_MAGIC, STATE_VERSION = 20240327, 2
TOKENS_MAGIC, TOKENS_VERSION = 20240520, 1
TOKENIZER_MAGIC = 20240328
EOT_TOKEN = 50256


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 1."""


def read_header(f, path, magic, versions):
    raw = f.read(HEADER_INTS * 4)
    if len(raw) != HEADER_INTS * 4:
        raise UserError(f"{path}: file too short for a {HEADER_INTS * 4}-byte header (not an llm.c file)")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != magic:
        raise UserError(f"{path}: bad magic number {header[0]} (expected {magic})")
    if header[1] not in versions:
        raise UserError(f"{path}: unsupported version {header[1]} (expected {' or '.join(map(str, versions))})")
    return header


def write_file_atomic(path, chunks):
    """Write byte chunks to path through a temp file, fsync and rename: a crash never
    leaves a half-written file where a good one was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            for chunk in chunks:
                f.write(memoryview(chunk).cast("B") if isinstance(chunk, np.ndarray) else chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def cache_file(variable, name):
    """Where a small file that outlives runs is kept (a measured rate, tuned choices): the
    path in $variable, else gpt2py/name in $XDG_CACHE_HOME (~/.cache)."""
    path = os.environ.get(variable)
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2py", name)


def bfloat16_to_float32(bits):
    """bfloat16 is the top half of a float32: widen uint16 bit patterns exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(x):
    """uint16 bfloat16 bit patterns of float32 values, rounded to nearest, ties to even
    (as PyTorch, ml_dtypes and CUDA's __float2bfloat16_rn); NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16), rounded)


# -----------------------------------------------------------------------------
# Model shape, and the layout of the parameter and activation buffers


@dataclass(frozen=True)
class GPT2Config:
    max_seq_len: int = 1024
    vocab_size: int = 50257
    padded_vocab_size: int = 50304
    num_layers: int = 12
    num_heads: int = 12
    channels: int = 768


def padded_vocab(vocab_size):
    return ((vocab_size + 127) // 128) * 128


GPT2_SIZES = {12: (12, 768), 24: (16, 1024), 36: (20, 1280), 48: (25, 1600)}  # depth: (heads, channels)


def config_from_depth(descriptor, vocab_size=50257, max_seq_len=1024):
    """'d12' is GPT-2 124M, 'd24' 350M, 'd36' 774M, 'd48' 1558M; any other 'dN' has
    N layers, N heads and 64*N channels."""
    if not (descriptor.startswith("d") and descriptor[1:].isdigit() and int(descriptor[1:]) > 0):
        raise UserError(f"bad model descriptor {descriptor!r}: expected d12, d24, d6, ... or a checkpoint file")
    depth = int(descriptor[1:])
    heads, channels = GPT2_SIZES.get(depth, (depth, 64 * depth))
    return GPT2Config(max_seq_len, vocab_size, padded_vocab(vocab_size), depth, heads, channels)


def parameter_shapes(cfg):
    """The 16 parameter tensors in llm.c checkpoint order; weights are (out, in)."""
    C, L, Vp, maxT = cfg.channels, cfg.num_layers, cfg.padded_vocab_size, cfg.max_seq_len
    return [
        ("wte", (Vp, C)), ("wpe", (maxT, C)),
        ("ln1w", (L, C)), ("ln1b", (L, C)),
        ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)),
        ("attprojw", (L, C, C)), ("attprojb", (L, C)),
        ("ln2w", (L, C)), ("ln2b", (L, C)),
        ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
        ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
        ("lnfw", (C,)), ("lnfb", (C,)),
    ]


MATRIX_PARAMETERS = {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}  # weight decay applies to these


def activation_shapes(cfg, B, T):
    """Everything the forward pass writes and the backward pass reads, per layer.
    Rows are the B*T token positions, so every matmul sees a plain 2-D view."""
    C, L, NH, Vp, BT = cfg.channels, cfg.num_layers, cfg.num_heads, cfg.padded_vocab_size, B * T
    return [
        ("encoded", (BT, C)),
        ("ln1", (L, BT, C)), ("ln1_mean", (L, BT)), ("ln1_rstd", (L, BT)),
        ("qkv", (L, BT, 3 * C)),
        ("att", (L, B, NH, T, T)),       # softmax of the causal attention scores
        ("atty", (L, BT, C)),            # attention output, heads side by side
        ("residual2", (L, BT, C)),       # residual + attention projection
        ("ln2", (L, BT, C)), ("ln2_mean", (L, BT)), ("ln2_rstd", (L, BT)),
        ("fch", (L, BT, 4 * C)),         # MLP hidden, before GELU
        ("fch_gelu", (L, BT, 4 * C)),
        ("residual3", (L, BT, C)),       # residual2 + MLP projection
        ("lnf", (BT, C)), ("lnf_mean", (BT,)), ("lnf_rstd", (BT,)),
        ("logits", (BT, Vp)),            # becomes dlogits in place during backward
        ("logsumexp", (BT,)),            # per position, kept for the fused classifier backward
        ("losses", (BT,)),
    ]


def activation_grad_shapes(cfg, B, T):
    """Backward scratch: the residual stream's gradient plus one buffer per width,
    reused by every layer (backward never needs a layer's activation gradients again)."""
    C, BT = cfg.channels, B * T
    return [
        ("dresidual", (BT, C)),
        ("dC", (BT, C)),
        ("d3C", (BT, 3 * C)),
        ("d4C", (BT, 4 * C)),
        ("gemm_scratch", (max(4 * C * C, BT * C),)),  # for accumulating weight gradients
    ]


def buffer_size(shapes):
    return sum(int(np.prod(shape)) for _, shape in shapes)


def tensor_offsets(shapes):
    """(name, shape, start, end) of each tensor laid out back to back in a flat buffer."""
    out, offset = [], 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out.append((name, shape, offset, offset + n))
        offset += n
    return out


def slice_views(buffer, shapes):
    """Named views into one flat buffer, in order."""
    layout = tensor_offsets(shapes)
    assert layout[-1][3] == buffer.size
    return SimpleNamespace(**{name: buffer[start:end].reshape(shape) for name, shape, start, end in layout})


def parameter_offsets(cfg):
    """(name, start, end) of each parameter tensor in the flat buffer."""
    return [(name, start, end) for name, _, start, end in tensor_offsets(parameter_shapes(cfg))]


def matrix_groups(cfg, end=None):
    """(start, end, is_matrix) runs of the flat parameter buffer: the 2-D weights (which
    AdamW's weight decay may apply to) and the rest, neighbours of a kind merged. A
    buffer padded past the parameters (up to end) ends in a run that is not matrices."""
    runs = parameter_offsets(cfg)
    if end is not None and end > runs[-1][2]:
        runs.append(("padding", runs[-1][2], end))
    groups = []
    for name, start, stop in runs:
        is_matrix = name in MATRIX_PARAMETERS
        if groups and groups[-1][2] == is_matrix:
            groups[-1] = (groups[-1][0], stop, is_matrix)
        else:
            groups.append((start, stop, is_matrix))
    return groups


GELU_SCALE = np.float32(math.sqrt(2.0 / math.pi))  # GELU's tanh form, as GPT-2: both targets use it
GELU_CUBE = np.float32(0.044715)


# -----------------------------------------------------------------------------
# The host model: one float32 buffer of parameters (plus gradients and AdamW
# moments of the same layout, allocated on first use), init, llm.c checkpoints

def zeros_f32(n):
    """A zeroed float32 buffer of n values. Big ones are anonymous memory mapped with
    MAP_POPULATE: the kernel faults every page in at once, which on the VMs we measured
    runs about 6x faster than first-touch page faults inside the first training step."""
    if n * 4 < (1 << 24) or not hasattr(mmap, "MAP_POPULATE"):
        return np.zeros(n, dtype=np.float32)
    memory = mmap.mmap(-1, n * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return np.frombuffer(memory, dtype=np.float32)


class GPT2:
    """Holds the buffers and their views; all the work is in the functions below."""

    def __init__(self, cfg):
        self.cfg = cfg
        shapes = parameter_shapes(cfg)
        self.num_parameters = buffer_size(shapes)
        self.params_memory = zeros_f32(self.num_parameters)
        self.params = slice_views(self.params_memory, shapes)
        # gradients and AdamW moments are allocated on first use (eval and sampling need none)
        self.grads_memory = self.m_memory = self.v_memory = None
        self.grads = None
        self.B = self.T = 0
        self.acts = self.dacts = None
        self.step = 0  # AdamW steps taken
        self.inputs = self.targets = None  # of the last forward pass, flat int32
        self.num_valid_targets = 0


INIT_BLOCK = 1 << 20  # parameters drawn per independent random stream


def fill_standard_normal(buffer, seed):
    """Standard normals into a flat float32 buffer, block k from its own stream
    SeedSequence([seed, k]): the result does not depend on the thread count, and the
    blocks are drawn on every core (numpy's generators release the GIL)."""
    def fill(k):
        rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
        rng.standard_normal(out=buffer[k * INIT_BLOCK:(k + 1) * INIT_BLOCK], dtype=np.float32)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(fill, range((buffer.size + INIT_BLOCK - 1) // INIT_BLOCK)))


def gpt2_init_random(cfg, seed):
    """llm.c's scheme: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2L),
    zero biases, unit LayerNorm weights; the padded vocab rows stay zero."""
    model = GPT2(cfg)
    fill_standard_normal(model.params_memory, seed)
    p = model.params
    residual_std = np.float32(0.02 / math.sqrt(2 * cfg.num_layers))
    for name, _ in parameter_shapes(cfg):
        view = getattr(p, name)
        if name in ("wte", "wpe", "qkvw", "fcw"):
            view *= np.float32(0.02)
        elif name in ("attprojw", "fcprojw"):
            view *= residual_std
        elif name in ("ln1w", "ln2w", "lnfw"):
            view[...] = 1.0
        else:
            view[...] = 0.0  # biases
    p.wte[cfg.vocab_size:] = 0.0
    return model


def read_checkpoint(path):
    """Load an llm.c checkpoint into a new model: version 3 (float32), or version 5
    (bfloat16, what llm.c's mixed-precision runs write), widened exactly to float32."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        header = read_header(f, path, CHECKPOINT_MAGIC, (CHECKPOINT_VERSION, CHECKPOINT_VERSION_BF16))
        bytes_per_value = 2 if header[1] == CHECKPOINT_VERSION_BF16 else 4
        maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
        if min(maxT, V, L, NH, C) <= 0 or C % NH or Vp < V:
            raise UserError(f"{path}: header describes an impossible model (maxT={maxT}, V={V}, L={L}, NH={NH}, C={C}, Vp={Vp})")
        cfg = GPT2Config(maxT, V, Vp, L, NH, C)
        model = GPT2(cfg)
        expected = HEADER_INTS * 4 + model.num_parameters * bytes_per_value
        actual = os.path.getsize(path)
        if actual != expected:
            raise UserError(f"{path}: size {actual} bytes, but its header describes {expected} bytes of "
                            f"{'bfloat16' if bytes_per_value == 2 else 'float32'} values (truncated or corrupt)")
        if bytes_per_value == 4:
            f.readinto(memoryview(model.params_memory).cast("B"))
        else:
            model.params_memory[:] = bfloat16_to_float32(np.fromfile(f, dtype="<u2", count=model.num_parameters))
    return model


def checkpoint_header(cfg, version=CHECKPOINT_VERSION):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [CHECKPOINT_MAGIC, version, cfg.max_seq_len, cfg.vocab_size,
                  cfg.num_layers, cfg.num_heads, cfg.channels, cfg.padded_vocab_size]
    return header


def write_checkpoint(model, path, bfloat16=False):
    """An llm.c checkpoint: version 3 (float32), or version 5 (bfloat16, rounded to nearest even)."""
    if bfloat16:
        write_file_atomic(path, [checkpoint_header(model.cfg, CHECKPOINT_VERSION_BF16),
                                 float32_to_bfloat16(model.params_memory)])
    else:
        write_file_atomic(path, [checkpoint_header(model.cfg), model.params_memory])


def ensure_gradients(model):
    """The gradient buffer, allocated once (eval and sampling need none)."""
    if model.grads_memory is None:
        model.grads_memory = zeros_f32(model.num_parameters)
        model.grads = slice_views(model.grads_memory, parameter_shapes(model.cfg))


def ensure_optimizer_buffers(model):
    """AdamW's m and v over the whole parameter buffer, allocated once (a ZeRO-1 rank
    keeps only its shard of them, so its host model has these only for checkpoints)."""
    if model.m_memory is None:
        model.m_memory = zeros_f32(model.num_parameters)
        model.v_memory = zeros_f32(model.num_parameters)


def check_tokens(tokens, vocab_size, what):
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens.max() if tokens.max() >= vocab_size else tokens.min()
        raise UserError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def start_token(cfg):
    """<|endoftext|> starts a sample; a model with a smaller vocabulary uses its last id."""
    return min(EOT_TOKEN, cfg.vocab_size - 1)


def model_file_kind(path):
    """(kind, first bytes) of a file: 'llm.c' (its checkpoint magic), 'torch' (a PyTorch
    zip or pickle), 'safetensors' (a JSON header after the length), or None."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == CHECKPOINT_MAGIC:
        return "llm.c", head
    if head[:2] in (b"PK", b"\x80\x02"):
        return "torch", head
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors", head
    return None, head


def load_model(init, seed, vocab_size=50257):
    """--init: 'dN' (from scratch), an llm.c checkpoint, or Hugging Face weights (a folder
    or a weights file). A file is told by its first bytes, never by its name."""
    if os.path.isdir(init):
        return gpt2_from_hf(init)
    if not os.path.exists(init):
        if not re.search(r"[./\\]", init):  # not path-like: a descriptor such as d12 (or a bad one)
            return gpt2_init_random(config_from_depth(init, vocab_size), seed)
        raise UserError(f"--init {init}: checkpoint not found (no such file or folder, and not a dN descriptor such as d12)")
    kind, head = model_file_kind(init)
    if kind == "llm.c":
        return read_checkpoint(init)
    if kind is not None:
        return gpt2_from_hf(init)
    found = f"bad magic number {int.from_bytes(head[:4], 'little', signed=True)}" if len(head) >= 4 else "too short"
    raise UserError(f"{init}: not a model file ({found}): expected an llm.c checkpoint (magic {CHECKPOINT_MAGIC}), "
                    "a Hugging Face model.safetensors / pytorch_model.bin, or a folder holding one")


# -----------------------------------------------------------------------------
# Data: llm.c token files (256-int32 header, then uint16 tokens)


def read_token_file(path, vocab_size=None):
    """Memory-map an llm.c token file after validating its header and size; with
    vocab_size, its ids too (a pass over every token: the DataLoader defers it to the
    file's first use)."""
    if not os.path.isfile(path):
        raise UserError(f"token file not found: {path}")
    with open(path, "rb") as f:
        header = read_header(f, path, TOKENS_MAGIC, (TOKENS_VERSION,))
    ntok = int(header[2])
    expected = HEADER_INTS * 4 + 2 * ntok
    actual = os.path.getsize(path)
    if ntok <= 0 or actual != expected:
        raise UserError(f"{path}: size {actual} bytes, but its header promises {ntok} tokens ({expected} bytes): truncated or corrupt")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(ntok,))
    if vocab_size is not None:
        check_tokens(tokens, vocab_size, path)
    return tokens


class DataLoader:
    """Batches of B sequences of T tokens (inputs, and targets shifted by one) from one
    or more token files. A file of n tokens holds (n-1)//T samples at stride T; in
    order, a batch is llm.c's contiguous B*T+1 tokens. With shuffle, each epoch visits
    every file's samples in a seeded random order. The position is three integers,
    so a checkpoint can save it and resume exactly.

    Opening reads only the headers (100 FineWeb shards of 10^8 tokens open in a fraction
    of a second, memory-mapped, nothing read): a file's token ids are checked against
    the vocabulary when a batch is first taken from it, and a bad one is named then.

    Data parallel (llm.c's scheme): the N ranks step through the same sequence of
    batches N at a time and rank r takes the r-th of each group, so N ranks see exactly
    the batches that one process accumulating N micro-batches would (a file's last
    incomplete group is skipped)."""

    def __init__(self, pattern, B, T, vocab_size, shuffle=False, seed=0, rank=0, world=1):
        paths = sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else [])
        if not paths:
            raise UserError(f"no token file matches {pattern!r} (run `make data`, or pass -i/-j)")
        self.files = [read_token_file(path) for path in paths]
        self.paths, self.vocab_size, self.checked = paths, vocab_size, set()
        self.B, self.T, self.shuffle, self.seed, self.rank, self.world = B, T, shuffle, seed, rank, world
        for path, tokens in zip(paths, self.files):
            if (tokens.size - 1) // T < B * world:
                raise UserError(f"{path}: {tokens.size} tokens is too few for one batch of B={B}, T={T}"
                                + (f" on each of {world} ranks" if world > 1 else ""))
        self.inputs = np.empty((B, T), dtype=np.int32)
        self.targets = np.empty((B, T), dtype=np.int32)
        self.reset()

    def reset(self):
        self.set_state({"epoch": 0, "file": 0, "batch": 0})

    def state(self):
        return {"epoch": self.epoch, "file": self.file_index, "batch": self.batch_index}

    def set_state(self, state):
        self.epoch, self.file_index, self.batch_index = state["epoch"], state["file"], state["batch"]
        self._order = None

    def batches_in_file(self, file_index):
        return ((self.files[file_index].size - 1) // self.T) // self.B

    def sample_order(self):
        if self._order is None:
            n = (self.files[self.file_index].size - 1) // self.T
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch, self.file_index])
                self._order = rng.permutation(n)
            else:
                self._order = np.arange(n)
        return self._order

    def next_batch(self):
        if self.batch_index + self.world > self.batches_in_file(self.file_index):
            self.batch_index = 0
            self.file_index += 1
            if self.file_index == len(self.files):
                self.file_index = 0
                self.epoch += 1
            self._order = None
        tokens = self.files[self.file_index]
        if self.file_index not in self.checked:  # the ids of a file, once, on its first use
            check_tokens(tokens, self.vocab_size, self.paths[self.file_index])
            self.checked.add(self.file_index)
        first = (self.batch_index + self.rank) * self.B
        samples = self.sample_order()[first:first + self.B]
        T = self.T
        for row, sample in enumerate(samples):
            start = int(sample) * T
            chunk = tokens[start:start + T + 1]
            self.inputs[row] = chunk[:-1]
            self.targets[row] = chunk[1:]
        self.batch_index += self.world
        return self.inputs, self.targets

    def num_batches(self):
        return sum(self.batches_in_file(i) // self.world for i in range(len(self.files)))


# -----------------------------------------------------------------------------
# Hugging Face interop: GPT-2 weights from/to a transformers folder (config.json,
# model.safetensors or pytorch_model.bin), as save_pretrained writes and
# GPT2LMHeadModel.from_pretrained reads.

HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_LAYER_NAMES = [  # (our tensor, HF name within block i)
    ("ln1w", "ln_1.weight"), ("ln1b", "ln_1.bias"),
    ("qkvw", "attn.c_attn.weight"), ("qkvb", "attn.c_attn.bias"),
    ("attprojw", "attn.c_proj.weight"), ("attprojb", "attn.c_proj.bias"),
    ("ln2w", "ln_2.weight"), ("ln2b", "ln_2.bias"),
    ("fcw", "mlp.c_fc.weight"), ("fcb", "mlp.c_fc.bias"),
    ("fcprojw", "mlp.c_proj.weight"), ("fcprojb", "mlp.c_proj.bias"),
]
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


def read_safetensors(path):
    """name -> float32 array, from the safetensors layout: u64 header size, JSON, raw data."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        assert isinstance(header, dict) and len(raw) >= 8 + n
    except (ValueError, UnicodeDecodeError, AssertionError):
        raise UserError(f"{path}: not a safetensors file")
    tensors, data = {}, memoryview(raw)[8 + n:]
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')} (F32, F16, BF16, F64 are read)")
        start, end = info["data_offsets"]
        try:
            array = np.frombuffer(data[start:end], dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        except ValueError:
            raise UserError(f"{path}: tensor {name}: its bytes do not hold shape {info['shape']} (truncated or corrupt)")
        tensors[name] = bfloat16_to_float32(array) if info["dtype"] == "BF16" else array.astype(np.float32)
    return tensors


def write_safetensors(path, tensors):
    header, offset, chunks = {"__metadata__": {"format": "pt"}}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        chunks.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    write_file_atomic(path, [len(blob).to_bytes(8, "little"), blob] + chunks)


def read_hf_weights(path):
    """The state dict of a weights file: model.safetensors, a sharded safetensors index,
    or pytorch_model.bin (which needs PyTorch)."""
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(os.path.dirname(path), shard)))
        return tensors
    kind, _ = model_file_kind(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind != "torch":
        raise UserError(f"{path}: neither safetensors nor a PyTorch state dict")
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading pytorch_model.bin needs PyTorch; convert it to model.safetensors instead")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a PyTorch state dict ({type(e).__name__})")
    return {k: v.float().numpy() for k, v in state.items()}


def hf_shapes(cfg):
    """HF name -> shape of every GPT-2 tensor we read or write (Conv1D weights are (in, out))."""
    C, V, maxT = cfg.channels, cfg.vocab_size, cfg.max_seq_len
    ours = dict(parameter_shapes(cfg))
    shapes = {"wte.weight": (V, C), "wpe.weight": (maxT, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for l in range(cfg.num_layers):
        for name, theirs in HF_LAYER_NAMES:
            shape = ours[name][1:]
            shapes[f"h.{l}.{theirs}"] = shape[::-1] if theirs in HF_CONV1D else shape
    return shapes


def gpt2_from_hf(path, num_heads=None):
    """A model from Hugging Face GPT-2 weights: a folder (config.json and weights, as
    save_pretrained writes), or a weights file (n_head from a config.json beside it, else
    GPT-2's sizes). Conv1D (in, out) weights are transposed; every tensor's presence and
    shape is checked."""
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise UserError(f"{path}: no {', '.join(HF_WEIGHT_FILES)} in this folder")
        weights_path, folder = found[0], path
    elif os.path.isfile(path):
        weights_path, folder = path, os.path.dirname(os.path.abspath(path))
    else:
        raise UserError(f"weights file not found: {path}")
    hf_config = {}
    if os.path.isfile(os.path.join(folder, "config.json")):
        try:
            with open(os.path.join(folder, "config.json")) as f:
                hf_config = json.load(f)
        except ValueError:
            raise UserError(f"{os.path.join(folder, 'config.json')}: not valid JSON")
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v
          for k, v in read_hf_weights(weights_path).items()}
    if "wte.weight" not in sd or "wpe.weight" not in sd or sd["wte.weight"].ndim != 2 or sd["wpe.weight"].ndim != 2:
        raise UserError(f"{weights_path}: not a GPT-2 state dict (wte.weight / wpe.weight missing)")
    V, C = sd["wte.weight"].shape
    maxT = sd["wpe.weight"].shape[0]
    L = 1 + max((int(k.split(".")[1]) for k in sd if re.match(r"h\.\d+\.", k)), default=-1)
    for key, value in (("vocab_size", V), ("n_embd", C), ("n_positions", maxT), ("n_layer", L)):
        if hf_config.get(key, value) != value:
            raise UserError(f"{weights_path}: config.json says {key}={hf_config[key]}, the tensors say {value}")
    NH = num_heads or hf_config.get("n_head") or {c: h for h, c in GPT2_SIZES.values()}.get(C, max(1, C // 64))
    if C % NH:
        raise UserError(f"{weights_path}: {NH} heads do not divide {C} channels (put n_head in config.json beside it)")
    cfg = GPT2Config(maxT, V, padded_vocab(V), L, NH, C)
    for name, shape in hf_shapes(cfg).items():
        if name not in sd:
            raise UserError(f"{weights_path}: tensor {name} is missing (a GPT-2 with {L} layers, {C} channels needs it)")
        if sd[name].shape != shape:
            raise UserError(f"{weights_path}: tensor {name} has shape {list(sd[name].shape)}, expected {list(shape)}")
    model = GPT2(cfg)
    p = model.params
    p.wte[:V] = sd["wte.weight"]
    p.wpe[...] = sd["wpe.weight"]
    for l in range(L):
        for ours, theirs in HF_LAYER_NAMES:
            tensor = sd[f"h.{l}.{theirs}"]
            getattr(p, ours)[l] = tensor.T if theirs in HF_CONV1D else tensor
    p.lnfw[...] = sd["ln_f.weight"]
    p.lnfb[...] = sd["ln_f.bias"]
    return model


def hf_config(cfg):
    """config.json of a transformers GPT-2 (GPT2LMHeadModel, tied embeddings, no dropout)."""
    eot = start_token(cfg)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "n_embd": cfg.channels,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
            "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32"}


def write_hf(model, path):
    """A Hugging Face GPT-2 folder: model.safetensors (save_pretrained's names, Conv1D
    layout, unpadded vocab), config.json and generation_config.json. A path ending in
    .safetensors names the weights file; the JSON files go beside it."""
    folder = os.path.dirname(os.path.abspath(path)) if path.endswith(".safetensors") else path
    weights_path = path if path.endswith(".safetensors") else os.path.join(folder, "model.safetensors")
    cfg, p = model.cfg, model.params
    tensors = {"wte.weight": p.wte[:cfg.vocab_size], "wpe.weight": p.wpe}
    for l in range(cfg.num_layers):
        for ours, theirs in HF_LAYER_NAMES:
            tensor = getattr(p, ours)[l]
            tensors[f"h.{l}.{theirs}"] = tensor.T if theirs in HF_CONV1D else tensor
    tensors["ln_f.weight"], tensors["ln_f.bias"] = p.lnfw, p.lnfb
    write_safetensors(weights_path, {"transformer." + name: tensor for name, tensor in tensors.items()})
    config = hf_config(cfg)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    for name, content in (("config.json", config), ("generation_config.json", generation)):
        write_file_atomic(os.path.join(folder, name), [json.dumps(content, indent=2).encode() + b"\n"])
    return folder


# -----------------------------------------------------------------------------
# Training state on disk: model_NNNNNNNN.bin (llm.c v3 weights; v5, bf16, for bf16 runs) beside
# state_NNNNNNNN.bin (AdamW m and v, step, data position, sampler RNG).

# Version 1: header, m, v, JSON. Version 2 (bf16 runs, whose model file is llm.c's bf16
# version 5): header (int 4 = 1), m, v, the float32 master weights, JSON; a resume takes
# the weights from here, exactly.
STATE_FILE_MAGIC, STATE_FILE_VERSION, STATE_FILE_VERSION_MASTER = 20240527, 1, 2


def checkpoint_paths(output_dir, step):
    return (os.path.join(output_dir, f"model_{step:08d}.bin"), os.path.join(output_dir, f"state_{step:08d}.bin"))


def save_training_checkpoint(model, output_dir, step, extra, keep_last, bfloat16=False):
    """model_NNNNNNNN.bin (llm.c version 3, or version 5 with bfloat16) and the state
    file (with bfloat16, the float32 master weights too). Then prunes: of the complete
    checkpoints before this one, the newest keep_last - 1 stay (keep_last 0: all), so
    the pair just written always survives; checkpoints after this step (the abandoned
    future of a resumed run, replayed by it) are left alone."""
    model_path, state_path = checkpoint_paths(output_dir, step)
    write_checkpoint(model, model_path, bfloat16)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    blob = json.dumps(dict(extra, step=step, adam_step=model.step)).encode()
    version = STATE_FILE_VERSION_MASTER if bfloat16 else STATE_FILE_VERSION
    header[:5] = [STATE_FILE_MAGIC, version, model.num_parameters % (1 << 31), len(blob), int(bfloat16)]
    master = [model.params_memory] if bfloat16 else []
    write_file_atomic(state_path, [header, model.m_memory, model.v_memory, *master, blob])  # last: marks it complete
    steps = list_checkpoint_steps(output_dir)
    older = [s for s in steps if s < step]
    pruned = older[:max(0, len(older) - (keep_last - 1))] if keep_last > 0 else []
    for old in pruned:
        for path in checkpoint_paths(output_dir, old):
            if os.path.exists(path):
                os.remove(path)
    # leftovers of saves that were killed: temp files, and weights whose state never landed
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"(model|state)_(\d{8})\.bin(\.tmp\.\d+)?", name)
        if match and int(match.group(2)) < step and (match.group(3) or int(match.group(2)) not in steps):
            os.remove(os.path.join(output_dir, name))
    return model_path


def list_checkpoint_steps(output_dir):
    steps = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = re.fullmatch(r"state_(\d{8})\.bin", name)
        if match and os.path.exists(checkpoint_paths(output_dir, int(match.group(1)))[0]):
            steps.append(int(match.group(1)))
    return sorted(steps)


# What a training run writes into its output directory, and nothing else there: the
# checkpoint pairs, log.jsonl, and the temp files of writes that were cut short.
RUN_FILE_PATTERN = re.compile(r"(?:(?:model|state)_\d{8}\.bin|log\.jsonl)(?:\.tmp\.\d+)?")


def run_files(output_dir):
    """Names of the training-run files in output_dir (sorted; [] when it does not exist)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if RUN_FILE_PATTERN.fullmatch(name))


def remove_run_files(output_dir):
    """Delete a previous run's checkpoints, log and temp leftovers (other files stay);
    returns how many files went."""
    names = run_files(output_dir)
    for name in names:
        os.remove(os.path.join(output_dir, name))
    return len(names)


def load_training_checkpoint(output_dir):
    """(model with optimizer state, extra dict) from the newest complete checkpoint; a
    damaged newest one is reported and the one before it used."""
    for step in reversed(list_checkpoint_steps(output_dir)):
        model_path, state_path = checkpoint_paths(output_dir, step)
        try:
            model = read_checkpoint(model_path)
            n = model.num_parameters
            with open(state_path, "rb") as f:
                header = read_header(f, state_path, STATE_FILE_MAGIC, (STATE_FILE_VERSION, STATE_FILE_VERSION_MASTER))
                has_master = header[1] == STATE_FILE_VERSION_MASTER and header[4] == 1
                expected = HEADER_INTS * 4 + (12 if has_master else 8) * n + int(header[3])
                if header[2] != n % (1 << 31) or os.path.getsize(state_path) != expected:
                    raise UserError(f"{state_path}: size or parameter count does not match {model_path}")
                ensure_optimizer_buffers(model)
                f.readinto(memoryview(model.m_memory).cast("B"))
                f.readinto(memoryview(model.v_memory).cast("B"))
                if has_master:  # the model file holds bf16: the exact weights are here
                    f.readinto(memoryview(model.params_memory).cast("B"))
                extra = json.loads(f.read(int(header[3])))
            model.step = int(extra["adam_step"])
            return model, extra
        except (UserError, ValueError, KeyError) as e:
            print(f"warning: skipping damaged checkpoint at step {step}: {e}", file=sys.stderr)
    raise UserError(f"--resume: no complete checkpoint in {output_dir}")


# -----------------------------------------------------------------------------
# Tokenizer (llm.c's gpt2_tokenizer.bin, for decoding without tiktoken)


def read_tokenizer(path):
    """List of byte strings per token id, or None when the file is missing."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        header = read_header(f, path, TOKENIZER_MAGIC, (1, 2))
        table = []
        for _ in range(int(header[2])):
            length = f.read(1)
            if not length:
                raise UserError(f"{path}: truncated tokenizer file")
            table.append(f.read(length[0]))
    return table


def decode(tokenizer, tokens):
    if tokenizer is None:
        return " ".join(str(t) for t in tokens)
    return b"".join(tokenizer[t] for t in tokens if t < len(tokenizer) and t != EOT_TOKEN).decode("utf-8", errors="replace")


def encode_prompt(text, vocab_path=None, mirror=None):
    """GPT-2 tokens of text; the BPE ranks come from vocab_path, else <mirror>/gpt2.tiktoken,
    else data/gpt2.tiktoken, else tiktoken's own download (the caller resolves --mirror
    and DATA_MIRROR and passes them in)."""
    from prepro_tinyshakespeare import PreproError, load_gpt2_encoding
    try:
        encoding = load_gpt2_encoding(vocab_path, mirror)
    except PreproError as e:
        raise UserError(str(e))
    return encoding.encode(text, allowed_special={"<|endoftext|>"})


# -----------------------------------------------------------------------------
# The device interface: what main(), the parity check and the benchmark call. A
# target is built from a host model and the batch shape (B, T), and owns whatever
# buffers it computes in; the host model is where checkpoints, samples and exports
# read from, so the target copies into it when asked.


class Device:
    """The one interface both targets implement (train_gpt2.CPU, train_gpt2_cuda.CUDA)."""

    name = "?"

    def forward(self, inputs, targets=None):
        """inputs, targets: int32 (B, T), targets of -1 masked. The mean loss over the
        unmasked targets, or None without targets."""
        raise NotImplementedError

    def backward(self, accumulate=False, loss_scale=1.0, last_micro_step=True):
        """Gradients of loss_scale * the last forward's mean loss: accumulate=False
        overwrites the parameter gradients, True adds to them (gradient accumulation).
        last_micro_step: this backward ends the step, so a data-parallel target may sum
        the gradients over the ranks as they are produced (the GPU does; the CPU sums in
        update)."""
        raise NotImplementedError

    def update(self, lr, beta1, beta2, eps, weight_decay, weight_decay_mode, grad_clip):
        """One AdamW step (clipping to grad_clip when > 0); the gradient norm before clipping."""
        raise NotImplementedError

    def params_to_host(self):
        """The parameters into the host model (for samples and exports)."""
        raise NotImplementedError

    def state_to_host(self):
        """Parameters, AdamW m and v, and the step count into the host model (for checkpoints)."""
        raise NotImplementedError

    def state_from_host(self):
        """The reverse: continue from the host model's parameters, m, v and step (resume)."""
        raise NotImplementedError

    def run_state(self):
        """What else a resumed run needs to continue as this one would (JSON-able; the
        checkpoint's state file keeps it): the fp8 scales. {} by default."""
        return {}

    def set_run_state(self, state):
        """The reverse of run_state, after state_from_host."""

    def logits_to_host(self):
        """(B*T, Vp) logits of the last forward (the CPU and CUDA fp32 / tf32: the dlogits once a
        backward has run)."""
        raise NotImplementedError

    def losses_to_host(self):
        """(B*T,) per-position losses of the last forward with targets (0 where masked)."""
        raise NotImplementedError

    def evaluator(self, B, T):
        """A forward-only target of the same kind at batch shape (B, T) over the same
        parameters (no copy of them): for evaluations (the val loss, HellaSwag), whose
        forward needs none of the work a training forward does for its backward."""
        raise NotImplementedError

    def decoder(self):
        """A fresh generated sequence: an object whose step(token) feeds the token at the
        next position (a KV cache keeps the earlier ones) and returns the float32 logits
        (Vp,) of the token after it, on the host."""
        raise NotImplementedError

    def grads_to_host(self):
        """The flat parameter-gradient buffer."""
        raise NotImplementedError

    def optimizer_bytes(self):
        """AdamW state this process holds: m and v, or their ZeRO-1 shards."""
        raise NotImplementedError

    def memory_used(self):
        """Bytes this process holds where the target computes: peak RSS on the CPU, the
        GPU's memory in use (ours, cuBLAS's, CuPy's) on CUDA; None when unknown."""
        return None

    def free(self):
        """Give back what the target allocated."""
