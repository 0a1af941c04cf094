"""
GPT-2 training on an NVIDIA GPU: the CUDA twin of train_gpt2.py (as llm.c has
train_gpt2.c and train_gpt2.cu). The map:

- train_gpt2_cuda.py (this file): the model on the device. `to_device(model, B, T)` (and
  `to_device_bf16`) copies a gpt2_common.GPT2's parameters to the GPU and allocates, once,
  every buffer a step needs (the `dm`); `gpt2_forward_cuda`, `mean_loss_cuda`,
  `gpt2_backward_cuda`, `stage_update` and `update_on_device` (and their bf16 twins) run a
  step on it, a layer at a time; `CUDA`, at the end, is the training target that
  train_gpt2.py's main() and test_gpt2.py use (the gpt2_common.Device interface, as
  train_gpt2.CPU).
- cuda_kernels.py: our kernels (numba.cuda) and their launchers, one per layer kind
  (`encoder_layernorm`, `residual_layernorm`, `colsum`, `layernorm_backward`, `adamw`, ...).
- cuda_libraries.py: device memory, and the libraries with their simulator emulations:
  cuBLAS (`Blas`), cuBLASLt with its tuning cache (`Lt`), cuDNN's attention (`Attention`).
- cuda_fp8.py: --precision fp8's formats, casts and delayed scales (`Fp8State`).
- distributed.py: the ranks of a data-parallel run and NCCL.
This module imports gpt2_common, never train_gpt2.

The device buffers hold the CPU module's tensors (llm.c checkpoint order for the
parameters, `common.activation_shapes` for the activations), each tensor starting on a
256-byte boundary (DEVICE_ALIGN): a flat device buffer may have padding between tensors
where the host's packed layout would leave one misaligned for the 8- and 16-byte loads
of the kernels and cuBLASLt's preferred alignment, so host copies go tensor by tensor
when the layouts differ (DeviceLayout). Every non-matmul layer is a numba.cuda kernel
computing the same math as its CPU twin; the matmuls go through cuBLAS, TF32 tensor
cores or strict fp32 by the handle's math mode.

Four precisions (CUDA(..., precision=)): "fp32" and "tf32" as described here, all
buffers float32; "bf16", mixed precision (to_device_bf16, gpt2_forward_bf16,
gpt2_backward_bf16): a bf16 copy of the parameters and bf16 activations beside the float32
master weights, gradients, AdamW state and residual stream, matmuls through cuBLASLt
with the bias and GELU as epilogues, attention through cuDNN's fused flash attention,
and each step phase replayed as a CUDA graph; "fp8", the bf16 step with its layers'
matmuls in fp8 (linear_forward, linear_backward, cuda_fp8). The kernels are the same for all:
they read and write through ld/st, which convert by the array's dtype (uint16 holds
bf16 bits), and the memory-bound row kernels through ld4/st4, four values per access
over a packed uint64 view (quads).

In fp32 and tf32, attention never permutes q, k, v: pointer-array batched GEMMs (one
matrix per (batch, head)) read them in place from the qkv rows and write the head outputs
in place into atty / dqkv. The causal mask is exploited by splitting the T query rows into blocks:
block i only multiplies against keys 0..end_i, so about (NB+1)/(2 NB) of the T x T work
and traffic is done. Entries above the diagonal of `att` stay zero. The softmax is one
warp per row, straight from device memory.

Measured and removed (on an H100, B=16, T=1024, TF32): llm.c's head-major layout
(q, k, v permuted into per-head copies, strided batched GEMMs, the outputs merged
back) was slower, 110 vs 100 ms per step: cuBLAS picks the same GEMM kernels, and the
copies cost; softmax kernels staging each row in shared memory measured no faster
than the plain ones.

Everything is allocated once in `to_device`; a training step does small async
host-to-device copies from pinned staging buffers (tokens and targets in the forward;
the encoder-backward buckets, built on the host while the device runs the forward,
behind them; the AdamW hyperparameters before the update) and no device allocation. The only device-to-host reads are the ones the
caller asks for: through `CUDA`, the loss of each forward and the norm of each update
(one wait each), and the *_to_host copies.

With NUMBA_ENABLE_CUDASIM=1 the kernels run in numba's simulator and the libraries are
replaced by numpy emulations of the same calls (cuda_libraries.py), so the tests cover
the plumbing too.
"""

import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

import cuda_fp8
import distributed
import gpt2_common as common
from cuda_kernels import (  # noqa: F401  (the launchers; tests and dev scripts reach them through this module too)
    MAX_THREADS, NORM_BLOCKS, adamw, bias_forward, bias_gelu_forward, classifier_backward, classifier_forward,
    classifier_wte_grad, colsum,
    attention_decode, colsum_scratch, encoder_backward_wpe, encoder_backward_wte, encoder_buckets, encoder_layernorm,
    fill,
    gelu_forward, global_norm, layernorm_backward, layernorm_backward_scratch, loss_reduce,
    layernorm_apply, residual_layernorm, set_launch_stream, softmax_backward, softmax_forward, store)
from cuda_libraries import (SIM, R_8F_E4M3, R_8F_E5M2, Attention, Blas, Lt, PtrArray, addr, alloc,  # noqa: F401
                            release)


# -----------------------------------------------------------------------------
# The model on the device


class CudaGPT2:
    """Device buffers (the tensors of common.GPT2's layouts, each aligned), their views,
    and the step state."""


def cuda_available():
    try:
        if not cuda.is_available():
            return False
        if not SIM:
            import cupy  # noqa: F401
            from cupy_backends.cuda.libs import cublas  # noqa: F401
        return True
    except Exception:
        return False


