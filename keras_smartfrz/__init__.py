"""keras-smartfrz: freeze converged layers during Keras training."""

from keras_smartfrz import datasets
from keras_smartfrz import policies
from keras_smartfrz.auto_freeze import AutoFreeze
from keras_smartfrz.cka import linear_cka
from keras_smartfrz.freezing import freeze_layers
from keras_smartfrz.freezing import rebuild_train_step
from keras_smartfrz.freezing_callback import FreezeDecision
from keras_smartfrz.freezing_callback import FreezingCallback
from keras_smartfrz.linear_freezing import LinearFreezing
from keras_smartfrz.optimizer_state import release_optimizer_state
from keras_smartfrz.predictor import FreezePredictor
from keras_smartfrz.predictor import PredictorPolicy
from keras_smartfrz.predictor import load_predictor
from keras_smartfrz.predictor import save_predictor
from keras_smartfrz.saving import load_model
from keras_smartfrz.smart_frz import SmartFRZ
from keras_smartfrz.units import FreezeUnit
from keras_smartfrz.units import find_units

__version__ = "0.1.0"

__all__ = [
    "AutoFreeze",
    "FreezeDecision",
    "FreezePredictor",
    "FreezeUnit",
    "FreezingCallback",
    "LinearFreezing",
    "PredictorPolicy",
    "SmartFRZ",
    "datasets",
    "find_units",
    "freeze_layers",
    "linear_cka",
    "load_model",
    "load_predictor",
    "policies",
    "rebuild_train_step",
    "release_optimizer_state",
    "save_predictor",
]
