"""The CUDA branches of the library, on a real GPU (``gpu`` tests: skipped with the reason elsewhere;
``benchmarks/gpu_check.py`` runs them on the GPU machine).

- NCCL: a plain process is rank 0 of a world of one with a NCCL group (``dist.init_distributed``).
- Attention: every attention layer of every flavour runs on the flash kernel in bf16, forward and
  backward (``sdpa_kernel(FLASH_ATTENTION)`` raises where PyTorch would fall back to another
  kernel); the autoencoders' single-head blocks on a fused kernel (flash or memory-efficient).
- ``torch.compile``: the tiny UNet compiles with inductor as one graph at fixed shapes and matches eager.
- Loader: ``data.pin_memory=true`` hands over page-locked batches (uint8 and float images).
- Training: a bf16 step of the tiny LDM through ``build_task`` under ZeRO-2 and ZeRO-3 with
  activation checkpointing, on loader batches; the engine's optimizer is torch's fused AdamW.
- EMA: the CPU EMA of CUDA weights copies through pinned memory and waits for the copy's event.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.fixtures.torchrun import REPO_ROOT, run_python

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def sdpa_only(*names: str):
    """SDPA restricted to the named backends: any call they cannot run raises instead of falling back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)])


FLASH = ("FLASH_ATTENTION",)
FUSED = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")  # anything but the math kernel


def write_tiny_shards(root) -> str:
    from ldm_scale.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(str(root), num_samples=32, samples_per_shard=8, seed=0, min_size=32, max_size=40)
    return f"{root}/{{00000..00003}}.tar"


# ------------------------------------------------------------------------------------------ NCCL, engine

@pytest.fixture(scope="module")
def cuda_step_result(tmp_path_factory):
    url = write_tiny_shards(tmp_path_factory.mktemp("cuda_step_shards"))
    result = run_python([str(REPO_ROOT / "tests" / "gpu" / "_cuda_step_driver.py"), url], timeout=300).check()
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):])


def test_plain_process_is_a_nccl_world_of_one(cuda_step_result):
    assert cuda_step_result["backend"] == "nccl"
    assert (cuda_step_result["world_size"], cuda_step_result["rank"]) == (1, 0)
    assert cuda_step_result["device"].startswith("cuda")
    assert cuda_step_result["all_reduce"] == [3.0] * 4


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_steps_of_the_tiny_ldm_through_build_task(cuda_step_result, stage):
    run = next(r for r in cuda_step_result["runs"] if r["stage"] == stage)
    assert all(run["healthy"]), run
    assert all(math.isfinite(loss) and abs(loss) < 1e3 for loss in run["losses"]), run["losses"]
    assert run["param_dtypes"] == ["torch.bfloat16"] and run["param_devices"] == ["cuda"], run
    assert all(run["host_batches_pinned"]), "data.pin_memory=true: loader batches must be page-locked"
    if stage < 3:
        assert run["weights_changed"], "three applied optimizer steps left the weights unchanged"


@pytest.mark.parametrize("stage", [2, 3])
def test_no_synchronising_cuda_call_of_ours_in_the_step(cuda_step_result, stage):
    """torch.cuda.set_sync_debug_mode over the hand-off and train_step (the step-health decision,
    the step's one sync, comes after): no call site in ldm_scale synchronises. DeepSpeed's own (its
    overflow / norm checks, ZeRO-3's gathers) land in the result file for the record."""
    run = next(r for r in cuda_step_result["runs"] if r["stage"] == stage)
    assert run["tokens_in_batches"], run
    ours = {site: n for site, n in run["syncs_in_steps"].items() if not site.startswith("deepspeed/")}
    assert ours == {}, run["syncs_in_steps"]


@pytest.mark.parametrize("stage", [2, 3])
def test_the_engine_uses_torch_fused_adamw_on_cuda(cuda_step_result, stage):
    run = next(r for r in cuda_step_result["runs"] if r["stage"] == stage)
    assert run["optimizer"] == "torch.optim.adamw.AdamW", run
    assert run["optimizer_fused"] is True, run


# ------------------------------------------------------------------------------------------ attention

