"""The callback every freezing rule shares: sample -> history -> policy -> apply."""

import dataclasses
import json
import os
import time
import warnings

import keras
import numpy as np

from keras_smartfrz import freezing
from keras_smartfrz import policies
from keras_smartfrz import summaries
from keras_smartfrz.history import SnapshotCadence
from keras_smartfrz.history import SnapshotHistory
from keras_smartfrz.sampling import WeightSampler
from keras_smartfrz.sampling import draw_sample_positions
from keras_smartfrz.units import find_units

MODES = ("prefix", "any")
BACKUP_FILENAME = "smartfrz_state.npz"
BACKUP_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class FreezeDecision:
    """One unit's verdict at one freezing stage.

    Attributes:
        epoch: 0-based epoch at whose end the stage ran.
        layer: the unit's name (path of its weighted layer).
        score: the policy's score in `[0, 1]`, higher = readier to freeze.
        frozen: whether the unit was frozen at this stage.
    """

    epoch: int
    layer: str
    score: float
    frozen: bool


def _check_path(name, value):
    if value is not None and (
        not isinstance(value, (str, os.PathLike)) or not os.fspath(value)
    ):
        raise ValueError(
            f"`{name}` must be None or a non-empty path (str or "
            f"os.PathLike); received {name}={value!r}."
        )


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{value!r} is not JSON serialisable")


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}; received "
            f"{name}={value!r}."
        )
    if value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}; received "
            f"{name}={value!r}."
        )


