"""What every benchmark shares: the device name, versions, and writing bench/results/<name>-<device>-<date>.json."""

from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"cpu{torch.get_num_threads()}"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("streaming", "safetensors", "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a benchmark that doesn't use it still records the rest
            pass
    return out


def write_result(name: str, config: dict, figures: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = RESULTS / f"{name}-{device_slug()}-{date}.json"
    record = {
        "name": name,
        "device": device_name(),
        "date": date,
        "versions": versions(),
        "config": config,
        "figures": figures,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def newest_result(name: str) -> dict | None:
    """The result with the latest date in its file name (<name>-<device>-<YYYY-MM-DD>.json): file times are
    those of the checkout, the same for every file in a fresh clone."""
    dated = re.compile(rf"{re.escape(name)}-[a-z0-9-]+-\d{{4}}-\d{{2}}-\d{{2}}\.json")
    files = sorted(
        (p for p in RESULTS.glob(f"{name}-*.json") if dated.fullmatch(p.name)), key=lambda p: (p.stem[-10:], p.name)
    )
    return json.loads(files[-1].read_text()) if files else None


def write_between_markers(doc: Path, name: str, text: str) -> None:
    """Replace what stands between `<!-- name -->` and `<!-- /name -->` in a doc (a table a benchmark owns)."""
    head, rest = doc.read_text().split(f"<!-- {name} -->", 1)
    _, tail = rest.split(f"<!-- /{name} -->", 1)
    doc.write_text(f"{head}<!-- {name} -->\n{text}\n<!-- /{name} -->{tail}")
