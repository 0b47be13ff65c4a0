"""The callback every freezing rule shares: sample -> history -> policy -> apply."""

import dataclasses
import json
import os
import time
import warnings

import keras
import numpy as np

from keras_smartfrz import caching
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
BACKUP_FORMAT = 2
# `min_epochs="auto"`: the share of the planned epochs trained before the
# first freezing stage (see `auto_min_epochs`).
WARMUP_FRACTION = 0.3


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


def auto_min_epochs(epochs):
    """The warm-up `min_epochs="auto"` gives a `fit` of `epochs` epochs.

    `ceil(WARMUP_FRACTION * epochs)` and at least 1: 3 epochs of 10, 2 of 6,
    6 of 20; 1 when the number of epochs is unknown. Measured on the
    benchmark suite (`benchmarks/results/suite_min_epochs_notes.md`): a
    warm-up of 3 of 10 epochs cut SmartFRZ's accuracy cost by 60% against
    freezing after the first epoch, for 7 points less of the FLOPs saved.
    """
    if not epochs:
        return 1
    return max(1, int(np.ceil(WARMUP_FRACTION * int(epochs) - 1e-9)))


def _check_min_epochs(min_epochs):
    if isinstance(min_epochs, str):
        if min_epochs != "auto":
            raise ValueError(
                "`min_epochs` must be 'auto' or an integer >= 0; received "
                f"min_epochs={min_epochs!r}."
            )
        return
    if (
        isinstance(min_epochs, bool)
        or not isinstance(min_epochs, (int, np.integer))
        or min_epochs < 0
    ):
        raise ValueError(
            "`min_epochs` must be 'auto' or an integer >= 0; received "
            f"min_epochs={min_epochs!r}."
        )


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
    one compiled gather) `window_size` times per freezing stage, in the
    epochs whose snapshots a stage will read (not in a warm-up before
    `min_epochs`, nor after the run's last stage). Every
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
    is not counted) and `"caching"` (finding the cut, deriving a deeper
    cut's cache and managing the activation cache when
    `cache_activations=True`; filling it happens inside the train steps and
    is not counted).

    Args:
        policy: a `keras_smartfrz.policies.FreezePolicy`.
        mode: `"prefix"` (default): a unit freezes only when every unit before
            it is frozen, so back-propagation stops at the frozen boundary and
            the frozen part costs a forward pass only. `"any"`: any unit may
            freeze; this saves only its own weight-gradient and update work.
        min_epochs: no freezing before this many epochs are done (default
            1), or `"auto"`: 30% of the `fit`'s epochs, rounded up
            (`auto_min_epochs`; `SmartFRZ`'s default).
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
            not match the model, the callback's arguments or the weights
            `BackupAndRestore` restored is ignored with a warning. Under
            `tf.distribute.MultiWorkerMirroredStrategy` only the chief writes
            to `backup_dir` (the other workers use a temporary directory
            inside it) and every worker restores the chief's state.
        backup_freq: `"epoch"` (default) or an integer N: also save the
            state every N batches, after the same batches as
            `keras.callbacks.BackupAndRestore(save_freq=N)` saves the
            weights. Give both the same value.
        cache_activations: `False` (default) or `True`: once a front part
            of the model is frozen, keep its output for every training
            example and train the rest of the model on it, so later epochs
            skip the frozen part's forward pass too. It needs a Sequential
            or Functional model, `frozen_batchnorm="inference"`, nothing
            random in the frozen part, and an input pipeline that gives the
            same examples every epoch (shuffling is fine, random
            augmentation is not); where that does not hold it stays off and
            a warning says why. The epoch after the first freeze fills the
            cache; a later freeze that moves the cut deeper computes the new
            cache from the old one at the freezing stage. `cache_info`
            reports what it did: the current cache's cut, size and hits
            and misses per epoch, and `"cuts"`, each cut the run moved to
            with the stage that made it, the cut it was derived from, its
            size (None until its first step when the size comes from the
            data, as for a text model built for any sequence length) and
            its own hits and misses per epoch. See
            `keras_smartfrz.caching`.
        cache_budget_bytes: the largest cache allowed, in bytes (default
            1 GiB). It holds one epoch's examples; a bigger cache is not
            made (a warning gives the size it would need).
        release_optimizer_state: `False` (default) or `True`: when layers
            freeze, free their weights' optimizer slots (e.g. Adam's
            moments); the other weights' state is untouched. A frozen layer
            made trainable again afterwards then needs a new optimizer.
            Not with `backup_dir` (a resumed run would lose the optimizer
            state). See `keras_smartfrz.release_optimizer_state`.

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
        cache_activations=False,
        cache_budget_bytes=2**30,
        release_optimizer_state=False,
        backup_freq="epoch",
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
        _check_min_epochs(min_epochs)
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
        for name, value in (
            ("cache_activations", cache_activations),
            ("release_optimizer_state", release_optimizer_state),
        ):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(
                    f"`{name}` must be True or False; received "
                    f"{name}={value!r}."
                )
        _check_positive_int("cache_budget_bytes", cache_budget_bytes)
        if release_optimizer_state and backup_dir is not None:
            raise ValueError(
                "`release_optimizer_state=True` cannot be combined with "
                "`backup_dir`: keras.callbacks.BackupAndRestore skips loading "
                "an optimizer whose frozen weights' state was released, so a "
                "resumed run would lose the optimizer state. Received "
                f"release_optimizer_state={release_optimizer_state!r} and "
                f"backup_dir={backup_dir!r}."
            )
        if backup_freq != "epoch" and (
            isinstance(backup_freq, bool)
            or not isinstance(backup_freq, (int, np.integer))
            or backup_freq < 1
        ):
            raise ValueError(
                "`backup_freq` must be 'epoch' or an integer >= 1 (the "
                "`save_freq` of keras.callbacks.BackupAndRestore); received "
                f"backup_freq={backup_freq!r}."
            )
        self.policy = policy
        self.mode = mode
        self.min_epochs = (
            min_epochs if isinstance(min_epochs, str) else int(min_epochs)
        )
        self.freeze_every = freeze_every
        self.window_size = window_size
        self.sample_size = sample_size
        self.seed = seed
        self.frozen_batchnorm = frozen_batchnorm
        self.verbose = int(verbose)
        self.log_dir = log_dir
        self.backup_dir = backup_dir
        self.cache_activations = bool(cache_activations)
        self.cache_budget_bytes = int(cache_budget_bytes)
        self.release_optimizer_state = bool(release_optimizer_state)
        self._backup_freq = backup_freq
        self._summaries = None
        self._cache = None
        self._reset_state()

    def _reset_state(self):
        if self._summaries is not None:
            self._summaries.close()
        self._summaries = None
        if self._cache is not None:
            self._cache.release()
        self._cache = None
        self._cache_off = None
        self._epoch_samples = None
        self._cache_warned = set()
        self.cache_info = {"status": "off", "reason": "not requested",
                           "cut": None, "bytes": 0, "hits": [],
                           "misses": [], "cuts": []}
        self.optimizer_bytes_released = 0
        self.units = []
        self.frozen_layers = []
        self.frozen_units = []
        self.decisions = []
        self._active = []
        self._positions = {}
        self._unit_index = {}
        self.overhead_seconds = {"sampling": 0.0, "decision": 0.0,
                                 "freezing": 0.0, "caching": 0.0}
        self._sampler = None
        self._sample_rows = None
        self._history = None
        self._cadence = None
        self._step = 0
        self._epoch_start_step = 0
        self._sampling = True
        self._min_epochs = (
            1 if self.min_epochs == "auto" else self.min_epochs
        )
        self._warned_nonfinite = set()
        self._restore_pending = False
        self._setup_pending = False
        self._reset_backup_schedule()

    # ------------------------------------------------------------------ fit
    def on_train_begin(self, logs=None):
        self._reset_state()
        if caching.remove_leftover_step(self.model):
            # An earlier `fit` with activation caching ended in an
            # exception and left its cached step on the model: this `fit`
            # trains with the model's own step.
            freezing.rebuild_train_step(self.model)
        self.policy.reset()
        if self.min_epochs == "auto":
            self._min_epochs = auto_min_epochs(
                (self.params or {}).get("epochs")
            )
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
        if self.cache_activations:
            self._cache_off = caching.static_refusal(self.model)
            if self._cache_off is None and not (self.params or {}).get(
                "steps"
            ):
                self._cache_off = "the number of steps per epoch is unknown"
            self.cache_info["reason"] = self._cache_off or "nothing frozen yet"
            if self._cache_off is not None:
                self._warn_cache(self._cache_off)
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
        self._begin_backup_epoch(epoch)
        self._epoch_start_step = self._step
        self._sampling = self._epoch_feeds_stage(epoch)
        if self._sampling and self._cadence is not None:
            # Back from epochs that fed no stage: the same snapshot steps as
            # if every epoch had been sampled.
            self._cadence.skip_to(self._step + 1)
        if self._summaries is not None:
            self._summaries.begin_epoch(epoch)

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index of the last step run (several with
        # steps_per_execution > 1); this is the only per-step Python work.
        self._step = self._epoch_start_step + batch + 1
        if self._setup_pending:
            self._setup()
        if (
            self.cache_activations
            and self._cache_off is None
            and batch + 1 >= self.params["steps"]
        ):
            # Once per epoch: examples seen this epoch (the loss tracker
            # counts them; validation resets it before on_epoch_end).
            self._epoch_samples = int(self.model._loss_tracker.count.numpy())
        if (
            self._sampling
            and self._cadence is not None
            and self._cadence.due(self._step)
        ):
            start = time.perf_counter()
            self._history.append(self._sampler()[self._sample_rows])
            self.overhead_seconds["sampling"] += time.perf_counter() - start
        self._backup_in_epoch(batch)

    def on_epoch_end(self, epoch, logs=None):
        cache_dropped = False
        if self._cache is not None:
            start = time.perf_counter()
            reason = self._cache.end_epoch()
            # `bytes` is known once the step was traced when the cut's
            # shapes come from the data.
            self.cache_info.update(
                status="filling" if self._cache.filling else "active",
                hits=list(self._cache.hits), misses=list(self._cache.misses),
                bytes=self._cache.nbytes,
            )
            if self.cache_info["cuts"]:
                # The current cache is the last cut's.
                self.cache_info["cuts"][-1].update(
                    hits=list(self._cache.hits),
                    misses=list(self._cache.misses),
                    bytes=self._cache.nbytes,
                )
            if reason is not None:
                self._cache_off = reason
                self._set_cache(None, reason)
                cache_dropped = True  # the train step is rebuilt below
            self.overhead_seconds["caching"] += time.perf_counter() - start
        frozen_before = len(self.frozen_units)
        if self._cadence is not None and self._cadence.steps_per_stage is None:
            steps_in_epoch = self._step - self._epoch_start_step
            self._cadence.set_steps_per_stage(
                steps_in_epoch * self.freeze_every, self._step
            )
        if self._is_stage(epoch):
            start = time.perf_counter()
            self._run_stage(epoch)
            self.overhead_seconds["decision"] += time.perf_counter() - start
        if cache_dropped and len(self.frozen_units) == frozen_before:
            # No freeze rebuilt the step at this stage: drop the cache's step
            # here (one rebuild per epoch end, whatever happened in it).
            start = time.perf_counter()
            freezing.rebuild_train_step(self.model)
            self.overhead_seconds["caching"] += time.perf_counter() - start
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
        if self._cache is not None:
            # The user's model gets its own train step back.
            self._set_cache(None, "fit ended")
            freezing.rebuild_train_step(self.model)
        if self._summaries is not None:
            self._summaries.close()
            self._summaries = None
        if self.backup_dir is not None:
            # `fit` finished (an exception skips on_train_end): as
            # BackupAndRestore, forget the state.
            self._delete_backup()

    # ------------------------------------------------------------ decisions
    @property
    def frozen_fraction(self):
        """Share of the model's units frozen so far."""
        return len(self.frozen_units) / len(self.units) if self.units else 0.0

    def _is_stage(self, epoch):
        done = epoch + 1
        return done >= self._min_epochs and done % self.freeze_every == 0

    def _epoch_feeds_stage(self, epoch):
        """Whether snapshots taken in `epoch` can be in a stage's window.

        Snapshots serve only the window read at the next freezing stage:
        epochs further before it than a window spans (the warm-up before
        `min_epochs`, the epochs after the last stage of the run) are not
        sampled. Until the number of steps per epoch is known, every epoch
        is.
        """
        cadence = self._cadence
        if cadence is None or cadence.steps_per_stage is None:
            return True
        epochs = int((self.params or {}).get("epochs") or 0)
        stage = max(epoch, self._min_epochs - 1)
        while not self._is_stage(stage):
            stage += 1
        if epochs and stage >= epochs:
            return False  # no stage left in this fit
        steps_per_epoch = cadence.steps_per_stage / self.freeze_every
        span = cadence.interval * self.window_size
        return (stage - epoch) * steps_per_epoch < span

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
        propose = self._finite(candidates, propose)
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

    def _is_last_epoch(self, epoch):
        """Whether `epoch` is the last one `fit` was asked to run."""
        epochs = (self.params or {}).get("epochs")
        return epochs is not None and epoch + 1 >= epochs

    def _finite(self, units, propose):
        """`propose` with the units holding NaN or inf weights taken out;
        warns once per bad unit.

        Only the proposed units are read, each variable with one reduction
        of its own: no compiled check to trace (a check of every unit,
        compiled once per fit, took 300-350 ms on the suite's ViT and
        MiniLM and 37 ms on the quickstart CNN; this one takes 23-34 ms for
        28-43 proposed units), and nothing is read at a stage that
        proposes nothing.
        """
        propose = np.array(propose, dtype=bool)
        for index in np.flatnonzero(propose):
            unit = units[index]
            if all(
                bool(keras.ops.all(keras.ops.isfinite(v.value)))
                for v in unit.trainable_weights
            ):
                continue
            propose[index] = False
            if unit.name not in self._warned_nonfinite:
                self._warned_nonfinite.add(unit.name)
                warnings.warn(
                    f"{type(self).__name__}: unit '{unit.name}' has NaN or "
                    "inf weights; it is not frozen.",
                    stacklevel=2,
                )
        return propose

    def _freeze(self, units, epoch):
        layers = [layer for unit in units for layer in unit.layers]
        start = time.perf_counter()
        freezing.freeze_layers(
            self.model, layers, frozen_batchnorm=self.frozen_batchnorm,
            rebuild=False,
        )
        if self.release_optimizer_state:
            self._release_optimizer_state(layers)
        if (
            self.cache_activations
            and self._cache_off is None
            and not self._is_last_epoch(epoch)
        ):
            # After the last epoch no step reads a cache (`on_train_end`
            # drops it): deriving one there cost MiniLM's 10-epoch run 1.2 s.
            self._update_cache(epoch)
        freezing.rebuild_train_step(self.model)
        # Counted in "decision" too (it runs inside the stage); kept apart
        # here so the rebuild's share can be told from the policy's.
        self.overhead_seconds["freezing"] += time.perf_counter() - start
        self.frozen_units.extend(u.name for u in units)
        self.frozen_layers.extend(p for u in units for p in u.layer_paths)
        keep = [u not in units for u in self._active]
        self._active = [u for u, k in zip(self._active, keep) if k]
        if self._history is not None:
            # The compiled sampler keeps reading the frozen units, whose
            # rows are dropped here, until it reads at least twice the units
            # still active: then a sampler of the active units replaces it.
            # A snapshot's cost grows with the units read (1.5 ms for the
            # suite's 35 ViT units, most of them frozen at the first stage)
            # and so does the new sampler's trace, which is paid once.
            self._history.keep_units(keep)
            self._sample_rows = self._sample_rows[np.asarray(keep, bool)]
            if 2 * len(self._active) <= len(self._sampler.units):
                self._new_sampler(self._active)
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: {type(self).__name__} froze "
                f"{', '.join(u.name for u in units)} "
                f"({len(self.frozen_units)}/{len(self.units)} units frozen)."
            )

    # -------------------------------------------------------------- caching
    def _warn_cache(self, reason):
        if reason not in self._cache_warned:
            self._cache_warned.add(reason)
            warnings.warn(
                f"{type(self).__name__}: activation caching is off: {reason}.",
                stacklevel=3,
            )

    def _set_cache(self, cache, reason=None):
        """Installs `cache`'s train step on the model, or removes ours."""
        if self._cache is not None:
            self._cache.release()
        self._cache = cache
        if cache is None:
            if "train_step" in vars(self.model):
                del self.model.train_step
            self.cache_info.update(status="off", reason=reason)
            if reason != "fit ended":
                self.cache_info["bytes"] = 0
            if reason not in (None, "fit ended"):
                self._warn_cache(reason)
        else:
            cache.install()
            self.cache_info.update(
                status="filling" if cache.filling else "active",
                reason=None, cut=cache.layer.name, bytes=cache.nbytes,
                hits=[], misses=[],
            )

    def _update_cache(self, epoch):
        """After a freeze (before the rebuild): cache at the deepest cut."""
        start = time.perf_counter()
        try:
            cut = caching.find_cut(self.model)
        except caching.CacheRefused as refusal:
            if self._cache is not None:
                self._set_cache(None, str(refusal))
            else:
                self.cache_info["reason"] = str(refusal)
            self.overhead_seconds["caching"] += time.perf_counter() - start
            return
        old = self._cache
        if old is not None and old.layer is cut[0]:
            return  # the cut did not move: keep the cache
        if not self._epoch_samples:
            self.cache_info["reason"] = "no complete epoch counted yet"
            return
        cache = None
        if old is not None and old.nbytes is not None:
            # Deeper cut: computed from the old cache now (both held for the
            # moment, within the budget), so no epoch is spent filling.
            cache = old.derive(
                cut, budget_bytes=self.cache_budget_bytes - old.nbytes)
        # The cache checks its own budget: here when its size is known from
        # the model, when its step is traced when it comes from the data.
        cache = cache or caching.ActivationCache(
            self.model, cut, self._epoch_samples, seed=self.seed,
            budget_bytes=self.cache_budget_bytes,
        )
        if cache.refusal is not None:
            self._set_cache(None, cache.refusal)
        else:
            self._set_cache(cache)
            # After the epoch-`epoch` stage: its cut, and where its values
            # come from (None: the next epoch fills it from the inputs).
            self.cache_info["cuts"].append(
                {"cut": cut[0].name, "epoch": epoch,
                 "derived_from": cache.derived_from,
                 "bytes": cache.nbytes, "hits": [], "misses": []}
            )
        self.overhead_seconds["caching"] += time.perf_counter() - start

    def _release_optimizer_state(self, layers):
        from keras_smartfrz.optimizer_state import release_optimizer_state

        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return
        variables = [v for layer in layers for v in layer.weights]
        self.optimizer_bytes_released += release_optimizer_state(
            optimizer, variables
        )

    def _start_sampling(self):
        self._new_sampler(self._active)
        self._history = SnapshotHistory(
            len(self._active), self.window_size, self.sample_size
        )

    def _new_sampler(self, units):
        """A compiled gather of `units` (the same positions as before, so
        the history goes on seamlessly); its rows are the history's."""
        self._sampler = WeightSampler(
            units, [self._positions[u.name] for u in units]
        )
        self._sample_rows = np.arange(len(units))

    # --------------------------------------------------------------- backup
    # Saving the state inside epochs too, where
    # `keras.callbacks.BackupAndRestore(save_freq=N)` saves the weights:
    # "epoch" (the default: at epoch ends only) or N, the same integer as
    # BackupAndRestore's `save_freq` (a callback cannot see the others in
    # `fit`, so it is not read from there).
    def _reset_backup_schedule(self):
        # BackupAndRestore's batch counters, new in every `fit`.
        self._batches_since_backup = 0
        self._last_backup_batch = 0
        self._backup_epoch = None

    def _begin_backup_epoch(self, epoch):
        self._backup_epoch = epoch
        # BackupAndRestore resets it at each epoch end, and it starts at 0.
        self._last_backup_batch = 0

    def _backup_due(self, batch):
        """Whether `BackupAndRestore(save_freq=self._backup_freq)` saves after
        `batch`: its own count (Keras 3.15 `_should_save_on_batch`), so both
        save after the same train step, with `steps_per_execution` too."""
        if batch <= self._last_backup_batch:  # a new epoch
            self._batches_since_backup += batch + 1
        else:
            self._batches_since_backup += batch - self._last_backup_batch
        self._last_backup_batch = batch
        if self._batches_since_backup >= self._backup_freq:
            self._batches_since_backup = 0
            return True
        return False

    def _backup_in_epoch(self, batch):
        """At a batch end: saves the state where BackupAndRestore does."""
        if self.backup_dir is None or self._backup_freq == "epoch":
            return
        if (
            self._backup_due(batch)
            and not self._setup_pending
            and not self._restore_pending
            and self._backup_epoch is not None
        ):
            # BackupAndRestore resumes a backup taken inside an epoch at the
            # start of that epoch: it restores the weights, not the batch.
            self._save_backup(self._backup_epoch, batch=batch)

    def _worker_role(self):
        """`(is_chief, temporary_directory_name)` under `tf.distribute`.

        Every process is the chief, except in multi-worker training
        (`tf.distribute.MultiWorkerMirroredStrategy` over a cluster): there
        the chief is the worker `strategy.extended.should_checkpoint` names,
        and the others are given `workertemp_<task_id>`, as tf.keras'
        `distributed_file_utils` did (Keras 3 has no such utility).
        """
        strategy = getattr(self.model, "distribute_strategy", None)
        extended = getattr(strategy, "extended", None)
        try:
            multi_worker = bool(extended._in_multi_worker_mode())
        except Exception:  # no tf.distribute strategy here
            multi_worker = False
        if not multi_worker:
            return True, None
        task_id = getattr(getattr(strategy, "cluster_resolver", None),
                          "task_id", None)
        if task_id is None:
            task_id = getattr(extended, "_task_id", 0)
        return bool(extended.should_checkpoint), f"workertemp_{task_id}"

    def _backup_paths(self, of_chief=False):
        """The latest state and the one before it (kept for a crash between
        this callback's save and BackupAndRestore's after the same step).

        This worker's own files (a worker other than the chief writes in its
        temporary directory in `backup_dir`), or with `of_chief` the chief's,
        which every worker restores from."""
        directory = os.fspath(self.backup_dir)
        if not of_chief:
            is_chief, temporary = self._worker_role()
            if not is_chief:
                directory = os.path.join(directory, temporary)
        path = os.path.join(directory, BACKUP_FILENAME)
        return path, path + ".bkp"

    def _delete_backup(self):
        """`fit` finished (an exception skips this): as BackupAndRestore,
        forget the state; a worker other than the chief removes its
        temporary directory."""
        for path in self._backup_paths():
            if os.path.exists(path):
                os.remove(path)
        is_chief, temporary = self._worker_role()
        if not is_chief:
            import shutil

            shutil.rmtree(os.path.join(os.fspath(self.backup_dir), temporary),
                          ignore_errors=True)

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

    def _weights_key(self):
        """`[optimizer iterations, CRC-32 of the head unit's weights]`.

        Saved with the state and compared when restoring, so the state
        restored is the one saved with the very weights BackupAndRestore
        restored (the head trains at every step, so its weights tell two
        steps apart even where `iterations` does not count steps: loss-scale
        skips, gradient accumulation)."""
        import zlib

        optimizer = getattr(self.model, "optimizer", None)
        iterations = None
        if optimizer is not None:
            iterations = int(keras.ops.convert_to_numpy(optimizer.iterations))
        digest = 0
        if self.units:
            for layer in self.units[-1].layers:
                for variable in layer.weights:
                    value = np.ascontiguousarray(
                        keras.ops.convert_to_numpy(variable))
                    digest = zlib.crc32(value.tobytes(), digest)
        return [iterations, digest]

    def _save_backup(self, next_epoch, batch=None):
        """Writes the state `fit` needs to resume at `next_epoch` with the
        model's current weights; `batch` is the batch of `next_epoch` it is
        saved after, or None at an epoch end."""
        meta = {
            "format": BACKUP_FORMAT,
            "next_epoch": int(next_epoch),
            "batch": None if batch is None else int(batch),
            "weights_key": self._weights_key(),
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
            "sampler_units": (
                None if self._sampler is None
                else [u.name for u in self._sampler.units]
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

    def _read_backups(self):
        """`(path, meta, arrays)` of every readable state, newest first: the
        chief's, then this worker's own copies (a worker other than the
        chief falls back on them when it cannot see the chief's files)."""
        paths = list(self._backup_paths(of_chief=True))
        paths += [p for p in self._backup_paths() if p not in paths]
        found = []
        for path in paths:
            if not os.path.exists(path):
                continue
            try:
                meta, arrays = self._read_backup(path)
            except Exception as error:  # a truncated or foreign file
                warnings.warn(
                    f"{type(self).__name__}: cannot read the freezing state "
                    f"'{path}' ({error}); it is ignored.",
                    stacklevel=3,
                )
                continue
            found.append((path, meta, arrays))
        return found

    def _restore_backup(self, epoch):
        """Restores the state saved with the model's current weights (those
        BackupAndRestore restored), if there is one; `epoch` is the one `fit`
        starts at. Under multi-worker training, checks that every worker
        restored the same state."""
        chosen = None
        try:
            chosen = self._choose_backup(epoch)
            if chosen is not None:
                self._apply_backup(epoch, *chosen)
        finally:
            # Every worker takes part, or the others would wait forever.
            self._check_workers_agree(None if chosen is None else chosen[1])
        return chosen is not None

    def _choose_backup(self, epoch):
        found = self._read_backups()
        if not found:
            return None
        fingerprint = self._fingerprint()
        usable = [
            (path, meta, arrays) for path, meta, arrays in found
            if meta.get("format") == BACKUP_FORMAT
            and meta.get("fingerprint") == fingerprint
        ]
        if not usable:
            warnings.warn(
                f"{type(self).__name__}: the freezing state '{found[0][0]}' "
                "was saved for another model or other arguments (or by "
                "another version of keras_smartfrz); it is ignored.",
                stacklevel=3,
            )
            return None
        key = self._weights_key()
        same = [s for s in usable if s[1].get("weights_key") == key]
        for state in same:
            if state[1]["next_epoch"] == epoch:
                return state
        if same:
            state = same[0]
            warnings.warn(
                f"{type(self).__name__}: `fit` resumes at epoch {epoch}, but "
                f"the freezing state saved with the model's weights "
                f"('{state[0]}') was saved in epoch {state[1]['next_epoch']}"
                ". (Keras' BackupAndRestore with an integer `save_freq` "
                "records epoch 0 for a backup taken in the first epoch of a "
                "resumed `fit`, and restarts training from there.) The "
                "state is restored.",
                stacklevel=3,
            )
            return state
        epochs = [meta.get("next_epoch") for _, meta, _ in usable]
        if epoch not in epochs:
            warnings.warn(
                f"{type(self).__name__}: the freezing state in "
                f"'{self.backup_dir}' was saved to resume at epoch(s) "
                f"{epochs}, but `fit` starts at epoch {epoch}; it is "
                "ignored and freezing starts afresh. Use "
                "keras.callbacks.BackupAndRestore to resume.",
                stacklevel=3,
            )
        else:
            saved = [meta.get("weights_key") for _, meta, _ in usable]
            warnings.warn(
                f"{type(self).__name__}: no freezing state in "
                f"'{self.backup_dir}' was saved with the weights the model "
                f"resumes with ([optimizer iterations, digest] {key}; saved: "
                f"{saved}); it is ignored and freezing starts afresh. Either "
                "the weights were not restored by BackupAndRestore, or it "
                "saved them at other steps than this callback (with "
                "`save_freq=N`, give the freezing callback `backup_freq=N` "
                "too), or the process stopped between the two "
                "callbacks' saves.",
                stacklevel=3,
            )
        return None

    def _apply_backup(self, epoch, path, meta, arrays):
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
        # The steps done when the state was saved: a backup taken inside an
        # epoch resumes at the epoch's first batch, so that epoch's steps
        # count again, as they train again.
        self._step = int(meta["step"])
        self._warned_nonfinite = set(meta["warned_nonfinite"])
        if self._history is not None and "history" in arrays:
            sampled = meta.get("sampler_units")
            if sampled and sampled != [u.name for u in self._sampler.units]:
                # The saved run had replaced its sampler (see `_freeze`).
                self._new_sampler([by_name[name] for name in sampled])
            self._history._buffer = np.array(arrays["history"], np.float32)
            self._history._count = int(meta["history_count"])
            self._sample_rows = np.array(arrays["sample_rows"], np.int64)
        if self._cadence is not None and meta["cadence"] is not None:
            vars(self._cadence).update(meta["cadence"])
        self.policy.set_state(meta["policy_state"])
        if self.verbose:
            after = "" if meta.get("batch") is None else (
                f" (saved after batch {meta['batch'] + 1} of epoch "
                f"{meta['next_epoch'] + 1})")
            print(
                f"\nEpoch {epoch + 1}: {type(self).__name__} restored "
                f"{len(self.frozen_units)}/{len(self.units)} frozen units "
                f"from '{path}'{after}."
            )

    def _check_workers_agree(self, meta):
        """Under multi-worker training, stops every worker with an error if
        they did not all restore the same state: they would train different
        variables and the all-reduce would mix or hang."""
        if self._worker_role()[1] is None:
            return
        import zlib

        if meta is None:
            outcome = [0, -1, -1, 0]
        else:
            outcome = [
                1, int(meta["next_epoch"]), int(meta["step"]),
                zlib.crc32(json.dumps(meta["frozen_units"]).encode()),
            ]
        every = self._gather_from_workers(outcome)
        if not (every == every[:1]).all():
            rows = sorted({tuple(int(v) for v in row) for row in every})
            raise RuntimeError(
                f"{type(self).__name__}: the workers restored different "
                "freezing states ([restored, epoch, step, frozen-set CRC] "
                f"found: {rows}). Every worker restores the chief's "
                f"state from '{self.backup_dir}': put `backup_dir` on a "
                "filesystem every worker shares, and give every worker the "
                "same callbacks."
            )

    def _gather_from_workers(self, row):
        """Every replica's `row` of integers (an all-gather), in every
        worker."""
        import tensorflow as tf

        strategy = self.model.distribute_strategy
        return strategy.gather(
            strategy.run(lambda: tf.constant([row], tf.int64)), axis=0
        ).numpy()

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
            "cache_activations": self.cache_activations,
            "cache_budget_bytes": self.cache_budget_bytes,
            "release_optimizer_state": self.release_optimizer_state,
            "backup_freq": self._backup_freq,
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