def default_attention_blocks(T, tf32=True):
    """Causal query blocks: block i multiplies against keys 0..end_i only, so the T x T
    work is (NB+1)/(2 NB) of the full product. Blocks of about 256 rows with TF32
    (smaller products lose tensor-core efficiency), about 128 in strict fp32."""
    rows = 256 if tf32 else 128
    return max(1, min(1024 // rows, (T + rows - 1) // rows))


LAYER_PARAMETERS = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
                    "fcw", "fcb", "fcprojw", "fcprojb")
LAYER_ACTIVATIONS = ("ln1", "ln1_mean", "ln1_rstd", "qkv", "att", "atty", "residual2", "ln2", "ln2_mean",
                     "ln2_rstd", "fch", "fch_gelu", "residual3")
DEVICE_ALIGN = 256  # bytes: where every device tensor starts (cuBLASLt's preferred alignment; the 16-byte loads)
PARAMETER_ALIGN = DEVICE_ALIGN // 2  # values: the float32 and the bf16 parameter buffers share one layout


class DeviceLayout:
    """Where the tensors of one flat device buffer live. The host packs them back to back
    in `shapes`' order (llm.c's layout, for the parameters); on the device every tensor,
    and every layer's slice of a layered one (first axis L), starts at a multiple of
    `align` values, zero padding between, so that no tensor after an odd-sized one (an
    L*B*T layernorm statistic, a B*NH*T*T score matrix) starts where the packed loads
    cannot read it. layer_major: the layered slices grouped by layer, after the rest (the
    parameter buffer: one layer's gradients are one contiguous range, a reduction bucket
    the backward pass completes at once).

    segments: (name, layer or None, host start, device start, length) in device order;
    size: the device buffer's length; identical: the device offsets are the host's (one
    copy moves a whole buffer: GPT-2's own shapes at T=1024)."""

    def __init__(self, shapes, layered, num_layers, align, layer_major=False):
        self.shapes = dict(shapes)
        self.layered = [name for name, _ in shapes if name in layered]
        self.host_size = common.buffer_size(shapes)
        pieces = []  # (name, layer, host start, length)
        for name, shape, start, end in common.tensor_offsets(shapes):
            if name in layered:
                n = (end - start) // num_layers if num_layers else 0
                pieces += [(name, l, start + l * n, n) for l in range(num_layers)]
            else:
                pieces.append((name, None, start, end - start))
        if layer_major:  # a stable sort: the tensor order within each layer stays
            pieces = [p for p in pieces if p[1] is None] + sorted((p for p in pieces if p[1] is not None),
                                                                  key=lambda p: p[1])
        self.segments, offset = [], 0
        for name, layer, host_start, n in pieces:
            self.segments.append((name, layer, host_start, offset, n))
            offset += -(-n // align) * align
        self.size = max(offset, align)
        self.identical = all(h == d for _, _, h, d, _ in self.segments)
        self.buckets = None
        if layer_major:  # layer l's slices: from its first one to the next layer's first one
            firsts = {}
            for _, layer, _, d, _ in self.segments:
                firsts.setdefault(layer, d)
            bounds = [firsts[l] for l in range(num_layers)] + [self.size]
            self.buckets = {l: (bounds[l], bounds[l + 1]) for l in range(num_layers)}
            self.buckets[None] = (0, bounds[0])

    def views(self, buffer):
        """Named views into a device buffer of this layout: an array per tensor, a list of
        per-layer arrays per layered tensor."""
        out = {name: [] for name in self.layered}
        for name, layer, _, start, n in self.segments:
            shape = self.shapes[name]
            view = buffer[start:start + n].reshape(shape if layer is None else shape[1:])
            if layer is None:
                out[name] = view
            else:
                out[name].append(view)
        return SimpleNamespace(**out)

    def bucket(self, layer):
        """[start, end) of the device buffer holding every slice of `layer` (a
        layer_major layout), or, for None, the unlayered tensors before the first layer."""
        return self.buckets[layer]

    def to_host(self, device, host):
        """device (this layout) -> host (packed): one copy when identical, else tensor by tensor."""
        if self.identical:
            device[:self.host_size].copy_to_host(host[:self.host_size])
            return
        for _, _, h, d, n in self.segments:
            if n:
                device[d:d + n].copy_to_host(host[h:h + n])

    def to_device(self, host, device):
        """host (packed) -> device (this layout); the padding is left as it is (zero)."""
        if self.identical:
            device[:self.host_size].copy_to_device(np.ascontiguousarray(host[:self.host_size]))
            return
        for _, _, h, d, n in self.segments:
            if n:
                device[d:d + n].copy_to_device(np.ascontiguousarray(host[h:h + n]))

    def device_order(self, host, size=None):
        """host (packed) as a numpy array in this layout, zero-padded to size values."""
        out = np.zeros(max(size or 0, self.size), dtype=host.dtype)
        for _, _, h, d, n in self.segments:
            out[d:d + n] = host[h:h + n]
        return out

    def groups(self, flag, end):
        """(start, end, flag(name)) runs of the device buffer up to end, each segment's
        padding with it, neighbours with the same flag merged (AdamW's decay groups)."""
        runs = []
        for i, (name, _, _, start, _) in enumerate(self.segments):
            stop = self.segments[i + 1][3] if i + 1 < len(self.segments) else end
            if runs and runs[-1][2] == flag(name):
                runs[-1] = (runs[-1][0], stop, runs[-1][2])
            else:
                runs.append((start, stop, flag(name)))
        return runs


def parameter_layout(cfg):
    """The device layout of the parameter buffer (and of the gradients, m, v and the bf16
    copy): layer-major, each slice at a multiple of PARAMETER_ALIGN values."""
    return DeviceLayout(common.parameter_shapes(cfg), LAYER_PARAMETERS, cfg.num_layers, PARAMETER_ALIGN,
                        layer_major=True)


def _check_shape(cfg, B, T, precision="fp32"):
    """A one-line error, at start, for a shape the GPU or the precision cannot take."""
    if T > cfg.max_seq_len or B <= 0 or T <= 0:
        raise common.UserError(f"bad batch shape B={B}, T={T} (max_seq_len={cfg.max_seq_len})")
    if cfg.channels % cfg.num_heads:
        raise ValueError(f"channels {cfg.channels} not divisible by heads {cfg.num_heads}")
    if cfg.channels % 4 or cfg.padded_vocab_size % 4:  # the row kernels' packed access (quads)
        raise common.UserError(f"the GPU needs channels and padded vocab size that are multiples of 4, not "
                               f"{cfg.channels} and {cfg.padded_vocab_size}")
    if cfg.channels > 4 * MAX_THREADS:  # the layernorm backward's block: a thread per 4 channels
        raise common.UserError(f"the GPU takes at most {4 * MAX_THREADS} channels, not {cfg.channels}")
    head_size = cfg.channels // cfg.num_heads
    if precision in MIXED and (head_size % 8 or head_size > 128):  # cuDNN's fused attention, on any GPU
        raise common.UserError(f"--precision {precision} needs a head size (channels / heads) that is a multiple of 8 "
                               f"and at most 128 (cuDNN's fused attention), not {head_size}: use --precision tf32 or fp32")
    if precision == "fp8":
        if not cuda_fp8.supported():
            cc = ".".join(map(str, cuda.get_current_device().compute_capability))
            raise common.UserError(f"--precision fp8 needs a GPU with fp8 tensor cores (compute capability 8.9 or "
                                   f"later: Ada, Hopper); this one is {cc}: use --precision bf16")
        if (B * T) % 16 or cfg.channels % 16:  # cuBLASLt's fp8 matmuls
            raise common.UserError(f"--precision fp8 needs B*T and channels that are multiples of 16, not {B * T} "
                                   f"and {cfg.channels}")


def _parameters_to_device(dm, model, B, T, shards, rank, shard_optimizer):
    """What both precisions keep in float32: the parameters (the master weights under
    bf16), their gradients, AdamW m and v, the grad-norm and loss scratch, the AdamW
    decay groups, and the token staging. The parameter layout's buffer is padded to
    `shards` equal shards (NCCL's collectives take equal pieces); under ZeRO-1
    (shard_optimizer) m and v hold only this rank's shard."""
    cfg = dm.cfg = model.cfg
    dm.num_parameters = model.num_parameters
    dm.step = 0
    BT, C = B * T, cfg.channels
    dm.layout = parameter_layout(cfg)
    dm.shard_size = -(-distributed.shard_size(dm.layout.size, shards) // 4) * 4  # whole quads (k_adamw)
    size = dm.shard_size * shards
    dm.params_memory, dm.grads_memory = alloc(size), alloc(size)
    moments = dm.shard_size if shard_optimizer else size
    dm.m_memory, dm.v_memory = alloc(moments), alloc(moments)
    dm.sharded = shard_optimizer
    for buf in (dm.params_memory, dm.grads_memory, dm.m_memory, dm.v_memory):
        fill(buf, 0.0)
    dm.layout.to_device(model.params_memory, dm.params_memory)
    dm.params = dm.layout.views(dm.params_memory)
    dm.grads = dm.layout.views(dm.grads_memory)
    dm.P = SimpleNamespace(**{name: getattr(dm.params, name) for name in LAYER_PARAMETERS})
    dm.G = SimpleNamespace(**{name: getattr(dm.grads, name) for name in LAYER_PARAMETERS})

    # column-sum and layernorm-backward scratch (bias and layernorm weight gradients), norm
    # partials
    dm.colsum_scratch = colsum_scratch(BT, 4 * C)
    dm.layernorm_scratch = layernorm_backward_scratch(C)
    dm.norm_part = cuda.device_array(NORM_BLOCKS, dtype=np.float64)
    dm.normbuf = cuda.device_array(2, dtype=np.float64)
    dm.normbuf.copy_to_device(np.array([0.0, 1.0]))
    _token_staging(dm, B, T)
    # AdamW hyperparameters of the next update, staged as the tokens are
    dm.hyper_host = cuda.pinned_array(6, dtype=np.float32)
    dm.hyper_host[:] = 0
    dm.hyper = cuda.to_device(dm.hyper_host)

    # AdamW weight-decay groups: contiguous ranges of the parameter buffer (the padding
    # with the tensor before it, never decayed: it stays zero), as ends relative to the
    # first value this rank updates
    groups = dm.layout.groups(lambda name: name in common.MATRIX_PARAMETERS, size)
    dm.update_start = dm.shard_size * rank if shard_optimizer else 0
    dm.group_end = cuda.to_device(np.array([end for _, end, _ in groups], dtype=np.int64) - dm.update_start)
    dm.group_is_matrix = np.array([is_matrix for _, _, is_matrix in groups], dtype=bool)
    dm.group_decay = cuda.to_device(np.zeros(len(groups), dtype=np.float32))
    dm._decay_key = None


def _communication(dm, dist):
    """dm's part in a data-parallel run: its process group (None: alone), and on a GPU the
    stream its gradient sums run on beside the compute, with the events that order them."""
    dm.dist = dist
    dm.reducing = dm.grads_reduced = False
    dm.comm_stream = None
    if dist is None or SIM:
        return
    import cupy
    dm.comm_stream = cupy.cuda.Stream(non_blocking=True)
    dm.comm_events = [cupy.cuda.Event(disable_timing=True) for _ in range(dm.cfg.num_layers + 1)]
    dm.comm_done = cupy.cuda.Event(disable_timing=True)


SHARED_WITH_VIEWS = ("cfg", "precision", "tf32", "blas", "stream", "stream_ptr", "compute_stream", "launch_stream",
                     "num_parameters", "layout", "params", "grads", "P", "G", "params16_memory", "params16", "lt",
                     "recompute", "attention_blocks", "classifier_rows", "deterministic")


def forward_view(dm, B, T, kv=None):
    """A forward-only model at batch shape (B, T) over dm's parameters and libraries (no
    second copy of the weights): its own token staging and activation views, over dm's
    activation memory where they fit (else memory of its own). kv: a KVCache, for a
    (1, 1) view that decodes one token at a time (its attention reads the cache)."""
    _check_shape(dm.cfg, B, T, "bf16" if dm.precision == "fp8" else dm.precision)
    view = CudaGPT2()
    for name in SHARED_WITH_VIEWS:
        if hasattr(dm, name):
            setattr(view, name, getattr(dm, name))
    view.trains, view.kv = False, kv
    view.fp8 = None  # under fp8, evaluation and generation run in bf16 from the same weights
    _token_staging(view, B, T)
    _communication(view, None)
    if dm.precision in MIXED:
        _activations_bf16(view, dm.acts16_memory, dm.acts32_memory)
    else:
        _activations_fp32(view, dm.acts_memory, dm.dacts_memory)
    return view


class KVCache:
    """Keys and values of every layer for one generated sequence, on the device, in the
    run's precision: (L, maxT, C) each."""

    def __init__(self, cfg, dtype):
        L, maxT, C = cfg.num_layers, cfg.max_seq_len, cfg.channels
        self.memory = alloc(2 * L * maxT * C, dtype)
        fill(self.memory, 0.0)
        whole = self.memory.reshape(2, L, maxT, C)
        self.k, self.v = [whole[0, l] for l in range(L)], [whole[1, l] for l in range(L)]


def _token_staging(dm, B, T):
    """The pinned token staging of batch shape (B, T) and the loss statistics: [inputs |
    targets | positions | bucket tokens | bucket starts (BT+1) | #buckets]."""
    BT = B * T
    dm.B, dm.T = B, T
    dm.stats = cuda.to_device(np.zeros(2))
    ns = 5 * BT + 2
    dm.staging_host = cuda.pinned_array(ns, dtype=np.int32)
    dm.staging_host[:] = 0
    dm.staging = cuda.to_device(dm.staging_host)
    stg = dm.staging
    dm.tokens, dm.targets = stg[0:BT], stg[BT:2 * BT]
    dm.positions, dm.bucket_token = stg[2 * BT:3 * BT], stg[3 * BT:4 * BT]
    dm.bucket_start, dm.num_buckets = stg[4 * BT:5 * BT + 1], stg[5 * BT + 1:5 * BT + 2]
    dm.staging_event = None if SIM else cuda.event(timing=False)
    dm.host_tokens = None
    dm.position = 0  # the first position's index (a decoding view's newest token; else 0)
    dm.buckets_staged = True
    dm.has_loss = False        # a forward with targets ran: the loss statistics are valid
    dm.backward_ready = False  # ... and its logits are still there for a backward


def _reuse_or_alloc(memory, size, dtype=np.float32):
    """memory when it holds at least size values, else a fresh zeroed buffer."""
    if memory is not None and memory.size >= size:
        return memory
    buf = alloc(size, dtype)
    fill(buf, 0.0)
    return buf


def to_device(model, B, T, tf32=True, attention_blocks=None, shards=1, rank=0, shard_optimizer=False):
    """Copy a common.GPT2's parameters to the device and allocate, once, everything a
    training step at batch shape (B, T) needs. m, v start at zero (step 0);
    CUDA.state_from_host resumes. attention_blocks: the number of causal query blocks
    (default: default_attention_blocks). Data parallel over `shards` ranks: the flat
    parameter and gradient buffers are padded to a multiple of it, and with
    shard_optimizer (ZeRO-1) m and v hold only this rank's shard."""
    _check_shape(model.cfg, B, T)
    dm = CudaGPT2()
    dm.precision = "tf32" if tf32 else "fp32"
    dm.tf32 = bool(tf32)
    dm.blas = Blas.get()
    dm.stream = 0 if SIM else cuda.default_stream()
    dm.stream_ptr, dm.launch_stream = 0, None  # cuBLAS and the kernels go to the legacy default stream
    dm.compute_stream = None
    if not SIM:
        import cupy
        dm.compute_stream = cupy.cuda.Stream.null
    dm.trains = True
    dm.params16_memory, dm.fp8 = None, None
    dm.attention_blocks = attention_blocks
    dm.kv = None
    _parameters_to_device(dm, model, B, T, shards, rank, shard_optimizer)
    _activations_fp32(dm, None, None)
    return dm


def _activations_fp32(dm, acts_memory, dacts_memory):
    """dm's fp32 / tf32 activations and backward scratch at its (B, T), in the given
    device buffers where they are large enough (else new ones), their views, the
    attention pointer arrays, and the addresses of every GEMM operand."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    C, L, NH = cfg.channels, cfg.num_layers, cfg.num_heads
    align = DEVICE_ALIGN // 4
    acts = DeviceLayout(common.activation_shapes(cfg, B, T), LAYER_ACTIVATIONS, L, align)
    # backward scratch: the CPU's shapes, plus the attention score gradients of one layer
    dacts = DeviceLayout(common.activation_grad_shapes(cfg, B, T) + [("datt", (B * NH, T, T))], (), L, align)
    dm.acts_memory = _reuse_or_alloc(acts_memory, acts.size)
    dm.dacts_memory = _reuse_or_alloc(dacts_memory, dacts.size)
    dm.acts, dm.dacts = acts.views(dm.acts_memory), dacts.views(dm.dacts_memory)
    a = dm.acts
    dm.A = SimpleNamespace(**{name: getattr(a, name) for name in LAYER_ACTIVATIONS})
    dm.att3 = [x.reshape(B * NH, T, T) for x in a.att]
    dm.datt3 = dm.dacts.datt

    # attention: query blocks and the pointer arrays of the batched GEMMs
    nb = dm.attention_blocks or default_attention_blocks(T, dm.tf32)
    nb = max(1, min(int(nb), T))
    Tb = (T + nb - 1) // nb
    dm.attn_Tb = Tb
    dm.attn_blocks = [(r0, min(T, r0 + Tb)) for r0 in range(0, T, Tb)]
    dm.attn_scale = 1.0 / math.sqrt(C // NH)
    if dm.kv is None:
        _build_attention_pointers(dm)

    # addresses of every GEMM operand
    p, g = dm.params, dm.grads
    ad = SimpleNamespace()
    for name in ("qkvw", "attprojw", "fcw", "fcprojw"):
        setattr(ad, name, [addr(x) for x in getattr(dm.P, name)])
        setattr(ad, "g" + name, [addr(x) for x in getattr(dm.G, name)])
    for name in ("ln1", "qkv", "atty", "residual2", "ln2", "fch", "fch_gelu", "residual3"):
        setattr(ad, name, [addr(x) for x in getattr(dm.A, name)])
    ad.wte, ad.gwte = addr(p.wte), addr(g.wte)
    ad.lnf, ad.logits = addr(a.lnf), addr(a.logits)
    d = dm.dacts
    ad.dC, ad.d3C, ad.d4C, ad.dresidual = addr(d.dC), addr(d.d3C), addr(d.d4C), addr(d.dresidual)
    dm.addr = ad


def _build_attention_pointers(dm):
    """Pointer arrays (one entry per (b, h)) for every batched GEMM of every layer and
    query block, uploaded once into one device int64 array."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    C, L, NH = cfg.channels, cfg.num_layers, cfg.num_heads
    hs = C // NH
    bb = np.repeat(np.arange(B, dtype=np.int64), NH)
    hh = np.tile(np.arange(NH, dtype=np.int64), B)
    F = 4
    tok3 = bb * T * 3 * C + hh * hs          # element offset of head (b, h) in a (BT, 3C) matrix
    tok1 = bb * T * C + hh * hs              # ... in a (BT, C) matrix
    sq = (bb * NH + hh) * T * T              # ... of its (T, T) score matrix
    specs = {}
    d = dm.dacts
    dC, d3C, datt = addr(d.dC), addr(d.d3C), addr(d.datt)
    for l in range(L):
        qkv, att, atty = addr(dm.A.qkv[l]), addr(dm.att3[l]), addr(dm.A.atty[l])
        specs[("K", l)] = qkv + F * (tok3 + C)
        specs[("V", l)] = qkv + F * (tok3 + 2 * C)
        for i, (r0, r1) in enumerate(dm.attn_blocks):
            specs[("Q", l, i)] = qkv + F * (tok3 + r0 * 3 * C)
            specs[("att", l, i)] = att + F * (sq + r0 * T)
            specs[("attT", l, i)] = att + F * (sq + r0 * T + r0)
            specs[("atty", l, i)] = atty + F * (tok1 + r0 * C)
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        specs[("dout", i)] = dC + F * (tok1 + r0 * C)
        specs[("dq", i)] = d3C + F * (tok3 + r0 * 3 * C)
        specs[("dk", i)] = d3C + F * (tok3 + C + r0 * 3 * C)
        specs[("dv", i)] = d3C + F * (tok3 + 2 * C + r0 * 3 * C)
        specs[("datt", i)] = datt + F * (sq + r0 * T)
        specs[("dattT", i)] = datt + F * (sq + r0 * T + r0)
    keys = list(specs)
    table = np.concatenate([specs[k] for k in keys]).astype(np.int64)
    dm.ptr_table = cuda.to_device(table)
    base = addr(dm.ptr_table)
    n = B * NH
    dm.ptrs = {k: PtrArray(table[j * n:(j + 1) * n], base + 8 * j * n) for j, k in enumerate(keys)}


def attention_forward(dm, l):
    """att[l] = causal softmax(q k^T * scale), atty[l] = att @ v, per (b, h), reading
    q, k, v in place from qkv[l] (with its bias) and writing atty[l] in place. A decoding
    view (dm.kv) attends over its cache instead."""
    if dm.kv is not None:
        return attention_decode(dm.A.atty[l], dm.A.qkv[l], dm.kv.k[l], dm.kv.v[l], dm.position, dm.cfg.num_heads)
    cfg, T = dm.cfg, dm.T
    C = cfg.channels
    hs = C // cfg.num_heads
    blas, P = dm.blas, dm.ptrs
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        R = r1 - r0
        blas.gemm_batched(False, True, R, r1, hs, P[("Q", l, i)], 3 * C, P[("K", l)], 3 * C, P[("att", l, i)], T,
                          alpha=dm.attn_scale)
    softmax_forward(dm.att3[l], dm.attn_Tb)
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        R = r1 - r0
        blas.gemm_batched(False, False, R, hs, r1, P[("att", l, i)], T, P[("V", l)], 3 * C, P[("atty", l, i)], C)


def attention_backward(dm, l):
    """dqkv (d3C) from datty (dC) of layer l, through att @ v and the softmax."""
    cfg, T = dm.cfg, dm.T
    C = cfg.channels
    hs = C // cfg.num_heads
    blas, P = dm.blas, dm.ptrs
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        R = r1 - r0
        # dv[r0:r1] = att[r0:T, r0:r1]^T @ dout[r0:T]
        blas.gemm_batched(True, False, R, hs, T - r0, P[("attT", l, i)], T, P[("dout", i)], C, P[("dv", i)], 3 * C)
        # datt[r0:r1, 0:r1] = dout[r0:r1] @ v[0:r1]^T
        blas.gemm_batched(False, True, R, r1, hs, P[("dout", i)], C, P[("V", l)], 3 * C, P[("datt", i)], T)
    softmax_backward(dm.datt3, dm.att3[l], dm.attn_Tb, dm.attn_scale)
    for i, (r0, r1) in enumerate(dm.attn_blocks):
        R = r1 - r0
        # dq[r0:r1] = dpre[r0:r1, 0:r1] @ k[0:r1]
        blas.gemm_batched(False, False, R, hs, r1, P[("datt", i)], T, P[("K", l)], 3 * C, P[("dq", i)], 3 * C)
        # dk[r0:r1] = dpre[r0:T, r0:r1]^T @ q[r0:T]
        blas.gemm_batched(True, False, R, hs, T - r0, P[("dattT", i)], T, P[("Q", l, i)], 3 * C, P[("dk", i)], 3 * C)


def _stage(dm, lo, hi):
    """Copy staging[lo:hi] host -> device (pinned, async, on the default stream)."""
    dm.staging[lo:hi].copy_to_device(dm.staging_host[lo:hi], stream=dm.stream)
    if dm.staging_event is not None:
        dm.staging_event.record(dm.stream)


def _wait_staging(dm):
    if dm.staging_event is not None:
        dm.staging_event.synchronize()  # the last copy out of the staging buffer is done


def _stage_tokens(dm, inputs, targets):
    B, T, BT = dm.B, dm.T, dm.B * dm.T
    inputs = np.asarray(inputs)
    if inputs.shape != (B, T):
        raise ValueError(f"inputs of shape {inputs.shape}, but the device model was built for (B, T) = {(B, T)}")
    tokens = np.ascontiguousarray(inputs, dtype=np.int32).reshape(-1)
    V = dm.cfg.vocab_size
    if tokens.min() < 0 or tokens.max() >= V:
        raise ValueError(f"token ids must lie in [0, {V})")
    if targets is not None:
        targets = np.asarray(targets)
        if targets.shape != (B, T):
            raise ValueError(f"targets of shape {targets.shape}, expected {(B, T)}")
        tg = np.ascontiguousarray(targets, dtype=np.int32).reshape(-1)
        if tg.max() >= V or tg.min() < -1:
            raise ValueError(f"target ids must lie in [0, {V}) or be -1 (masked)")
    _wait_staging(dm)
    h = dm.staging_host
    h[0:BT] = tokens
    if targets is not None:
        h[BT:2 * BT] = tg
    _stage(dm, 0, 2 * BT if targets is not None else BT)
    dm.host_tokens = tokens.copy()
    dm.buckets_staged = False


def _stage_buckets(dm):
    """The encoder backward's buckets, built on the host while the device still runs
    the forward, staged behind it."""
    if dm.buckets_staged:
        return
    BT = dm.B * dm.T
    order, bucket_token, bucket_start = encoder_buckets(dm.host_tokens)
    _wait_staging(dm)
    h = dm.staging_host
    nb = bucket_token.size
    h[2 * BT:3 * BT] = order
    h[3 * BT:3 * BT + nb] = bucket_token
    h[4 * BT:4 * BT + nb + 1] = bucket_start
    h[5 * BT + 1] = nb
    _stage(dm, 2 * BT, 5 * BT + 2)
    dm.buckets_staged = True


def embed(dm):
    """encoded = wte[tokens] + wpe, and the first layernorm (ln1 of layer 0, or lnf for a
    model without layers), from the float32 parameters in both precisions."""
    p, a, P, A, L = dm.params, dm.acts, dm.P, dm.A, dm.cfg.num_layers
    first_ln = (A.ln1[0], A.ln1_mean[0], A.ln1_rstd[0], P.ln1w[0], P.ln1b[0]) if L else \
        (a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb)
    encoder_layernorm(a.encoded, first_ln[0], first_ln[1], first_ln[2], dm.tokens, p.wte, p.wpe,
                      first_ln[3], first_ln[4], dm.T, dm.position)


def gpt2_forward_cuda(dm):
    """The fp32 / tf32 forward over the staged tokens: fills the device activations and,
    with targets (dm.has_loss), the per-position losses and the loss statistics on the
    device; returns nothing (read the loss with mean_loss_cuda)."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    L, V = cfg.num_layers, cfg.vocab_size
    C, Vp, BT = cfg.channels, cfg.padded_vocab_size, B * T
    blas = dm.blas
    blas.set_tf32(dm.tf32)
    p, a, P, A, ad = dm.params, dm.acts, dm.P, dm.A, dm.addr

    embed(dm)
    residual = a.encoded
    for l in range(L):
        blas.gemm(False, True, BT, 3 * C, C, ad.ln1[l], C, ad.qkvw[l], C, ad.qkv[l], 3 * C)
        bias_forward(A.qkv[l], P.qkvb[l])
        attention_forward(dm, l)
        blas.gemm(False, True, BT, C, C, ad.atty[l], C, ad.attprojw[l], C, ad.residual2[l], C)
        residual_layernorm(A.residual2[l], residual, P.attprojb[l], A.ln2[l], A.ln2_mean[l], A.ln2_rstd[l],
                           P.ln2w[l], P.ln2b[l])
        blas.gemm(False, True, BT, 4 * C, C, ad.ln2[l], C, ad.fcw[l], C, ad.fch[l], 4 * C)
        bias_gelu_forward(A.fch[l], A.fch_gelu[l], P.fcb[l])
        blas.gemm(False, True, BT, C, 4 * C, ad.fch_gelu[l], 4 * C, ad.fcprojw[l], 4 * C, ad.residual3[l], C)
        if l + 1 < L:
            nxt = (A.ln1[l + 1], A.ln1_mean[l + 1], A.ln1_rstd[l + 1], P.ln1w[l + 1], P.ln1b[l + 1])
        else:
            nxt = (a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb)
        residual_layernorm(A.residual3[l], A.residual2[l], P.fcprojb[l], nxt[0], nxt[1], nxt[2], nxt[3], nxt[4])
        residual = A.residual3[l]
    blas.gemm(False, True, BT, Vp, C, ad.lnf, C, ad.wte, C, ad.logits, Vp)  # tied embedding
    if dm.has_loss:
        classifier_forward(a.losses, a.logsumexp, a.logits, dm.targets, V)
        loss_reduce(dm.stats, a.losses, dm.targets)


def mean_loss_cuda(dm):
    """Mean loss over the unmasked targets of the last forward (a device-to-host read;
    it waits for the device). None after a forward without targets."""
    if not dm.has_loss:
        return None
    s, cnt = dm.stats.copy_to_host()
    return float(s / cnt) if cnt else 0.0


def gpt2_backward_cuda(dm, accumulate, loss_scale):
    """Gradients of loss_scale * mean loss of the last forward (fp32 / tf32).
    accumulate=False overwrites the parameter gradients, True adds to them. The logits
    become dlogits."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    L, V = cfg.num_layers, cfg.vocab_size
    C, Vp, BT = cfg.channels, cfg.padded_vocab_size, B * T
    blas = dm.blas
    blas.set_tf32(dm.tf32)
    p, g, a, d = dm.params, dm.grads, dm.acts, dm.dacts
    P, G, A, ad = dm.P, dm.G, dm.A, dm.addr
    cs, lnb = dm.colsum_scratch, dm.layernorm_scratch
    beta = 1.0 if accumulate else 0.0

    classifier_backward(a.logits, a.logsumexp, dm.targets, V, dm.stats, loss_scale)
    # logits = lnf @ wte^T
    blas.gemm(False, False, BT, C, Vp, ad.logits, Vp, ad.wte, C, ad.dC, C)
    blas.gemm(True, False, Vp, C, BT, ad.logits, Vp, ad.lnf, C, ad.gwte, C, beta=beta)
    last_residual = A.residual3[L - 1] if L > 0 else a.encoded
    layernorm_backward(lnb, d.dresidual, d.dC, last_residual, p.lnfw, a.lnf_mean, a.lnf_rstd, True, g.lnfw, g.lnfb,
                       accumulate, dbias=G.fcprojb[L - 1] if L > 0 else None)

    for l in range(L - 1, -1, -1):
        residual = A.residual3[l - 1] if l > 0 else a.encoded
        # MLP: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2)))); fcprojb's gradient came
        # with the layernorm backward above it
        blas.gemm(False, False, BT, 4 * C, C, ad.dresidual, C, ad.fcprojw[l], 4 * C, ad.d4C, 4 * C)
        blas.gemm(True, False, C, 4 * C, BT, ad.dresidual, C, ad.fch_gelu[l], 4 * C, ad.gfcprojw[l], 4 * C, beta=beta)
        colsum(cs, G.fcb[l], d.d4C, accumulate, aux=A.fch[l], mode=1)  # GELU backward in place + fc bias
        blas.gemm(False, False, BT, C, 4 * C, ad.d4C, 4 * C, ad.fcw[l], C, ad.dC, C)
        blas.gemm(True, False, 4 * C, C, BT, ad.d4C, 4 * C, ad.ln2[l], C, ad.gfcw[l], C, beta=beta)
        layernorm_backward(lnb, d.dresidual, d.dC, A.residual2[l], P.ln2w[l], A.ln2_mean[l], A.ln2_rstd[l], False,
                           G.ln2w[l], G.ln2b[l], accumulate, dbias=G.attprojb[l])
        # attention: residual2 = residual + attproj(attention(qkv(ln1(residual))))
        blas.gemm(False, False, BT, C, C, ad.dresidual, C, ad.attprojw[l], C, ad.dC, C)
        blas.gemm(True, False, C, C, BT, ad.dresidual, C, ad.atty[l], C, ad.gattprojw[l], C, beta=beta)
        attention_backward(dm, l)
        colsum(cs, G.qkvb[l], d.d3C, accumulate)
        blas.gemm(False, False, BT, C, 3 * C, ad.d3C, 3 * C, ad.qkvw[l], C, ad.dC, C)
        blas.gemm(True, False, 3 * C, C, BT, ad.d3C, 3 * C, ad.ln1[l], C, ad.gqkvw[l], C, beta=beta)
        layernorm_backward(lnb, d.dresidual, d.dC, residual, P.ln1w[l], A.ln1_mean[l], A.ln1_rstd[l], False,
                           G.ln1w[l], G.ln1b[l], accumulate, dbias=G.fcprojb[l - 1] if l > 0 else None)
        start_reduction(dm, l)  # layer l's gradients are complete
    encoder_backward_wte(g.wte, d.dresidual, dm.positions, dm.bucket_token, dm.bucket_start, dm.num_buckets, BT)
    encoder_backward_wpe(g.wpe, d.dresidual, B, T, accumulate)
    finish_reduction(dm)


# Data parallel (dm.dist: distributed.NCCLGroup, or the MPIGroup under the simulator): the
# gradients are summed over the ranks by buckets, as DDP and llm.c's multi-GPU step do. A
# layer's gradients are one contiguous range of the layer-major parameter layout,
# complete once the backward pass has left the layer (its fcprojb gradient came with the
# layernorm backward above it), so the step's last backward starts that range's sum on a
# second stream and goes on with the next layer meanwhile; wte, wpe and lnf, done last,
# are the last bucket, and the backward ends by waiting for every sum. ZeRO-0: an
# all-reduce of each range in place. ZeRO-1: each rank's piece of the range is summed
# onto that rank (NCCL reduce, grouped), so every rank ends with the summed gradients of
# exactly its contiguous shard of the flat buffer: the shard layout of m and v, which
# checkpoints and any-rank-count resume read, is the one a single reduce-scatter gives.
# Measured on one H100 with one NCCL rank (dev/cuda_check.py overlap): see the README.


def _sum_over_ranks(dm, lo, hi, stream):
    """grads[lo:hi] summed over the ranks: in place, or onto each piece's owner (ZeRO-1)."""
    if dm.sharded:
        dm.dist.reduce_to_owners_device(dm.grads_memory, lo, hi, dm.shard_size, stream)
    else:
        dm.dist.allreduce_sum_device(dm.grads_memory, lo, hi, stream)


def start_reduction(dm, layer):
    """Start summing `layer`'s gradients (None: the unlayered ones) over the ranks, on the
    communication stream, behind everything the compute stream has done so far; nothing
    outside the last backward of a step (dm.reducing)."""
    if not dm.reducing:
        return
    lo, hi = dm.layout.bucket(layer)
    if hi <= lo:
        return
    if dm.comm_stream is None:  # the simulator's MPI stand-in copies through the host, in order
        _sum_over_ranks(dm, lo, hi, 0)
        return
    event = dm.comm_events[dm.cfg.num_layers if layer is None else layer]
    event.record(dm.compute_stream)
    dm.comm_stream.wait_event(event)
    _sum_over_ranks(dm, lo, hi, dm.comm_stream.ptr)


def finish_reduction(dm):
    """The last bucket, then the compute stream waits for every sum (an update may follow)."""
    if not dm.reducing:
        return
    start_reduction(dm, None)
    if dm.comm_stream is not None:
        dm.comm_done.record(dm.comm_stream)
        dm.compute_stream.wait_event(dm.comm_done)
    dm.grads_reduced = True


# One AdamW step over the parameter buffer (cpu.gpt2_update's semantics), with the global
# gradient norm and the clipping computed on the device, in two halves: the host's
# (stage_update) and the device's (update_on_device, which a CUDA graph can capture).
# Under ZeRO-1 this rank updates its shard of the parameters with its shard of m and v,
# and the ranks all-gather the parameters.


def stage_update(dm, lr, beta1, beta2, eps, weight_decay, weight_decay_mode):
    """The host side of an update: count the step, stage the AdamW hyperparameters and
    bias corrections (pinned, async, like the tokens), and the decay groups when they
    change."""
    if weight_decay_mode not in ("all", "matrices"):
        raise ValueError(f"weight_decay_mode must be 'all' or 'matrices', not {weight_decay_mode!r}")
    dm.step += 1
    key = (float(weight_decay), weight_decay_mode)
    if dm._decay_key != key:  # a small host-to-device copy only when the decay changes
        decay = np.full(dm.group_is_matrix.size, weight_decay, dtype=np.float32)
        if weight_decay_mode == "matrices":
            decay[~dm.group_is_matrix] = 0.0
        dm.group_decay.copy_to_device(decay, stream=dm.stream)
        dm._decay_key = key
    _wait_staging(dm)
    dm.hyper_host[:] = (lr, beta1, beta2, eps, 1.0 - beta1 ** dm.step, 1.0 - beta2 ** dm.step)
    dm.hyper.copy_to_device(dm.hyper_host, stream=dm.stream)
    if dm.staging_event is not None:
        dm.staging_event.record(dm.stream)


def update_on_device(dm, grad_clip, reduce_first):
    """The device side of an update: with reduce_first, the gradient sum over the ranks
    (a backward that did not end a step left it: the whole buffer as one bucket); the
    norm and clip scale; AdamW; the all-gather (ZeRO-1); under bf16 the bf16 weights
    of the next step; under fp8 the new scales and the fp8 weights. The norm before
    clipping lands in dm.normbuf[0] (overwritten by the next update); nothing here waits
    for the device."""
    dist, stream = dm.dist, dm.stream_ptr  # the compute stream (0: the legacy default stream)
    if reduce_first:
        _sum_over_ranks(dm, 0, dm.grads_memory.size, stream)
    if dm.sharded:
        lo, hi = dm.update_start, dm.update_start + dm.shard_size
        params, grads = dm.params_memory[lo:hi], dm.grads_memory[lo:hi]
        global_norm(dm.normbuf, dm.norm_part, grads, grad_clip,
                    lambda part: dist.allreduce_sum_device(part, 0, part.size, stream))
        adamw(params, grads, dm.m_memory, dm.v_memory, dm.normbuf, dm.hyper, dm.group_end, dm.group_decay)
        dist.allgather_device(dm.params_memory, stream)
        if dm.params16_memory is not None:
            store(dm.params16_memory, dm.params_memory)
    else:
        global_norm(dm.normbuf, dm.norm_part, dm.grads_memory, grad_clip)
        adamw(dm.params_memory, dm.grads_memory, dm.m_memory, dm.v_memory, dm.normbuf, dm.hyper, dm.group_end,
              dm.group_decay, dm.params16_memory)
    if dm.fp8 is not None:  # the step's amaxes into the scales, then the next step's fp8 weights
        cuda_fp8.update_scales(dm.fp8.meta)
        dm.fp8.cast_weights(dm.params16)


# -----------------------------------------------------------------------------
# bf16 mixed precision: bf16 weights for the matmuls, bf16 activations and activation
# gradients; float32 master weights (which the layernorms and the embedding lookup read,
# as PyTorch's autocast does), parameter gradients, AdamW m and v, the residual stream
# and its gradient (the matmuls that end a block add their output to it in float32, and
# read a bf16 shadow of its gradient), layernorm, softmax and loss statistics. Matmuls
# through Lt, attention through Attention. What the backward recomputes instead of
# keeping per layer (one buffer, which every layer's forward overwrites) is the recompute
# level (-r, RECOMPUTED).

BF16_ACTIVATIONS = ("ln1", "qkv", "atty", "ln2", "fch", "fch_gelu")
F32_ACTIVATIONS = ("residual2", "residual3", "ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd")
RECOMPUTED = {  # -r level: the activations the bf16 backward computes again, bit for bit
    0: (),
    # llm.c's default: the GELU output, from the stored pre-activation fch (2*B*T*4C*(L-1) bytes less)
    1: ("fch_gelu",),
    # also the layernorm outputs, from the stored residual and statistics (llm.c's -r 2), and
    # residual2, the residual after attention, by the attention projection's matmul again,
    # same plan, same bits (B*T*C*(L-1) * (2 + 2 + 4) bytes less: on an H100, 350M at B=16 in
    # 15.73 GiB instead of 18.61, 4% slower; 124M 5% slower)
    2: ("fch_gelu", "ln1", "ln2", "residual2"),
}


CLASSIFIER_ROWS = 4096  # rows of logits the bf16 classifier computes at a time (see classifier_bf16)


FP8_ONE_LAYER = ("fch_gelu", "ln1", "ln2")  # fp8's backward reads none of them (one_layer_activations)


def one_layer_activations(recompute, fp8=False):
    """The activations a buffer of one layer holds: the recomputed ones, and under fp8 the
    GELU output (its casts compute it from fch) and the layernorm outputs (their casts
    keep E4M3 transposes for the backward instead; cuda_fp8.Fp8State.inputs_t) too."""
    return RECOMPUTED[recompute] + tuple(n for n in FP8_ONE_LAYER if fp8 and n not in RECOMPUTED[recompute])


def fp8_keeps_inputs_t(recompute):
    """Whether fp8 keeps the layernorm outputs' E4M3 transposes from the forward
    (cuda_fp8.Fp8State.inputs_t): unless the backward recomputes the outputs (-r 2)."""
    return "ln1" not in RECOMPUTED[recompute]


def backward_recomputes(dm):
    """What the bf16 step's backward computes again: RECOMPUTED's; under fp8 (whose casts
    apply the GELU, and which keeps the layernorm outputs' transposes at -r 0 and 1) the
    layernorm outputs and residual2 at -r 2; while fp8 measures its first scales with
    bf16 matmuls, every one-layer activation."""
    if dm.fp8 is None:
        return RECOMPUTED[dm.recompute]
    if dm.fp8.measuring:
        return one_layer_activations(dm.recompute, True)
    return tuple(n for n in RECOMPUTED[dm.recompute] if n != "fch_gelu")


def bf16_activation_shapes(cfg, B, T, recompute=1, classifier_rows=CLASSIFIER_ROWS, fp8=False):
    """The bf16 activations and backward scratch (one buffer), then the float32 ones. The
    one_layer_activations hold one layer's; the logits one chunk of the classifier's rows."""
    L, C, Vp, NH, BT = cfg.num_layers, cfg.channels, cfg.padded_vocab_size, cfg.num_heads, B * T
    one_layer = one_layer_activations(recompute, fp8)

    def layers(name, cols):
        return (name, (BT, cols) if name in one_layer else (L, BT, cols))
    bf16 = [layers("ln1", C), ("qkv", (L, BT, 3 * C)), ("atty", (L, BT, C)), layers("ln2", C),
            ("fch", (L, BT, 4 * C)), layers("fch_gelu", 4 * C),
            ("lnf", (BT, C)), ("logits", (min(BT, classifier_rows), Vp)),
            ("dresidual16", (BT, C)), ("dC", (BT, C)), ("d4C", (BT, 4 * C))]  # d3C: the front of d4C
    f32 = [("encoded", (BT, C)), layers("residual2", C), ("residual3", (L, BT, C)), ("dresidual", (BT, C)),
           ("ln1_mean", (L, BT)), ("ln1_rstd", (L, BT)), ("ln2_mean", (L, BT)), ("ln2_rstd", (L, BT)),
           ("lnf_mean", (BT,)), ("lnf_rstd", (BT,)), ("losses", (BT,)), ("logsumexp", (BT,)),
           ("att_stats", (L, B * NH * T))]
    return bf16, f32


def fuses_gelu(BT, C):
    """Whether the fc layer's bias + GELU runs as cuBLASLt's epilogue: on GPT-2-like
    shapes only. At a small ragged shape (24 x 40 x 56) the epilogue returned wrong
    values on an H200 (dev/cuda_check.py bf16), as it did at 64 x 128 x 64 with A
    transposed (which Lt.matmul refuses), so other shapes take the bias epilogue and our
    GELU kernel."""
    return BT % 64 == 0 and C % 64 == 0


def to_device_bf16(model, B, T, shards=1, rank=0, shard_optimizer=False, recompute=1,
                   classifier_rows=CLASSIFIER_ROWS, deterministic=True, fp8=False):
    """to_device for bf16: the float32 state of _parameters_to_device, a bf16 copy of the
    parameters (same layout), the bf16 and float32 activations, the classifier's wte
    gradient per target (classifier_bf16), one stream that every kernel, matmul,
    attention call and copy of the step goes to (so a step can be captured in a CUDA
    graph), the cuBLASLt plans and the cuDNN attention graphs. recompute: the -r level
    (RECOMPUTED); deterministic: cuDNN's attention backward in a fixed order (else its
    faster atomic dq sums); fp8: the layers' matmuls in fp8 (cuda_fp8.Fp8State: the
    scales, the fp8 weights; the casts' scratch in the logits buffer, which the layers
    leave idle)."""
    cfg = model.cfg
    _check_shape(cfg, B, T, "fp8" if fp8 else "bf16")
    if recompute not in RECOMPUTED:
        raise ValueError(f"recompute must be one of {sorted(RECOMPUTED)}, not {recompute!r}")
    if classifier_rows < 1:
        raise ValueError(f"classifier_rows must be positive, not {classifier_rows}")
    dm = CudaGPT2()
    dm.precision = "fp8" if fp8 else "bf16"
    dm.recompute = int(recompute)
    dm.classifier_rows, dm.deterministic = int(classifier_rows), bool(deterministic)
    dm.trains, dm.kv = True, None
    if SIM:
        dm.stream, dm.stream_ptr, dm.compute_stream = 0, 0, None
    else:
        import cupy
        dm.compute_stream = cupy.cuda.Stream(non_blocking=False)  # ordered with the legacy default stream
        dm.stream_ptr = dm.compute_stream.ptr
        dm.stream = cuda.external_stream(dm.stream_ptr)
    dm.launch_stream = None if SIM else dm.stream
    _parameters_to_device(dm, model, B, T, shards, rank, shard_optimizer)
    dm.params16_memory = alloc(dm.params_memory.size, np.uint16)
    store(dm.params16_memory, dm.params_memory)
    dm.params16 = dm.layout.views(dm.params16_memory)
    dm.fp8 = cuda_fp8.Fp8State(cfg, B, T, dm.params16, fp8_keeps_inputs_t(dm.recompute)) if fp8 else None
    if fp8:
        dm.fp8.calibrate(dm.params16)
    dm.wte_grad_pending = alloc(dm.params.wte.size)
    dm.dlnf_scale = cuda.to_device(np.ones(1, np.float32))
    dm.lt = Lt(dm.stream_ptr)
    _activations_bf16(dm, None, None)
    if fp8:
        dm.fp8.use_scratch(dm.acts.logits)
    return dm


def _activations_bf16(dm, acts16_memory, acts32_memory):
    """dm's bf16 and float32 activations at its (B, T), in the given device buffers where
    they are large enough (else new ones), their views, cuDNN's attention graphs for the
    shape, and the addresses of every matmul operand."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    C, L, NH = cfg.channels, cfg.num_layers, cfg.num_heads
    dm.fused_gelu = fuses_gelu(B * T, C) and dm.fp8 is None  # (fp8: fc writes fch; the casts apply the GELU)
    fp8 = dm.precision == "fp8"  # (also a bf16 view of an fp8 model: the same layout)
    bf16, f32 = bf16_activation_shapes(cfg, B, T, dm.recompute, dm.classifier_rows, fp8)
    recomputed = one_layer_activations(dm.recompute, fp8)
    acts16 = DeviceLayout(bf16, [n for n in BF16_ACTIVATIONS if n not in recomputed], L, DEVICE_ALIGN // 2)
    acts32 = DeviceLayout(f32, [n for n in F32_ACTIVATIONS + ("att_stats",) if n not in recomputed], L,
                          DEVICE_ALIGN // 4)
    dm.acts16_memory = _reuse_or_alloc(acts16_memory, acts16.size, np.uint16)
    dm.acts32_memory = _reuse_or_alloc(acts32_memory, acts32.size)
    dm.acts = acts16.views(dm.acts16_memory)
    for name, view in vars(acts32.views(dm.acts32_memory)).items():
        setattr(dm.acts, name, view)
    a = dm.acts
    a.d3C = a.d4C.reshape(-1)[:B * T * 3 * C].reshape(B * T, 3 * C)  # a layer's attention gradient, after its MLP's
    dm.A = SimpleNamespace(**{name: [getattr(a, name)] * L if name in recomputed else getattr(a, name)
                              for name in BF16_ACTIVATIONS + F32_ACTIVATIONS})  # a layer's view, per layer
    dm.att_stats = [addr(x) for x in a.att_stats]

    ad = SimpleNamespace()  # addresses of every matmul operand
    for name in ("qkvw", "qkvb", "attprojw", "fcw", "fcb", "fcprojw"):  # bf16 weights, and the biases of bf16 outputs
        setattr(ad, name, [addr(x) for x in getattr(dm.params16, name)])
    for name in ("attprojb", "fcprojb"):  # float32 biases of the float32 (residual) outputs
        setattr(ad, name, [addr(x) for x in getattr(dm.P, name)])
        setattr(ad, name + "16", [addr(x) for x in getattr(dm.params16, name)])  # (fp8 matmuls take bf16 biases)
    for name in ("qkvw", "attprojw", "fcw", "fcprojw"):
        setattr(ad, "g" + name, [addr(x) for x in getattr(dm.G, name)])
    for name in BF16_ACTIVATIONS + ("residual2", "residual3"):
        setattr(ad, name, [addr(x) for x in getattr(dm.A, name)])
    for name in ("encoded", "lnf", "logits", "dresidual", "dresidual16", "dC", "d3C", "d4C"):
        setattr(ad, name, addr(getattr(a, name)))
    ad.wte = addr(dm.params16.wte)
    ad.wte_grad_pending = addr(dm.wte_grad_pending) if dm.trains else None
    dm.addr = ad
    R = a.logits.shape[0]  # the classifier's chunks of rows: (first row, rows, their views)
    dm.chunks = [(r0, min(R, B * T - r0), a.logits[:min(R, B * T - r0)], a.losses[r0:r0 + R], a.logsumexp[r0:r0 + R],
                  dm.targets[r0:r0 + R]) for r0 in range(0, B * T, R)]
    dm.attention = Attention(B, NH, T, C // NH, dm.stream_ptr, dm.deterministic) if dm.kv is None else None


def gpt2_forward_bf16(dm):
    """The bf16 forward over the staged tokens (and targets, with dm.has_loss)."""
    cfg, L = dm.cfg, dm.cfg.num_layers
    p, a, P, A, ad = dm.params, dm.acts, dm.P, dm.A, dm.addr

    embed(dm)
    for l in range(L):
        linear_forward(dm, l, "qkvw", A.ln1[l], ad.qkv[l], bias=ad.qkvb[l])
        if dm.kv is None:
            dm.attention.forward(ad.qkv[l], ad.atty[l], dm.att_stats[l])
        else:  # a decoding view: the newest position against its cache
            attention_decode(A.atty[l], A.qkv[l], dm.kv.k[l], dm.kv.v[l], dm.position, cfg.num_heads)
        attention_projection(dm, l)
        residual_layernorm(A.residual2[l], None, None, A.ln2[l], A.ln2_mean[l], A.ln2_rstd[l], P.ln2w[l], P.ln2b[l])
        if dm.fused_gelu:
            linear_forward(dm, l, "fcw", A.ln2[l], ad.fch_gelu[l], bias=ad.fcb[l], gelu_aux=ad.fch[l])
        else:
            linear_forward(dm, l, "fcw", A.ln2[l], ad.fch[l], bias=ad.fcb[l])
            if bf16_matmuls(dm):  # (fp8: the GELU is applied by the cast into the next matmul)
                gelu_forward(A.fch_gelu[l], A.fch[l])
        linear_forward(dm, l, "fcprojw", A.fch_gelu[l], ad.residual3[l], add=ad.residual2[l], bias=ad.fcprojb[l],
                       gelu_of=A.fch[l])
        if l + 1 < L:
            nxt = (A.ln1[l + 1], A.ln1_mean[l + 1], A.ln1_rstd[l + 1], P.ln1w[l + 1], P.ln1b[l + 1])
        else:
            nxt = (a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb)
        residual_layernorm(A.residual3[l], None, None, *nxt)
    classifier_bf16(dm)


def attention_projection(dm, l):
    """residual2 of layer l = its residual stream in + the attention output's projection
    (float32, the bias in the epilogue): the forward's, and -r 2's recompute of it in the
    backward (the same call, so the same plan and the same bits)."""
    ad = dm.addr
    linear_forward(dm, l, "attprojw", dm.A.atty[l], ad.residual2[l], add=ad.residual3[l - 1] if l > 0 else ad.encoded,
                   bias=ad.attprojb[l])


def bf16_matmuls(dm):
    """Whether the layers' matmuls run in bf16: under bf16, and while fp8 measures its
    first scales (cuda_fp8.Fp8State.measuring)."""
    return dm.fp8 is None or dm.fp8.measuring


def linear_forward(dm, l, w, x, out, bias=0, add=0, gelu_aux=0, gelu_of=None):
    """out = x @ W^T for layer l's weight w (N x K; x, B*T x K, bf16) through cuBLASLt,
    with its epilogues (Lt.matmul): bf16 out, or float32 when it adds to the residual
    stream (add). fp8: x cast to E4M3 on the way (its slot's scale; cuda_fp8), times the
    weight's E4M3 copy, with the tensor cores' fast accumulation; the bias in bf16; with
    gelu_of, x is gelu(gelu_of), which the cast computes (x itself is never written, but
    while fp8 measures its first scales, when the matmul is bf16's)."""
    ad, BT = dm.addr, dm.B * dm.T
    N, K = getattr(dm.params16, w)[l].shape
    out_fp32 = bool(add)
    f8 = dm.fp8
    if f8 is not None:
        x8 = f8.buffer(f8.x8, BT, K)
        s_in, s_w = cuda_fp8.slot(l, w, cuda_fp8.INPUT), cuda_fp8.slot(l, w, cuda_fp8.WEIGHT)
        if gelu_of is None:  # (and the transpose the backward reads, where fp8 keeps it)
            cuda_fp8.cast(x, f8.meta, s_in, cuda_fp8.E4M3, out=x8, out_t=f8.inputs_t.get((w, l)))
        else:
            cuda_fp8.cast(gelu_of, f8.meta, s_in, cuda_fp8.E4M3, out=x8, with_gelu=True)
    if bf16_matmuls(dm):
        dm.lt.matmul(False, True, BT, N, K, addr(x), K, getattr(ad, w)[l], K, out, N, out_fp32=out_fp32, add=add,
                     bias=bias, gelu_aux=gelu_aux)
        return
    if out_fp32 and bias:
        bias = getattr(ad, {"attprojw": "attprojb16", "fcprojw": "fcprojb16"}[w])[l]
    dm.lt.matmul(False, True, BT, N, K, addr(x8), K, addr(f8.w8[w, l]), K, out, N, out_fp32=out_fp32, add=add,
                 bias=bias, gelu_aux=gelu_aux, a8=(R_8F_E4M3, f8.scale_inv(s_in)),
                 b8=(R_8F_E4M3, f8.scale_inv(s_w)), fast_accum=True)


def linear_backward(dm, l, w, dout, x, dinp, accumulate, dgelu_aux=0, gelu_of=None):
    """The backward of linear_forward for layer l's weight w (N x K): dinp (B*T x K, bf16)
    = dout @ W (times gelu'(the pre-activation at dgelu_aux)), and W's gradient (float32)
    = dout^T @ x (+= with accumulate); dout (B*T x N) and x bf16. fp8: dout cast to E5M2
    and its transpose, x's transpose to E4M3 (the slot of its forward cast; gelu_of as
    there), W's transposed E4M3 copy; precise accumulation (Transformer Engine's choice
    for the backward). While fp8 measures its first scales: bf16's matmuls, and dout's
    cast only for its amax."""
    ad, BT = dm.addr, dm.B * dm.T
    N, K = getattr(dm.params16, w)[l].shape
    grad = getattr(ad, "g" + w)[l]
    f8 = dm.fp8
    if f8 is not None:
        dy8, dy_t, x_t = f8.buffer(f8.x8, BT, N), f8.buffer(f8.dy_t, N, BT), f8.buffer(f8.x_t, K, BT)
        s_in, s_w, s_dy = (cuda_fp8.slot(l, w, kind) for kind in (cuda_fp8.INPUT, cuda_fp8.WEIGHT, cuda_fp8.GRAD))
    if bf16_matmuls(dm):
        if f8 is not None:
            cuda_fp8.cast(dout, f8.meta, s_dy, cuda_fp8.E5M2, out=dy8)
        dm.lt.matmul(True, False, N, K, BT, addr(dout), N, addr(x), K, grad, K, out_fp32=True, accumulate=accumulate)
        dm.lt.matmul(False, False, BT, K, N, addr(dout), N, getattr(ad, w)[l], K, dinp, K, dgelu_aux=dgelu_aux)
        return
    cuda_fp8.cast(dout, f8.meta, s_dy, cuda_fp8.E5M2, out=dy8, out_t=dy_t)
    if (w, l) in f8.inputs_t:  # the forward's cast kept it
        x_t = f8.inputs_t[w, l]
    else:
        cuda_fp8.cast(x if gelu_of is None else gelu_of, f8.meta, s_in, cuda_fp8.E4M3, out_t=x_t,
                      with_gelu=gelu_of is not None)
    dy_scale = (R_8F_E5M2, f8.scale_inv(s_dy))
    dm.lt.matmul(False, True, N, K, BT, addr(dy_t), BT, addr(x_t), BT, grad, K, out_fp32=True, accumulate=accumulate,
                 a8=dy_scale, b8=(R_8F_E4M3, f8.scale_inv(s_in)))
    dm.lt.matmul(False, True, BT, K, N, addr(dy8), N, addr(f8.w8_t[w, l]), N, dinp, K, dgelu_aux=dgelu_aux,
                 a8=dy_scale, b8=(R_8F_E4M3, f8.scale_inv(s_w)))


def classifier_bf16(dm):
    """The tied-embedding classifier, and its backward, a chunk of rows at a time: the
    logits buffer holds dm.classifier_rows rows, not B*T (at 124M, B=16, T=1024: 0.41
    GB instead of 1.65). Each chunk's logits are computed, then their losses and, when
    the forward prepares a backward, turned into dlogits in place and multiplied out at
    once: the lnf gradient of the chunk's rows (float32, into dresidual) and the chunk's
    part of the wte gradient (summed into wte_grad_pending), both per target (dloss =
    1): the loss scale comes with the backward, which applies it (classifier_wte_grad,
    the final layernorm's dout_scale). Without targets, the logits are computed when one
    chunk holds them all (a decoding step); else logits_to_host computes them.
    Each chunk reads and writes the float32 Vp x C wte gradient sum once, so smaller
    chunks cost time: on an H100 at 124M, B=16, one call, 2,048 rows ran 466.7k tokens/s
    in 7.68 GiB, 4,096 (the default) 475.7k in 7.87, one chunk of all 16,384 479.7k in
    9.02; the whole-logits classifier this replaced, 476.4k in 8.95 (the call before)."""
    C, Vp, V = dm.cfg.channels, dm.cfg.padded_vocab_size, dm.cfg.vocab_size
    ad, lt = dm.addr, dm.lt
    if not dm.has_loss:
        if len(dm.chunks) == 1:
            chunk_logits(dm, 0, dm.chunks[0][1])
        return
    for r0, n, logits, losses, logsumexp, targets in dm.chunks:
        lnf = chunk_logits(dm, r0, n)
        classifier_forward(losses, logsumexp, logits, targets, V)
        if dm.backward_ready:
            classifier_backward(logits, logsumexp, targets, V, dm.stats, 1.0, per_target=True)
            lt.matmul(False, False, n, C, Vp, ad.logits, Vp, ad.wte, C, ad.dresidual + 4 * r0 * C, C, out_fp32=True)
            lt.matmul(True, False, Vp, C, n, ad.logits, Vp, lnf, C, ad.wte_grad_pending, C, out_fp32=True,
                      accumulate=r0 > 0)
    loss_reduce(dm.stats, dm.acts.losses, dm.targets)


def chunk_logits(dm, r0, n):
    """The logits buffer = rows r0 .. r0 + n of lnf times wte (the tied embedding); the
    address of those lnf rows."""
    C, Vp, ad = dm.cfg.channels, dm.cfg.padded_vocab_size, dm.addr
    lnf = ad.lnf + 2 * r0 * C
    dm.lt.matmul(False, True, n, Vp, C, lnf, C, ad.wte, C, ad.logits, Vp)
    return lnf


def logits_bf16(dm, host):
    """host (B*T, Vp float32) = the logits of the last forward's rows, computed again a
    chunk at a time from lnf (the classifier keeps no more than a chunk of them)."""
    for r0, n, logits, _, _, _ in dm.chunks:
        chunk_logits(dm, r0, n)
        synchronize()
        host[r0:r0 + n] = common.bfloat16_to_float32(logits.copy_to_host())
    return host


def gpt2_backward_bf16(dm, accumulate, loss_scale):
    """The bf16 backward of the last forward (gradients into the float32 buffer;
    accumulate adds to them), from the classifier's gradients that forward left."""
    cfg, B, T = dm.cfg, dm.B, dm.T
    L, BT = cfg.num_layers, B * T
    p, g, a = dm.params, dm.grads, dm.acts
    P, G, A, ad = dm.P, dm.G, dm.A, dm.addr
    cs, lnb = dm.colsum_scratch, dm.layernorm_scratch
    recomputed = backward_recomputes(dm)

    # the classifier's part ran with the forward, per target (classifier_bf16): scaled here
    classifier_wte_grad(g.wte, dm.wte_grad_pending, dm.stats, dm.dlnf_scale, loss_scale, accumulate)
    last_residual = A.residual3[L - 1] if L > 0 else a.encoded
    layernorm_backward(lnb, a.dresidual, a.dresidual, last_residual, p.lnfw, a.lnf_mean, a.lnf_rstd, True, g.lnfw,
                       g.lnfb, accumulate, dbias=G.fcprojb[L - 1] if L > 0 else None, shadow=a.dresidual16,
                       dout_scale=dm.dlnf_scale)
    for l in range(L - 1, -1, -1):
        residual = A.residual3[l - 1] if l > 0 else a.encoded
        if "residual2" in recomputed:
            attention_projection(dm, l)
        if "ln2" in recomputed:
            layernorm_apply(A.residual2[l], A.ln2[l], A.ln2_mean[l], A.ln2_rstd[l], P.ln2w[l], P.ln2b[l])
        # MLP: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2)))); fcprojb's gradient came
        # with the layernorm backward above it
        if "fch_gelu" in recomputed:
            gelu_forward(A.fch_gelu[l], A.fch[l])
        linear_backward(dm, l, "fcprojw", a.dresidual16, A.fch_gelu[l], ad.d4C, accumulate, dgelu_aux=ad.fch[l],
                        gelu_of=A.fch[l])
        colsum(cs, G.fcb[l], a.d4C, accumulate)
        linear_backward(dm, l, "fcw", a.d4C, A.ln2[l], ad.dC, accumulate)
        layernorm_backward(lnb, a.dresidual, a.dC, A.residual2[l], P.ln2w[l], A.ln2_mean[l], A.ln2_rstd[l], False,
                           G.ln2w[l], G.ln2b[l], accumulate, dbias=G.attprojb[l], shadow=a.dresidual16)
        # attention: residual2 = residual + attproj(attention(qkv(ln1(residual))))
        linear_backward(dm, l, "attprojw", a.dresidual16, A.atty[l], ad.dC, accumulate)
        dm.attention.backward(ad.qkv[l], ad.atty[l], ad.dC, dm.att_stats[l], ad.d3C)
        colsum(cs, G.qkvb[l], a.d3C, accumulate)
        if "ln1" in recomputed:
            layernorm_apply(residual, A.ln1[l], A.ln1_mean[l], A.ln1_rstd[l], P.ln1w[l], P.ln1b[l])
        linear_backward(dm, l, "qkvw", a.d3C, A.ln1[l], ad.dC, accumulate)
        layernorm_backward(lnb, a.dresidual, a.dC, residual, P.ln1w[l], A.ln1_mean[l], A.ln1_rstd[l], False,
                           G.ln1w[l], G.ln1b[l], accumulate, dbias=G.fcprojb[l - 1] if l > 0 else None,
                           shadow=a.dresidual16)
        start_reduction(dm, l)  # layer l's gradients are complete
    encoder_backward_wte(g.wte, a.dresidual, dm.positions, dm.bucket_token, dm.bucket_start, dm.num_buckets, BT)
    encoder_backward_wpe(g.wpe, a.dresidual, B, T, accumulate)
    finish_reduction(dm)


def synchronize():
    cuda.synchronize()


def device_memory_used():
    """Bytes in use on the device (whole context: ours, cuBLAS's, CuPy's), or None."""
    if SIM:
        return None
    free, total = cuda.current_context().get_memory_info()
    return total - free


def datasheet_peak_tflops(precision):
    """Dense peak of the GPU for MFU: the H100/H200 SXM datasheet's BF16 (989.4), TF32
    tensor-core (494.7) or plain FP32 (66.9) TFLOP/s; 0 (MFU not shown) for other GPUs
    and the simulator. fp8 is measured against the BF16 peak (its attention and
    classifier are bf16): an MFU comparable with bf16's."""
    if SIM:
        return 0.0
    name = cuda.get_current_device().name
    name = name.decode() if isinstance(name, bytes) else str(name)
    if "H100" in name or "H200" in name:
        return {"bf16": 989.4, "fp8": 989.4, "tf32": 494.7}.get(precision, 66.9)
    return 0.0


def _free(dm):
    """Drop the device buffers of dm (the memory goes back when nothing else holds them)."""
    release(vars(dm).values())
    dm.__dict__.clear()


# -----------------------------------------------------------------------------
# The training target (gpt2_common.Device): train_gpt2.py's main() and test_gpt2.py talk
# to the GPU only through it


PRECISIONS = ("fp32", "tf32", "bf16", "fp8")
MIXED = ("bf16", "fp8")  # the precisions of the bf16 step (fp8: its layers' matmuls in fp8)


class CUDA(common.Device):
    """The host model's training on the GPU: a thin wrapper over the functions above.
    The device holds the parameters, gradients, AdamW state and step count; the host
    model is read at construction and by state_from_host, and written only when asked
    (params_to_host, state_to_host).

    precision: "fp32" (strict), "tf32" (TF32 matmuls) or "bf16" (mixed precision, the
    bf16 functions above). bf16 steps run as CUDA graphs: the forward (with or without
    targets), the backward (per accumulate flag, loss scale and whether it ends the step)
    and the update (per clip) are each captured on their second call and replayed after,
    so Python's launch cost (tens of microseconds a kernel) is paid once; host work (token
    and hyperparameter staging, the encoder buckets) stays outside the graphs. In a
    data-parallel run the collectives are captured too (NCCL on the graphs' streams)."""

    name = "cuda"

    def __init__(self, model, B, T, precision="tf32", attention_blocks=None, dist=None, zero_stage=0,
                 graphs=True, recompute=1, deterministic=True, classifier_rows=CLASSIFIER_ROWS):
        """dist: one rank of a data-parallel run (distributed.setup), which has already
        made this rank's GPU (LOCAL_RANK) the current one, NCCL even with one rank;
        zero_stage 1 shards m and v. graphs: capture bf16 steps in CUDA graphs (never
        under the simulator). bf16 only: recompute, the -r level (RECOMPUTED: what the
        backward computes again instead of keeping per layer); deterministic=False,
        cuDNN's faster attention backward whose dq sums vary in order (a seed no longer
        repeats bit for bit); classifier_rows, the rows of logits computed at a time."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.model = model
        self.precision = precision
        self.dist = dist if dist is not None and dist.engine != "none" else None
        world, rank = (self.dist.world, self.dist.rank) if self.dist else (1, 0)
        shard_optimizer = bool(self.dist) and zero_stage == 1
        if precision in MIXED:
            self.dm = to_device_bf16(model, B, T, shards=world, rank=rank, shard_optimizer=shard_optimizer,
                                     recompute=recompute, classifier_rows=classifier_rows,
                                     deterministic=deterministic, fp8=precision == "fp8")
        else:
            self.dm = to_device(model, B, T, tf32=precision == "tf32", attention_blocks=attention_blocks,
                                shards=world, rank=rank, shard_optimizer=shard_optimizer)
        _communication(self.dm, self.dist)
        self.graphs = {} if graphs and precision in MIXED and not SIM else None
        self.ran_once = set()
        self.kv_view, self.views = None, {}  # the decoding view, the forward views by shape

    def _device_step(self, key, work):
        """Run work() (device launches only) on the target's stream. bf16: eagerly the
        first time (kernels compile, plans are made), captured into a CUDA graph the
        second, replayed from then on."""
        dm = self.dm
        set_launch_stream(dm.launch_stream)
        try:
            if self.graphs is None or key not in self.ran_once:
                work()
                self.ran_once.add(key)
                return
            graph = self.graphs.get(key)
            if graph is None:
                dm.compute_stream.begin_capture()
                try:
                    work()
                finally:
                    graph = dm.compute_stream.end_capture()
                self.graphs[key] = graph
            graph.launch(dm.compute_stream)
        finally:
            set_launch_stream(None)

    def forward(self, inputs, targets=None):
        dm = self.dm
        _stage_tokens(dm, inputs, targets)
        dm.has_loss = targets is not None
        dm.backward_ready = dm.has_loss and dm.trains
        if dm.backward_ready and dm.fp8 is not None and dm.fp8.unscaled:
            self.measure_fp8_scales()
        forward = gpt2_forward_bf16 if self.precision in MIXED else gpt2_forward_cuda
        self._device_step(("forward", targets is not None), lambda: forward(dm))
        if dm.backward_ready:
            _stage_buckets(dm)  # built on the host while the device runs the forward
        return mean_loss_cuda(dm)  # waits for the forward

    def measure_fp8_scales(self):
        """A fresh fp8 run's first training forward: its layers' inputs and gradients have
        no amax history yet, and at scale 1 most first-step gradients round to zero in E5M2
        (cuda_fp8's docstring). So it first runs a bf16 forward and backward whose casts
        only measure (every fp8 input's and gradient's amax), sets the scales from them, and
        goes on in fp8. Once per run; the gradients it writes are replaced by the step's
        first backward (accumulate=False). The weights' scales stay (their history holds
        their own amax already)."""
        dm, f8 = self.dm, self.dm.fp8

        def measure():
            gpt2_forward_bf16(dm)
            gpt2_backward_bf16(dm, False, 1.0)
            cuda_fp8.update_scales(f8.meta)

        _stage_buckets(dm)  # (its backward's embedding gradient, though only the amaxes are kept)
        f8.measuring, dm.reducing = True, False
        try:
            self._device_step(("fp8 scales",), measure)
        finally:
            f8.measuring = False
        f8.unscaled = False

    def backward(self, accumulate=False, loss_scale=1.0, last_micro_step=True):
        """last_micro_step: this backward ends the step (data parallel: its gradients are
        summed over the ranks as the layers finish)."""
        dm = self.dm
        if not dm.backward_ready:
            raise RuntimeError("backward needs a forward pass with targets first")
        _stage_buckets(dm)
        dm.backward_ready = False  # the dlogits (fp32, tf32) or the classifier's gradients (bf16) are used up
        backward = gpt2_backward_bf16 if self.precision in MIXED else gpt2_backward_cuda
        accumulate, loss_scale = bool(accumulate), float(loss_scale)
        dm.reducing = self.dist is not None and bool(last_micro_step)
        dm.grads_reduced = False
        self._device_step(("backward", accumulate, loss_scale, dm.reducing),
                          lambda: backward(dm, accumulate, loss_scale))

    def update(self, lr, beta1, beta2, eps, weight_decay, weight_decay_mode, grad_clip):
        dm = self.dm
        stage_update(dm, lr, beta1, beta2, eps, weight_decay, weight_decay_mode)
        reduce_first = self.dist is not None and not dm.grads_reduced
        self._device_step(("update", float(grad_clip), reduce_first),
                          lambda: update_on_device(dm, grad_clip, reduce_first))
        dm.grads_reduced = False
        return float(dm.normbuf.copy_to_host()[0])  # waits for the update

    def evaluator(self, B, T):
        """A forward-only CUDA target at batch shape (B, T) over these parameters (no
        second copy): its activations reuse this target's activation memory where they
        fit. For evaluations whose rows are not the training's (HellaSwag). Made once per
        shape, with its own CUDA graphs."""
        view = self.views.get((B, T))
        if view is None:
            view = object.__new__(CUDA)
            view.model, view.precision, view.dist = self.model, self.precision, None
            view.dm = forward_view(self.dm, B, T)
            view.graphs = {} if self.graphs is not None else None
            view.ran_once, view.kv_view, view.views = set(), None, {}
            self.views[(B, T)] = view
        return view

    def decoder(self):
        """Generation on the GPU, one token at a time with a KV cache, in the run's
        precision: an object whose step(token) feeds the next position and returns the
        float32 logits (Vp,) of the token after it, on the host (train_gpt2.generate
        samples from them). Made once (the cache and a (1, 1) view over this target's
        memory), reset on every call."""
        if self.kv_view is None:
            dm = self.dm
            kv = KVCache(dm.cfg, np.uint16 if self.precision in MIXED else np.float32)
            self.kv_view = forward_view(dm, 1, 1, kv)
        return Decoder(self.kv_view, self.precision)

    def losses_to_host(self):
        dm = self.dm
        return dm.acts.losses[:dm.B * dm.T].copy_to_host()

    def params_to_host(self):
        synchronize()
        self.dm.layout.to_host(self.dm.params_memory, self.model.params_memory)

    def state_to_host(self):
        """Under ZeRO-1 every rank takes part: the m and v shards are all-gathered
        through the gradient buffer (free between an update and the next backward)."""
        dm, model = self.dm, self.model
        synchronize()
        common.ensure_optimizer_buffers(model)
        dm.layout.to_host(dm.params_memory, model.params_memory)
        for moments, host in ((dm.m_memory, model.m_memory), (dm.v_memory, model.v_memory)):
            if not dm.sharded:
                dm.layout.to_host(moments, host)
            else:
                dm.grads_memory[dm.update_start:dm.update_start + dm.shard_size].copy_to_device(moments)
                self.dist.allgather_device(dm.grads_memory)
                synchronize()
                dm.layout.to_host(dm.grads_memory, host)
        model.step = dm.step

    def state_from_host(self):
        """ZeRO-1: this rank takes its shard of the host model's m and v."""
        dm, model = self.dm, self.model
        synchronize()
        dm.layout.to_device(model.params_memory, dm.params_memory)
        if model.m_memory is None:  # no optimizer state on the host: a fresh one
            fill(dm.m_memory, 0.0)
            fill(dm.v_memory, 0.0)
        else:
            for moments, host in ((dm.m_memory, model.m_memory), (dm.v_memory, model.v_memory)):
                if dm.sharded:  # the padding past the end stays zero
                    whole = dm.layout.device_order(host, dm.params_memory.size)
                    moments.copy_to_device(whole[dm.update_start:dm.update_start + dm.shard_size])
                else:
                    dm.layout.to_device(host, moments)
        if dm.params16_memory is not None:
            store(dm.params16_memory, dm.params_memory)
        if dm.fp8 is not None:
            dm.fp8.calibrate(dm.params16)
        synchronize()
        dm.step = int(model.step)

    def run_state(self):
        """fp8: the scales and amax histories (a resumed run casts as this one would)."""
        if self.dm.fp8 is None:
            return {}
        synchronize()
        return {"fp8_meta": self.dm.fp8.meta.copy_to_host().tolist(), "fp8_unscaled": self.dm.fp8.unscaled}

    def set_run_state(self, state):
        if self.dm.fp8 is not None and "fp8_meta" in state:
            self.dm.fp8.restore(np.array(state["fp8_meta"], np.float32), self.dm.params16,
                                state.get("fp8_unscaled", False))

    def logits_to_host(self):
        """fp32, tf32: the logits buffer as it is (dlogits after a backward); bf16: the
        last forward's logits, computed again (classifier_bf16 keeps a chunk of them)."""
        dm = self.dm
        if self.precision in MIXED:
            return logits_bf16(dm, np.empty((dm.B * dm.T, dm.cfg.padded_vocab_size), np.float32))
        return dm.acts.logits.copy_to_host()

    def grads_to_host(self):
        synchronize()
        host = np.zeros(self.dm.num_parameters, dtype=np.float32)
        self.dm.layout.to_host(self.dm.grads_memory, host)
        return host

    def optimizer_bytes(self):
        """AdamW state held on this GPU (m and v, or their shards)."""
        return 2 * 4 * self.dm.m_memory.size

    def peak_flops(self):
        return datasheet_peak_tflops(self.precision) * 1e12

    def memory_used(self):
        return device_memory_used()

    def free(self):
        if self.dm is not None:
            synchronize()
            self.graphs, self.kv_view, self.views = None, None, {}
            if self.dm.trains:  # a view's buffers are its parent's
                _free(self.dm)
            self.dm = None


class Decoder:
    """One generated sequence on the GPU (CUDA.decoder): step(token) runs the (1, 1)
    forward of the token at the next position, its attention over the KV cache, and
    returns the next token's float32 logits on the host."""

    def __init__(self, view, precision):
        self.view, self.precision, self.length = view, precision, 0

    def step(self, token):
        dm = self.view
        if self.length >= dm.cfg.max_seq_len:
            raise common.UserError(f"generation reached the model's max_seq_len={dm.cfg.max_seq_len}")
        _stage_tokens(dm, np.array([[token]], dtype=np.int32), None)
        dm.has_loss = dm.backward_ready = False
        dm.position = self.length
        set_launch_stream(dm.launch_stream)
        try:
            (gpt2_forward_bf16 if self.precision in MIXED else gpt2_forward_cuda)(dm)
        finally:
            set_launch_stream(None)
        self.length += 1
        if dm.compute_stream is not None:
            dm.compute_stream.synchronize()
        logits = dm.acts.logits[0].copy_to_host()
        return common.bfloat16_to_float32(logits) if logits.dtype == np.uint16 else logits
