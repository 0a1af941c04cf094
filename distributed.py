"""
Data-parallel runs: which process this is, and the collectives over the flat gradient
and parameter buffers, through real engines only: MPI (mpi4py) between CPU processes,
NCCL (CuPy's binding) between GPUs. One process per device; a run of one process uses
`SINGLE`, whose collectives do nothing, so the training loop has no special case.

How a run is launched, and so how the processes find each other:
- `mpirun -np N python train_gpt2.py ...` (or Slurm's `srun` with MPI): mpi4py's
  COMM_WORLD. On the CPU it carries the collectives; on GPUs it only hands NCCL its id.
- torchrun's or Slurm's environment without MPI (RANK, WORLD_SIZE, LOCAL_RANK, or
  SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID): GPUs only. Rank 0 makes the NCCL id and
  writes it to a file in --nccl-init-dir (a directory every rank can read, as llm.c's
  `-pi fs`), or serves it over TCP at MASTER_ADDR, port MASTER_PORT + 1.

ZeRO-1 splits the flat buffer into N contiguous shards of one size (`shard_size`; the
last is cut at the buffer's end on the CPU, and the GPU buffers are padded to N equal
shards, as NCCL needs); rank r owns shard r of the AdamW moments and updates only
those parameters.

Nothing here imports numpy, mpi4py or CuPy at module level: `share_cores` must run
before numpy starts its thread pool, and single-process runs never load MPI.
"""

import os
import socket
import sys
import time
from types import SimpleNamespace

MPI_LAUNCH_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
RENDEZVOUS_TIMEOUT_S = 300


class DistributedError(Exception):
    """A launch or rendezvous problem: printed as one line, exit code 1."""


def launched_by_mpi():
    return any(name in os.environ for name in MPI_LAUNCH_VARIABLES)


def launched_by_environment():
    return "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ


