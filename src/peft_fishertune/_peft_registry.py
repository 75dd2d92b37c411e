"""The one place that touches peft internals: adding ``FISHERTUNE`` to ``peft.PeftType``.

peft's ``register_peft_method`` only accepts names that are already members of the ``PeftType`` enum, and
enums cannot be extended through a public API. This module adds the member the way ``enum`` itself does
when it builds a class (member object, name/value maps, member-name list, class attribute), and then
calls ``register_peft_method``. Nothing else in the package knows these internals.

A process that loads a saved FisherTune adapter must ``import peft_fishertune`` first: peft looks the
method up in its registry by the ``"peft_type"`` of ``adapter_config.json`` and, without the import,
fails with ``KeyError: 'FISHERTUNE'``. peft offers no plugin hook that would let this package run
before that lookup, so the error cannot be intercepted; the README and the model card say so.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

PEFT_TYPE_NAME = "FISHERTUNE"
PREFIX = "fishertune_"


def _add_peft_type_member(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it to the enum first when it is missing."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    # type.__setattr__ bypasses EnumType.__setattr__, which forbids touching members.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


FISHERTUNE = _add_peft_type_member(PEFT_TYPE_NAME)


def register(config_cls, model_cls) -> None:
    """Register the method with peft (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if PEFT_TYPE_TO_TUNER_MAPPING.get(FISHERTUNE) is not model_cls:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