def attention_layers():
    """Every distinct attention layer our LDM flavours build (UNets and our text transformer), read off
    the modules on the meta device: ``{(kind, sizes...): first flavour that has it}``."""
    from ldm_scale.models.attention import AttentionBlock, CrossAttention
    from ldm_scale.models.conditioners import build_conditioner
    from ldm_scale.models.registry import FLAVOURS
    from ldm_scale.models.unet import UNetModel

    layers = {}
    for flavour, spec in sorted(FLAVOURS.items()):
        with torch.device("meta"):
            models = [UNetModel(spec.unet)]
            if spec.cond_stage.kind == "text":  # OpenCLIP brings its own attention
                models.append(build_conditioner(spec.cond_stage))
        for model in models:
            for name, module in model.named_modules():
                if isinstance(module, CrossAttention):
                    cross = name.endswith("attn2")
                    key = ("cross" if cross else "self", module.to_q.in_features,
                           module.context_dim if cross else None, module.heads,
                           module.to_q.out_features // module.heads)
                elif isinstance(module, AttentionBlock):
                    key = ("adm", module.qkv.in_channels, module.heads)
                else:
                    continue
                layers.setdefault(key, flavour)
    return layers


def run_layer(key):
    from ldm_scale.models.attention import AttentionBlock, CrossAttention

    torch.manual_seed(0)
    kind = key[0]
    if kind == "adm":
        _, channels, heads = key
        layer = AttentionBlock(channels, heads)
        inputs = (torch.randn(2, channels, 16, 16),)
    else:
        _, query_dim, context_dim, heads, dim_head = key
        layer = CrossAttention(query_dim, context_dim, heads, dim_head)
        x = torch.randn(2, 256, query_dim)
        inputs = (x, torch.randn(2, 77, context_dim)) if kind == "cross" else (x,)
    layer = layer.to(DEVICE, torch.bfloat16)
    inputs = [t.to(DEVICE, torch.bfloat16).requires_grad_() for t in inputs]
    out = layer(*inputs)
    out.float().square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs)


def test_the_flash_only_context_refuses_what_flash_cannot_run():
    """The control for the tests below: under the restriction an ineligible call raises (fp32 has
    no flash kernel), so a call that passes ran on flash."""
    q = torch.randn(1, 2, 16, 64, device=DEVICE)
    with sdpa_only(*FLASH), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_every_unet_and_text_attention_layer_runs_on_flash_in_bf16():
    layers = attention_layers()
    assert any(k[0] == "cross" for k in layers) and any(k[0] == "adm" for k in layers), layers
    failures = []
    with sdpa_only(*FLASH):
        for key, flavour in layers.items():
            try:
                run_layer(key)
            except RuntimeError as exc:
                failures.append(f"{key} (first in {flavour}): {str(exc).splitlines()[0]}")
    assert not failures, "attention layers that cannot use flash:\n" + "\n".join(failures)


