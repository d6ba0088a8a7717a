"""Training tokens/s of this trainer against an earlier commit's, on the same machine in one invocation.

    python -m bench.trainer_speed                        # against 43dca9c (the recipe before Muon), the demo config
    python -m bench.trainer_speed --steps 20 --rounds 4

Four trainers are kept warm side by side (bench/speed_worker.py), each in its own process and source
tree, and take turns running the same number of optimizer steps, so a change in background load hits
them alike:
  baseline             the old commit's trainer and its jobs/pretrain.yaml (checked out with git archive);
  todays_recipe_eager  this trainer on the old recipe (pinned in bench/recipe.py), torch.compile off:
                       what the run-time fixes alone buy (training/cpu_setup.py, the chunked loss, fused AdamW);
  todays_recipe        the same with this job file's train.compile: what compiling adds;
  new_defaults         this trainer and this jobs/pretrain.yaml: what the demo gets, the new recipe's own
                       cost (Muon's orthogonalization, a larger vocabulary) included.
The figure per trainer is its best round (least disturbed by other processes); user and system CPU time
and page faults per step come from getrusage. Start-up (build, data, compile, the first steps) is
reported apart. Last, each trainer's step is profiled (torch.profiler): where the time goes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.common import write_result
from bench.recipe import BASELINE
from jobspec import load_spec

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "speed_worker.py"
RUNNER = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')"
# The keys of today's recipe that only change speed, not what is learned: taken from this job file.
SPEED_KEYS = ("train.compile",)


def checkout(ref: str) -> Path:
    """The tree of commit `ref` in a temporary folder (git archive: no worktree to clean up)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"orch-baseline-{sha}"
    if not (tree / "training").is_dir():
        archive = subprocess.run(["git", "archive", "--format=tar", sha], cwd=REPO, capture_output=True, check=True)
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tree, filter="data")
    return tree


class Worker:
    def __init__(self, name: str, tree: Path, overrides: list[str]):
        self.name, self.rounds = name, []
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(WORKER), *overrides], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.startup_s = float(self._reply("ready")[0])

    def _reply(self, word: str) -> list[str]:
        for line in self.proc.stdout:
            if line.startswith(word + " "):
                return line.split()[1:]
        raise SystemExit(f"[trainer_speed] the {self.name} trainer exited (code {self.proc.wait()})")

    def run(self, steps: int) -> None:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        seconds, tokens, user, system, faults = map(float, self._reply("done"))
        self.rounds.append({"seconds": seconds, "tokens": tokens, "user_s": user, "system_s": system,
                            "page_faults": faults})

    def profile(self, steps: int) -> dict:
        self.proc.stdin.write(f"profile {steps}\n")
        self.proc.stdin.flush()
        return json.loads(" ".join(self._reply("profile")))

    def figures(self, steps: int) -> dict:
        best = min(self.rounds, key=lambda r: r["seconds"])
        return {"tokens_per_s": round(best["tokens"] / best["seconds"]), "startup_s": round(self.startup_s, 1),
                "user_ms_per_step": round(1000 * best["user_s"] / steps), "system_ms_per_step":
                round(1000 * best["system_s"] / steps), "page_faults_per_step": round(best["page_faults"] / steps),
                "rounds_tokens_per_s": [round(r["tokens"] / r["seconds"]) for r in self.rounds]}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _job_value(key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(load_spec(str(REPO / "jobs" / "pretrain.yaml")), key)


def speed_settings() -> list[str]:
    return [f"{k}={_job_value(k)}" for k in SPEED_KEYS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-ref", default="43dca9c")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="job overrides for all three, e.g. train.dtype=fp32")
    args = ap.parse_args()
    old = checkout(args.baseline_ref)
    # The old recipe's data, prepared once for both trees (the format is unchanged); the job file's own.
    data = [f"data.dir={REPO / 'data' / 'recipe' / 'v4096-s256'}"]
    new_data = [f"data.dir={REPO / _job_value('data.dir')}"]
    specs = {"baseline": (old, [*data, *args.overrides]),
             "todays_recipe_eager": (REPO, [*BASELINE, "train.compile=false", *data, *args.overrides]),
             "todays_recipe": (REPO, [*BASELINE, *speed_settings(), *data, *args.overrides]),
             "new_defaults": (REPO, [*new_data, *args.overrides])}
    workers = []
    for name, (tree, overrides) in specs.items():  # one at a time: start-ups (compiles) don't overlap
        workers.append(Worker(name, tree, overrides))
        print(f"[trainer_speed] {name}: ready after {workers[-1].startup_s:.1f} s", flush=True)
    for r in range(args.rounds):
        for w in (workers if r % 2 == 0 else workers[::-1]):
            w.run(args.steps)
            print(f"[trainer_speed] round {r + 1} {w.name}: "
                  f"{w.rounds[-1]['tokens'] / w.rounds[-1]['seconds']:,.0f} tokens/s", flush=True)
    profiles = {w.name: w.profile(args.profile_steps) for w in workers}
    for w in workers:
        w.close()
    figures = {w.name: {**w.figures(args.steps), "profile": profiles[w.name]} for w in workers}
    base = figures["baseline"]["tokens_per_s"]
    for name in ("todays_recipe_eager", "todays_recipe", "new_defaults"):
        figures[f"{name}_ratio"] = round(figures[name]["tokens_per_s"] / base, 3)
    for name, f in figures.items():
        print(f"{name:14s} {f}" if isinstance(f, dict) else f"{name:14s} {f:.3f}")
    print("wrote", write_result("trainer_speed", {"baseline_ref": args.baseline_ref, "steps": args.steps,
                                                   "rounds": args.rounds, "overrides": args.overrides,
                                                   "speed_settings": speed_settings()}, figures))


if __name__ == "__main__":
    main()
