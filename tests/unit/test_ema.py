"""CPU EMA: CompVis warm-up decay, once per optimizer step, sharding over ranks, state round trips."""
import copy

import pytest
import torch
from torch import nn

from ldm_scale.dist import DistInfo
from ldm_scale.train.ema import (
    CpuEma,
    EmaConfig,
    assemble_full_state_dict,
    ema_decay,
    whole_param_owners,
)


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))


class LitEmaReference:
    """CompVis ldm/modules/ema.py LitEma.forward, transcribed as the reference."""

    def __init__(self, model: nn.Module, decay: float, use_num_updates: bool = True):
        self.decay = decay
        self.num_updates = 0 if use_num_updates else -1
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def __call__(self, model: nn.Module) -> None:
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    self.shadow[n].sub_((1.0 - decay) * (self.shadow[n] - p))


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, generator=g)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def test_warmup_decay_formula():
    assert ema_decay(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay(10, 0.9999) == pytest.approx(11 / 20)
    assert ema_decay(10**6, 0.9999) == 0.9999  # capped at decay
    assert ema_decay(1, 0.9, warmup=False) == 0.9
    with pytest.raises(ValueError, match="starts at 1"):
        ema_decay(0, 0.9)


@pytest.mark.parametrize("use_num_updates", [True, False])
@pytest.mark.parametrize("async_update", [True, False])
def test_matches_compvis_litema(use_num_updates, async_update):
    model = toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref = LitEmaReference(model, 0.99, use_num_updates)
    ema = CpuEma(model, EmaConfig(decay=0.99, use_num_updates=use_num_updates, async_update=async_update))
    for step in range(1, 8):
        sgd_step(model, opt, step)
        assert ema.update(step)
        ref(model)
    full = ema.full_state_dict()
    assert list(full) == list(ref.shadow)
    for name in full:
        torch.testing.assert_close(full[name], ref.shadow[name], rtol=0, atol=1e-6)
    assert ema.num_updates == 7
    ema.close()


def test_updates_once_per_optimizer_step_with_accumulation():
    """A loop that calls update() after every micro-batch with the optimizer step counter
    (2 micro-batches per step) updates once per optimizer step."""
    model = toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = CpuEma(model, EmaConfig(decay=0.9))
    ref = LitEmaReference(model, 0.9)
    step, updates = 0, 0
    for micro in range(12):
        x = torch.randn(2, 6, generator=torch.Generator().manual_seed(micro))
        model(x).pow(2).mean().backward()
        if micro % 2 == 1:  # accumulation boundary
            opt.step()
            opt.zero_grad()
            step += 1
            ref(model)
        updates += ema.update(step)
    assert updates == 6 and ema.num_updates == 6 and ema.last_step == 6
    for name, value in ema.full_state_dict().items():
        torch.testing.assert_close(value, ref.shadow[name], rtol=0, atol=1e-6)
    assert ema.decay_at(6) == pytest.approx(ema_decay(6, 0.9))


def test_update_every():
    model = toy()
    ema = CpuEma(model, EmaConfig(decay=0.5, update_every=3, use_num_updates=False, async_update=False))
    done = [s for s in range(1, 10) if ema.update(s)]
    assert done == [3, 6, 9] and ema.num_updates == 3


def test_only_trainable_parameters_are_tracked():
    model = toy()
    model[0].requires_grad_(False)
    ema = CpuEma(model, EmaConfig())
    assert "0.weight" not in ema.all_names and "2.weight" in ema.all_names
    with pytest.raises(ValueError, match="no trainable parameters"):
        CpuEma(nn.Linear(2, 2).requires_grad_(False), EmaConfig())


def test_whole_param_owners_contiguous_and_balanced():
    owners = whole_param_owners([100, 100, 100, 100], 2)
    assert owners == [0, 0, 1, 1]
    owners = whole_param_owners([10] * 10 + [1000], 4)
    assert owners == sorted(owners)  # contiguous runs in parameter order
    assert whole_param_owners([5], 3) == [0]


def _sharded(model, world, cfg):
    return [CpuEma(model, cfg, dist_info=DistInfo(rank=r, world_size=world)) for r in range(world)]


def test_shards_assemble_to_the_single_rank_ema_and_reshard():
    model = toy()
    cfg = EmaConfig(decay=0.8, async_update=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    single = CpuEma(model, cfg)
    shards = _sharded(model, 3, cfg)
    assert sum(s.numel for s in shards) == single.numel  # each element lives on exactly one rank
    for step in range(1, 5):
        sgd_step(model, opt, step)
        for e in [single, *shards]:
            e.update(step)
    states = [s.state_dict() for s in shards]
    full = assemble_full_state_dict(states[::-1])  # any order
    expected = single.full_state_dict()
    for name in expected:
        torch.testing.assert_close(full[name], expected[name], rtol=0, atol=0)

    # Reshard 3 ranks -> 2 ranks and back to one file: the same numbers.
    resharded = _sharded(toy(seed=1), 2, cfg)
    for e in resharded:
        e.load_full_state_dict(full, num_updates=4, last_step=4)
    again = assemble_full_state_dict([e.state_dict() for e in resharded])
    for name in expected:
        torch.testing.assert_close(again[name], expected[name], rtol=0, atol=0)
    assert resharded[0].num_updates == 4 and not resharded[0].update(4)

    with pytest.raises(ValueError, match="incomplete"):
        assemble_full_state_dict(states[:2])
    with pytest.raises(ValueError, match="world size or ZeRO stage"):
        resharded[1].load_state_dict(states[0])  # another rank's slices


def test_state_dict_round_trip_and_wrong_model():
    model = toy()
    ema = CpuEma(model, EmaConfig(decay=0.9))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(1)
    state = copy.deepcopy(ema.state_dict())
    other = CpuEma(toy(seed=3), EmaConfig(decay=0.9))
    other.load_state_dict(state)
    for name, value in ema.full_state_dict().items():
        torch.testing.assert_close(other.full_state_dict()[name], value, rtol=0, atol=0)
    assert other.num_updates == 1 and other.last_step == 1

    wrong = CpuEma(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)), EmaConfig())
    with pytest.raises(ValueError, match="different parameters"):
        wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="not an ldm_scale EMA shard"):
        wrong.load_state_dict({"weights": 1})


