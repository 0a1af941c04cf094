#!/usr/bin/env python
"""PyTorch reference for the llm.c Python port (a test-time tool only).

The trainer never imports torch.  This script builds a small, plain PyTorch
GPT-2 with exactly llm.c's numerics and writes the reference files our trainer
is checked against:

  * an llm.c model checkpoint (version 3, float32) of the initial weights,
  * an llm.c debug state (x, y, logits, loss, every parameter gradient) for
    one forward/backward pass on the initial weights,
  * a JSON sidecar (<state path>.json) with the optimizer recipe and the loss
    and gradient norm of each of --steps AdamW steps on that same batch
    (llm.c's test_gpt2 recipe).

Model (all float32, CPU):
  token + position embedding -> L x [x + attn(ln_1(x)); x + mlp(ln_2(x))]
  -> ln_f -> logits = x @ wte^T over all padded_vocab_size rows.
  LayerNorm eps 1e-5 (biased variance); causal self-attention with a fused
  qkv Linear (C -> 3C), scale 1/sqrt(head_size), output proj (C -> C);
  MLP C -> 4C, GELU (tanh approximation), 4C -> C; lm_head tied to wte;
  no dropout.  The loss is the mean cross-entropy over the first vocab_size
  logit columns only (ignore_index=-1).

Init from scratch (init_llmc), with a torch.Generator seeded by --seed (the
same stream torch.manual_seed(seed) gives the default CPU generator).  Tensors
are drawn in this order, each row-major in its (out, in) layout:
    wte (Vp, C) std 0.02  [rows >= V are zeroed afterwards]
    wpe (maxT, C) std 0.02
    for each layer l = 0..L-1:
        attn.c_attn.weight (3C, C) std 0.02
        attn.c_proj.weight (C, C)  std 0.02/sqrt(2L)
        mlp.c_fc.weight    (4C, C) std 0.02
        mlp.c_proj.weight  (C, 4C) std 0.02/sqrt(2L)
  All biases 0; LayerNorm weights 1, biases 0.  (This is the module order
  llm.c's train_gpt2.py draws in.)

Public API (imported by other dev tools):
  GPT2Config, GPT2, init_llmc, load_llmc_checkpoint, write_llmc_checkpoint,
  configure_adamw, plus load_hf_gpt2, write_hf_weights, read_llmc_tokens,
  write_llmc_debug_state, read_llmc_debug_state, reference_pass.

Examples:
  python dev/torch_reference.py --depth 12 --tokens tiny_shakespeare_val.bin
  python dev/torch_reference.py --layers 2 --heads 2 --channels 32 \\
      --vocab-size 64 --max-seq-len 16 --B 2 --T 8 --out-checkpoint /tmp/m.bin \\
      --out-state /tmp/s.bin
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_MAGIC = 20240326
CHECKPOINT_VERSION_FP32 = 3
CHECKPOINT_VERSION_BF16 = 5
STATE_MAGIC = 20240327
STATE_VERSION = 2
TOKENS_MAGIC = 20240520
TOKENS_VERSION = 1
TOKENS_MAGIC_U32 = 20240801
TOKENS_VERSION_U32 = 7
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

# GPT-2 family by depth: layers, heads, channels.
GPT2_DEPTHS = {12: (12, 12, 768), 24: (24, 16, 1024), 36: (36, 20, 1280), 48: (48, 25, 1600)}
# Heads of the GPT-2 family by channel count (used when an HF file gives no config).
GPT2_HEADS_BY_CHANNELS = {C: H for (_, H, C) in GPT2_DEPTHS.values()}

# The 16 llm.c parameter tensors, in checkpoint order.
LLMC_PARAM_NAMES = (
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
)


def round_up(n: int, multiple: int = 128) -> int:
    return ((n + multiple - 1) // multiple) * multiple


# ----------------------------------------------------------------------------
# Model


@dataclass
class GPT2Config:
    max_seq_len: int = 1024
    vocab_size: int = 50257
    padded_vocab_size: int = 50304
    num_layers: int = 12
    num_heads: int = 12
    channels: int = 768

    def __post_init__(self):
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        if self.channels % self.num_heads != 0:
            raise ValueError(f"channels {self.channels} not divisible by num_heads {self.num_heads}")
        for k in ("max_seq_len", "vocab_size", "num_layers", "num_heads", "channels"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be positive")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels")}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        C = config.channels
        self.n_head = config.num_heads
        self.c_attn = nn.Linear(C, 3 * C)  # fused q, k, v (rows 0:C q, C:2C k, 2C:3C v)
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)
        v = v.view(B, T, nh, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        C = config.channels
        self.c_fc = nn.Linear(C, 4 * C)
        self.c_proj = nn.Linear(4 * C, C)

    def forward(self, x):
        # GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.channels, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.channels, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2(nn.Module):
    """GPT-2 with a padded, tied token embedding (llm.c layout)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.channels)
        self.wpe = nn.Embedding(config.max_seq_len, config.channels)
        self.h = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(config.channels, eps=1e-5)
        # lm_head is tied to wte: logits = x @ wte.weight^T (no separate parameter).

    def forward(self, idx, targets=None):
        """idx (B, T) int64 token ids < vocab_size; targets (B, T) or None (-1 = ignore).

        Returns (logits (B, T, padded_vocab_size), mean loss over non-ignored
        targets using only the first vocab_size columns, or None).
        """
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"T={T} > max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        logits = x @ self.wte.weight.t()  # (B, T, Vp)
        loss = None
        if targets is not None:
            V = self.config.vocab_size
            loss = F.cross_entropy(logits[..., :V].reshape(-1, V), targets.reshape(-1), ignore_index=-1)
        return logits, loss