@keras.saving.register_keras_serializable(package="keras_smartfrz")
class FreezingCallback(keras.callbacks.Callback):
    """Freezes layers during `fit` as a decision rule (a policy) proposes.

    The shared engine of `SmartFRZ`, `LinearFreezing` and `AutoFreeze`. At the
    start of `fit` it lists the model's freezable units (a layer owning
    trainable weights, with the `BatchNormalization` that follows it) in
    forward order. While training it samples each still-trainable unit's
    weights (`sample_size` fixed positions per unit drawn from `seed`, read by
    one compiled gather) `window_size` times per freezing stage. Every
    `freeze_every` epochs, from epoch `min_epochs` on, it gives the policy the
    history window, freezes what the policy proposes (in `mode`), and rebuilds
    the train step once so frozen layers cost no gradient work from the next
    step on. The last unit (the head) never freezes, nor does a unit whose
    weights hold NaN or inf.

    After `fit`, `frozen_layers` lists the frozen layer paths in freeze order
    and `decisions` every verdict. Each epoch's logs get `frozen_fraction`, the
    share of units frozen so far. Layers stay frozen after `fit`.
    `overhead_seconds` holds the wall-clock time the callback itself spent
    in this `fit`: `"sampling"` (the snapshots), `"decision"` (the freezing
    stages, policy and rebuild) and `"freezing"` (the rebuild alone, part of
    `"decision"`; the retrace it causes happens in the next train step and
    is not counted).

    Args:
        policy: a `keras_smartfrz.policies.FreezePolicy`.
        mode: `"prefix"` (default): a unit freezes only when every unit before
            it is frozen, so back-propagation stops at the frozen boundary and
            the frozen part costs a forward pass only. `"any"`: any unit may
            freeze; this saves only its own weight-gradient and update work.
        min_epochs: no freezing before this many epochs are done (default 1).
        freeze_every: epochs between freezing stages (default 1).
        window_size: snapshots kept per unit, aimed at one stage's worth
            (default 30).
        sample_size: sampled weights per unit (default 1024).
        seed: seed of the sampled positions (default 0).
        frozen_batchnorm: `"batch_statistics"` (default) or `"inference"`;
            see `keras_smartfrz.freeze_layers`.
        verbose: 0 (default) is silent, 1 prints each freeze.
        log_dir: `None` (default), or a directory to write TensorBoard
            summaries of every freezing stage to, in its `smartfrz`
            subdirectory: frozen fractions, estimated compute saved, each
            scored unit's score, a table of the decisions and the state the
            SmartFRZ dashboard draws. It may be the `log_dir` of a
            `keras.callbacks.TensorBoard` (which writes `train` and
            `validation`). See `keras_smartfrz.summaries`.
        backup_dir: `None` (default), or a directory where the callback's
            own state (frozen units, sampled history, snapshot schedule,
            decisions, the policy's state) is saved at the end of every
            epoch, in `smartfrz_state.npz`. Use it with
            `keras.callbacks.BackupAndRestore` (it may be the same
            `backup_dir`; the order of the two callbacks does not matter):
            when an interrupted `fit` is resumed, the state saved for the
            epoch `fit` resumes at is restored at the start of that epoch,
            the frozen layers are frozen again before the first step, and
            training continues to the same decisions as an uninterrupted
            run. The state is deleted when `fit` finishes. A state that does
            not match the model, the callback's arguments or the resumed
            epoch is ignored with a warning.

    Example:

    ```python
    callback = keras_smartfrz.FreezingCallback(
        keras_smartfrz.policies.LinearPolicy(freeze_start=0.0))
    model.fit(x, y, epochs=4, callbacks=[callback])
    print(callback.frozen_layers)
    ```
    """

    def __init__(
        self,
        policy,
        mode="prefix",
        min_epochs=1,
        freeze_every=1,
        window_size=30,
        sample_size=1024,
        seed=0,
        frozen_batchnorm="batch_statistics",
        verbose=0,
        log_dir=None,
        backup_dir=None,
    ):
        super().__init__()
        freezing.require_tensorflow_backend()
        if not isinstance(policy, policies.FreezePolicy):
            raise ValueError(
                "`policy` must be a keras_smartfrz.policies.FreezePolicy; "
                f"received policy={policy!r}."
            )
        if mode not in MODES:
            raise ValueError(
                f"`mode` must be one of {MODES}; received mode={mode!r}."
            )
        _check_positive_int("min_epochs", min_epochs, minimum=0)
        _check_positive_int("freeze_every", freeze_every)
        _check_positive_int("window_size", window_size, minimum=2)
        _check_positive_int("sample_size", sample_size)
        _check_positive_int("seed", seed, minimum=0)
        if frozen_batchnorm not in freezing.FROZEN_BATCHNORM_MODES:
            raise ValueError(
                "`frozen_batchnorm` must be one of "
                f"{freezing.FROZEN_BATCHNORM_MODES}; received "
                f"frozen_batchnorm={frozen_batchnorm!r}."
            )
        if verbose not in (0, 1, True, False):
            raise ValueError(
                f"`verbose` must be 0 or 1; received verbose={verbose!r}."
            )
        _check_path("log_dir", log_dir)
        _check_path("backup_dir", backup_dir)
        self.policy = policy
        self.mode = mode
        self.min_epochs = min_epochs
        self.freeze_every = freeze_every
        self.window_size = window_size
        self.sample_size = sample_size
        self.seed = seed
        self.frozen_batchnorm = frozen_batchnorm
        self.verbose = int(verbose)
        self.log_dir = log_dir
        self.backup_dir = backup_dir
        self._summaries = None
        self._reset_state()

    def _reset_state(self):
        if self._summaries is not None:
            self._summaries.close()
        self._summaries = None
        self.units = []
        self.frozen_layers = []
        self.frozen_units = []
        self.decisions = []
        self._active = []
        self._positions = {}
        self._unit_index = {}
        self.overhead_seconds = {"sampling": 0.0, "decision": 0.0,
                                 "freezing": 0.0}
        self._sampler = None
        self._sample_rows = None
        self._history = None
        self._cadence = None
        self._step = 0
        self._epoch_start_step = 0
        self._warned_nonfinite = set()
        self._restore_pending = False
        self._setup_pending = False

    # ------------------------------------------------------------------ fit
    def on_train_begin(self, logs=None):
        self._reset_state()
        self.policy.reset()
        if not self.model.built or not self.model.weights:
            # A subclassed model fit without being built first gets its
            # variables in the first train step: set up after it.
            self._setup_pending = True
            return
        self._setup()

    def _setup(self):
        self._setup_pending = False
        self.units = find_units(self.model)
        self._unit_index = {id(u): i for i, u in enumerate(self.units)}
        if len(self.units) < 2:
            warnings.warn(
                f"{type(self).__name__}: model '{self.model.name}' has "
                f"{len(self.units)} trainable unit(s); the last unit (the "
                "head) never freezes, so nothing will be frozen.",
                stacklevel=2,
            )
        self._active = list(self.units)
        if self.log_dir is not None:
            self._summaries = summaries.StageSummaryWriter(
                self.log_dir,
                [u.name for u in self.units],
                [u.num_params for u in self.units],
            )
        if self.policy.needs_history and len(self.units) >= 2:
            for index, unit in enumerate(self.units):
                self._positions[unit.name] = draw_sample_positions(
                    unit.num_params, self.sample_size, self.seed, index
                )
            self._start_sampling()
            steps = self.params.get("steps") if self.params else None
            self._cadence = SnapshotCadence(
                self.window_size,
                steps * self.freeze_every if steps else None,
            )
        # Restored at the first epoch's start, not here: by then
        # `BackupAndRestore` (before or after this callback in the list) has
        # built the optimizer over every trainable variable and loaded the
        # backup, and the epoch `fit` resumes at is known.
        self._restore_pending = self.backup_dir is not None

    def on_epoch_begin(self, epoch, logs=None):
        if self._restore_pending and not self._setup_pending:
            self._restore_pending = False
            self._restore_backup(epoch)
        self._epoch_start_step = self._step
        if self._summaries is not None:
            self._summaries.begin_epoch(epoch)

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index of the last step run (several with
        # steps_per_execution > 1); this is the only per-step Python work.
        self._step = self._epoch_start_step + batch + 1
        if self._setup_pending:
            self._setup()
        if self._cadence is not None and self._cadence.due(self._step):
            start = time.perf_counter()
            self._history.append(self._sampler()[self._sample_rows])
            self.overhead_seconds["sampling"] += time.perf_counter() - start

    def on_epoch_end(self, epoch, logs=None):
        if self._cadence is not None and self._cadence.steps_per_stage is None:
            steps_in_epoch = self._step - self._epoch_start_step
            self._cadence.set_steps_per_stage(
                steps_in_epoch * self.freeze_every, self._step
            )
        if self._is_stage(epoch):
            start = time.perf_counter()
            self._run_stage(epoch)
            self.overhead_seconds["decision"] += time.perf_counter() - start
        if self._summaries is not None and self._is_stage(epoch):
            # After the stage, so a stage that decided nothing still logs.
            self._summaries.write_stage(
                epoch, [d for d in self.decisions if d.epoch == epoch]
            )
        if logs is not None:
            logs["frozen_fraction"] = self.frozen_fraction
        if self.backup_dir is not None:
            self._save_backup(epoch + 1)

    def on_train_end(self, logs=None):
        if self._summaries is not None:
            self._summaries.close()
            self._summaries = None
        if self.backup_dir is not None:
            # `fit` finished (an exception skips on_train_end): as
            # BackupAndRestore, forget the state.
            for path in self._backup_paths():
                if os.path.exists(path):
                    os.remove(path)

    # ------------------------------------------------------------ decisions
    @property
    def frozen_fraction(self):
        """Share of the model's units frozen so far."""
        return len(self.frozen_units) / len(self.units) if self.units else 0.0

    def _is_stage(self, epoch):
        done = epoch + 1
        return done >= self.min_epochs and done % self.freeze_every == 0

    def _run_stage(self, epoch):
        # The head is the last unit and never freezes, so it is always the
        # last active unit; the history rows follow `self._active`.
        candidates = self._active[:-1]
        if not candidates:
            return
        window = None
        if self.policy.needs_history:
            if len(self._history) < 2:
                return
            window = self._history.window()[:-1]
        stage = policies.FreezeStage(
            epoch=epoch,
            epochs=int(self.params.get("epochs") or epoch + 1),
            unit_names=[u.name for u in candidates],
            num_units=len(self.units),
            num_frozen=len(self.frozen_units),
            window=window,
            unit_indices=np.array(
                [self._unit_index[id(u)] for u in candidates], np.int64
            ),
        )
        scores, propose = self.policy.decide(stage)
        propose = np.asarray(propose, dtype=bool) & self._finite(candidates)
        chosen = set(policies.select_units(propose, self.mode).tolist())
        for index, unit in enumerate(candidates):
            self.decisions.append(
                FreezeDecision(
                    epoch=epoch,
                    layer=unit.name,
                    score=float(scores[index]),
                    frozen=index in chosen,
                )
            )
        if chosen:
            self._freeze([candidates[i] for i in sorted(chosen)], epoch)

    def _finite(self, units):
        """Which units hold only finite weights; warns once per bad unit."""
        finite = np.array(
            [
                all(
                    bool(keras.ops.all(keras.ops.isfinite(v)))
                    for v in unit.trainable_weights
                )
                for unit in units
            ],
            dtype=bool,
        )
        for unit, ok in zip(units, finite):
            if not ok and unit.name not in self._warned_nonfinite:
                self._warned_nonfinite.add(unit.name)
                warnings.warn(
                    f"{type(self).__name__}: unit '{unit.name}' has NaN or "
                    "inf weights; it is not frozen.",
                    stacklevel=2,
                )
        return finite

    def _freeze(self, units, epoch):
        layers = [layer for unit in units for layer in unit.layers]
        start = time.perf_counter()
        freezing.freeze_layers(
            self.model, layers, frozen_batchnorm=self.frozen_batchnorm
        )
        # Counted in "decision" too (it runs inside the stage); kept apart
        # here so the rebuild's share can be told from the policy's.
        self.overhead_seconds["freezing"] += time.perf_counter() - start
        self.frozen_units.extend(u.name for u in units)
        self.frozen_layers.extend(p for u in units for p in u.layer_paths)
        keep = [u not in units for u in self._active]
        self._active = [u for u, k in zip(self._active, keep) if k]
        if self._history is not None:
            # The compiled sampler is kept: it still reads the frozen units
            # (a few thousand values), whose rows are dropped here, rather
            # than compiling a new gather at every stage (0.4-1.5 s each).
            self._history.keep_units(keep)
            self._sample_rows = self._sample_rows[np.asarray(keep, bool)]
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: {type(self).__name__} froze "
                f"{', '.join(u.name for u in units)} "
                f"({len(self.frozen_units)}/{len(self.units)} units frozen)."
            )

    def _start_sampling(self):
        self._sampler = WeightSampler(
            self._active, [self._positions[u.name] for u in self._active]
        )
        self._sample_rows = np.arange(len(self._active))
        self._history = SnapshotHistory(
            len(self._active), self.window_size, self.sample_size
        )

    # --------------------------------------------------------------- backup
    def _backup_paths(self):
        """The latest state and the one before it (kept for a crash between
        this callback's save and BackupAndRestore's at the same epoch end)."""
        path = os.path.join(os.fspath(self.backup_dir), BACKUP_FILENAME)
        return path, path + ".bkp"

    def _fingerprint(self):
        return {
            "class": type(self).__name__,
            "units": [u.name for u in self.units],
            "mode": self.mode,
            "min_epochs": self.min_epochs,
            "freeze_every": self.freeze_every,
            "window_size": self.window_size,
            "sample_size": self.sample_size,
            "seed": self.seed,
            "frozen_batchnorm": self.frozen_batchnorm,
        }

    def _save_backup(self, next_epoch):
        """Writes the state `fit` needs to resume at `next_epoch`."""
        meta = {
            "format": BACKUP_FORMAT,
            "next_epoch": int(next_epoch),
            "fingerprint": self._fingerprint(),
            "frozen_units": list(self.frozen_units),
            "frozen_layers": list(self.frozen_layers),
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
            "step": int(self._step),
            "cadence": (
                None if self._cadence is None else dict(vars(self._cadence))
            ),
            "history_count": (
                None if self._history is None else int(self._history._count)
            ),
            "policy_state": self.policy.get_state(),
            "warned_nonfinite": sorted(self._warned_nonfinite),
        }
        arrays = {"meta": np.array(json.dumps(meta, default=_json_default))}
        if self._history is not None:
            arrays["history"] = self._history._buffer
            arrays["sample_rows"] = self._sample_rows
        latest, previous = self._backup_paths()
        os.makedirs(os.path.dirname(latest), exist_ok=True)
        temporary = latest + ".tmp"
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
        if os.path.exists(latest):
            os.replace(latest, previous)
        os.replace(temporary, latest)  # atomic: never a half-written state

    def _read_backup(self, path):
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k != "meta"}
        return meta, arrays

    def _restore_backup(self, epoch):
        """Restores the state saved for `epoch`, if there is one."""
        found = []
        for path in self._backup_paths():
            if not os.path.exists(path):
                continue
            try:
                meta, arrays = self._read_backup(path)
            except Exception as error:  # a truncated or foreign file
                warnings.warn(
                    f"{type(self).__name__}: cannot read the freezing state "
                    f"'{path}' ({error}); it is ignored.",
                    stacklevel=2,
                )
                continue
            found.append(meta.get("next_epoch"))
            if meta.get("next_epoch") == epoch:
                break
        else:
            if found:
                warnings.warn(
                    f"{type(self).__name__}: the freezing state in "
                    f"'{self.backup_dir}' was saved to resume at epoch(s) "
                    f"{found}, but `fit` starts at epoch {epoch}; it is "
                    "ignored and freezing starts afresh. Use "
                    "keras.callbacks.BackupAndRestore to resume.",
                    stacklevel=2,
                )
            return False
        if meta.get("format") != BACKUP_FORMAT or (
            meta.get("fingerprint") != self._fingerprint()
        ):
            warnings.warn(
                f"{type(self).__name__}: the freezing state '{path}' was "
                "saved for another model or other arguments; it is ignored.",
                stacklevel=2,
            )
            return False
        by_name = {u.name: u for u in self.units}
        units = [by_name[name] for name in meta["frozen_units"]]
        if units:
            optimizer = getattr(self.model, "optimizer", None)
            if optimizer is not None and not optimizer.built:
                # As in the uninterrupted run, the optimizer's slots cover
                # every trainable variable, frozen later or not.
                optimizer.build(self.model.trainable_variables)
            freezing.freeze_layers(
                self.model,
                [layer for unit in units for layer in unit.layers],
                frozen_batchnorm=self.frozen_batchnorm,
            )
        frozen = set(meta["frozen_units"])
        self.frozen_units = list(meta["frozen_units"])
        self.frozen_layers = list(meta["frozen_layers"])
        self._active = [u for u in self.units if u.name not in frozen]
        self.decisions = [FreezeDecision(**d) for d in meta["decisions"]]
        self._step = int(meta["step"])
        self._warned_nonfinite = set(meta["warned_nonfinite"])
        if self._history is not None and "history" in arrays:
            self._history._buffer = np.array(arrays["history"], np.float32)
            self._history._count = int(meta["history_count"])
            self._sample_rows = np.array(arrays["sample_rows"], np.int64)
        if self._cadence is not None and meta["cadence"] is not None:
            vars(self._cadence).update(meta["cadence"])
        self.policy.set_state(meta["policy_state"])
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: {type(self).__name__} restored "
                f"{len(self.frozen_units)}/{len(self.units)} frozen units "
                f"from '{path}'."
            )
        return True

    def get_config(self):
        return {
            "policy": keras.saving.serialize_keras_object(self.policy),
            "mode": self.mode,
            "min_epochs": self.min_epochs,
            "freeze_every": self.freeze_every,
            "window_size": self.window_size,
            "sample_size": self.sample_size,
            "seed": self.seed,
            "frozen_batchnorm": self.frozen_batchnorm,
            "verbose": self.verbose,
            "log_dir": (
                None if self.log_dir is None else os.fspath(self.log_dir)
            ),
            **(
                {}
                if self.backup_dir is None
                else {"backup_dir": os.fspath(self.backup_dir)}
            ),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["policy"] = keras.saving.deserialize_keras_object(
            config["policy"]
        )
        return cls(**config)
