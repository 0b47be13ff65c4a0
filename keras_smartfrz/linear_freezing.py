"""`LinearFreezing`: the frozen prefix grows linearly with training progress."""

import keras

from keras_smartfrz.freezing_callback import FreezingCallback
from keras_smartfrz.policies import LinearPolicy


@keras.saving.register_keras_serializable(package="keras_smartfrz")
class LinearFreezing(FreezingCallback):
    """Freezes a growing prefix of the network on a fixed schedule.

    The baseline of Composer's `LayerFreezing` and of FreezeOut (Brock et al.
    2017): nothing freezes before `freeze_start` of the planned epochs; from
    there, at each freezing stage, the frozen share of the units (all but the
    head) grows linearly to `freeze_level` at the end of training. It needs no
    weight history, so it samples nothing.

    Args:
        freeze_start: fraction of training before any freezing (default 0.5).
        freeze_level: fraction of the non-head units frozen at the end of
            training (default 1.0).
        mode: `"prefix"` (default) or `"any"`; see `FreezingCallback`.
        min_epochs: no freezing before this many epochs (default 1).
        freeze_every: epochs between freezing stages (default 1).
        frozen_batchnorm: `"batch_statistics"` (default) or `"inference"`.
        verbose: 0 (default) or 1.
        log_dir: `None` (default) or a directory for TensorBoard summaries of
            the freezing stages; see `FreezingCallback`.
        backup_dir: `None` (default) or a directory where the freezing state
            is saved every epoch, to resume with
            `keras.callbacks.BackupAndRestore`; see `FreezingCallback`.
        cache_activations: `True` to train on the cached outputs of the
            frozen front of the model once it freezes (default `False`);
            see `keras_smartfrz.FreezingCallback`.
        cache_budget_bytes: the largest activation cache allowed, in
            bytes (default 1 GiB).
        release_optimizer_state: `True` to free frozen weights' optimizer
            slots (default `False`); see
            `keras_smartfrz.release_optimizer_state`.
        backup_freq: `"epoch"` (default) or the `save_freq` N of
            `keras.callbacks.BackupAndRestore`; see `FreezingCallback`.

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse")
    x, y = np.random.rand(64, 8), np.random.rand(64, 1)
    freezer = keras_smartfrz.LinearFreezing(freeze_start=0.25)
    model.fit(x, y, epochs=4, callbacks=[freezer], verbose=0)
    print(freezer.frozen_layers)
    ```
    """

    def __init__(
        self,
        freeze_start=0.5,
        freeze_level=1.0,
        mode="prefix",
        min_epochs=1,
        freeze_every=1,
        frozen_batchnorm="batch_statistics",
        verbose=0,
        log_dir=None,
        backup_dir=None,
        cache_activations=False,
        cache_budget_bytes=2**30,
        release_optimizer_state=False,
        backup_freq="epoch",
    ):
        super().__init__(
            LinearPolicy(freeze_start=freeze_start, freeze_level=freeze_level),
            mode=mode,
            min_epochs=min_epochs,
            freeze_every=freeze_every,
            frozen_batchnorm=frozen_batchnorm,
            verbose=verbose,
            log_dir=log_dir,
            backup_dir=backup_dir,
            cache_activations=cache_activations,
            cache_budget_bytes=cache_budget_bytes,
            release_optimizer_state=release_optimizer_state,
            backup_freq=backup_freq,
        )
        self.freeze_start = freeze_start
        self.freeze_level = freeze_level

    def get_config(self):
        config = super().get_config()
        for key in ("policy", "window_size", "sample_size", "seed"):
            del config[key]
        config["freeze_start"] = self.freeze_start
        config["freeze_level"] = self.freeze_level
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
