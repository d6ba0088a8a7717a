"""Training-core decisions that only show on GPUs or at scale, tested here on the CPU: the process group's
backends, the device table behind MFU, and what the throughput window counts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from training.distributed import process_group_backend
from training.metrics import Throughput, peak_flops_of


def test_gpu_runs_get_a_cpu_backend_beside_nccl():
    """Checkpoint verification and other small collectives use CPU tensors; a NCCL-only group fails on them."""
    assert process_group_backend(use_cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(use_cuda=False) == "gloo"


def test_a_device_backend_string_group_reduces_cpu_tensors(tmp_path):
    """The same form of backend string, here with gloo alone: a CPU all-reduce goes through."""
    dist.init_process_group("cpu:gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        flag = torch.tensor([1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        assert flag.item() == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA GeForce RTX 4090", None),  # unknown: no MFU rather than a wrong one
        ("Tesla T4", None),
    ],
)
def test_mfu_uses_the_exact_device(name, peak):
    assert peak_flops_of(name) == peak


def test_throughput_counts_training_time_only():
    meter = Throughput(flops_per_token=1e6, world_size=1, peak=1e12)
    with meter.timing():
        time.sleep(0.05)  # stands in for a step's compute: the quantity measured, not a synchronization
    meter.add(1000)
    time.sleep(0.2)  # validation or a checkpoint between steps: not counted
    report = meter.take()
    assert 1000 / 0.2 < report["tokens_per_s"] <= 1000 / 0.05 * 1.01
    assert report["mfu"] == pytest.approx(report["tokens_per_s"] * 1e6 / 1e12)
    assert meter.take()["tokens_per_s"] == 0  # a window starts empty


# ---------------------------------------------------------------- on two gloo ranks

VOCAB = 320  # a tiny model's vocabulary (the smallest tokenizer has 260 tokens)


def on_two_ranks(tmp_path, fn, *args) -> None:
    """Run fn(rank, *args) in 2 processes joined in a gloo process group (real collectives); an assertion
    that fails in either process fails the test with its traceback."""
    torch.multiprocessing.spawn(_join, args=(str(tmp_path / "rendezvous"), fn, args), nprocs=2)


def _join(rank: int, rendezvous: str, fn, args) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")  # read by init_distributed
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def tiny_job(*overrides: str):
    from jobspec import load_spec
    from tests.conftest import REPO

    return load_spec(
        str(REPO / "jobs" / "pretrain.yaml"),
        [
            "model.n_layer=2",
            "model.n_head=4",
            "model.n_kv_head=2",
            "model.d_model=32",
            "model.max_seq_len=16",
            f"model.vocab_size={VOCAB}",
            f"data.vocab_size={VOCAB}",
            "data.seq_len=16",
            "train.device=cpu",
            *overrides,
        ],
    )


def built(cfg, tie: bool = True):
    """The job's model as the trainer builds it on this rank's mesh, and the rank's Dist."""
    from model.config import GPTConfig
    from training.distributed import init_distributed
    from training.build import build_model, precision

    dist_info = init_distributed(cfg.parallel, "cpu")
    model_cfg = GPTConfig(**{**dict(cfg.model), "tie_embeddings": tie})
    return build_model(model_cfg, cfg, dist_info, precision(cfg, dist_info)[0]), dist_info


# ---------------------------------------------------------------- tensor parallel alone in bf16


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_tensor_parallel_alone_takes_bf16_from_autocast_on_gpus():
    """With tp=2 and dp=1 no FSDP is applied, so FSDP's bf16 policy would be lost: autocast carries it instead.
    (The CUDA device is only named here: deciding needs no GPU.)"""
    from training.distributed import Dist
    from training.build import precision

    cfg = tiny_job("train.dtype=bf16")
    gpu = torch.device("cuda", 0)
    tp_only = precision(cfg, Dist(0, 2, 0, gpu, None, dp_replicate=1, dp_shard=1, tp=2))
    assert tp_only[0] == torch.float32 and tp_only[1].fast_dtype == torch.bfloat16 and tp_only[1].device == "cuda"
    dp_and_tp = precision(cfg, Dist(0, 4, 0, gpu, None, dp_replicate=1, dp_shard=2, tp=2))
    assert dp_and_tp[0] == torch.bfloat16 and not isinstance(dp_and_tp[1], torch.autocast)  # FSDP's policy
    fp32 = precision(tiny_job("train.dtype=fp32"), Dist(0, 2, 0, gpu, None, dp_replicate=1, dp_shard=1, tp=2))
    assert fp32[0] == torch.float32 and not isinstance(fp32[1], torch.autocast)


def test_tp2_dp1_computes_in_bf16_over_fp32_master_weights(tmp_path):
    on_two_ranks(tmp_path, _tp2_dp1_dtypes)


def _tp2_dp1_dtypes(rank: int) -> None:
    from torch.distributed.tensor import DTensor

    from training.build import precision

    cfg = tiny_job("train.dtype=bf16", "parallel.tp=2")
    model, dist_info = built(cfg)
    assert (dist_info.tp, dist_info.dp_size) == (2, 1)
    seen = []
    for block in model.layers:
        for linear in (block.attention.wq, block.attention.wo, block.feed_forward.w2):
            linear.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    _, autocast = precision(cfg, dist_info)
    with autocast:
        model(torch.randint(0, VOCAB, (2, 16))).sum().backward()
    assert seen and set(seen) == {torch.bfloat16}  # tensor-parallel matmuls in bf16
    params = list(model.parameters())
    assert any(isinstance(p, DTensor) for p in params)  # really tensor parallel
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)


