"""`AutoFreeze`: freeze the front unit once its update norm stops changing."""

import keras

from keras_smartfrz.freezing_callback import FreezingCallback
from keras_smartfrz.policies import AutoFreezePolicy


@keras.saving.register_keras_serializable(package="keras_smartfrz")
class AutoFreeze(FreezingCallback):
    """Freezes front units whose training has stopped changing (AutoFreeze).

    Liu et al., "AutoFreeze: Automatically Freezing Model Blocks to
    Accelerate Fine-tuning" (2021). At each freezing stage every candidate
    unit's relative weight-update norm over the stage is compared with the
    previous stage's; a unit whose change is at or below the `percentile`-th
    percentile of all candidates' changes is proposed, and in the default
    `"prefix"` mode the front run of proposed units freezes. The paper uses
    gradient norms; this uses weight-update norms read from the sampled
    snapshots, which cost nothing extra (see
    `keras_smartfrz.policies.AutoFreezePolicy`). The first stage only
    records norms, so the earliest freeze happens at epoch `min_epochs + 1`
    (with `freeze_every=1`).

    Args:
        percentile: the percentile threshold (default 50).
        mode: `"prefix"` (default) or `"any"`; see `FreezingCallback`.
        min_epochs: no freezing before this many epochs (default 1).
        freeze_every: epochs between freezing stages (default 1).
        window_size: snapshots per stage (default 30).
        sample_size: sampled weights per unit (default 1024).
        seed: seed of the sampled positions (default 0).
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
    freezer = keras_smartfrz.AutoFreeze()
    model.fit(x, y, epochs=4, callbacks=[freezer], verbose=0)
    print(freezer.frozen_layers)
    ```
    """

    def __init__(
        self,
        percentile=50.0,
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
        super().__init__(
            AutoFreezePolicy(percentile=percentile),
            mode=mode,
            min_epochs=min_epochs,
            freeze_every=freeze_every,
            window_size=window_size,
            sample_size=sample_size,
            seed=seed,
            frozen_batchnorm=frozen_batchnorm,
            verbose=verbose,
            log_dir=log_dir,
            backup_dir=backup_dir,
            cache_activations=cache_activations,
            cache_budget_bytes=cache_budget_bytes,
            release_optimizer_state=release_optimizer_state,
            backup_freq=backup_freq,
        )
        self.percentile = percentile

    def get_config(self):
        config = super().get_config()
        del config["policy"]
        config["percentile"] = self.percentile
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
