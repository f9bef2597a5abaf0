"""Conversions between the three network parameterizations at a noise level alpha-bar.

With x_t = a x_0 + s eps, a = sqrt(abar), s = sqrt(1 - abar) (a^2 + s^2 = 1):

* eps-prediction (Ho et al. 2020): the network predicts eps;
* x0-prediction: the network predicts x_0;
* v-prediction (Salimans & Ho 2022, Sec. 4 / Appendix D): v = a eps - s x_0, hence
  x_0 = a x_t - s v and eps = s x_t + a v.

All three are affine in the network output for a fixed x_t, so any convex combination
(classifier-free guidance) commutes with the conversion.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ldm_scale.choices import Choice


class Parameterization(Choice):
    """What the denoiser predicts (``diffusion.parameterization``)."""

    eps = "eps"
    v = "v"
    x0 = "x0"
    # Rectified flow (diffusion/flow.py): the network predicts dx_t/dt = eps - x_0 for
    # x_t = (1 - t) x_0 + t eps. Not a VP parameterization: the conversions below refuse it.
    flow = "flow"


PARAMETERIZATIONS = tuple(Parameterization.values())


def check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")


def _refuse_flow(parameterization: str) -> None:
    if parameterization == "flow":
        raise ValueError("parameterization=flow is rectified flow, not a noise-schedule (VP) parameterization: "
                         "use diffusion/flow.py (flow_loss, flow_sample; sampler.name=euler|heun)")


def _coefs(alpha_bar: torch.Tensor | float, like: torch.Tensor):
    if isinstance(alpha_bar, float):
        # Samplers pass Python floats: no per-step host-to-device copy of a scalar tensor.
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    abar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    a, s = abar.sqrt(), (1.0 - abar).sqrt()
    return a.to(device=like.device, dtype=like.dtype), s.to(device=like.device, dtype=like.dtype)


def x0_and_eps(
    prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float, parameterization: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by the network output ``prediction`` at ``x_t`` with noise level ``alpha_bar``.

    ``alpha_bar`` is a float or a tensor broadcastable against ``x_t`` (e.g. [B, 1, 1, 1]).
    """
    a, s = _coefs(alpha_bar, x_t)
    if parameterization == "eps":
        eps = prediction
        return (x_t - s * eps) / a, eps
    if parameterization == "x0":
        x0 = prediction
        return x0, (x_t - a * x0) / s
    if parameterization == "v":
        return a * x_t - s * prediction, s * x_t + a * prediction
    _refuse_flow(parameterization)
    check_parameterization(parameterization)
    raise AssertionError("unreachable")


def prediction_target(
    parameterization: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor | float
) -> torch.Tensor:
    """What a network of the given parameterization should output for (x_0, eps) at ``alpha_bar``."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        a, s = _coefs(alpha_bar, x0)
        return a * noise - s * x0
    _refuse_flow(parameterization)
    check_parameterization(parameterization)
    raise AssertionError("unreachable")


def to_eps(prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float, parameterization: str) -> torch.Tensor:
    """eps implied by ``prediction`` (shortcut of ``x0_and_eps`` used by the multistep samplers)."""
    if parameterization == "eps":
        return prediction
    return x0_and_eps(prediction, x_t, alpha_bar, parameterization)[1]
