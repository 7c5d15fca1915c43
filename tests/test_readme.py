"""The README's commands and Python blocks run as a user runs them: offline, on the bundled digits.

Every command of a fenced bash/sh/console block is either run (in README order, in one temporary
folder, `supcon` as `python -m supcon` of this checkout) or listed in SKIPPED with the reason. A new
command that is neither fails `test_readme_commands_are_run_or_skipped`, so the list stays honest.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"

# Commands not run here, and why. Keys are the commands as they read in the README, continuation
# lines joined and comments dropped.
SKIPPED = {
    # Create a virtualenv and install from the package index (minutes); `make test` would also run
    # this test again. The command `make demo` ends with runs below at one epoch.
    "make demo": "installs a virtualenv",
    "make test": "installs a virtualenv and runs the whole suite",
    # CIFAR-10 is a download, and each of these trains for 8 to 25 minutes on a CPU.
    "supcon compare --preset keras-example --dataset cifar10 --out runs/keras-example": "download, long",
    "supcon pretrain --preset cpu-fast --dataset cifar10 --out runs/cpu-fast": "download, long",
    "supcon linear --from runs/cpu-fast --out runs/cpu-fast-linear": "needs the cpu-fast run",
    "supcon train-ce --preset cpu-fast --dataset cifar10 --out runs/cpu-fast-ce": "download, long",
    # The user's own photos and a ResNet-50 weights file, which the README tells them to bring.
    "supcon compare --preset cpu-fast --data photos --image-size 224 --encoder resnet50 "
    "--pretrained resnet50.safetensors --out runs/photos": "needs the user's images and weights",
    # GPUs and several machines.
    "torchrun --nproc_per_node=4 -m supcon pretrain --preset paper-cifar10 --data PATH --out runs/r50 "
    "--sync-bn": "needs 4 GPUs and a copy of CIFAR-10",
    "torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 "
    "-m supcon pretrain --preset paper-cifar10 --data PATH --out /shared/runs/r50 --sync-bn": "needs two "
    "machines with 8 GPUs each",
}

BLOCK = re.compile(r"^```(bash|sh|console|python)\n(.*?)^```", re.M | re.S)


def blocks(text: str) -> list[tuple[str, str]]:
    """The README's runnable pieces in order: ("shell", command) or ("python", code)."""
    out = []
    for lang, body in BLOCK.findall(text):
        if lang == "python":
            out.append(("python", body))
            continue
        line = ""
        for raw in body.splitlines():
            if lang == "console" and not line:
                if not raw.startswith("$ "):
                    continue  # output shown in a console block
                raw = raw[2:]
            if raw.rstrip().endswith("\\"):
                line += raw.rstrip()[:-1] + " "
                continue
            words = shlex.split(line + raw, comments=True)
            line = ""
            if words:
                out.append(("shell", shlex.join(words)))
    return out


def test_readme_commands_are_run_or_skipped():
    commands = [c for kind, c in blocks(README.read_text()) if kind == "shell"]
    unknown = [c for c in commands if c not in SKIPPED and not c.startswith("supcon ")]
    assert not unknown, f"README commands neither runnable here nor in SKIPPED: {unknown}"
    stale = [c for c in SKIPPED if c not in commands]
    assert not stale, f"SKIPPED lists commands the README no longer has: {stale}"


@pytest.mark.slow
def test_readme_commands_and_python_blocks_run(tmp_path):
    env = dict(os.environ)
    # This checkout's code, whatever is installed; a cache of its own (compiled kernels, stores).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["SUPCON_DATA"] = str(tmp_path / "cache")
    work = tmp_path / "work"
    work.mkdir()
    ran = set()
    for kind, text in blocks(README.read_text()):
        if (kind == "shell" and text in SKIPPED) or text in ran:
            continue  # a command shown twice (the one-epoch check) runs once
        if kind == "shell":
            argv = [sys.executable, "-m", "supcon", *shlex.split(text)[1:]]
        else:
            argv = [sys.executable, "-c", text]
        r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{text}\nexit {r.returncode}\n{r.stderr[-3000:]}"
        ran.add(text)
    assert len(ran) >= 8  # the seven command lines and the two Python blocks, at the time of writing
