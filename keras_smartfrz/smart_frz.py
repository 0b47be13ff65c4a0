"""`SmartFRZ`: freeze the units an attention-based predictor finds converged."""

import os

import keras

from keras_smartfrz.freezing_callback import FreezingCallback
from keras_smartfrz.predictor import FreezePredictor
from keras_smartfrz.predictor import PredictorPolicy


@keras.saving.register_keras_serializable(package="keras_smartfrz")
class SmartFRZ(FreezingCallback):
    """Freezes converged layers during `fit`, as a trained predictor decides.

    Li et al., "SmartFRZ: An Efficient Training Framework using
    Attention-Based Layer Freezing", ICLR 2023. While the model trains, a
    fixed sample of each unit's weights is recorded `window_size` times per
    freezing stage. At each stage (every `freeze_every` epochs from epoch
    `min_epochs` on) a small attention network, trained offline on other
    models (`tools/train_predictor.py`) and shipped with the package, reads
    each unit's normalised weight history (and a few scale-aware features of
    it, see `keras_smartfrz.predictor.window_features`) and scores how surely
    it has converged; units scoring at least `freeze_threshold` are frozen (in
    `"prefix"` mode, the front run of them), and the train step is rebuilt so
    they cost no gradient work from the next step on. The head never freezes.

    `window_size` and `sample_size` are the predictor's own (30 snapshots of
    1024 sampled weights for the shipped one). The shipped predictor's
    training data and held-out metrics are in its model card,
    `keras_smartfrz.load_predictor().card`: it transferred well to a ResNet
    it never saw (precision 0.97, recall 0.78) but freezes too eagerly on a
    BERT trained from scratch (precision 0.26), so watch `decisions` on
    transformers, or raise `freeze_threshold`.

    Args:
        predictor: `None` (default) for the predictor shipped with the
            package, the path of a saved predictor (see
            `keras_smartfrz.load_predictor`), or a `FreezePredictor`.
        freeze_threshold: minimum predicted probability of convergence to
            freeze a unit, in `[0, 1]` (default 0.5). Higher freezes later and
            less.
        mode: `"prefix"` (default) or `"any"`; see `FreezingCallback`.
        min_epochs: no freezing before this many epochs are done, or
            `"auto"` (default): a warm-up of 30% of the `fit`'s epochs,
            rounded up (3 of 10, 2 of 6, 1 of 3; see
            `keras_smartfrz.freezing_callback.auto_min_epochs`). Freezing
            right after the first epoch cost 1-3 points of accuracy in the
            benchmark suite where a warm-up cost a fraction of that, with
            the same units frozen.
        freeze_every: epochs between freezing stages (default 1).
        seed: seed of the sampled weight positions (default 0).
        frozen_batchnorm: `"batch_statistics"` (default) or `"inference"`;
            see `keras_smartfrz.freeze_layers`.
        verbose: 0 (default) or 1 (print each freeze).
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
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse")
    x, y = np.random.rand(512, 8), np.random.rand(512, 1)
    freezer = keras_smartfrz.SmartFRZ()
    model.fit(x, y, epochs=5, callbacks=[freezer], verbose=0)
    print(freezer.frozen_layers)
    ```
    """

    def __init__(
        self,
        predictor=None,
        freeze_threshold=0.5,
        mode="prefix",
        min_epochs="auto",
        freeze_every=1,
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
        policy = PredictorPolicy(predictor, freeze_threshold=freeze_threshold)
        super().__init__(
            policy,
            mode=mode,
            min_epochs=min_epochs,
            freeze_every=freeze_every,
            window_size=policy.window_size,
            sample_size=policy.sample_size,
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
        self.predictor = predictor
        self.freeze_threshold = freeze_threshold

    def get_config(self):
        if isinstance(self.predictor, FreezePredictor):
            raise ValueError(
                "This SmartFRZ holds an in-memory FreezePredictor, which "
                "cannot be serialised by config. Save it with "
                "`keras_smartfrz.predictor.save_predictor(predictor, path)` "
                "and pass `SmartFRZ(predictor=path)`."
            )
        config = super().get_config()
        for key in ("policy", "window_size", "sample_size"):
            del config[key]
        config["predictor"] = (
            None if self.predictor is None else os.fspath(self.predictor)
        )
        config["freeze_threshold"] = self.freeze_threshold
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
