"""An engine's KV pool as another process on the same host sees it (the IpcConnector's data path, ipc.py): exported
once by the producer, mapped once by each consumer, then copied from block by block with no staging on the host.

CUDA: each layer's [2, blocks, block_size, kv_heads, head_dim] tensor goes out as torch's own CUDA IPC handle
(`storage._share_cuda_()`, what torch.multiprocessing sends) in plain JSON fields, never pickled: a consumer may be
pointed at any address by a request, and unpickling what it answers would run its code. The consumer opens it with
`rebuild_cuda_tensor` on the GPU with the producer's UUID (CUDA_VISIBLE_DEVICES may number it differently there).
CPU: the producer allocates its whole pool in one memfd (`SharedMemoryPool`): anonymous shared memory that lives as
long as a process maps it, so a crashed producer leaves nothing behind in /dev/shm; the consumer maps it through
/proc/<producer pid>/fd/<fd>."""

from __future__ import annotations

import base64
import math
import os
import re
from typing import Any, Callable

import torch

_SHM_PATH = re.compile(r"/proc/\d+/fd/\d+")
_MAX_RUNS = 2  # up to this many contiguous runs, slices are copied directly; beyond, a gather and a scatter per layer


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def pool_layout(kv_caches: list[torch.Tensor], block_size: int) -> dict[str, Any]:
    """What must match for a block id of one pool to mean the same tokens' K and V as a block id of another."""
    shapes = [list(kv.shape[2:]) for kv in kv_caches]
    return {"device": kv_caches[0].device.type, "dtype": str(kv_caches[0].dtype).removeprefix("torch."),
            "block_size": block_size, "layers": len(kv_caches),
            "block_shape": shapes[0] if all(s == shapes[0] for s in shapes) else shapes}


class SharedMemoryPool:
    """A CPU KV pool in one memfd; `tensors` are each layer's view of it (zeroed, as the runner's own pool is)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> None:
        if not hasattr(os, "memfd_create"):
            raise ValueError("the IpcConnector's CPU path needs Linux (memfd_create); use the TcpConnector here.")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        sizes = [math.prod(shape) * itemsize for shape in shapes]
        self.size, self.pid = sum(sizes), os.getpid()
        self.fd = os.memfd_create("pagedllm-kv")  # close-on-exec: spawned ranks do not keep it alive
        os.ftruncate(self.fd, self.size)
        flat = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.tensors = [flat[o : o + n].view(dtype).view(shape) for o, n, shape in zip(self.offsets, sizes, shapes)]

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"

    def close(self) -> None:
        os.close(self.fd)  # the mapping (and every consumer's) stays valid: the memory goes with the last one


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def export_pool(kv_caches: list[torch.Tensor], shared: SharedMemoryPool | None) -> dict[str, Any]:
    """The JSON a consumer maps the pool with (see `map_pool`)."""
    first = kv_caches[0]
    if first.is_cuda:
        layers = []
        for kv in kv_caches:
            (_, handle, size, offset, counter, counter_offset, event, sync) = kv.untyped_storage()._share_cuda_()
            layers.append({"handle": b64(handle), "storage_bytes": size, "storage_offset_bytes": offset,
                           "ref_counter": b64(counter), "ref_counter_offset": counter_offset,
                           "event": b64(event or b""), "event_sync": bool(sync), "offset": kv.storage_offset(),
                           "shape": list(kv.shape), "stride": list(kv.stride())})
        return {"kind": "cuda", "device_uuid": device_uuid(first.device), "layers": layers}
    if shared is None:
        raise ValueError("a CPU pool is shared only when allocated in shared memory (SharedMemoryPool)")
    return {"kind": "shm", "path": shared.path, "size": shared.size,
            "layers": [{"offset": o, "shape": list(kv.shape)} for o, kv in zip(shared.offsets, kv_caches)]}


def local_cuda_device(uuid: str) -> torch.device:
    """This process's index of the GPU the producer names by UUID (ValueError if it cannot see that GPU)."""
    for index in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", index)) == uuid:
            return torch.device("cuda", index)
    raise ValueError(f"the producer's pool is on GPU {uuid}, which this process does not see (CUDA_VISIBLE_DEVICES)")


def map_pool(info: dict[str, Any], dtype: torch.dtype) -> list[torch.Tensor]:
    """The producer's per-layer pool tensors, mapped into this process (read only by convention)."""
    if info["kind"] == "cuda":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        device = local_cuda_device(str(info["device_uuid"]))
        return [rebuild_cuda_tensor(torch.Tensor, torch.Size(layer["shape"]), tuple(layer["stride"]),
                                    int(layer["offset"]), torch.UntypedStorage, dtype, device.index,
                                    unb64(layer["handle"]), int(layer["storage_bytes"]),
                                    int(layer["storage_offset_bytes"]), False, unb64(layer["ref_counter"]),
                                    int(layer["ref_counter_offset"]), unb64(layer["event"]) or None,
                                    bool(layer["event_sync"]))
                for layer in info["layers"]]
    path, size = str(info["path"]), int(info["size"])
    if info["kind"] != "shm" or not _SHM_PATH.fullmatch(path):
        raise ValueError(f"not a KV pool this engine maps: {info['kind']!r} at {path!r}")
    if os.stat(path).st_size != size:  # from_file would grow a shorter file: never write to the producer's
        raise ValueError(f"the producer's pool file {path} is not {size} bytes")
    flat = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    out = []
    for layer in info["layers"]:
        offset, shape = int(layer["offset"]), [int(n) for n in layer["shape"]]
        out.append(flat[offset : offset + math.prod(shape) * itemsize].view(dtype).view(shape))
    return out


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the stretches where both block id lists count up by one."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_blocks(src: list[torch.Tensor], dst: list[torch.Tensor], src_ids: list[int], dst_ids: list[int],
                max_runs: int = _MAX_RUNS, before_layer: Callable[[int], None] | None = None) -> None:
    """dst[layer][:, dst_ids[i]] = src[layer][:, src_ids[i]] for every layer, on the current streams (a device copy
    on CUDA: the mapped pool is device memory); `before_layer(i)` runs before layer i's copy is issued (a streamed
    transfer waits there for the producer's layer i). On an H100 a prompt's copy is bound by kernel launches, not
    bytes (512 MiB: 32 slice copies 0.8 ms, 64 gathers and scatters 2.1 ms, 64 K/V memcpys 1.8 ms, against 0.37 ms
    for one memcpy of those bytes): one or two contiguous runs copy slice to slice, one kernel per run and layer;
    scattered blocks take a gather and a scatter per layer, whatever their number."""
    runs = _runs(src_ids, dst_ids)
    if len(runs) > max_runs:
        if src[0].element_size() == 1:  # float8: the indexing kernels may lack it, and bytes are bytes
            src, dst = [kv.view(torch.uint8) for kv in src], [kv.view(torch.uint8) for kv in dst]
        src_index = torch.tensor(src_ids, dtype=torch.int64).to(src[0].device, non_blocking=True)
        dst_index = torch.tensor(dst_ids, dtype=torch.int64).to(dst[0].device, non_blocking=True)
    for layer, (s_kv, d_kv) in enumerate(zip(src, dst)):
        if before_layer is not None:
            before_layer(layer)
        if len(runs) > max_runs:
            d_kv.index_copy_(1, dst_index, s_kv.index_select(1, src_index).to(d_kv.device, non_blocking=True))
            continue
        for s, d, n in runs:
            d_kv[:, d : d + n].copy_(s_kv[:, s : s + n], non_blocking=True)
