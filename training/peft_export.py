"""`orch export RUN --hf OUT` of a LoRA run: the base model in the Llama layout in OUT, and the adapter in
PEFT's format in OUT/adapter, so that

    base = LlamaForCausalLM.from_pretrained(OUT)
    model = peft.PeftModel.from_pretrained(base, OUT + "/adapter")

gives our logits. PEFT's format: adapter_config.json (peft_type LORA, r, lora_alpha, the wrapped modules by
their Llama names) and adapter_model.safetensors whose keys are the Llama names under PEFT's prefix:
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` for our `layers.0.attention.wq.lora_A.weight`.
With --merge (or for a run without LoRA) the export is one plain Llama folder (training/hf_export.py's export_hf,
which reads a LoRA checkpoint as its base with the adapters merged).
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_DIR = "adapter"
PEFT_PREFIX = "base_model.model."


def export(source: str | Path, out_dir: str | Path, merge: bool = False) -> tuple[Path, str]:
    """(out_dir, what was written)."""
    from training.hf_export import export_hf
    from training.lora_checkpoint import base_of, verify_base
    from training.run_folder import resolve_checkpoint, run_config, tokenizer_file

    run_dir, ckpt_dir = resolve_checkpoint(source)
    record = base_of(ckpt_dir)
    if record is None or merge:
        kind = run_config(run_dir).get("kind") or ""
        what = "LoRA adapters merged into the base" if record else "Hugging Face Llama layout"
        return export_hf(ckpt_dir, out_dir), what + (", sequence classification" if kind == "classify" else "")
    if run_config(run_dir).get("kind") == "classify":
        raise ValueError(
            f"{source} is a LoRA classify run: export it with --merge (a LlamaForSequenceClassification "
            "folder); the PEFT adapter form is written for causal language models"
        )
    base = verify_base(record, ckpt_dir)
    out = export_hf(base, out_dir, tokenizer=tokenizer_file(run_dir))
    write_adapter(ckpt_dir, record, out / ADAPTER_DIR)
    return out, f"base model in the Llama layout, PEFT LoRA adapter in {out / ADAPTER_DIR}"


def peft_name(ours: str) -> str:
    """layers.0.attention.wq.lora_A.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    (DoRA's layers.0.attention.wq.lora_magnitude -> ...q_proj.lora_magnitude_vector)"""
    from model.state_dict_adapter import to_hf_name

    if ours.endswith(".lora_magnitude"):
        module = to_hf_name(ours[: -len(".lora_magnitude")] + ".weight")[: -len(".weight")]
        return f"{PEFT_PREFIX}{module}.lora_magnitude_vector"
    for part in (".lora_A.", ".lora_B."):
        if part in ours:
            module = to_hf_name(ours.replace(part, "."))[: -len(".weight")]
            return f"{PEFT_PREFIX}{module}{part}weight"
    return PEFT_PREFIX + to_hf_name(ours)  # a module_to_save: its full weight


def write_adapter(ckpt_dir: Path, record: dict, out: Path) -> Path:
    from safetensors.torch import save_file

    from training.run_folder import read_checkpoint_model

    state = read_checkpoint_model(ckpt_dir, merge_lora=False)
    magnitudes = [k for k in state if k.endswith(".lora_magnitude")]
    if magnitudes:  # PEFT's DoRA magnitude is absolute: ours is a factor of the base's row norms
        base = _base_tensors(Path(record["checkpoint"]))
        for key in magnitudes:
            rows = base[key[: -len(".lora_magnitude")] + ".weight"].float().norm(dim=1)
            state[key] = state[key].float() * rows
    tensors = {peft_name(k): v.float().contiguous() for k, v in state.items()}
    targets = sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
    saved = sorted({k[len(PEFT_PREFIX) :].rsplit(".", 1)[0] for k in tensors if ".lora_" not in k})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "..",
        "r": record["rank"],
        "lora_alpha": record["alpha"],
        "lora_dropout": 0.0,
        "target_modules": targets,  # full module names: exactly the wrapped projections
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": bool(record.get("use_rslora", False)),
        "use_dora": bool(record.get("use_dora", False)),
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _base_tensors(base: Path) -> dict:
    """The full tensors of a LoRA run's base, by our names (a Hugging Face folder or our checkpoint)."""
    from training.hf_import import load_hf_state_dict
    from training.run_folder import read_checkpoint_model

    return load_hf_state_dict(base)[1] if (base / "config.json").is_file() else read_checkpoint_model(base)
