"""DCP's Hugging Face storage reader, reading whole tensors straight into their destination.

torch's reader opens each file with `safetensors.safe_open`, which memory-maps it, and copies every
tensor out of the mapping: the first touch of each page of a freshly written checkpoint is a page
fault, which makes a cold 1 GB load about three times slower than reading the bytes
(bench/checkpoint_io.py). Here a stored tensor that lands whole in a contiguous CPU destination
(every tensor, when a run resumes on the mesh it was saved on) is read with `readinto` directly into
the destination's memory. Anything else (a slice of a stored shard when resharding, a GPU or
strided destination) is left to torch's code.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.futures import Future

from training.safetensors_writer import DTYPES

READ_THREADS = 4  # a rank's files (it writes 4: training.checkpoint.WRITE_FILES) are read at once


def read_header(f) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data begins."""
    length = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _read_exactly(f, view: memoryview, path) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise EOFError(f"{path} ends {len(view) - done} bytes early")
        done += n


class StreamingHFStorageReader(HuggingFaceStorageReader):
    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        with ThreadPoolExecutor(max(1, min(READ_THREADS, len(per_file)))) as pool:  # readinto releases the GIL
            leftovers = list(pool.map(lambda path: self._read_whole_tensors(path, per_file[path], planner), per_file))
        for path, rest in zip(per_file, leftovers):
            if rest:
                with safe_open(filename=path, framework="pt") as f:
                    for item in rest:
                        self._process_read_request(f, item, planner)
        done: Future = Future()
        done.set_result(None)
        return done

    def _read_whole_tensors(self, path: str, items: list, planner) -> list:
        """Read the items this fast path can take; return the others."""
        rest = []
        with open(path, "rb", buffering=0) as f:
            header, data_start = read_header(f)
            for item in items:
                entry = header[item.storage_index.fqn]
                target = planner.resolve_tensor(item).detach()
                whole = not any(item.storage_offsets) and list(item.lengths) == entry["shape"]
                if not (
                    whole
                    and target.device.type == "cpu"
                    and target.is_contiguous()
                    and DTYPES.get(target.dtype) == entry["dtype"]
                ):
                    rest.append(item)
                    continue
                begin, end = entry["data_offsets"]
                if end > begin:
                    f.seek(data_start + begin)
                    _read_exactly(f, memoryview(target.reshape(-1).view(torch.uint8).numpy()), Path(path))
                planner.commit_tensor(item, target)
        return rest
