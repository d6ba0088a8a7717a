"""The sandbox of model-written code (training/evaluate/sandbox.py), with real programs run in it on this machine:
what it may write, see and read, how much of its output we hold, and when a test counts as passed. Each check
of the 'namespaces' level is skipped where this machine gives only 'limits' (see docs/eval.md)."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, env_for

from training.evaluate.sandbox import Limits, isolation, run_untrusted


@pytest.fixture
def namespaces():
    if isolation() != "namespaces":
        pytest.skip("this machine gives only the 'limits' level (no namespaces)")


def test_nothing_it_writes_survives_and_nothing_is_writable_but_its_folder(namespaces, request):
    name = f"orch-sandbox-{secrets.token_hex(8)}"
    targets = [
        f"/dev/shm/{name}",
        f"/tmp/{name}",
        f"/var/tmp/{name}",
        f"/{name}",
        str(REPO / name),
        f"{Path.home()}/{name}",
    ]
    request.addfinalizer(lambda: [Path(t).unlink(missing_ok=True) for t in targets])  # should it get through
    program = f"""import os
for path in {targets!r} + ['{name}']:
    try:
        open(path, 'w').write('x')
        print('wrote', path)
    except OSError:
        pass
"""
    outcome = run_untrusted(program)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stdout.decode().split("\n")[:-1] == [f"wrote {name}"]  # its working folder, only
    assert not [t for t in targets if Path(t).exists()]


def test_it_holds_no_capabilities_so_cannot_make_a_mount_writable(namespaces):
    program = """import subprocess
status = dict(line.split(':\\t') for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)
print(status['CapEff'], status['CapBnd'], status['NoNewPrivs'])
print(subprocess.run(['mount', '-o', 'remount,rw', '/usr'], capture_output=True).returncode)
"""
    outcome = run_untrusted(program)
    assert outcome.stdout.decode().split() == ["0000000000000000", "0000000000000000", "1", "32"], outcome


def test_it_sees_a_fresh_proc_and_an_empty_environment(namespaces, tmp_path):
    """The eval process holds a secret in its environment (as a job's process may: a token, a key); the program
    it runs looks through every /proc/PID/environ and cmdline it can find."""
    secret = secrets.token_hex(16)
    program = """import os
print(sorted(os.environ))
print(sorted(p for p in os.listdir('/proc') if p.isdigit()))
for pid in os.listdir('/proc'):
    for part in ('environ', 'cmdline'):
        try:
            print(open(f'/proc/{pid}/{part}', 'rb').read())
        except OSError:
            pass
"""
    evaluator = (
        "import sys\nfrom training.evaluate.sandbox import run_untrusted\n"
        "sys.stdout.buffer.write(run_untrusted(sys.stdin.read()).stdout)"
    )
    seen = subprocess.run(
        [sys.executable, "-c", evaluator],
        input=program,
        capture_output=True,
        text=True,
        env=dict(env_for(tmp_path), ORCH_TEST_SECRET=secret),
        timeout=60,
        check=True,
    ).stdout
    assert secret not in seen
    lines = seen.splitlines()
    assert lines[0] == "['LC_CTYPE']"  # Python's own locale coercion: nothing of ours
    assert lines[1] == "['1']", "only its own process"


def test_the_checkout_home_and_run_folders_are_not_there(namespaces, tmp_path):
    run = tmp_path / "runs" / "eval-1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("secret: 1\n")
    program = f"""import os
for path in {[str(REPO / 'pyproject.toml'), str(run / 'config.yaml'), str(Path.home() / '.bashrc')]!r}:
    try:
        print(open(path).read())
    except OSError:
        print('absent', path)
print(os.path.exists({str(REPO)!r}), sorted(os.listdir('/')))
"""
    outcome = run_untrusted(program)
    out = outcome.stdout.decode().splitlines()
    assert [line.split()[0] for line in out[:3]] == ["absent"] * 3, out
    assert out[3].startswith("False"), out


@pytest.mark.parametrize("level", ["namespaces", "limits"])
def test_output_is_capped_and_the_program_killed(level):
    if level == "namespaces" and isolation() != "namespaces":
        pytest.skip("no namespaces here")
    limits = Limits(output_bytes=1 << 16)
    flood = (
        "import sys\nsys.stderr.write('e' * 4096)\nsys.stderr.flush()\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    )
    outcome = run_untrusted(flood, timeout_s=30, limits=limits, namespaces=level == "namespaces")
    assert outcome.output_capped and not outcome.timed_out and outcome.returncode == -9
    assert len(outcome.stdout) + len(outcome.stderr) == limits.output_bytes
    assert outcome.stderr == b"e" * len(outcome.stderr) and outcome.stdout == b"x" * len(outcome.stdout)
    small = run_untrusted("print('y' * 1000)", limits=limits, namespaces=level == "namespaces")
    assert not small.output_capped and small.stdout == b"y" * 1000 + b"\n"


@pytest.mark.parametrize("level", ["namespaces", "limits"])
def test_the_environment_is_empty_at_either_level(level, monkeypatch):
    if level == "namespaces" and isolation() != "namespaces":
        pytest.skip("no namespaces here")
    monkeypatch.setenv("ORCH_TEST_SECRET", "x")
    outcome = run_untrusted("import os; print(sorted(os.environ))", namespaces=level == "namespaces")
    assert outcome.stdout == b"['LC_CTYPE']\n"


def test_a_test_passes_only_when_it_ran_to_its_end():
    from training.evaluate.scoring import passes_test

    body = "def add(a, b):\n    return a + b\n"
    assert passes_test(body + "\nassert add(2, 3) == 5\n")
    assert not passes_test(body + "\nassert add(2, 3) == 6\n")
    for early in (
        "raise SystemExit(0)",
        "import sys; sys.exit()",
        "import os; os._exit(0)",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    ):
        exits = f"def add(a, b):\n    {early}\nadd(0, 0)\n"
        assert not passes_test(exits + "\nassert add(2, 3) == 6\n"), early
    # printing what the harness prints is not enough: the token is new every time
    assert not passes_test(body + "\nprint('0' * 32)\nimport os; os._exit(0)\nassert add(2, 3) == 5\n")
