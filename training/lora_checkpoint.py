"""A LoRA run's checkpoints hold only what it trains (the adapters, and any lora.modules_to_save);
the base weights are the checkpoint the run started from, named in its trainer_state.json:

    "lora_base": {"checkpoint": "/abs/runs/sft/checkpoints/step_00000150", "xxh64": "<its manifest's hash>",
                  "rank": 16, "alpha": 32.0, "use_rslora": false, "use_dora": false}

A resume loads that very checkpoint (not whatever is newest in its run by then) after checking that its
manifest still hashes the same: a base that changed or vanished stops the run with a sentence saying so.
Whoever reads a LoRA checkpoint's full model (eval, export, a later stage starting from it) gets the
base with the adapters merged in (`with_base`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import xxhash

from training import checkpoint as ckpt

BASE_KEY = "lora_base"


def _is_hf(folder: Path) -> bool:
    # training/run_folder.is_hf_folder's test, not imported: run_folder reads LoRA checkpoints through this module
    return (Path(folder) / "config.json").is_file()


def _digest(folder: Path) -> str:
    """Our checkpoint: its manifest's xxh64 (the manifest hashes every file). A Hugging Face folder:
    the xxh64 of its config and weight files' own hashes."""
    if _is_hf(folder):
        names = ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]
        return xxhash.xxh64("".join(ckpt._file_hashes([folder / n for n in names])).encode()).hexdigest()
    return ckpt._file_hash(folder / ckpt.MANIFEST)


def source_checkpoint(init_from: str | Path) -> Path:
    """The folder checkpoint.init_from's weights come from: a Hugging Face folder, a checkpoint folder,
    or a run folder's newest valid checkpoint."""
    src = Path(init_from)
    if _is_hf(src) or not (src / "checkpoints").is_dir():
        return src.resolve()
    found = ckpt.find_resumable(src)
    if found is None:
        raise ckpt.CheckpointError(f"checkpoint.init_from={str(init_from)!r} has no valid checkpoint")
    return found.resolve()


def base_record(
    init_from: str | Path, rank: int, alpha: float, use_rslora: bool = False, use_dora: bool = False
) -> dict:
    folder = source_checkpoint(init_from)
    return {
        "checkpoint": str(folder),
        "xxh64": _digest(folder),
        "rank": rank,
        "alpha": alpha,
        "use_rslora": bool(use_rslora),
        "use_dora": bool(use_dora),
    }


def verify_base(record: dict, where: Path) -> Path:
    """The base checkpoint of a LoRA checkpoint at `where`, checked to be the one its adapters were trained on."""
    base = Path(record["checkpoint"])
    if not base.exists():
        raise ckpt.CheckpointError(
            f"{where} holds LoRA adapters trained on the base checkpoint {base}, which no "
            "longer exists: restore it (the adapters are useless without it)"
        )
    digest = _digest(base)
    if digest != record["xxh64"]:
        raise ckpt.CheckpointError(
            f"{where} holds LoRA adapters trained on the base checkpoint {base}, but that "
            f"checkpoint changed since (manifest hash {digest}, recorded {record['xxh64']}): "
            "restore the original base, or start a new run from the new one"
        )
    return base


def base_to_resume(path: Path, lora_enabled: bool) -> Optional[dict]:
    """The verified base record of the checkpoint a run resumes from (None for a whole-model checkpoint);
    a CheckpointError when the checkpoint and the job disagree about LoRA."""
    record = base_of(path)
    if record is not None and not lora_enabled:
        raise ckpt.CheckpointError(
            f"{path} holds LoRA adapters: this run folder trained with lora.enabled; "
            "resume it with lora.enabled=true (and the same lora: section)"
        )
    if record is None and lora_enabled:
        raise ckpt.CheckpointError(
            f"{path} holds a whole model, not LoRA adapters: this run folder was "
            "trained without lora.enabled; resume it without LoRA or start a new run"
        )
    if record is not None:
        verify_base(record, path)
    return record


def base_of(ckpt_dir: str | Path) -> Optional[dict]:
    """The lora_base record of a checkpoint folder, or None for a checkpoint of the whole model."""
    state = Path(ckpt_dir) / "trainer_state.json"
    if not state.is_file():
        return None
    return json.loads(state.read_text()).get(BASE_KEY)


def with_base(ckpt_dir: str | Path, state: dict, read_checkpoint) -> dict:
    """A checkpoint's full model tensors: `state` as read from it, or for a LoRA checkpoint, its base's
    tensors (read_checkpoint(base folder), which merges further bases) with each adapter merged
    (W + B @ A * alpha / rank) and modules_to_save replaced."""
    record = base_of(ckpt_dir)
    if record is None:
        return state
    from model.lora import lora_scaling, merged_weight
    from training.hf_import import load_hf_state_dict

    base_dir = verify_base(record, Path(ckpt_dir))
    full = load_hf_state_dict(base_dir)[1] if _is_hf(base_dir) else read_checkpoint(base_dir)
    scaling = lora_scaling(record["rank"], record["alpha"], record.get("use_rslora", False))
    for key, value in state.items():
        if ".lora_A." in key:
            weight_key = key.replace(".lora_A.weight", ".weight")
            lora_b = state[key.replace(".lora_A.", ".lora_B.")]
            magnitude = state.get(key.replace(".lora_A.weight", ".lora_magnitude"))  # DoRA's
            full[weight_key] = merged_weight(full[weight_key], value, lora_b, scaling, magnitude)
        elif ".lora_B." not in key and not key.endswith(".lora_magnitude"):
            full[key] = value  # a module_to_save (or a head the base lacks)
    return full
