"""The one place that touches peft internals: adding ``FISHERTUNE`` to ``peft.PeftType``, and more.

peft's ``register_peft_method`` only accepts names that are already members of the ``PeftType`` enum, and
enums cannot be extended through a public API. This module adds the member the way ``enum`` itself does
when it builds a class (member object, name/value maps, member-name list, class attribute), and then
calls ``register_peft_method``. Nothing else in the package knows these internals.

It also routes two PeftModel methods that peft offers no per-method hook for, for FisherTune models only:
the model card (a FisherTune section is added) and ``push_to_hub`` (the saved folder is uploaded as is).

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
    """Register the method with peft (idempotent) and route PeftModel's card and Hub upload for it."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if PEFT_TYPE_TO_TUNER_MAPPING.get(FISHERTUNE) is not model_cls:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
    _route_peft_model_methods()


def _is_fishertune(peft_model) -> bool:
    return any(config.peft_type == FISHERTUNE for config in getattr(peft_model, "peft_config", {}).values())


def _route_peft_model_methods() -> None:
    """PeftModel has no per-method hook for its model card or Hub upload. For models with a FisherTune adapter,
    the card gets a FisherTune section and push_to_hub uploads the saved folder as it is; every other model
    keeps peft's behaviour."""
    from peft import PeftModel

    from .hub import push_to_hub, update_model_card

    if getattr(PeftModel, "_fishertune_routed", False):
        return
    original_card = PeftModel.create_or_update_model_card
    original_push = PeftModel.push_to_hub

    def create_or_update_model_card(self, output_dir):
        original_card(self, output_dir)
        if _is_fishertune(self):
            update_model_card(self, output_dir)

    def push(self, repo_id, *args, **kwargs):
        if not _is_fishertune(self):
            return original_push(self, repo_id, *args, **kwargs)
        return push_to_hub(self, repo_id, *args, **kwargs)

    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.push_to_hub = push
    PeftModel._fishertune_routed = True
