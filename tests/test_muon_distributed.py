"""Muon's orthogonalization shared out over the ranks (training/muon_shards.py): over 2 and 4 gloo processes,
FSDP2-sharded (and HSDP on a 2 x 2 mesh), the optimizer makes the single process's updates. The matrices' rows
split unevenly on purpose, down to a rank with no rows of a matrix.

The processes are started by torchrun, as a user's job is; this file is also their program.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(48, 32), (32, 48), (7, 9), (5, 40), (64, 16), (16, 64), (3, 3)]  # (rows, cols) of layers.* matrices
STEPS = 3


class Matrices(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(cols, rows, bias=False) for rows, cols in SHAPES)  # Muon's
        self.embed = nn.Parameter(torch.randn(11, 8))  # AdamW's


def train(mesh_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps on fixed gradients; the full parameters afterwards."""
    from jobspec.schema import OptimConfig
    from training.optim import build_optimizer

    torch.manual_seed(0)
    model = Matrices()
    mesh = None
    if mesh_shape != (1,):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        names = ("dp_shard",) if len(mesh_shape) == 1 else ("dp_replicate", "dp_shard")
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    cfg = OptimConfig(name="muon", muon_weight_decay=0.1)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            full = torch.randn(p.shape, generator=g)
            p.grad = (
                full if mesh is None else torch.distributed.tensor.distribute_tensor(full, p.device_mesh, p.placements)
            )
        optimizer.step()
    return {n: p.full_tensor() if mesh is not None else p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)], ids=["fsdp2", "fsdp4", "hsdp2x2"])
def test_sharded_muon_makes_the_single_process_updates(tmp_path, mesh_shape):
    nproc = 1
    for n in mesh_shape:
        nproc *= n
    out = tmp_path / "params.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [*cmd, str(out), *map(str, mesh_shape)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sharded, single = torch.load(out), train((1,))
    # each rank orthogonalized its share of the matrices only (matrix i on shard rank i % n), not all of them
    n = mesh_shape[-1]
    share = [sum(i % n == rank % n for i in range(len(SHAPES))) * STEPS for rank in range(nproc)]
    assert sharded.pop("newton_schulz_calls") == share
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=1e-6, msg=name)
    torch.manual_seed(0)
    assert all(not torch.equal(single[n], p) for n, p in Matrices().state_dict().items())  # the steps moved them


if __name__ == "__main__":  # one rank of the test above, under torchrun
    import torch.distributed as dist

    import training.optim

    dist.init_process_group("gloo")
    calls = []
    newton_schulz = training.optim._zeropower_via_newtonschulz
    training.optim._zeropower_via_newtonschulz = lambda *a, **k: calls.append(1) or newton_schulz(*a, **k)
    params = train(tuple(int(n) for n in sys.argv[2:]))
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, len(calls))
    params["newton_schulz_calls"] = counts
    if dist.get_rank() == 0:
        torch.save(params, sys.argv[1])
    dist.destroy_process_group()
