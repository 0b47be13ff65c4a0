"""Freeze policies: pure decision rules that share one interface.

A policy reads a `FreezeStage` (what the engine knows at a freezing stage) and
returns, for each candidate unit, a score in `[0, 1]` (higher: readier to
freeze) and whether it proposes to freeze it. Policies never touch the model;
the engine applies their proposals (prefix or any mode, never the head).
"""

import dataclasses

import keras
import numpy as np


@dataclasses.dataclass
class FreezeStage:
    """What a policy sees at one freezing stage.

    Attributes:
        epoch: the 0-based index of the epoch that just ended.
        epochs: the number of epochs `fit` was asked to run.
        unit_names: candidate units (still trainable, not the head), in
            forward order.
        num_units: all units of the model, frozen ones and the head included.
        num_frozen: units frozen so far.
        window: sampled weights of the candidates, shape `(len(unit_names),
            T, sample_size)`, oldest snapshot first; `None` for policies that
            set `needs_history = False`.
        unit_indices: each candidate's position among all `num_units`
            units (forward order); `None` reads as the candidates being the
            last units before the head (see `positions()`).
    """

    epoch: int
    epochs: int
    unit_names: list
    num_units: int
    num_frozen: int
    window: np.ndarray = None
    unit_indices: np.ndarray = None

    def positions(self):
        """`unit_indices` as an int array, filled in when it is `None`."""
        if self.unit_indices is not None:
            return np.asarray(self.unit_indices, dtype=np.int64)
        count = len(self.unit_names)
        start = max(0, self.num_units - 1 - count)
        return np.arange(start, start + count, dtype=np.int64)

    @property
    def progress(self):
        """Fraction of the planned training done at the end of this epoch."""
        return (self.epoch + 1) / max(1, self.epochs)


@keras.saving.register_keras_serializable(package="keras_smartfrz")
class FreezePolicy:
    """Base class of the decision rules.

    Subclasses implement `decide(stage) -> (scores, freeze)`, both arrays of
    length `len(stage.unit_names)`, and `get_config()`.
    """

    needs_history = True

    def reset(self):
        """Forgets any state kept between stages (called at `fit` start)."""

    def get_state(self):
        """The state kept between stages, as a JSON-serialisable dict.

        Saved with the freezing callback's backup (`backup_dir=`) so that a
        resumed `fit` decides as an uninterrupted one would. Stateless
        policies return `{}` (the default).
        """
        return {}

    def set_state(self, state):
        """Restores a state returned by `get_state()`."""

    def decide(self, stage):
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_smartfrz")
class LinearPolicy(FreezePolicy):
    """The frozen prefix grows linearly with training progress.

    As Composer's `LayerFreezing` and FreezeOut's schedule: nothing is frozen
    before `freeze_start` of training; from there the frozen share of the
    non-head units grows linearly to `freeze_level` at the end of training.

    Args:
        freeze_start: fraction of training before any freezing (default 0.5).
        freeze_level: fraction of the non-head units frozen at the end of
            training (default 1.0).
    """

    needs_history = False

    def __init__(self, freeze_start=0.5, freeze_level=1.0):
        if not 0.0 <= freeze_start < 1.0:
            raise ValueError(
                "`freeze_start` must be in [0, 1); received "
                f"freeze_start={freeze_start!r}."
            )
        if not 0.0 < freeze_level <= 1.0:
            raise ValueError(
                "`freeze_level` must be in (0, 1]; received "
                f"freeze_level={freeze_level!r}."
            )
        self.freeze_start = freeze_start
        self.freeze_level = freeze_level

    def target_fraction(self, progress):
        """The frozen share of non-head units wanted at `progress`."""
        if progress <= self.freeze_start:
            return 0.0
        ramp = (progress - self.freeze_start) / (1.0 - self.freeze_start)
        return self.freeze_level * min(1.0, ramp)

    def decide(self, stage):
        candidates = len(stage.unit_names)
        freezable = stage.num_units - 1
        target = int(np.floor(self.target_fraction(stage.progress) * freezable))
        count = int(np.clip(target - stage.num_frozen, 0, candidates))
        freeze = np.arange(candidates) < count
        return freeze.astype(np.float32), freeze

    def get_config(self):
        return {
            "freeze_start": self.freeze_start,
            "freeze_level": self.freeze_level,
        }


def relative_update_norm(window):
    """Mean weight change between consecutive snapshots, per unit, relative to
    the norm of the unit's latest sampled weights. `window`: `(units, T, S)`."""
    steps = np.linalg.norm(np.diff(window, axis=1), axis=2).mean(axis=1)
    scale = np.linalg.norm(window[:, -1], axis=1)
    return steps / np.maximum(scale, 1e-12)


@keras.saving.register_keras_serializable(package="keras_smartfrz")
class AutoFreezePolicy(FreezePolicy):
    """AutoFreeze's rule (Liu et al. 2021), on weight-update norms.

    AutoFreeze freezes a front layer once the change of its gradient norm
    between two intervals is below the `percentile`-th percentile of those
    changes over all active layers. In Keras, per-layer gradient norms would
    need a custom train step or extra backward work, while the weight-update
    norm comes free from the sampled snapshots the engine already keeps; for
    an optimizer step `dw = -lr * g` (SGD) the two are proportional, and for
    adaptive optimizers the update norm is what actually moves the layer. So
    this rule uses the relative weight-update norm (`relative_update_norm`)
    and its change between consecutive stages: `|u_prev - u| / u_prev`.

    Args:
        percentile: a unit freezes when its change is at or below this
            percentile of the changes of all candidates (default 50).
    """

    def __init__(self, percentile=50.0):
        if not 0.0 < percentile <= 100.0:
            raise ValueError(
                "`percentile` must be in (0, 100]; received "
                f"percentile={percentile!r}."
            )
        self.percentile = percentile
        self.reset()

    def reset(self):
        self._previous_norms = {}

    def get_state(self):
        return {
            "previous_norms": {
                name: float(norm)
                for name, norm in self._previous_norms.items()
            }
        }

    def set_state(self, state):
        self._previous_norms = dict(state.get("previous_norms", {}))

    def decide(self, stage):
        count = len(stage.unit_names)
        scores = np.zeros(count, np.float32)
        freeze = np.zeros(count, bool)
        if stage.window is None or stage.window.shape[1] < 2:
            return scores, freeze
        norms = relative_update_norm(stage.window)
        previous = np.array(
            [self._previous_norms.get(n, np.nan) for n in stage.unit_names],
            dtype=np.float64,  # the same whether restored (JSON) or not
        )
        self._previous_norms.update(zip(stage.unit_names, norms))
        with np.errstate(divide="ignore", invalid="ignore"):
            change = np.abs(previous - norms) / previous
        valid = np.isfinite(change)
        if not valid.any():
            return scores, freeze
        cutoff = np.percentile(change[valid], self.percentile)
        freeze = valid & (change <= cutoff)
        scores = np.where(valid, 1.0 - np.clip(change, 0.0, 1.0), 0.0)
        return scores.astype(np.float32), freeze

    def get_config(self):
        return {"percentile": self.percentile}


def select_units(freeze, mode):
    """Indices of the candidates to freeze under `mode`.

    `"prefix"`: the leading run of proposed units (a unit freezes only when
    every unit before it is frozen). `"any"`: every proposed unit.
    """
    freeze = np.asarray(freeze, dtype=bool)
    if mode == "any":
        return np.flatnonzero(freeze)
    stop = np.flatnonzero(~freeze)
    return np.arange(stop[0] if len(stop) else len(freeze))