def share_cores():
    """Processes on one machine split its cores: unless the user chose, each gets
    cores / (processes on this machine) threads for Numba, OpenMP and BLAS. Call it
    before numpy is imported (BLAS sizes its pool then)."""
    for name in LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit() and int(value) > 1:
            threads = str(max(1, (os.cpu_count() or 1) // int(value)))
            for variable in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(variable, threads)
            return


def shard_size(n, world):
    """Values per ZeRO-1 shard of a flat buffer of n values: n / world, rounded up."""
    return (n + world - 1) // world


def owner_pieces(lo, hi, shard_size, world):
    """(rank, start, end) of the pieces of [lo, hi) that fall in each rank's shard of a flat
    buffer cut into shards of shard_size values."""
    return [(r, max(lo, r * shard_size), min(hi, (r + 1) * shard_size)) for r in range(world)
            if max(lo, r * shard_size) < min(hi, (r + 1) * shard_size)]


def shard_range(n, world, rank):
    """[lo, hi) of rank's shard, cut at the end of the buffer."""
    size = shard_size(n, world)
    return min(n, rank * size), min(n, (rank + 1) * size)


class Single:
    """A run of one process: every collective is the identity."""

    rank, world, local_rank, engine = 0, 1, 0, "none"

    def sum(self, value):
        return value

    def any(self, flag):
        return bool(flag)

    def allreduce_sum(self, buffer):
        pass

    def barrier(self):
        pass

    def abort(self, code):
        pass  # nobody else to stop: the caller exits with code


SINGLE = Single()


class MPIGroup:
    """The processes of an MPI launch; collectives on host float32 numpy arrays."""

    engine = "mpi"

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise DistributedError(f"launched by MPI, but mpi4py does not import ({e}): pip install mpi4py")
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.world = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()

    def sum(self, value):
        return self.comm.allreduce(value, op=self.MPI.SUM)

    def any(self, flag):
        return bool(self.comm.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def all_equal(self, value):
        return len(set(self.comm.allgather(value))) == 1

    def allreduce_sum(self, buffer):
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)

    def _layout(self, n):
        """(counts, displacements) of the shards of a flat buffer of n values."""
        ranges = [shard_range(n, self.world, r) for r in range(self.world)]
        return [hi - lo for lo, hi in ranges], [lo for lo, _ in ranges]

    def reduce_scatter_sum(self, buffer, shard):
        """shard = this rank's part of the sum of every rank's buffer."""
        counts, _ = self._layout(buffer.size)
        self.comm.Reduce_scatter(buffer, shard, recvcounts=counts, op=self.MPI.SUM)

    def allgather(self, buffer):
        """Every rank's shard of buffer (it wrote its own in place) to every rank."""
        counts, displacements = self._layout(buffer.size)
        self.comm.Allgatherv(self.MPI.IN_PLACE, [buffer, counts, displacements, self.MPI.FLOAT])

    def gather_to_root(self, shard, full, n):
        """The shards of a buffer of n values, in rank order, into full on rank 0 (full
        may be None elsewhere)."""
        counts, displacements = self._layout(n)
        target = [full, counts, displacements, self.MPI.FLOAT] if self.rank == 0 else None
        self.comm.Gatherv(shard, target, root=0)

    def barrier(self):
        self.comm.Barrier()

    # the same collectives on device arrays, through host copies: what GPU ranks use
    # under Numba's CUDA simulator (no NCCL there), so the tests cover the CUDA target's
    # data-parallel logic on a machine without a GPU
    def allreduce_sum_device(self, array, lo=0, hi=None, stream=0):
        part = array[lo:array.size if hi is None else hi]
        host = part.copy_to_host()
        self.allreduce_sum(host)
        part.copy_to_device(host)

    def reduce_to_owners_device(self, array, lo, hi, shard_size, stream=0):
        for owner, a, b in owner_pieces(lo, hi, shard_size, self.world):
            piece = array[a:b]
            host = piece.copy_to_host()
            total = host.copy() if self.rank == owner else None
            self.comm.Reduce(host, total, op=self.MPI.SUM, root=owner)
            if self.rank == owner:
                piece.copy_to_device(total)

    def allgather_device(self, array, stream=0):
        host = array.copy_to_host()
        self.comm.Allgather(self.MPI.IN_PLACE, host)
        array.copy_to_device(host)

    def abort(self, code):
        """End every rank of the job, not only this one (the others may be inside a collective)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def environment_rank():
    """(rank, world, local rank) from torchrun's or Slurm's variables."""
    def read(*names):
        for name in names:
            if os.environ.get(name, "").isdigit():
                return int(os.environ[name])
        return None
    rank, world = read("RANK", "SLURM_PROCID"), read("WORLD_SIZE", "SLURM_NTASKS")
    local_rank = read("LOCAL_RANK", "SLURM_LOCALID")
    if rank is None or world is None or not 0 <= rank < world:
        raise DistributedError(f"bad launch environment: rank {rank}, world size {world} "
                               "(set RANK and WORLD_SIZE, or run under srun / mpirun)")
    return rank, world, rank if local_rank is None else local_rank


def setup(device, nccl_init_dir=None):
    """The process group of this run: SINGLE for one process; an MPIGroup between CPU
    processes; an NCCLGroup between GPUs, each rank on GPU LOCAL_RANK (under Numba's
    CUDA simulator, which has no NCCL, the MPIGroup stands in, copying through the host)."""
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    if launched_by_mpi():
        group = MPIGroup()
    elif launched_by_environment():
        rank, world, local_rank = environment_rank()
        if world > 1 and (device != "cuda" or simulator):
            raise DistributedError(f"{'CPU' if device != 'cuda' else 'simulated CUDA'} data parallel runs through "
                                   "MPI: launch with mpirun -np N python train_gpt2.py")
        # no host engine: NCCL will carry everything, the few host numbers too
        group = SimpleNamespace(rank=rank, world=world, local_rank=local_rank, engine="environment")
    else:
        return SINGLE
    if device != "cuda" or simulator:  # CPU ranks (or the simulator's stand-in) talk through MPI
        return SINGLE if group.world == 1 else group
    # GPU ranks use NCCL even when there is one (as PyTorch's DDP does): a one-rank launch
    # runs every collective, so one GPU checks the path that several take
    try:
        from numba import cuda
        cuda.select_device(group.local_rank)  # before CuPy, cuBLAS and NCCL bind to the current device
        import cupy
        cupy.cuda.Device(group.local_rank).use()
    except Exception as e:  # no GPU, no driver, fewer GPUs than ranks, no numba-cuda or CuPy
        raise DistributedError(f"rank {group.rank}: cannot use GPU {group.local_rank} ({type(e).__name__}: "
                               f"{' '.join(str(e).split())})")
    return NCCLGroup(group, nccl_init_dir)


class Watchdog:
    """Ends this process when no training step finishes for `timeout` seconds: a rank
    that died or a collective that hangs (NCCL has no timeout of its own) must end the
    job, never leave it waiting. The message names the rank; the launcher (mpirun,
    torchrun, srun --kill-on-bad-exit) then ends the other ranks. Off for one process."""

    def __init__(self, dist, timeout):
        self.dist, self.timeout, self.last = dist, timeout, time.monotonic()
        if dist.world > 1 and timeout > 0:
            import threading
            threading.Thread(target=self._watch, daemon=True).start()

    def beat(self):
        self.last = time.monotonic()

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            if time.monotonic() - self.last > self.timeout:
                print(f"error (rank {self.dist.rank} of {self.dist.world}): no training step finished in "
                      f"{self.timeout:g} s: another rank died or a collective hangs (--dist-timeout)",
                      file=sys.stderr, flush=True)
                os._exit(1)


# -----------------------------------------------------------------------------
# NCCL between GPUs (CuPy's binding: the communicator CuPy itself ships and tests)


def device_pointer(array):
    return array.__cuda_array_interface__["data"][0]


class NCCLGroup:
    """The GPU ranks' NCCL communicator: collectives on device buffers given as raw device
    pointers, on the stream the caller names (0: the legacy default stream, where the
    fp32 kernels and cuBLAS run). Shards are equal: the flat buffers are padded to a
    multiple of the world size."""

    def __init__(self, group, init_dir=None):
        from cupy.cuda import nccl
        self.nccl, self.group = nccl, group
        self.rank, self.world, self.local_rank = group.rank, group.world, group.local_rank
        self.engine = f"nccl ({group.engine} launch)"
        uid = share_nccl_id(group, lambda: bytes(b % 256 for b in nccl.get_unique_id()), init_dir)
        try:
            self.comm = nccl.NcclCommunicator(self.world, bytes(uid), self.rank)
        except Exception as e:  # noqa: BLE001  (NCCL's own errors: no GPU access, a bad id, a peer gone)
            raise DistributedError(f"rank {self.rank}: NCCL could not start ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())})")
        if init_dir and group.engine != "mpi" and self.rank == 0 and os.path.exists(id_file_path(init_dir)):
            os.remove(id_file_path(init_dir))  # every rank has joined, so every rank has read it

    def _type(self, array):
        return self.nccl.NCCL_FLOAT64 if array.dtype.itemsize == 8 else self.nccl.NCCL_FLOAT32

    def allreduce_sum_device(self, array, lo=0, hi=None, stream=0):
        """array[lo:hi] summed over the ranks, in place (float32 or float64)."""
        hi = array.size if hi is None else hi
        pointer = device_pointer(array) + array.dtype.itemsize * lo
        self.comm.allReduce(pointer, pointer, hi - lo, self._type(array), self.nccl.NCCL_SUM, stream)

    def reduce_to_owners_device(self, array, lo, hi, shard_size, stream=0):
        """Each piece of array[lo:hi] inside a rank's shard (of shard_size values) summed
        over the ranks onto that rank, in place (NCCL reduces, one group); the pieces of
        other ranks' shards keep this rank's own values. A bucket's share of a
        reduce-scatter, so every rank's shard is its own as a whole-buffer one leaves it."""
        base, size = device_pointer(array), array.dtype.itemsize
        self.nccl.groupStart()
        try:
            for owner, a, b in owner_pieces(lo, hi, shard_size, self.world):
                pointer = base + size * a
                self.comm.reduce(pointer, pointer, b - a, self._type(array), self.nccl.NCCL_SUM, owner, stream)
        finally:
            self.nccl.groupEnd()

    def allgather_device(self, array, stream=0):
        """In place: each rank's 1/N of array (its own shard, updated) to every rank."""
        count = array.size // self.world
        pointer = device_pointer(array)
        own = pointer + array.dtype.itemsize * self.rank * count
        self.comm.allGather(own, pointer, count, self._type(array), stream)

    # host-side agreement (loss, Ctrl-C, replica check, checkpoint barrier) goes through MPI
    # when there is MPI; under an environment launch, NCCL carries these few numbers too
    def sum(self, value):
        return self.group.sum(value) if self.group.engine == "mpi" else self._host_reduce([value], "sum")[0]

    def any(self, flag):
        return self.sum(1.0 if flag else 0.0) > 0

    def all_equal(self, value):
        if self.group.engine == "mpi":
            return self.group.all_equal(value)
        high, negated_low = self._host_reduce([float(value), -float(value)], "max")
        return high == -negated_low

    def barrier(self):
        self.sum(0.0)

    def abort(self, code):
        if self.group.engine == "mpi":
            self.group.abort(code)
        self.comm.abort()

    def _host_reduce(self, values, op):
        import cupy
        device = cupy.asarray(values, dtype=cupy.float64)
        reduction = self.nccl.NCCL_SUM if op == "sum" else self.nccl.NCCL_MAX
        self.comm.allReduce(device.data.ptr, device.data.ptr, device.size, self.nccl.NCCL_FLOAT64, reduction, 0)
        return device.get().tolist()


# -----------------------------------------------------------------------------
# The NCCL id: made by rank 0, read by every other rank before the communicator is built


def share_nccl_id(group, make_id, init_dir=None):
    """Bytes of the NCCL unique id on every rank: broadcast through MPI when there is
    MPI, else through a file in init_dir, else over TCP (MASTER_ADDR, port MASTER_PORT
    + 1; defaults 127.0.0.1 and 29500, as torchrun's)."""
    if group.engine == "mpi":
        return group.comm.bcast(make_id() if group.rank == 0 else None, root=0)
    if init_dir:
        return _id_through_file(group, make_id, init_dir)
    return _id_through_tcp(group, make_id)


def id_file_path(init_dir):
    """One name per job (Slurm's job and step, or torchrun's run id), so no rank reads a
    file left by an earlier job; rank 0 removes it once the communicator stands."""
    job = os.environ.get("TORCHELASTIC_RUN_ID") or ".".join(
        os.environ.get(name, "") for name in ("SLURM_JOB_ID", "SLURM_STEP_ID")).strip(".") or "run"
    return os.path.join(init_dir, f"nccl_id_{job}.bin")


def _id_through_file(group, make_id, init_dir):
    path = id_file_path(init_dir)
    if group.rank == 0:
        os.makedirs(init_dir, exist_ok=True)
        nccl_id, tmp = make_id(), f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(nccl_id)
        os.replace(tmp, path)
        return nccl_id
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while time.monotonic() < deadline:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
        time.sleep(0.1)
    raise DistributedError(f"rank {group.rank}: no NCCL id from rank 0 in {path} after {RENDEZVOUS_TIMEOUT_S} s")


def _id_through_tcp(group, make_id):
    """Rank 0 serves the id at MASTER_ADDR, port MASTER_PORT + 1 (torchrun's own store
    already listens on MASTER_PORT)."""
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500")) + 1
    if group.rank == 0:
        nccl_id = make_id()
        try:
            server = socket.create_server((address, port))
        except OSError as e:
            raise DistributedError(f"rank 0: cannot serve the NCCL id at {address}:{port} ({e}); "
                                   "set MASTER_PORT, or use --nccl-init-dir")
        with server:
            server.settimeout(RENDEZVOUS_TIMEOUT_S)
            for _ in range(group.world - 1):
                try:
                    connection, _ = server.accept()
                except socket.timeout:
                    raise DistributedError(f"rank 0: not every rank connected to {address}:{port} "
                                           f"within {RENDEZVOUS_TIMEOUT_S} s")
                with connection:
                    connection.sendall(len(nccl_id).to_bytes(4, "little") + nccl_id)
        return nccl_id
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while True:
        try:
            with socket.create_connection((address, port), timeout=10) as connection:
                data = b""
                while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "little"):
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if len(data) < 4 or len(data) != 4 + int.from_bytes(data[:4], "little"):
                    raise OSError("short read")
                return data[4:]
        except OSError:
            if time.monotonic() > deadline:
                raise DistributedError(f"rank {group.rank}: rank 0 did not answer at {address}:{port} "
                                       f"within {RENDEZVOUS_TIMEOUT_S} s")
            time.sleep(0.2)
