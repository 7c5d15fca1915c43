"""Placeholder until the real lock lands."""

import shutil
from pathlib import Path


class RunLock:
    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)

    def acquire(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def release(self):
        pass


def clear_run_folder(run_dir):
    for p in Path(run_dir).iterdir():
        if p.name == ".lock":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