@torch.no_grad()
def init_llmc(model: GPT2, seed: int) -> GPT2:
    """llm.c's from-scratch init (order documented in the module docstring)."""
    cfg = model.config
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    std = 0.02
    res_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    model.wte.weight.normal_(0.0, std, generator=g)
    model.wpe.weight.normal_(0.0, std, generator=g)
    for block in model.h:
        block.ln_1.weight.fill_(1.0)
        block.ln_1.bias.zero_()
        block.attn.c_attn.weight.normal_(0.0, std, generator=g)
        block.attn.c_attn.bias.zero_()
        block.attn.c_proj.weight.normal_(0.0, res_std, generator=g)
        block.attn.c_proj.bias.zero_()
        block.ln_2.weight.fill_(1.0)
        block.ln_2.bias.zero_()
        block.mlp.c_fc.weight.normal_(0.0, std, generator=g)
        block.mlp.c_fc.bias.zero_()
        block.mlp.c_proj.weight.normal_(0.0, res_std, generator=g)
        block.mlp.c_proj.bias.zero_()
    model.ln_f.weight.fill_(1.0)
    model.ln_f.bias.zero_()
    model.wte.weight[cfg.vocab_size:].zero_()
    return model


# ----------------------------------------------------------------------------
# llm.c tensor layout


