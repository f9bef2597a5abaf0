"""Sample images from an exported LDM checkpoint: text/class/unconditional, img2img, inpainting.

One module a job: ``checkpoints`` (load an export: ``load_checkpoint -> LoadedModel``), ``generate``
(the one generation function, also used by training grids and evaluation), ``command``
(``launch/sample.py``'s ``run(SampleConfig)``); image I/O is ``ldm_scale.images``. Everything is
re-exported here. Conventions are in docs/sampling.md.
"""
from ldm_scale.images import grid_size, image_grid, load_image, save_png, to_uint8_hwc
from ldm_scale.sampling.checkpoints import LoadedModel, load_checkpoint, read_checkpoint
from ldm_scale.sampling.command import SampleConfig, read_prompts, run, validate
from ldm_scale.sampling.generate import (PRECISIONS, Inpainting, check_size, condition_kind, generate,
                                         is_concat_inpainting, prepare_inpainting, raw_conditions)

__all__ = ["SampleConfig", "LoadedModel", "Inpainting", "load_checkpoint", "read_checkpoint", "generate",
           "prepare_inpainting", "run", "image_grid", "grid_size", "check_size", "condition_kind",
           "raw_conditions", "is_concat_inpainting", "load_image", "save_png", "to_uint8_hwc", "PRECISIONS",
           "read_prompts", "validate"]
