"""Train an LDM or an autoencoder: ``torchrun --nproc_per_node N launch/train.py experiment=<name> [overrides]``.

A thin shell over :func:`ldm_scale.train.loop.train`: Hydra composes ``conf/`` (typed by
``ldm_scale.config.Config``), the loop does the rest. Examples:

    torchrun --nproc_per_node 2 launch/train.py experiment=quickstart model.first_stage_ckpt=...
    torchrun --nnodes 8 --nproc_per_node 8 ... launch/train.py experiment=txt2img_kl8 \
        data.urls="['s3://bucket/laion/{00000..41407}.tar']" model.first_stage_ckpt=s3://bucket/ae/kl_f8.pt \
        checkpoint.root=s3://bucket/ckpt
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ldm_scale import config as config_lib  # noqa: E402
from ldm_scale import dist, storage  # noqa: E402
from ldm_scale.logging import setup_console  # noqa: E402

config_lib.register_configs()


@hydra.main(config_path=str(config_lib.CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ldm_scale.train.loop import RUN_REFUSED_OR_STOPPED, train

    try:
        typed = config_lib.to_object(cfg)
    except config_lib.ConfigError as exc:
        config_error(str(exc))
    # Hydra has set the log handlers up by now: one console per run (rank 0 logs INFO).
    setup_console(typed.logger.show_library_warnings, rank=dist.get_dist_info().rank)
    try:
        train(typed)
    except config_lib.ConfigError as exc:
        config_error(str(exc))
    except RUN_REFUSED_OR_STOPPED as exc:
        # A refused start (run id in use, lost checkpoints) or a stopped run (unhealthy steps): one
        # line that names the problem and the fix, exit status 1; result.json has the details.
        print(f"launch/train.py: {type(exc).__name__}: {storage.redact(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception:
        # Anything else is a bug or an outage: the traceback matters, but it must not reach Hydra,
        # which would print the raw overrides (credentials included) with it.
        print(storage.redact(traceback.format_exc()), file=sys.stderr, end="")
        raise SystemExit(1) from None


def config_error(message: str) -> NoReturn:
    """A configuration that cannot run: its message on stderr, exit status 2 (a usage error)."""
    print(f"launch/train.py: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup_console()  # library warnings off from the first import (LDM_SCALE_SHOW_LIBRARY_WARNINGS=1 shows them)
    # Hydra would print a composition error (a typo in an override or an experiment file) over
    # several lines itself and exit 1; with HYDRA_FULL_ERROR it raises it here instead.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")

    def run() -> None:
        try:
            main()
        except HydraException as exc:
            config_error(config_lib.describe_composition_error(exc))

    dist.run_entry_point(run)  # exits without the teardown that can abort a gloo/NCCL process