def llmc_tensors(model: GPT2, grads: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The 16 llm.c tensors (or their gradients) in checkpoint order, per-layer ones stacked."""

    def get(p: torch.Tensor) -> torch.Tensor:
        if not grads:
            return p.detach()
        return p.grad.detach() if p.grad is not None else torch.zeros_like(p)

    h = model.h
    stack = lambda f: torch.stack([get(f(b)) for b in h])  # noqa: E731
    return [
        ("wte", get(model.wte.weight)),
        ("wpe", get(model.wpe.weight)),
        ("ln1w", stack(lambda b: b.ln_1.weight)),
        ("ln1b", stack(lambda b: b.ln_1.bias)),
        ("qkvw", stack(lambda b: b.attn.c_attn.weight)),
        ("qkvb", stack(lambda b: b.attn.c_attn.bias)),
        ("attprojw", stack(lambda b: b.attn.c_proj.weight)),
        ("attprojb", stack(lambda b: b.attn.c_proj.bias)),
        ("ln2w", stack(lambda b: b.ln_2.weight)),
        ("ln2b", stack(lambda b: b.ln_2.bias)),
        ("fcw", stack(lambda b: b.mlp.c_fc.weight)),
        ("fcb", stack(lambda b: b.mlp.c_fc.bias)),
        ("fcprojw", stack(lambda b: b.mlp.c_proj.weight)),
        ("fcprojb", stack(lambda b: b.mlp.c_proj.bias)),
        ("lnfw", get(model.ln_f.weight)),
        ("lnfb", get(model.ln_f.bias)),
    ]


def llmc_shapes(cfg: GPT2Config) -> list[tuple[str, tuple[int, ...]]]:
    Vp, C, L, maxT = cfg.padded_vocab_size, cfg.channels, cfg.num_layers, cfg.max_seq_len
    return [
        ("wte", (Vp, C)), ("wpe", (maxT, C)), ("ln1w", (L, C)), ("ln1b", (L, C)),
        ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)),
        ("ln2w", (L, C)), ("ln2b", (L, C)), ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
        ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)), ("lnfw", (C,)), ("lnfb", (C,)),
    ]


@torch.no_grad()
def set_llmc_tensors(model: GPT2, tensors: dict[str, torch.Tensor]) -> GPT2:
    """Copy the 16 llm.c tensors (checkpoint shapes) into the model."""
    for name, shape in llmc_shapes(model.config):
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name}: shape {tuple(tensors[name].shape)} != expected {shape}")
    model.wte.weight.copy_(tensors["wte"])
    model.wpe.weight.copy_(tensors["wpe"])
    for l, b in enumerate(model.h):
        b.ln_1.weight.copy_(tensors["ln1w"][l])
        b.ln_1.bias.copy_(tensors["ln1b"][l])
        b.attn.c_attn.weight.copy_(tensors["qkvw"][l])
        b.attn.c_attn.bias.copy_(tensors["qkvb"][l])
        b.attn.c_proj.weight.copy_(tensors["attprojw"][l])
        b.attn.c_proj.bias.copy_(tensors["attprojb"][l])
        b.ln_2.weight.copy_(tensors["ln2w"][l])
        b.ln_2.bias.copy_(tensors["ln2b"][l])
        b.mlp.c_fc.weight.copy_(tensors["fcw"][l])
        b.mlp.c_fc.bias.copy_(tensors["fcb"][l])
        b.mlp.c_proj.weight.copy_(tensors["fcprojw"][l])
        b.mlp.c_proj.bias.copy_(tensors["fcprojb"][l])
    model.ln_f.weight.copy_(tensors["lnfw"])
    model.ln_f.bias.copy_(tensors["lnfb"])
    return model


# ----------------------------------------------------------------------------
# File I/O


def _atomic_write(path: str, write_fn) -> None:
    """Write via a temp file in the same directory, then os.replace onto path."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _header(*values: int) -> np.ndarray:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[: len(values)] = values
    return h


def _write_f32(f, t: torch.Tensor) -> None:
    f.write(np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy(), dtype="<f4").tobytes())


def write_llmc_checkpoint(model: GPT2, path: str) -> None:
    """Write an llm.c version-3 (float32) checkpoint."""
    cfg = model.config
    hdr = _header(CHECKPOINT_MAGIC, CHECKPOINT_VERSION_FP32, cfg.max_seq_len, cfg.vocab_size,
                  cfg.num_layers, cfg.num_heads, cfg.channels, cfg.padded_vocab_size)

    def write(f):
        f.write(hdr.tobytes())
        for _, t in llmc_tensors(model):
            _write_f32(f, t)

    _atomic_write(path, write)


def load_llmc_checkpoint(path: str) -> GPT2:
    """Load an llm.c checkpoint (version 3 float32, or version 5 bfloat16 upcast) into a float32 GPT2."""
    with open(path, "rb") as f:
        hdr = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
        data = f.read()
    if hdr.size != HEADER_INTS or hdr[0] != CHECKPOINT_MAGIC:
        raise ValueError(f"{path}: bad checkpoint magic {hdr[0] if hdr.size else None}")
    version = int(hdr[1])
    if version not in (CHECKPOINT_VERSION_FP32, CHECKPOINT_VERSION_BF16):
        raise ValueError(f"{path}: unsupported checkpoint version {version}")
    cfg = GPT2Config(max_seq_len=int(hdr[2]), vocab_size=int(hdr[3]), num_layers=int(hdr[4]),
                     num_heads=int(hdr[5]), channels=int(hdr[6]), padded_vocab_size=int(hdr[7]))
    shapes = llmc_shapes(cfg)
    n = sum(math.prod(s) for _, s in shapes)
    elem = 4 if version == CHECKPOINT_VERSION_FP32 else 2
    if len(data) != n * elem:
        raise ValueError(f"{path}: {len(data)} data bytes, expected {n * elem} for {cfg}")
    dtype = torch.float32 if version == CHECKPOINT_VERSION_FP32 else torch.bfloat16
    flat = torch.frombuffer(bytearray(data), dtype=dtype).to(torch.float32)
    tensors, off = {}, 0
    for name, shape in shapes:
        k = math.prod(shape)
        tensors[name] = flat[off: off + k].view(shape)
        off += k
    return set_llmc_tensors(GPT2(cfg), tensors)


