"""FisherTune as a peft method: ``import peft_fishertune`` registers it with peft.

import peft_fishertune
from peft import get_peft_model
model = get_peft_model(base_model, peft_fishertune.FisherTuneConfig(target_modules=[...]))
"""

from ._peft_registry import FISHERTUNE as PEFT_TYPE
from ._peft_registry import register as _register
from .calibration import calibrate
from .callback import FisherTuneCallback
from .config import FisherTuneConfig
from .layer import FisherTuneLayer
from .model import FisherTuneModel
from .naming import vit_target_modules
from .perturbation import DomainShift
from .schedules import density_at
from .scores import Scores
from .selection import Selection, global_topk
from .stages import FisherTuneStages, create_optimizer

__version__ = "0.1.0"

_register(FisherTuneConfig, FisherTuneModel)

__all__ = [
    "DomainShift",
    "FisherTuneCallback",
    "FisherTuneStages",
    "FisherTuneConfig",
    "FisherTuneLayer",
    "FisherTuneModel",
    "PEFT_TYPE",
    "Scores",
    "Selection",
    "calibrate",
    "create_optimizer",
    "density_at",
    "global_topk",
    "vit_target_modules",
]
