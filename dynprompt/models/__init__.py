"""The dynamic-prompt model core: backbones, assembly, routers, heads and checkpoints."""

from dynprompt.models.assembly import Assembled, arrangement_index, assemble
from dynprompt.models.backbone import (
    Backbone,
    BackboneError,
    Encoded,
    TokenizedRow,
    backbone_from_model,
    load_backbone,
)
from dynprompt.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_config,
    save_checkpoint,
    weights_checksum,
)
from dynprompt.models.config import (
    BASELINES,
    PROMPT_VARIANTS,
    VARIANTS,
    DynPromptConfig,
    TrainingInfo,
    make_config,
)
from dynprompt.models.inference import BatchStats, RowResult, classify_rows, predict
from dynprompt.models.model import DynPromptModel, Output
from dynprompt.models.routers import Routing

__all__ = [
    "BASELINES",
    "PROMPT_VARIANTS",
    "VARIANTS",
    "Assembled",
    "Backbone",
    "BackboneError",
    "BatchStats",
    "CheckpointError",
    "DynPromptConfig",
    "DynPromptModel",
    "Encoded",
    "Output",
    "RowResult",
    "Routing",
    "TokenizedRow",
    "TrainingInfo",
    "arrangement_index",
    "assemble",
    "backbone_from_model",
    "classify_rows",
    "load_backbone",
    "load_checkpoint",
    "make_config",
    "predict",
    "read_config",
    "save_checkpoint",
    "weights_checksum",
]