def read_llmc_tokens(path: str) -> np.ndarray:
    """Read an llm.c token shard (uint16, magic 20240520 v1; or uint32, magic 20240801 v7)."""
    with open(path, "rb") as f:
        hdr = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
        data = f.read()
    if hdr.size != HEADER_INTS:
        raise ValueError(f"{path}: file shorter than the 1024-byte header")
    if hdr[0] == TOKENS_MAGIC and hdr[1] == TOKENS_VERSION:
        dtype = "<u2"
    elif hdr[0] == TOKENS_MAGIC_U32 and hdr[1] == TOKENS_VERSION_U32:
        dtype = "<u4"
    else:
        raise ValueError(f"{path}: bad token file magic/version {hdr[0]}/{hdr[1]}")
    ntok = int(hdr[2])
    if len(data) != ntok * np.dtype(dtype).itemsize:
        raise ValueError(f"{path}: {len(data)} data bytes for {ntok} tokens")
    return np.frombuffer(data, dtype=dtype).astype(np.int64)


def write_llmc_debug_state(path: str, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
                           loss: torch.Tensor, grads: list[tuple[str, torch.Tensor]], vocab_size: int) -> None:
    """Debug state: header (20240327, 2, B, T), x i32, y i32, logits[..., :V] f32, loss f32, grads f32."""
    B, T = x.shape

    def write(f):
        f.write(_header(STATE_MAGIC, STATE_VERSION, B, T).tobytes())
        f.write(np.ascontiguousarray(x.cpu().numpy(), dtype="<i4").tobytes())
        f.write(np.ascontiguousarray(y.cpu().numpy(), dtype="<i4").tobytes())
        _write_f32(f, logits[..., :vocab_size])
        _write_f32(f, loss.reshape(1))
        for _, g in grads:
            _write_f32(f, g)

    _atomic_write(path, write)


def read_llmc_debug_state(path: str, cfg: GPT2Config) -> dict:
    """Read a debug state written for a model of config cfg (numpy arrays)."""
    with open(path, "rb") as f:
        hdr = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
        data = f.read()
    if hdr[0] != STATE_MAGIC or hdr[1] != STATE_VERSION:
        raise ValueError(f"{path}: bad debug state magic/version {hdr[0]}/{hdr[1]}")
    B, T, V = int(hdr[2]), int(hdr[3]), cfg.vocab_size
    out, off = {"B": B, "T": T}, 0

    def take(n, dtype, shape):
        nonlocal off
        a = np.frombuffer(data, dtype=dtype, count=n, offset=off).reshape(shape)
        off += n * 4
        return a

    out["x"] = take(B * T, "<i4", (B, T))
    out["y"] = take(B * T, "<i4", (B, T))
    out["logits"] = take(B * T * V, "<f4", (B, T, V))
    out["loss"] = float(take(1, "<f4", (1,))[0])
    out["grads"] = {name: take(math.prod(s), "<f4", s) for name, s in llmc_shapes(cfg)}
    if off != len(data):
        raise ValueError(f"{path}: {len(data) - off} trailing bytes")
    return out


# ----------------------------------------------------------------------------
# Hugging Face GPT-2 weights

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    if load_file is not None:
        return load_file(path)
    # Minimal reader: u64 header length, JSON header, raw little-endian data.
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: {name}: unsupported dtype {info['dtype']}")
        b, e = info["data_offsets"]
        t = torch.frombuffer(data[b:e], dtype=dtype) if e > b else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> str:
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        tmp = f"{path}.tmp.{os.getpid()}"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
        return "safetensors package"
    # Minimal writer (same layout the package writes; float32 only here).
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy(), dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)

    _atomic_write(path, write)
    return "built-in safetensors writer"


