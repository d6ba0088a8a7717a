"""Sweep files (`kind: sweep`): each member's shape, tokens, steps and schedule derived from the plan, N as the
real GPT counts it, and bad plans refused at submit with the reason and exit 2, before anything is registered."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from jobspec.loading import SpecError
from jobspec.sweep_file import load_sweep, non_embedding_params
from model.config import GPTConfig
from tests.conftest import REPO, env_for

SWEEP = str(REPO / "jobs" / "sweep.yaml")


def orch(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def write_sweep(tmp_path, **changes) -> str:
    with open(SWEEP) as f:
        raw = yaml.safe_load(f)
    raw["job"] = str(REPO / "jobs" / "pretrain.yaml")
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_the_demo_sweep_plans_3_budgets_by_4_depths_by_its_rules():
    sweep = load_sweep(SWEEP)
    assert len(sweep.members) == 12 and sweep.parallel == 2 and sweep.fit_budgets == [1e13, 1e14]
    tokens_per_step = 8 * 256
    for m in sweep.members:
        assert (m.d_model, m.n_head) == (32 * m.n_layer, 2 * m.n_layer)  # width_per_layer 32, head_dim 16
        assert m.steps == round(m.C / (6 * m.N) / tokens_per_step) and m.D == m.steps * tokens_per_step
        assert abs(m.D - m.C / (6 * m.N)) <= tokens_per_step / 2  # C = 6ND, to within half a step
        cfg = m.cfg
        assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (m.n_layer, m.d_model, m.n_head)
        assert cfg.train.max_steps == m.steps and cfg.optim.warmup_steps == max(1, round(0.05 * m.steps))
        assert cfg.train.time_budget_min is None and cfg.train.compile is False and cfg.name == f"scaling-{m.name}"
    assert sorted({m.C for m in sweep.members}) == [5e11, 1e12, 2e12]


@pytest.mark.parametrize("depth", [1, 3])
def test_n_is_the_real_models_parameters_less_its_embeddings(depth):
    import torch

    from model.gpt import GPT

    cfg = GPTConfig(vocab_size=512, n_layer=depth, n_head=2 * depth, n_kv_head=2, d_model=32 * depth)
    with torch.device("meta"):
        model = GPT(cfg)
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" in name or "output" in name)
    assert non_embedding_params(cfg) == model.num_params() - embedding


def test_grid_plan_and_attention_flops(tmp_path):
    grid = load_sweep(
        write_sweep(tmp_path, isoflop=None, grid={"n_layer": [2, 4], "tokens": [1e5, 4e5]}, flops="6ND+attention")
    )
    assert [m.name for m in grid.members] == ["t0-L2", "t1-L2", "t0-L4", "t1-L4"]
    for m in grid.members:  # C from D, with attention's 6 x depth x seq_len x d_model a token
        assert m.C == pytest.approx((6 * m.N + 6 * m.n_layer * 256 * m.d_model) * (1e5 if m.name[1] == "0" else 4e5))


BAD = {
    "heads_do_not_divide_width": (
        {"shape": {"width_per_layer": 20, "head_dim": 16}},
        ["isoflop.n_layer", "d_model = 20 x 2 = 40", "head_dim=16"],
    ),
    "kv_heads_do_not_divide_heads": (
        {"shape": {"width_per_layer": 48, "head_dim": 16}},
        ["isoflop.n_layer", "has the value 3", "the GPT refuses", "n_kv_head"],
    ),
    "budget_too_small_for_a_step": (
        {"isoflop": {"budgets": [1e9, 1e12], "n_layer": [2, 5]}},
        ["isoflop.budgets", "budget 1e+09 FLOPs", "less than one step's 2,048"],
    ),
    "both_plans": ({"grid": {"n_layer": [2], "tokens": [1e6]}}, ["exactly one plan", "both"]),
    "no_rule": ({"shape": None}, ["key 'shape'", "width_per_layer"]),
    "fractional_depth": ({"isoflop": {"budgets": [1e12], "n_layer": [2.5]}}, ["isoflop.n_layer", "2.5"]),
    "unknown_key": ({"budgets": [1e12]}, ["unknown key 'budgets'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_sweep_is_refused_with_its_reason(tmp_path, case):
    changes, words = BAD[case]
    path = write_sweep(tmp_path, **changes)
    with pytest.raises(SpecError) as e:
        load_sweep(path)
    for word in words:
        assert word in str(e.value), str(e.value)
    assert str(e.value).startswith(path) or "member" in str(e.value)


def test_orch_submit_refuses_a_bad_sweep_with_exit_2_and_registers_nothing(tmp_path):
    path = write_sweep(tmp_path, shape={"width_per_layer": 20, "head_dim": 16})
    result = orch(tmp_path, "submit", path)
    assert result.returncode == 2, result.stderr
    assert "heads would not divide the width" in result.stderr and path in result.stderr
    assert not (tmp_path / ".orch").exists() or not any((tmp_path / ".orch").rglob("*.pid"))
    assert not (tmp_path / "runs").exists()


def test_orch_config_prints_the_members(tmp_path):
    result = orch(tmp_path, "config", SWEEP)
    assert result.returncode == 0, result.stderr
    assert "12 members" in result.stdout and "b2-L5" in result.stdout and "name: scaling-b0-L2" in result.stdout
