"""DCP's Hugging Face storage writer, writing each safetensors file straight from tensor memory.

torch's writer builds every file in memory first (`safetensors.torch.save` returns the whole file as
bytes), which copies the checkpoint twice more before a byte reaches the disk. This writer writes the
same files, the same header and the same DCP metadata (so `HuggingFaceStorageReader` reads and reshards
them as before), but streams each tensor's bytes from where they lie. The files are ordinary
safetensors files: `safetensors.safe_open` reads them too.

Only the writing of the files is replaced; planning, the file names and `finish` stay torch's.
"""

from __future__ import annotations

import json
import os
import queue
import threading

import torch
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint._hf_utils import (
    CUSTOM_METADATA_KEY,
    DCP_VERSION_KEY,
    FORMAT_KEY,
    FORMAT_VALUE,
    HF_DCP_VERSION,
    _gen_file_name,
)
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from jobspec.faults import fault

DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file: 8-byte header length, JSON header (padded to 8 bytes), then the raw data."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        fault("checkpoint.shard_write")  # mid-file: a kill leaves half a shard, enospc a full disk
        for t in tensors.values():
            if t.numel():
                # A byte view of the tensor's own memory: no copy for a contiguous CPU tensor.
                f.write(memoryview(t.detach().contiguous().view(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


class StreamingHFStorageWriter(HuggingFaceStorageWriter):
    def write_data(self, plan, planner) -> Future:
        """As HuggingFaceStorageWriter.write_data (which calls FileSystemWriter's writer directly)."""
        storage_plan = plan.storage_data.get("fqn_to_index_mapping")
        shard_index = plan.storage_data.get("shard_index")
        highest_index = max(storage_plan.values()) if storage_plan is not None else 1
        file_queue: queue.Queue = queue.Queue()
        for file_index, items in self._split_by_storage_plan(storage_plan, plan.items).items():
            file_name = _gen_file_name(file_index, highest_index, shard_index)
            file_queue.put((self.fs.concat_path(self.path, file_name), file_name, items))
        return self._write_files(planner, file_queue)

    def _write_files(self, planner, file_queue: queue.Queue) -> Future:
        results: list[WriteResult] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker():
            try:
                while True:
                    try:
                        path, file_name, items = file_queue.get_nowait()
                    except queue.Empty:
                        return
                    tensors, sharding, written = {}, {}, []
                    for item in items:
                        if item.type == WriteItemType.BYTE_IO:
                            raise TypeError(
                                f"{item.index.fqn}: a non-tensor entry; a safetensors checkpoint holds tensors only"
                            )
                        tensor = planner.resolve_data(item).to("cpu")
                        fqn = item.index.fqn
                        tensors[fqn] = tensor
                        sharding[fqn] = {"saved_offsets": item.tensor_data.chunk.offsets}
                        size = tensor.numel() * tensor.element_size()
                        written.append(
                            WriteResult(
                                index=item.index, size_in_bytes=size, storage_data=_StorageInfo(file_name, 0, size)
                            )
                        )
                    write_safetensors(
                        path,
                        tensors,
                        {
                            CUSTOM_METADATA_KEY: json.dumps(sharding),
                            DCP_VERSION_KEY: str(HF_DCP_VERSION),
                            FORMAT_KEY: FORMAT_VALUE,
                        },
                    )
                    with lock:
                        results.extend(written)
            except BaseException as e:  # raised in the caller's thread below
                with lock:
                    errors.append(e)

        threads = [threading.Thread(target=worker, name=f"orch-safetensors-{i}") for i in range(1, self.thread_count)]
        for t in threads:
            t.start()
        worker()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        future: Future = Future()
        future.set_result(results)
        return future
