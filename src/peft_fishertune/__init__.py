"""FisherTune as a peft method: ``import peft_fishertune`` registers it with peft.

import peft_fishertune
from peft import get_peft_model
model = get_peft_model(base_model, peft_fishertune.FisherTuneConfig(target_modules=[...]))
"""

from ._peft_registry import FISHERTUNE as PEFT_TYPE
from ._peft_registry import register as _register
from .calibration import calibrate
from .config import FisherTuneConfig
from .layer import FisherTuneLayer
from .model import FisherTuneModel
from .perturbation import DomainShift
from .scores import Scores
from .selection import Selection, global_topk

__version__ = "0.1.0"

_register(FisherTuneConfig, FisherTuneModel)

__all__ = [
    "DomainShift",
    "FisherTuneConfig",
    "FisherTuneLayer",
    "FisherTuneModel",
    "PEFT_TYPE",
    "Scores",
    "Selection",
    "calibrate",
    "global_topk",
]
