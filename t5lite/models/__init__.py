"""The model zoo: configs, networks (logical axes only) and the model layer (loss, score)."""

from t5lite.models.config import ModelConfig
from t5lite.models.model import Model, build_model
from t5lite.models.transformer import DecoderOnly, EncoderDecoder, build_network