# Conv1D (in, out) weights in HF GPT-2; transposed to (out, in) on import.
_HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_LAYER_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                  "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                  "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def read_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """model.safetensors (by extension) or pytorch_model.bin (torch.load); keys without 'transformer.'."""
    if path.endswith(".safetensors"):
        sd = _read_safetensors(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for k, v in sd.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        out[k] = v
    return out


@torch.no_grad()
def load_hf_gpt2(path: str, num_heads: int | None = None, padded_vocab_size: int | None = None) -> GPT2:
    """Build a float32 GPT2 from Hugging Face GPT-2 weights on disk.

    The shape comes from the tensors; num_heads from the argument, else a
    config.json next to the file (n_head), else the GPT-2 family table by
    channel count.  wte is padded with zero rows to padded_vocab_size
    (default: vocab rounded up to a multiple of 128).
    """
    sd = read_hf_state_dict(path)
    lm_head = sd.pop("lm_head.weight", None)
    for k in [k for k in sd if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias")]:
        del sd[k]  # causal-mask buffers, not parameters
    V, C = sd["wte.weight"].shape
    maxT = sd["wpe.weight"].shape[0]
    L = 0
    while f"h.{L}.ln_1.weight" in sd:
        L += 1
    if num_heads is None:
        cfg_json = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if os.path.exists(cfg_json):
            with open(cfg_json) as f:
                num_heads = json.load(f).get("n_head")
    if num_heads is None:
        if C not in GPT2_HEADS_BY_CHANNELS:
            raise ValueError(f"cannot infer num_heads for channels={C}; pass --heads")
        num_heads = GPT2_HEADS_BY_CHANNELS[C]
    cfg = GPT2Config(max_seq_len=maxT, vocab_size=V, num_layers=L, num_heads=num_heads, channels=C,
                     padded_vocab_size=padded_vocab_size or round_up(V))
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    expected |= {f"h.{l}.{k}" for l in range(L) for k in _HF_LAYER_KEYS}
    if set(sd) != expected:
        raise ValueError(f"{path}: missing keys {sorted(expected - set(sd))[:8]}, "
                         f"unexpected keys {sorted(set(sd) - expected)[:8]}")
    if lm_head is not None and not torch.equal(lm_head.float(), sd["wte.weight"].float()):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight (this model ties them)")

    def w(k: str) -> torch.Tensor:
        t = sd[k].to(torch.float32)
        return t.t() if any(k.endswith(c) for c in _HF_CONV1D) else t

    per_layer = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvw": "attn.c_attn.weight",
                 "qkvb": "attn.c_attn.bias", "attprojw": "attn.c_proj.weight", "attprojb": "attn.c_proj.bias",
                 "ln2w": "ln_2.weight", "ln2b": "ln_2.bias", "fcw": "mlp.c_fc.weight", "fcb": "mlp.c_fc.bias",
                 "fcprojw": "mlp.c_proj.weight", "fcprojb": "mlp.c_proj.bias"}
    wte = torch.zeros(cfg.padded_vocab_size, C)
    wte[:V] = w("wte.weight")
    tensors = {"wte": wte, "wpe": w("wpe.weight"), "lnfw": w("ln_f.weight"), "lnfb": w("ln_f.bias")}
    for name, k in per_layer.items():
        tensors[name] = torch.stack([w(f"h.{l}.{k}") for l in range(L)])
    return set_llmc_tensors(GPT2(cfg), tensors)


def hf_state_dict(model: GPT2, prefix: str = "", with_mask_buffers: bool = True) -> dict[str, torch.Tensor]:
    """The model as an HF GPT-2 state dict: Conv1D (in, out) layout, wte unpadded to vocab_size.

    with_mask_buffers adds h.{i}.attn.bias (1, 1, maxT, maxT) lower-triangular
    ones, as in the HF hub gpt2 files, so importers must skip them.
    """
    cfg = model.config
    sd = {"wte.weight": model.wte.weight[: cfg.vocab_size], "wpe.weight": model.wpe.weight}
    mask = torch.tril(torch.ones(cfg.max_seq_len, cfg.max_seq_len)).view(1, 1, cfg.max_seq_len, cfg.max_seq_len)
    for l, b in enumerate(model.h):
        p = f"h.{l}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = b.ln_1.weight, b.ln_1.bias
        if with_mask_buffers:
            sd[p + "attn.bias"] = mask
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = b.attn.c_attn.weight.t(), b.attn.c_attn.bias
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = b.attn.c_proj.weight.t(), b.attn.c_proj.bias
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = b.ln_2.weight, b.ln_2.bias
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = b.mlp.c_fc.weight.t(), b.mlp.c_fc.bias
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = b.mlp.c_proj.weight.t(), b.mlp.c_proj.bias
    sd["ln_f.weight"], sd["ln_f.bias"] = model.ln_f.weight, model.ln_f.bias
    return {prefix + k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


def write_hf_weights(model: GPT2, path: str, prefix: str = "", with_mask_buffers: bool = True) -> str:
    """Write HF-style weights: safetensors if path ends in .safetensors, else torch.save. Returns how."""
    sd = hf_state_dict(model, prefix, with_mask_buffers)
    if path.endswith(".safetensors"):
        return _write_safetensors(path, sd)
    _atomic_write(path, lambda f: torch.save(sd, f))
    return "torch.save"


# ----------------------------------------------------------------------------
# Optimizer and the reference pass


def configure_adamw(model: nn.Module, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0, weight_decay_mode: str = "all", fused: bool = False):
    """torch.optim.AdamW. weight_decay_mode 'all': decay every tensor (llm.c's CPU AdamW);
    'matrices': decay only tensors with dim >= 2 (embeddings and Linear weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay_mode == "all":
        groups = [{"params": params, "weight_decay": weight_decay}]
    elif weight_decay_mode == "matrices":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    else:
        raise ValueError(f"weight_decay_mode must be 'all' or 'matrices', got {weight_decay_mode!r}")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=False, fused=fused)


def global_grad_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm over all parameter gradients (norm of the per-tensor norms, as clip_grad_norm_)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


def reference_pass(model: GPT2, x: torch.Tensor, y: torch.Tensor):
    """One forward + backward: returns (logits over padded vocab, loss, llm.c-ordered grads)."""
    model.zero_grad(set_to_none=True)
    logits, loss = model(x, y)
    loss.backward()
    return logits.detach(), loss.detach(), llmc_tensors(model, grads=True)


# ----------------------------------------------------------------------------
# Command line


def model_config_from_args(args) -> GPT2Config:
    explicit = [args.layers, args.heads, args.channels]
    if any(v is not None for v in explicit):
        if args.depth is not None or any(v is None for v in explicit):
            raise SystemExit("give either --depth or all of --layers --heads --channels")
        L, H, C = explicit
    else:
        d = 12 if args.depth is None else args.depth
        L, H, C = GPT2_DEPTHS.get(d, (d, d, 64 * d))
    V = args.vocab_size
    return GPT2Config(max_seq_len=args.max_seq_len, vocab_size=V,
                      padded_vocab_size=args.padded_vocab_size or round_up(V),
                      num_layers=L, num_heads=H, channels=C)


def default_name(cfg: GPT2Config) -> str:
    if (cfg.num_layers, cfg.num_heads, cfg.channels, cfg.vocab_size, cfg.max_seq_len) == (12, 12, 768, 50257, 1024):
        return "gpt2_124M"
    return f"gpt2_L{cfg.num_layers}_H{cfg.num_heads}_C{cfg.channels}"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show '(default: X)' only where a flag has a real default (not None/False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="PyTorch reference for the llm.c Python port: writes an llm.c float32 checkpoint, "
                    "a debug state and a JSON recipe with the losses of a few AdamW steps.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("model shape (either --depth or --layers/--heads/--channels; default d12)")
    g.add_argument("--depth", type=int, default=None,
                   help="GPT-2 family depth: 12 -> 12L/12H/768C, 24 -> 24/16/1024, 36 -> 36/20/1280, "
                        "48 -> 48/25/1600; any other n -> n layers, n heads, 64*n channels")
    g.add_argument("--layers", type=int, default=None, help="number of transformer blocks")
    g.add_argument("--heads", type=int, default=None, help="attention heads (also overrides the head count "
                   "inferred for --hf-weights)")
    g.add_argument("--channels", type=int, default=None, help="embedding width C")
    g.add_argument("--vocab-size", type=int, default=50257, help="real vocabulary size V")
    g.add_argument("--padded-vocab-size", type=int, default=None,
                   help="rows of wte, Vp >= V (default: V rounded up to a multiple of 128)")
    g.add_argument("--max-seq-len", type=int, default=1024, help="rows of wpe (maximum T)")
    g = p.add_argument_group("weights (default: llm.c's from-scratch init with --seed)")
    g.add_argument("--hf-weights", default=None, metavar="PATH",
                   help="load Hugging Face GPT-2 weights (model.safetensors or pytorch_model.bin); the shape "
                        "comes from the file, so the shape flags are ignored except --heads and "
                        "--padded-vocab-size")
    g.add_argument("--llmc-weights", default=None, metavar="PATH",
                   help="load an llm.c checkpoint (version 3, or 5 upcast to float32); shape from its header")
    g.add_argument("--seed", type=int, default=1337, help="seed of the init and of the random tokens")
    g = p.add_argument_group("data")
    g.add_argument("--B", type=int, default=4, help="batch size")
    g.add_argument("--T", type=int, default=64, help="sequence length")
    g.add_argument("--tokens", default=None, metavar="FILE",
                   help="llm.c token file (.bin); x = first B*T tokens, y = tokens 1..B*T. "
                        "Without it: B*T+1 random ids < V from a torch.Generator seeded with --seed")
    g = p.add_argument_group("optimizer recipe (torch.optim.AdamW, foreach=False, fused=False)")
    g.add_argument("--steps", type=int, default=10,
                   help="update steps on the same batch; the loss before each is recorded")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    g.add_argument("--weight-decay-mode", choices=("all", "matrices"), default="all",
                   help="'all': decay every tensor (llm.c's CPU test); 'matrices': only 2-D tensors")
    g.add_argument("--grad-clip", type=float, default=0.0,
                   help="clip the global grad norm to this with clip_grad_norm_ (0 = off)")
    g = p.add_argument_group("outputs")
    g.add_argument("--out-checkpoint", default=None, metavar="PATH",
                   help="llm.c v3 float32 checkpoint of the initial weights "
                        "(default data/gpt2_124M.bin for d12, else data/gpt2_L{L}_H{H}_C{C}.bin)")
    g.add_argument("--out-state", default=None, metavar="PATH",
                   help="llm.c debug state for the initial weights; the recipe JSON goes to PATH.json "
                        "(default data/<name>_debug_state.bin)")
    g.add_argument("--hf-out", default=None, metavar="PATH",
                   help="also write the initial weights as an HF GPT-2 state dict in Conv1D layout "
                        "(safetensors if PATH ends in .safetensors, else torch.save)")
    g.add_argument("--hf-out-prefix", choices=("none", "transformer"), default="none",
                   help="key prefix for --hf-out: 'none' as the hub gpt2 files, 'transformer' as "
                        "GPT2LMHeadModel.state_dict()")
    g.add_argument("--hf-out-no-mask", action="store_true",
                   help="leave the h.{i}.attn.bias causal-mask buffers out of --hf-out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_default_dtype(torch.float32)

    # weights
    t0 = time.perf_counter()
    if args.hf_weights and args.llmc_weights:
        raise SystemExit("give at most one of --hf-weights and --llmc-weights")
    if args.hf_weights:
        model = load_hf_gpt2(args.hf_weights, num_heads=args.heads, padded_vocab_size=args.padded_vocab_size)
        source = f"hf:{args.hf_weights}"
    elif args.llmc_weights:
        model = load_llmc_checkpoint(args.llmc_weights)
        source = f"llmc:{args.llmc_weights}"
    else:
        model = init_llmc(GPT2(model_config_from_args(args)), args.seed)
        source = f"init_llmc(seed={args.seed})"
    cfg = model.config
    model.train()
    print(f"model {cfg.to_dict()} from {source}: {sum(p.numel() for p in model.parameters()):,} parameters "
          f"({time.perf_counter() - t0:.2f}s)")

    # data
    B, T, V = args.B, args.T, cfg.vocab_size
    if T > cfg.max_seq_len:
        raise SystemExit(f"--T {T} > max_seq_len {cfg.max_seq_len}")
    if args.tokens:
        toks = read_llmc_tokens(args.tokens)
        if toks.size < B * T + 1:
            raise SystemExit(f"{args.tokens}: {toks.size} tokens, need B*T+1 = {B * T + 1}")
        buf = torch.from_numpy(toks[: B * T + 1].copy())
        data_source = args.tokens
    else:
        g = torch.Generator(device="cpu")
        g.manual_seed(args.seed)
        buf = torch.randint(0, V, (B * T + 1,), generator=g, dtype=torch.long)
        data_source = f"random(seed={args.seed})"
    if int(buf.max()) >= V or int(buf.min()) < 0:
        raise SystemExit(f"token ids must be in [0, {V})")
    x, y = buf[:-1].view(B, T), buf[1:].view(B, T)

    name = default_name(cfg)
    ckpt_path = args.out_checkpoint or os.path.join("data", f"{name}.bin")
    state_path = args.out_state or os.path.join("data", f"{name}_debug_state.bin")

    # outputs of the initial weights
    t0 = time.perf_counter()
    write_llmc_checkpoint(model, ckpt_path)
    print(f"wrote {ckpt_path} ({os.path.getsize(ckpt_path):,} bytes, {time.perf_counter() - t0:.2f}s)")
    if args.hf_out:
        t0 = time.perf_counter()
        how = write_hf_weights(model, args.hf_out, prefix="" if args.hf_out_prefix == "none" else "transformer.",
                               with_mask_buffers=not args.hf_out_no_mask)
        print(f"wrote {args.hf_out} via {how} ({os.path.getsize(args.hf_out):,} bytes, "
              f"{time.perf_counter() - t0:.2f}s)")

    # steps: forward on the same batch, record loss, zero grads, backward, (clip), AdamW update.
    # Step 0's forward/backward is on the initial weights and gives the debug state.
    opt = configure_adamw(model, args.lr, (args.beta1, args.beta2), args.eps, args.weight_decay,
                          args.weight_decay_mode)
    losses, grad_norms = [], []
    t_steps = time.perf_counter()
    n_steps = max(args.steps, 1)
    for step in range(n_steps):
        t0 = time.perf_counter()
        logits, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = global_grad_norm(model)
        if step == 0:
            t1 = time.perf_counter()
            write_llmc_debug_state(state_path, x, y, logits.detach(), loss.detach(),
                                   llmc_tensors(model, grads=True), V)
            print(f"wrote {state_path} ({os.path.getsize(state_path):,} bytes, {time.perf_counter() - t1:.2f}s)")
            if args.steps == 0:
                break
        losses.append(loss.item())
        grad_norms.append(norm.item())
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip, foreach=False)
        opt.step()
        print(f"step {step:3d}: loss {losses[-1]:.6f}  grad norm {grad_norms[-1]:.6f}  "
              f"({time.perf_counter() - t0:.2f}s)")
    t_steps = time.perf_counter() - t_steps

    recipe = {
        "format": "llmc-py-recipe",
        "version": 1,
        "B": B,
        "T": T,
        "seed": args.seed,
        "config": cfg.to_dict(),
        "optimizer": {"lr": args.lr, "beta1": args.beta1, "beta2": args.beta2, "eps": args.eps,
                      "weight_decay": args.weight_decay, "weight_decay_mode": args.weight_decay_mode,
                      "grad_clip": args.grad_clip},
        "losses": losses,
        "grad_norms": grad_norms,
        "torch_version": torch.__version__,
        "weights": source,
        "data": data_source,
        "num_threads": torch.get_num_threads(),
    }
    json_path = state_path + ".json"
    _atomic_write(json_path, lambda f: f.write((json.dumps(recipe, indent=2) + "\n").encode()))
    print(f"wrote {json_path}")
    print("losses: " + ", ".join(f"{l:.6f}" for l in losses))
    print(f"steps took {t_steps:.2f}s; total {time.perf_counter() - t_start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
