"""`orch plan`: a job's real step (mesh, FSDP2, TP, optimizer) in a fake world of its size, on the CPU; named sizes;
`orch submit --check-fit`. Small shapes here; the table of named sizes is `python -m bench.plan_table`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jobspec import SpecError, load_spec
from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "pretrain.yaml")
# the demo's shape, wider, with a vocabulary of its own: sharded state large enough to count exactly
SMALL = [
    "model.n_layer=2",
    "model.d_model=512",
    "model.n_head=8",
    "model.n_kv_head=8",
    "model.vocab_size=8192",
    "data.seq_len=128",
    "train.micro_batch_size=2",
    "train.compile=false",
    "optim.name=adamw",
]


def orch(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_a_named_size_fills_the_model_and_written_keys_win(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("kind: pretrain\nmodel:\n  size: 1.3b\n  n_layer: 2\ndata:\n  seq_len: 2048\n")
    cfg = load_spec(str(job), ["model.n_head=16"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model, cfg.model.vocab_size) == (2, 16, 2048, 50304)
    assert load_spec(str(job), ["model.size=8b"]).model.n_kv_head == 8
    with pytest.raises(SpecError, match=r"override 'model.size=13b'.*'model.size' has the value '13b'.*'1.3b'"):
        load_spec(str(job), ["model.size=13b"])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["parallel.tp=3", "--world", "6"], "must divide the model's 4 attention heads"),
        (["parallel.tp=4", "--nodes", "2", "--gpus-per-node", "2"], "must divide resources.nproc_per_node = 2"),
        (["parallel.dp_replicate=3", "--world", "8"], "does not divide the job's resources.nodes x"),
    ],
)
def test_a_wrong_mesh_fails_with_the_words_of_submit(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / ".orch"))
    overrides = [a for a in argv if "=" in a]
    code, _, err = orch(capsys, "plan", DEMO, *argv)
    assert code == 2 and words in err
    # what --world N / --nodes N --gpus-per-node G mean: the job's resources
    layout = {
        "6": ["resources.nodes=1", "resources.nproc_per_node=6"],
        "8": ["resources.nodes=1", "resources.nproc_per_node=8"],
    }.get(argv[-1], ["resources.nodes=2", "resources.nproc_per_node=2"])
    code, _, submit_err = orch(capsys, "submit", DEMO, *overrides, *layout)
    assert code == 2 and submit_err == err


def test_fsdp_over_8_counts_the_sharded_state_and_the_collectives(capsys):
    code, out, _ = orch(capsys, "plan", DEMO, *SMALL, "--world", "8", "--json")
    plan = json.loads(out)
    n = plan["job"]["params"]
    mem = plan["memory_gib"]["state"]
    # fp32 master weights and gradients, AdamW's two moments: split 8 ways (FSDP2 pads each to a multiple of 8 rows)
    assert mem["parameters"] * 2**30 == pytest.approx(4 * n / 8, rel=0.02)
    assert mem["gradients"] * 2**30 == pytest.approx(4 * n / 8, rel=0.02)
    assert mem["optimizer state"] * 2**30 == pytest.approx(8 * n / 8, rel=0.02)
    assert plan["tracker"] == "FSDPMemTracker" and plan["fits"] and code == 0
    byrole = {(c["role"], c["op"]): c for c in plan["collectives"]}
    # bf16 parameters gathered in forward and again in backward (less the last block, kept), fp32 gradients reduced
    assert byrole[("FSDP", "reduce-scatter")]["bytes"] == pytest.approx(4 * n, rel=0.02)
    assert 2 * n < byrole[("FSDP", "all-gather")]["bytes"] <= 2 * 2 * n * 1.02
    assert plan["flops"]["measured_per_gpu"] == pytest.approx(plan["flops"]["model_per_gpu"], rel=0.05)


def test_hsdp_over_2_nodes_with_tp_and_muon(capsys):
    code, out, _ = orch(
        capsys,
        "plan",
        DEMO,
        *SMALL,
        "optim.name=muon",
        "parallel.dp_replicate=2",
        "parallel.tp=2",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--json",
    )
    plan = json.loads(out)
    assert plan["layout"] == {"world": 8, "gpus_per_node": 4, "nodes": 2, "dp_replicate": 2, "dp_shard": 2, "tp": 2}
    groups = {(c["role"], c["op"], c["group"]): c["intra_node"] for c in plan["collectives"]}
    assert groups[("HSDP", "all-reduce", "dp_replicate")] is False  # across the two nodes
    assert groups[("FSDP", "reduce-scatter", "dp_shard")] is True
    assert groups[("TP", "all-gather", "tp")] is True
    assert ("Muon's gathers", "all-gather", "dp_shard") in groups
    assert code == 0


def test_a_job_that_does_not_fit_is_refused_before_it_queues_with_its_levers(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / ".orch"))
    tight = [
        *SMALL,
        "train.micro_batch_size=16",
        "data.seq_len=256",
        "resources.gpu_mem_gib=2.3",
        f"runs_dir={tmp_path / 'runs'}",
        "resources.nproc_per_node=2",
        "executor=local",  # the job file says auto, which would ask this machine's Slurm
    ]
    code, _out, err = orch(capsys, "submit", DEMO, *tight, "--check-fit")
    assert code == 2
    assert "resources.nodes=1 x resources.nproc_per_node=2" in err and "more than the 2.3 GiB" in err
    # the levers in order, each planned and named with its peak: checkpointing fits
    assert "activation checkpointing (train.activation_checkpointing=true): peak 2.2" in err
    assert not (tmp_path / "runs").exists()
    from orchestrator.registry import Registry

    assert Registry().list() == []


GPU_JOBS = sorted((REPO / "jobs" / "gpu").glob("*.yaml"))


def test_the_gpu_job_files_load_with_their_layout():
    layouts = {}
    for path in GPU_JOBS:
        cfg = load_spec(str(path), launch=True)
        layouts[path.stem] = (cfg.resources.nodes, cfg.resources.nproc_per_node, cfg.parallel.dp_replicate)
    assert layouts == {"pretrain-125m": (1, 8, 1), "pretrain-1.3b": (1, 8, 1), "pretrain-7b-2x8": (2, 8, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("path", GPU_JOBS, ids=lambda p: p.stem)
def test_the_gpu_job_files_fit_their_stated_hardware(path):
    """A few minutes on 2 cores: each job's full step at its own world size (16 GPUs for the 7B)."""
    from training.tools.plan import plan_for

    plan = plan_for(load_spec(str(path), launch=True))
    assert plan.fits and plan.layout.world == load_spec(str(path)).resources.nodes * 8, plan.headroom_bytes


