"""The base of every configuration choice (``deepspeed.precision=bf16``, ``sampler.name=ddim``, ...).

A choice field is annotated with a :class:`Choice` subclass, so OmegaConf rejects a value outside it
when the config is composed (``deepspeed.precision=fp8`` fails with the valid names) instead of a
late, hand-written check. Member names are their values (OmegaConf matches members by name).

At run time a choice is a plain ``str``: defaults are written as strings, and
``ldm_scale.config.to_object`` turns the members composition produces back into their strings
(:func:`plain_choices`). Why: configuration values end up in ``torch.save`` files (the loader's
checkpoint state, exports' model configs), and ``torch.load(weights_only=True)`` refuses any class it
does not know, an Enum included; JSON, YAML, W&B and data workers then see strings too. Code
compares choices with strings (``cfg.precision == "bf16"``), which holds for members as well: they
are ``str`` whose value is their name, format as their value on every Python (3.12 changed
``format()`` of mixed-in enums) and ``repr`` as the string's.
"""
from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, List


class Choice(str, Enum):
    """A string choice of a config field; subclass with ``name = "name"`` members."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # messages say `key='bf16'`, as they do for plain strings
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> List[str]:
        """The valid strings, in declaration order (for messages)."""
        return [m.value for m in cls]


def plain_choices(obj: Any) -> Any:
    """``obj`` (a dataclass tree, as ``OmegaConf.to_object`` returns it) with every Enum member in its
    fields, lists and dicts replaced by its value, in place; returns ``obj``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, plain_choices(getattr(obj, f.name)))
        return obj
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, list):
        obj[:] = [plain_choices(v) for v in obj]
    elif isinstance(obj, dict):
        for k in list(obj):
            obj[k] = plain_choices(obj[k])
    return obj
