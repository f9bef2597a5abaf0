"""Run a script or module as if only the GPU image's packages and the wheelhouse were installed.

    python tests/unit/_gpu_image_only.py BLOCKED.json (SCRIPT | -m MODULE) [ARGS...]

BLOCKED.json lists top-level module names to refuse (the parent test computes them from this
venv's distributions: those neither in ``gpu_check.GPU_IMAGE_PACKAGES``, nor pinned by
``gpu_wheelhouse.sh``, nor required by those). An import of one raises ImportError, as it would on
the GPU machine, and is appended to ``$GPU_IMAGE_ONLY_LOG``; optional imports (``try: import
wandb``) then take their fallback. Forked data-loader workers inherit the hook.
"""
from __future__ import annotations

import json
import os
import runpy
import sys


class RefuseOutsideTheImage:
    def __init__(self, blocked: set, log_path: str | None):
        self.blocked = blocked
        self.log_path = log_path

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in self.blocked:
            if self.log_path:
                with open(self.log_path, "a") as log:
                    log.write(name + "\n")
            raise ImportError(f"{name} is not on the GPU image (tests/unit/_gpu_image_only.py)")
        return None


def main() -> None:
    with open(sys.argv[1]) as f:
        blocked = set(json.load(f))
    sys.meta_path.insert(0, RefuseOutsideTheImage(blocked, os.environ.get("GPU_IMAGE_ONLY_LOG")))
    if sys.argv[2] == "-m":
        module, args = sys.argv[3], sys.argv[4:]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, args = sys.argv[2], sys.argv[3:]
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