def test_accepts_a_foreign_config_object():
    from types import SimpleNamespace

    ema = CpuEma(toy(), SimpleNamespace(enabled=True, decay=0.5, use_num_updates=False, update_every=1))
    assert ema.cfg.decay == 0.5 and not ema.cfg.use_num_updates
    with pytest.raises(ValueError, match="decay"):
        CpuEma(toy(), EmaConfig(decay=1.5))


def test_swapped_in_loads_the_ema_and_restores_the_weights_even_on_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    ema = CpuEma(model, EmaConfig(decay=0.5, async_update=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(1)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = ema.full_state_dict()
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)
    with ema.swapped_in():
        for k, v in model.state_dict().items():
            assert torch.equal(v, averaged[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k])
    with pytest.raises(RuntimeError, match="sampling failed"):
        with ema.swapped_in():
            raise RuntimeError("sampling failed")
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k])
    ema.close()


@pytest.mark.gpu
def test_cuda_ema_copies_on_their_own_stream_and_the_optimizer_waits_for_them():
    from ldm_scale.train.ema import CpuEma, EmaConfig

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(1 << 20, device="cuda"))
    optimizer = torch.optim.SGD([w], lr=0.1)
    ema = CpuEma([("w", w)], EmaConfig(decay=0.9, use_num_updates=False, async_update=True))
    ema.attach_to(optimizer)
    assert ema._copy_stream is not None and ema._copy_stream != torch.cuda.current_stream()
    expected = w.detach().cpu().clone()
    for step in range(1, 6):
        w.grad = torch.ones_like(w)
        optimizer.step()  # the pre-step hook orders this after the previous copy
        ema.update(step)
        expected.lerp_(w.detach().cpu(), 0.1)
    torch.testing.assert_close(ema.local_tensors()["w"], expected, rtol=0, atol=1e-6)
    ema.close()