# ---------------------------------------------------------------- the vocabulary stays sharded


def test_loss_on_vocabulary_sharded_logits_equals_the_whole_logits_loss(tmp_path):
    on_two_ranks(tmp_path, _vocab_parallel_losses)


def _vocab_parallel_losses(rank: int) -> None:
    for tie in (True, False):  # the head's weight is the embedding's, or its own
        _vocab_parallel_loss(tie)


def _vocab_parallel_loss(tie: bool) -> None:
    from torch.distributed.tensor import DTensor, Shard

    from model.config import GPTConfig
    from model.gpt import GPT
    from model.parallelize import token_cross_entropy, vocab_parallel_loss

    model, _ = built(tiny_job("parallel.tp=2"), tie)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, VOCAB, (2, 16), generator=gen), torch.randint(0, VOCAB, (2, 16), generator=gen)
    y[0, :5] = -100  # SFT's prompt tokens: ignored

    with vocab_parallel_loss():
        logits = model(x)
        assert isinstance(logits, DTensor) and logits.placements == (Shard(2),)
        assert logits.to_local().shape == (2, 16, VOCAB // 2)  # half the vocabulary on each rank
        sharded = token_cross_entropy(logits, y, reduction="sum")
        sharded.backward()
    sharded_grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    model.zero_grad()
    whole_logits = model(x)  # outside the context: every rank gets them whole, as before
    assert not isinstance(whole_logits, DTensor) and whole_logits.shape == (2, 16, VOCAB)
    whole = token_cross_entropy(whole_logits, y, reduction="sum")
    whole.backward()
    assert sharded.item() == pytest.approx(whole.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded_grads[name], p.grad.full_tensor(), rtol=1e-5, atol=1e-6)

    plain = GPT(GPTConfig(**{**dict(tiny_job().model), "tie_embeddings": tie}))  # no tensor parallelism
    plain.init_weights(seed=1337)
    per_token = token_cross_entropy(plain(x), y, reduction="none", ignore_index=-100)
    assert sharded.item() == pytest.approx(per_token.sum().item(), rel=1e-5)


# ---------------------------------------------------------------- async checkpoint staging stays on the host


def test_staging_keeps_the_copy_on_the_host_whatever_the_meshs_device(tmp_path):
    """A shard of a GPU mesh is staged into host memory and stays there. (A mesh of device type cuda, made
    without a GPU: DTensor.from_local, used before, moved the staged copy onto the mesh's device, a second
    GPU copy of the state until the write ended.)"""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    from training.async_checkpoint import stage

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        gpu_mesh = DeviceMesh("cuda", [0], _init_backend=False)
        shard = torch.randn(6, 4)
        spec = DTensorSpec(gpu_mesh, (Shard(0),), TensorMeta(shard.shape, shard.stride(), shard.dtype))
        buffers = {}
        staged = stage({"w": DTensor(shard, spec, requires_grad=False)}, buffers, "model")["w"]
    finally:
        dist.destroy_process_group()
    assert staged.to_local().device.type == "cpu" and staged.device_mesh is gpu_mesh
    assert staged.placements == (Shard(0),) and staged.shape == (6, 4)
    assert staged.to_local().data_ptr() == buffers["model/w"].data_ptr() and torch.equal(buffers["model/w"], shard)


def test_async_save_of_fsdp_shards_stages_host_copies_that_load_back_equal(tmp_path):
    on_two_ranks(tmp_path, _stage_fsdp_shards, str(tmp_path / "run"))


def _stage_fsdp_shards(rank: int, run_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    from training.async_checkpoint import AsyncSaver, stage
    from training.checkpoint import _model_tensors, _optim_tensors, load_checkpoint

    def fresh():
        model, _ = built(tiny_job())  # dp_shard=2: FSDP shards every parameter
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, opt = fresh()
    model(torch.randint(0, VOCAB, (2, 16))).sum().backward()
    opt.step()
    state = {"model": _model_tensors(model), "optim": _optim_tensors(model, opt)}
    buffers = {}
    staged = stage(state, buffers)
    flat = [(staged["model"][k], v) for k, v in state["model"].items()]
    flat += [
        (staged["optim"]["state"][k][m], v)
        for k, moments in state["optim"]["state"].items()
        for m, v in moments.items()
    ]
    for copy, source in flat:
        if isinstance(source, DTensor):
            assert isinstance(copy, DTensor) and copy.device_mesh == source.device_mesh
            assert copy.placements == source.placements and copy.shape == source.shape
            assert copy.stride() == source.stride() and torch.equal(copy.to_local(), source.to_local())
            copy = copy.to_local()
        assert copy.device.type == "cpu"
        assert any(copy.data_ptr() == b.data_ptr() for b in buffers.values())  # the reused buffer, no other copy

    weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    saver = AsyncSaver()
    try:
        saver.save(Path(run_dir), 1, model, opt, {"step": 1}, 2, 0)
        saver.wait_staged()
        opt.step()  # the weights change after staging: the checkpoint keeps step 1's
        saved = saver.wait()
    finally:
        saver.close()
    other, other_opt = fresh()
    load_checkpoint(saved, other, other_opt)
    for k, v in other.state_dict().items():
        assert torch.equal(v.full_tensor(), weights[k]), k
