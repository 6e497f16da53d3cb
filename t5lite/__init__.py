"""t5lite: T5 and decoder-only language models in JAX/Flax, trained end to end.

The public API, re-exported here so notebooks need one import:

    import t5lite
    model = t5lite.Model(t5lite.ModelConfig(arch="decoder_only", ...))

Importing t5lite never imports TensorFlow or gin.
"""

from t5lite.checkpoints import Checkpointer, CheckpointError, restore_params
from t5lite.losses import cross_entropy_with_logits
from t5lite.models.config import ModelConfig
from t5lite.models.model import LossConfig, Model, build_model
from t5lite.optimizers import OptimizerConfig, make_optimizer
from t5lite.partitioning import MeshConfig, make_mesh
from t5lite.schedules import ScheduleConfig, make_schedule
from t5lite.trainer import TrainConfig, eval_step, init_state, train_step

__version__ = "0.1.0"