def test_tiny_ldm_unet_and_text_encoder_train_on_flash_with_checkpointing():
    """The assembled modules, not only the layers: reshapes between them keep SDPA's inputs
    eligible, in the forward and in the recomputation of activation checkpointing."""
    from ldm_scale.models.conditioners import build_conditioner
    from ldm_scale.models.registry import get_spec
    from ldm_scale.models.unet import UNetModel

    spec = get_spec("tiny")
    torch.manual_seed(0)
    unet = UNetModel(spec.unet).to(DEVICE)
    text = build_conditioner(spec.cond_stage).to(DEVICE)
    unet.set_activation_checkpointing(True)
    text.set_activation_checkpointing(True)
    x = torch.randn(4, spec.unet.in_channels, 8, 8, device=DEVICE)
    t = torch.randint(0, 1000, (4,), device=DEVICE)
    tokens = torch.randint(0, 1000, (4, spec.cond_stage.text.max_length), device=DEVICE)
    with sdpa_only(*FLASH):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = unet(x, t, context=text.encode_tokens(tokens))
        out.float().square().mean().backward()
    grads = [p.grad for p in [*unet.parameters(), *text.parameters()] if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_every_autoencoder_attention_block_runs_on_a_fused_kernel_in_bf16():
    """Single-head blocks: at 512 channels (kl_f8) the head is wider than flash's 256, so the
    memory-efficient kernel must take it; what is refused here runs on the slow math kernel."""
    from ldm_scale.models.encoder_decoder import AttnBlock
    from ldm_scale.models.registry import AUTOENCODERS, build_autoencoder

    channels = {}
    for name, cfg in sorted(AUTOENCODERS.items()):
        with torch.device("meta"):
            model = build_autoencoder(cfg)
        for module in model.modules():
            if isinstance(module, AttnBlock):
                channels.setdefault(module.q.in_channels, name)
    assert channels
    failures = []
    with sdpa_only(*FUSED):
        for width, name in sorted(channels.items()):
            torch.manual_seed(0)
            block = AttnBlock(width).to(DEVICE, torch.bfloat16)
            x = torch.randn(2, width, 16, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
            try:
                block(x).float().square().mean().backward()
            except RuntimeError as exc:
                failures.append(f"AttnBlock({width}) (first in {name}): {str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------ loader, EMA

@pytest.mark.parametrize("uint8_images", [True, False])
def test_loader_hands_over_page_locked_batches_with_pin_memory(tmp_path, uint8_images):
    from ldm_scale import config as config_lib
    from ldm_scale.data import build_loader
    from ldm_scale.dist import DistInfo

    url = write_tiny_shards(tmp_path / "shards")
    for pin in (True, False):
        cfg = config_lib.to_object(config_lib.compose(
            ["experiment=quickstart", f"data.urls=['{url}']", "data.num_workers=1", f"data.pin_memory={pin}"]))
        loader = build_loader(cfg.data, DistInfo(), batch_size=4, seed=0, uint8_images=uint8_images)
        batches = loader.infinite()
        batch = next(batches)
        batches.close()
        assert batch["image"].dtype == (torch.uint8 if uint8_images else torch.float32)
        assert batch["image"].is_pinned() is pin, f"data.pin_memory={pin}, uint8_images={uint8_images}"
        moved = batch["image"].to(DEVICE, non_blocking=True)
        torch.testing.assert_close(moved.cpu(), batch["image"], rtol=0, atol=0)


def test_cpu_ema_of_cuda_weights_waits_for_the_copy_to_pinned_memory():
    """The weights are changed behind a busy stream: the (threaded) lerp must see the new values,
    so it waited on the copy's CUDA event rather than reading the staging buffer early."""
    from ldm_scale.dist import DistInfo
    from ldm_scale.train.ema import CpuEma, EmaConfig

    layer = torch.nn.Linear(1024, 1024).to(DEVICE)
    ema = CpuEma(layer.named_parameters(), EmaConfig(decay=0.5, use_num_updates=False, async_update=True), DistInfo())
    start = {n: p.detach().cpu().clone() for n, p in layer.named_parameters()}
    try:
        with torch.no_grad():
            torch.cuda._sleep(200_000_000)  # ~0.1 s of device time ahead of the update
            for p in layer.parameters():
                p.add_(1.0)
        assert ema.update(1)
        full = ema.full_state_dict()
    finally:
        ema.close()
    for name, before in start.items():
        torch.testing.assert_close(full[name], before + 0.5, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ compile (last: slowest)

def test_tiny_unet_compiles_to_one_graph_with_inductor_and_matches_eager():
    from ldm_scale.models.registry import get_spec
    from ldm_scale.models.unet import UNetModel

    torch._dynamo.reset()
    spec = get_spec("tiny")
    torch.manual_seed(0)
    unet = UNetModel(spec.unet).to(DEVICE)
    x = torch.randn(4, spec.unet.in_channels, 8, 8, device=DEVICE)
    t = torch.randint(0, 1000, (4,), device=DEVICE)
    context = torch.randn(4, 16, spec.unet.context_dim, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = unet(x, t, context=context).float()
    compiled = torch.compile(unet, backend="inductor", fullgraph=True)  # a graph break raises
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x, t, context=context).float()
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=3e-2, atol=3e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters() if p.requires_grad)