def test_muon_work_per_rank_falls_as_one_over_the_shard_ranks(capsys):
    """Muon's Newton-Schulz shared out (training/muon_shards.py): each of N ranks orthogonalizes ceil(matrices / N)
    of them and moves its shards of them in bf16, where each used to gather and orthogonalize them all."""
    plans = {}
    for world in (1, 2, 8):
        code, out, _ = orch(capsys, "plan", DEMO, *SMALL, "optim.name=muon", "--world", str(world), "--json")
        assert code == 0
        plans[world] = json.loads(out)
    work = {w: p["flops"]["optimizer_per_gpu"] for w, p in plans.items()}
    muon_bytes = {
        w: sum(c["bytes"] for c in p["collectives"] if c["role"] == "Muon's gathers") for w, p in plans.items()
    }
    matrices = 2 * 7  # two blocks of q, k, v, o and the MLP's three
    assert work[1] > 0 and muon_bytes[1] == 0
    assert work[2] == pytest.approx(work[1] / 2, rel=0.01)  # 7 matrices each, alike in size
    assert work[8] <= work[1] * math.ceil(matrices / 8) / matrices  # rank 0's 2 of the 14
    assert muon_bytes[8] < muon_bytes[2] / 3


def test_accumulation_under_fsdp_holds_sharded_gradients_only(capsys):
    """FSDP2 reduce-scatters every micro-batch's gradients (training/trainer.py): between micro-batches each rank
    holds its shard of the gradients, never the whole model's in fp32 (4 bytes a parameter, 27 GB at 7B)."""
    plans = {}
    for accum in (1, 2):
        code, out, _ = orch(capsys, "plan", DEMO, *SMALL, f"train.grad_accum_steps={accum}", "--world", "8", "--json")
        assert code == 0
        plans[accum] = json.loads(out)
    n = plans[1]["job"]["params"]
    extra = (plans[2]["memory_gib"]["tensors_peak"] - plans[1]["memory_gib"]["tensors_peak"]) * 2**30
    assert extra <= 4 * n / 8 * 1.05  # at most the sharded fp32 gradients, not 4 * n
    scattered = {a: sum(c["bytes"] for c in p["collectives"] if c["op"] == "reduce-scatter") for a, p in plans.items()}
    assert scattered[2] == pytest.approx(2 * scattered[1], rel=0.01)


def test_several_nodes_default_to_hsdp_with_embeddings_and_head_as_their_own_units(capsys):
    """dp_shard -1 on 2 nodes: shard within a node, replicate across (training/distributed.py); the embeddings and
    the head are FSDP units of their own (model/parallelize.py), here on a 2 x 2 mesh; with accumulation, the
    all-reduce across nodes runs once a step."""
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Replicate, Shard

    from model.gpt import GPT
    from model.parallelize import parallelize
    from training.distributed import resolve_mesh_shape
    from training.plan.measure import model_config
    from training.plan.world import fake_world

    assert resolve_mesh_shape(16, 1, -1, 1, gpus_per_node=8) == (2, 8, 1)
    assert resolve_mesh_shape(16, 1, -1, 2, gpus_per_node=8) == (2, 4, 2)
    assert resolve_mesh_shape(16, 1, 16, 1, gpus_per_node=8) == (1, 16, 1)  # asked for: one group over both
    assert resolve_mesh_shape(8, 1, -1, 1, gpus_per_node=8) == (1, 8, 1)
    untied, accum = ["model.tie_embeddings=false", "train.grad_accum_steps=3"]
    code, out, _ = orch(capsys, "plan", DEMO, *SMALL, untied, accum, "--nodes", "2", "--gpus-per-node", "4", "--json")
    assert code == 0
    units = 2 + 2 + 1  # two blocks, the embeddings, the head, the root
    hsdp = [c for c in json.loads(out)["collectives"] if c["role"] == "HSDP"]
    assert [(c["op"], c["calls"]) for c in hsdp] == [("all-reduce", units)]  # once a step, not once a micro-batch
    assert json.loads(out)["layout"] == {
        "world": 8, "gpus_per_node": 4, "nodes": 2, "dp_replicate": 2, "dp_shard": 4, "tp": 1
    }  # fmt: skip
    cfg = load_spec(DEMO, [*SMALL, untied])
    with fake_world(4, cfg.parallel, gpus_per_node=2) as dist_info:
        with torch.device("meta"):
            model = parallelize(GPT(model_config(cfg)), dist_info.mesh, param_dtype=torch.bfloat16)
        for unit in (model.tok_embeddings, model.output, model.layers[0], model):
            assert isinstance(unit, FSDPModule), unit
        for p in (model.tok_embeddings.weight, model.norm.weight, model.output.weight):
            assert p.placements == (Replicate(), Shard(0)) and p.device_mesh.shape == (2, 2)
