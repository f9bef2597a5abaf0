"""LDM training step with precomputed conditioning vs encoding in the step (issue 16, part 1).

A: image shards; each step encodes the images with the frozen KL first stage and the captions with
   the frozen OpenCLIP text tower (tokens from the data workers), as `data.input=image` does.
B: shards written by `data_tools/precompute_latents.py text_encoder.kind=openclip`: the step samples
   the stored posterior and reads the stored context (`data.input=latent data.text_embeddings=true`).
C: the same latent shards with the text encoder in the step (`data.text_embeddings=false`): A/B is
   the issue's ratio, C/B the text embeddings' own share.

Both are the real `LDMTask.train_step` built by `build_task` from the same configuration (same UNet,
same seeds), fed by the real loader; the two are alternated step block by step block (`--rounds`
blocks of `--steps` steps each), so load changes on this shared machine hit all alike, and each
ratio is the median of the per-round ratios.

It also prints the FLOP-model ratio for a real flavour (default `txt2img_openclip_kl8` at 256 and 512
px: UNet forward + backward vs KL-f8 encoder forward + ViT-H-14 text forward, counted on `meta`):
the step-time saving on a GPU where all three run at similar utilisation.

    python benchmarks/bench_precomputed_text.py [--flavour tiny] [--rounds 5] [--steps 4] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm_scale import config as config_lib  # noqa: E402
from ldm_scale import dist  # noqa: E402
from ldm_scale.data import build_loader  # noqa: E402
from ldm_scale.data.latents import finalize_latent_dataset, load_autoencoder, precompute_latents  # noqa: E402
from ldm_scale.data.synthetic import write_synthetic_dataset  # noqa: E402
from ldm_scale.models.conditioners import build_conditioner  # noqa: E402
from ldm_scale.train.tasks import build_task  # noqa: E402


def _clip_overrides(prefix: str, clip: dict) -> list:
    return [f"{prefix}.kind=openclip", f"{prefix}.openclip.arch={clip['arch']}",
            f"{prefix}.openclip.model_config_path={clip['config']}", f"{prefix}.openclip.pretrained={clip['ckpt']}"]


def _write_clip(root: str, width: int, layers: int) -> dict:
    """A CLIP text tower of the given size (random weights, saved as a checkpoint file)."""
    import open_clip

    arch = f"bench-clip-{width}x{layers}"
    config = os.path.join(root, arch + ".json")
    with open(config, "w") as f:
        json.dump({"embed_dim": width, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width,
                                "heads": max(1, width // 64), "layers": layers}}, f)
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    ckpt = os.path.join(root, arch + ".pt")
    torch.save(open_clip.create_model(arch, pretrained=None).state_dict(), ckpt)
    return {"arch": arch, "config": config, "ckpt": ckpt}


def _task(url: str, clip: dict, args, precomputed: bool, latents: bool = False):
    overrides = ["experiment=quickstart", "model.allow_random_first_stage=true", f"model={args.flavour}",
                 *_clip_overrides("model.ldm.cond_stage", clip), f"model.ldm.unet.context_dim={args.clip_width}",
                 f"data.urls=['{url}']", f"data.num_workers={args.workers}", "data.shuffle_buffer=16",
                 f"train.micro_batch_size={args.batch}", "checkpoint.root=/tmp/unused", "logger=none",
                 "deepspeed.zero.stage=0", "model.scale_factor_mode=spec", "train.compile=off"]
    if precomputed or latents:
        overrides += ["data.input=latent", f"data.text_embeddings={str(precomputed).lower()}"]
    cfg = config_lib.to_object(config_lib.compose(overrides))
    plan = config_lib.validate(cfg, 1)
    loader = build_loader(cfg.data, dist.get_dist_info(), batch_size=args.batch, seed=0, uint8_images=True)
    task = build_task(cfg, plan, device=torch.device("cpu"), total_steps=10 ** 6)
    loader.tokenize = task.caption_tokenizer()
    return task, loader.infinite()


def _block(task, batches, steps: int, offset: int) -> float:
    """Seconds per step over ``steps`` steps (batches fetched outside the timing)."""
    elapsed = 0.0
    for i in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        task.train_step([batch], offset + i)
        elapsed += time.perf_counter() - start
    return elapsed / steps


def measured_ratio(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        clip = _write_clip(tmp, args.clip_width, args.clip_layers)
        images = os.path.join(tmp, "images")
        write_synthetic_dataset(images, num_samples=args.samples, samples_per_shard=args.samples // 4, seed=0,
                                min_size=32, max_size=48)
        pattern = images + "/{00000..00003}.tar"
        from ldm_scale.models.conditioners import ConditionerConfig, OpenCLIPConfig

        cond = ConditionerConfig(kind="openclip", openclip=OpenCLIPConfig(
            arch=clip["arch"], pretrained=clip["ckpt"], model_config_path=clip["config"]))
        text = build_conditioner(cond).eval()
        first_stage = load_autoencoder(None, "kl_tiny")
        out = os.path.join(tmp, "latents")
        precompute_latents(pattern, out, first_stage, resolution=32, batch_size=16, text_encoder=text,
                           text_dtype="float16")
        finalize_latent_dataset(pattern, out, first_stage, 32, text_encoder=text, text_cond_stage=cond,
                                text_dtype="float16")
        online, online_batches = _task(pattern, clip, args, precomputed=False)
        latent_url = out + "/{00000..00003}.tar"
        pre, pre_batches = _task(latent_url, clip, args, precomputed=True)
        lat, lat_batches = _task(latent_url, clip, args, precomputed=False, latents=True)
        for task, batches in ((online, online_batches), (pre, pre_batches), (lat, lat_batches)):
            _block(task, batches, 2, 0)  # warm-up: first-call allocations, thread pools
        rounds = []
        for r in range(args.rounds):
            a = _block(online, online_batches, args.steps, 2 + r * args.steps)
            b = _block(pre, pre_batches, args.steps, 2 + r * args.steps)
            c = _block(lat, lat_batches, args.steps, 2 + r * args.steps)
            rounds.append({"online": a, "precomputed": b, "latents_only": c})

    def median(key):
        return statistics.median(r[key] for r in rounds)

    return {"flavour": args.flavour, "batch": args.batch, "clip_text": f"{args.clip_width}x{args.clip_layers}",
            "speedup_median": statistics.median(r["online"] / r["precomputed"] for r in rounds),
            "speedups": [round(r["online"] / r["precomputed"], 3) for r in rounds],
            "text_part_speedup_median": statistics.median(r["latents_only"] / r["precomputed"] for r in rounds),
            "ms_per_step_median": {k: round(1e3 * median(k), 2) for k in ("online", "latents_only", "precomputed")}}


def flop_ratio(flavour: str, sizes) -> dict:
    """(UNet train + encoders) / UNet train FLOPs per sample of a registered flavour, on meta."""
    from ldm_scale.logging import count_flops
    from ldm_scale.models import build_autoencoder
    from ldm_scale.models.registry import FLAVOURS, build_denoiser, denoiser_inputs

    spec = FLAVOURS[flavour]
    out = {}
    for size in sizes:
        h = size // spec.first_stage.downsample_factor
        with torch.device("meta"):
            unet = build_denoiser(spec)
            first = build_autoencoder(spec.first_stage)
            text = build_conditioner(spec.cond_stage)
        unet.set_activation_checkpointing(False)
        x, t, kwargs = denoiser_inputs(spec, h, requires_grad=True)
        train = count_flops(lambda: unet(x, t, **kwargs).float().pow(2).mean().backward())
        images = torch.zeros(1, 3, size, size, device="meta")
        with torch.no_grad():
            encode = count_flops(lambda: first.encode_to_latent(images, deterministic=True))
            tokens = torch.zeros(1, 77, dtype=torch.long, device="meta")
            text_flops = count_flops(lambda: text.encode_tokens(tokens))
        out[f"{size}px"] = {"unet_train_gflops": train / 1e9, "first_stage_encode_gflops": encode / 1e9,
                            "text_encode_gflops": text_flops / 1e9,
                            "step_flops_ratio_online_vs_precomputed": (train + encode + text_flops) / train}
    return {"flavour": flavour, **out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavour", default="tiny", help="LDM flavour of the measured step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="steps per side per round")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--clip-width", type=int, default=64)
    p.add_argument("--clip-layers", type=int, default=3)
    p.add_argument("--flop-flavour", default="txt2img_openclip_kl8")
    p.add_argument("--flop-sizes", default="256,512")
    args = p.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dist.init_distributed()
    result = {"measured": measured_ratio(args),
              "flop_model": flop_ratio(args.flop_flavour, [int(s) for s in args.flop_sizes.split(",")])}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    dist.run_entry_point(main)
