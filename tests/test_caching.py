"""Activation caching (`cache_activations=True`): same training, fewer passes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_smartfrz import FreezingCallback
from keras_smartfrz import caching
from keras_smartfrz.policies import FreezePolicy
from conftest import mlp
from conftest import toy_data


class ScriptedPolicy(FreezePolicy):
    """Proposes the candidates named in `plan[epoch]`."""

    needs_history = False

    def __init__(self, plan):
        self.plan = plan

    def decide(self, stage):
        wanted = self.plan.get(stage.epoch, ())
        freeze = np.array([any(n == w or n.endswith("/" + w) for w in wanted)
                           for n in stage.unit_names])
        return freeze.astype(np.float32), freeze


def _freezer(plan, cache=True, **kwargs):
    return FreezingCallback(
        ScriptedPolicy(plan), frozen_batchnorm="inference",
        cache_activations=cache, **kwargs)


def _train(cache, jit_compile, shuffle, epochs=5, plan=None, x=None, y=None,
           batchnorm=True, **kwargs):
    keras.utils.set_random_seed(0)
    model = mlp(batchnorm=batchnorm, jit_compile=jit_compile)
    if x is None:
        x, y = toy_data(100)  # 7 batches of 16, the last one of 4
    freezer = _freezer(plan or {0: ["d0"], 2: ["d1"]}, cache=cache, **kwargs)
    history = model.fit(x, y, batch_size=16, epochs=epochs, shuffle=shuffle,
                        callbacks=[freezer], verbose=0)
    return model, freezer, history


@pytest.mark.parametrize(
    "jit_compile, shuffle, budget",
    [(False, False, None), (True, True, None),
     # Room for one cache, not two: the deeper cut is filled, not derived.
     (False, True, 10000),
     # The other combinations add nothing the ones above do not cover
     # (about 20 s of the default run): `-m slow` runs them.
     pytest.param(False, True, None, marks=pytest.mark.slow),
     pytest.param(True, False, None, marks=pytest.mark.slow)],
)
def test_cached_training_matches_uncached(jit_compile, shuffle, budget):
    plain, _, plain_history = _train(False, jit_compile, shuffle)
    kwargs = {} if budget is None else {"cache_budget_bytes": budget}
    cached, freezer, cached_history = _train(True, jit_compile, shuffle,
                                             **kwargs)
    info = freezer.cache_info
    # Froze d0 (+bn0) after epoch 0: epoch 1 filled the cache at bn0 and
    # epoch 2 read it; d1 froze after epoch 2 and the cut moved to bn1.
    assert info["cut"] == "bn1", info
    # Each cache is 100 examples x 16 float32 = 6400 bytes.
    assert info["bytes"] == 6400
    if budget is None:
        # The bn1 cache was computed from the bn0 cache at that stage:
        # epochs 3 and 4 both read it.
        # Each cut keeps its own count: epoch 2 read the bn0 cache.
        assert info["cuts"] == [
            {"cut": "bn0", "epoch": 0, "derived_from": None, "bytes": 6400,
             "hits": [7], "misses": [0]},
            {"cut": "bn1", "epoch": 2, "derived_from": "bn0", "bytes": 6400,
             "hits": [7, 7], "misses": [0, 0]}], info
        assert info["hits"] == [7, 7] and info["misses"] == [0, 0], info
    else:
        # Both caches together (12800 bytes) are over the budget: epoch 3
        # filled the bn1 cache from the inputs, epoch 4 read it.
        assert [(c["derived_from"], c["hits"]) for c in info["cuts"]] == [
            (None, [7]), (None, [7])], info
        assert info["hits"] == [7] and info["misses"] == [0], info
    for a, b in zip(plain.weights, cached.weights):
        np.testing.assert_allclose(
            a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    np.testing.assert_allclose(plain_history.history["loss"],
                               cached_history.history["loss"], rtol=1e-5)
    # The user's model gets its own train step back after fit.
    assert "train_step" not in vars(cached)


@pytest.mark.parametrize("plan, cuts", [
    # epoch 0: full steps; 1: fill (prefix runs); 2-3: cache hits only.
    ({0: ["d0", "d1"]}, [("d1", None)]),
    # The cut moves from d0 to d1 after epoch 1, when the d0 cache is full:
    # the d1 cache is computed from it (d1 runs, the counter does not), so
    # epochs 2-3 read it without a second fill epoch.
    ({0: ["d0"], 1: ["d1"]}, [("d0", None), ("d1", "d0")]),
])
def test_cache_hit_skips_the_prefix(plan, cuts):
    """A prefix call counter inside the graph proves the prefix is skipped."""
    keras.utils.set_random_seed(0)
    model, calls = _counting_model()
    x, y = toy_data(64)
    freezer = _freezer(plan)
    assert _prefix_calls_per_epoch(model, calls, x, y, 4, [freezer]) == [
        4, 4, 0, 0]
    assert [(c["cut"], c["derived_from"])
            for c in freezer.cache_info["cuts"]] == cuts
    assert freezer.cache_info["hits"] == [4, 4]
    # Validation and predict still run the whole model.
    model.predict(x[:4], verbose=0)
    assert int(calls.numpy()) > 0


def test_no_cache_is_made_after_the_last_epoch(monkeypatch):
    """A freeze at the last epoch's stage still freezes (the model keeps it
    for a later `fit`), but no cache is derived or filled for it: no step
    would read it before `on_train_end` drops it."""
    derived = []
    derive = caching.ActivationCache.derive

    def counting_derive(self, *args, **kwargs):
        derived.append(self.layer.name)
        return derive(self, *args, **kwargs)

    monkeypatch.setattr(caching.ActivationCache, "derive", counting_derive)
    model, freezer, _ = _train(True, False, True, epochs=4,
                               plan={0: ["d0"], 3: ["d1"]})
    assert freezer.frozen_units[-1].endswith("d1")
    assert not model.get_layer("d1").trainable
    assert derived == []
    assert [c["cut"] for c in freezer.cache_info["cuts"]] == ["bn0"]
    assert freezer.cache_info["hits"] == [7, 7]
    assert "train_step" not in vars(model)
    # Deriving still happens when an epoch follows the stage.
    _train(True, False, True, epochs=4, plan={0: ["d0"], 2: ["d1"]})
    assert derived == ["bn0"]


class _Interrupt(Exception):
    pass


def _counting_model():
    """d0 -> d1 -> head behind a layer that counts its calls in the graph."""
    calls = tf.Variable(0, dtype=tf.int64, trainable=False)

    class Counting(keras.layers.Layer):
        def call(self, inputs):
            calls.assign_add(1)
            return inputs

    inputs = keras.Input((6,))
    h = Counting(name="count")(inputs)
    h = keras.layers.Dense(8, activation="relu", name="d0")(h)
    h = keras.layers.Dense(8, activation="relu", name="d1")(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    return model, calls


def _interrupted_cached_fit():
    """A cached `fit` that an exception stops at epoch 3, its cache serving
    (on_train_end never runs)."""
    keras.utils.set_random_seed(0)
    model, calls = _counting_model()
    x, y = toy_data(64)

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                raise _Interrupt()

    freezer = _freezer({0: ["d0", "d1"]})
    with pytest.raises(_Interrupt):
        model.fit(x, y, batch_size=16, epochs=5, verbose=0,
                  callbacks=[freezer, Stop()])
    assert freezer.cache_info["hits"] == [4]
    # The state an exception leaves: the cache's step is still the model's.
    assert caching.leftover_step(model) is not None
    return model, calls, x, y


def _prefix_calls_per_epoch(model, calls, x, y, epochs, callbacks=()):
    counts = []

    class Count(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            counts.append(int(calls.numpy()))
            calls.assign(0)

    calls.assign(0)
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
              callbacks=[*callbacks, Count()])
    return counts


def test_next_fit_with_a_freezing_callback_drops_a_leftover_cached_step():
    model, calls, x, y = _interrupted_cached_fit()
    # Nothing freezes in this fit and it does not cache: every step runs
    # the prefix (the leftover step would read the cache: 0 calls).
    freezer = FreezingCallback(ScriptedPolicy({}))
    assert _prefix_calls_per_epoch(model, calls, x, y, 2, [freezer]) == [4, 4]
    assert "train_step" not in vars(model)


def test_recompiling_after_an_interrupted_cached_fit_restores_the_own_step():
    model, calls, x, y = _interrupted_cached_fit()
    for layer in model.layers:
        layer.trainable = True
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    before = model.get_layer("d0").kernel.numpy().copy()
    # A plain fit, no callback of ours: the model's own step, whole model.
    assert _prefix_calls_per_epoch(model, calls, x, y, 1) == [4]
    assert "train_step" not in vars(model)
    assert not np.array_equal(before, model.get_layer("d0").kernel.numpy())

def _augmenting_dataset():
    """Toy batches with fresh noise every epoch. A generator's state advances
    across epochs (a seeded tf.random op in `map` would replay the same noise
    every epoch, which caching handles)."""
    x, y = toy_data(64)
    noise = tf.random.Generator.from_seed(1)
    return (tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
            .map(lambda a, b: (a + noise.normal(tf.shape(a), 0, 0.01), b)))


def test_augmenting_pipeline_turns_caching_off():
    keras.utils.set_random_seed(0)
    model = mlp(batchnorm=True)
    dataset = _augmenting_dataset()
    freezer = _freezer({0: ["d0"]})
    with pytest.warns(UserWarning, match="inputs change from epoch to epoch"):
        model.fit(dataset, epochs=4, callbacks=[freezer], verbose=0)
    assert freezer.cache_info["status"] == "off"
    assert freezer.cache_info["misses"] == [4]
    assert "train_step" not in vars(model)


def test_caching_off_at_a_freezing_stage_rebuilds_the_step_once():
    """The cache turns off at the end of epoch 2, where d1 also freezes:
    one rebuild serves both (and one where only the cache goes)."""
    keras.utils.set_random_seed(0)
    model = mlp(batchnorm=True)
    dataset = _augmenting_dataset()
    rebuilds = []

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

    epochs = Epochs()
    make = model.make_train_function

    def counting(force=False):
        if force:
            rebuilds.append(epochs.epoch)
        return make(force=force)

    model.make_train_function = counting
    for plan, expected in (({0: ["d0"], 2: ["d1"]}, [0, 2]),
                           ({0: ["d0"]}, [0, 2])):
        rebuilds.clear()
        freezer = _freezer(plan)
        with pytest.warns(UserWarning, match="inputs change"):
            model.fit(dataset, epochs=3, callbacks=[epochs, freezer],
                      verbose=0)
        assert freezer.cache_info["status"] == "off"
        assert rebuilds == expected, (plan, rebuilds)
        keras.utils.set_random_seed(0)
        for layer in model.layers:
            layer.trainable = True


def _compiled(*layers):
    model = keras.Sequential([keras.Input((6,)), *layers])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    return model


@pytest.mark.parametrize("frozen_batchnorm", ["inference", "batch_statistics"])
def test_cut_stops_before_randomness_and_batch_statistics(frozen_batchnorm):
    """The cut ends before a Dropout, or a BN normalising with batch stats."""
    x, y = toy_data(64)
    model = _compiled(
        keras.layers.Dense(8, name="d0"),
        keras.layers.Dropout(0.5, name="drop")
        if frozen_batchnorm == "inference"
        else keras.layers.BatchNormalization(name="bn0"),
        keras.layers.Dense(8, name="d1"), keras.layers.Dense(2, name="head"))
    freezer = FreezingCallback(
        ScriptedPolicy({0: ["d0", "d1"]}), cache_activations=True,
        frozen_batchnorm=frozen_batchnorm)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[freezer], verbose=0)
    assert freezer.cache_info["cut"] == "d0"
    assert freezer.cache_info["hits"] == [4]


@pytest.mark.parametrize(
    "noise",
    [keras.layers.Dropout(0.0, name="drop"),
     keras.layers.GaussianNoise(0.0, name="drop")],
)
def test_noise_layer_at_rate_zero_is_deterministic(noise):
    """A model built with dropout=0.0 keeps its (inert) Dropout layers."""
    x, y = toy_data(64)
    model = _compiled(keras.layers.Dense(8, name="d0"), noise,
                      keras.layers.Dense(8, name="d1"),
                      keras.layers.Dense(2, name="head"))
    freezer = FreezingCallback(
        ScriptedPolicy({0: ["d0", "d1"]}), cache_activations=True)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[freezer], verbose=0)
    assert freezer.cache_info["cut"] == "d1"
    assert freezer.cache_info["hits"] == [4]


@pytest.mark.parametrize(
    "first, match",
    [(keras.layers.GaussianNoise(0.1, name="noise"), "draws random numbers"),
     (keras.layers.BatchNormalization(name="bn_in"), "batch statistics")],
)
def test_no_safe_cut_says_why(first, match):
    x, y = toy_data(64)
    model = _compiled(first, keras.layers.Dense(8, name="d0"),
                      keras.layers.Dense(2, name="head"))
    freezer = FreezingCallback(
        ScriptedPolicy({0: ["bn_in", "d0"]}), cache_activations=True)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[freezer], verbose=0)
    assert freezer.cache_info["status"] == "off"
    assert match in freezer.cache_info["reason"]


def test_budget_and_subclassed_model_refuse_with_reason():
    x, y = toy_data(64)
    model = mlp(batchnorm=True)
    freezer = _freezer({0: ["d0"]}, cache_budget_bytes=100)
    with pytest.warns(UserWarning, match="over cache_budget_bytes=100"):
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[freezer],
                  verbose=0)
    assert freezer.cache_info["status"] == "off"

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d0 = keras.layers.Dense(8)
            self.head = keras.layers.Dense(2)

        def call(self, inputs):
            return self.head(self.d0(inputs))

    sub = Sub()
    sub.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    sub(x[:1])
    freezer = _freezer({0: ["dense"]})
    with pytest.warns(UserWarning, match="subclassed model"):
        sub.fit(x, y, batch_size=16, epochs=1, callbacks=[freezer],
                verbose=0)


def test_cut_bypassed_by_a_skip_connection_is_not_used():
    inputs = keras.Input((6,))
    a = keras.layers.Dense(6, name="d0")(inputs)
    b = keras.layers.Dense(6, name="d1")(a)
    joined = keras.layers.Add(name="add")([a, b])
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(joined))
    model.layers[1].trainable = False
    layer, tensor, prefix, suffix = caching.find_cut(model)
    assert layer.name == "d0"  # not d1: the skip from d0 bypasses it
    model.layers[2].trainable = False
    layer, *_ = caching.find_cut(model)
    assert layer.name == "add"


def test_cut_after_keras_ops_in_the_graph():
    """`keras.ops` calls (`x[:, 1:]`, `x[:, 0]`) are operations, not layers:
    the prefix may end at one, the suffix may hold one, and the user's graph
    is as it was after the cache."""
    x = np.random.default_rng(0).normal(size=(64, 3, 6)).astype("float32")
    y = (x[:, 1, 0] > 0).astype("int32")
    inputs = keras.Input((3, 6))
    sliced = keras.layers.Dense(6, name="d0")(inputs)[:, 1:]
    hidden = keras.layers.Dense(6, name="d1")(sliced)[:, 0]
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    nodes = [len(op._inbound_nodes) for op in model.operations]
    freezer = FreezingCallback(
        ScriptedPolicy({0: ["d0"]}), cache_activations=True)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[freezer], verbose=0)
    assert freezer.cache_info["cut"] == sliced._keras_history.operation.name
    assert freezer.cache_info["hits"] == [4]
    assert [len(op._inbound_nodes) for op in model.operations] == nodes


@pytest.mark.parametrize("jit_compile", [False, True])
def test_token_inputs_of_unknown_length(jit_compile):
    """Token ids with an unknown sequence length (as in a keras-hub text
    model): the keys hash any width; cached training matches uncached."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, size=(96, 12)).astype("int32")
    labels = (tokens[:, 0] > 25).astype("int32")

    def data():
        # The reshape hides the width from the traced step: (None, None).
        return tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(
            16).map(lambda t, y: (tf.reshape(t, [tf.shape(t)[0], -1]), y))

    def train(cache):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((None,), dtype="int32")
        hidden = keras.layers.Embedding(50, 8, name="embed")(inputs)
        hidden = keras.layers.GlobalAveragePooling1D(name="pool")(hidden)
        hidden = keras.layers.Dense(8, name="d1")(hidden)
        model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        model.compile("adam",
                      keras.losses.SparseCategoricalCrossentropy(True),
                      jit_compile=jit_compile)
        freezer = FreezingCallback(
            ScriptedPolicy({0: ["embed", "d1"]}), cache_activations=cache)
        model.fit(data(), epochs=4, callbacks=[freezer], verbose=0)
        return model, freezer

    plain, _ = train(False)
    cached, freezer = train(True)
    assert freezer.cache_info["cut"] == "d1"
    assert freezer.cache_info["hits"] == [6, 6]
    for a, b in zip(plain.weights, cached.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=a.path)
    # Other tokens, or the same ones one longer, are other examples.
    cache = caching.ActivationCache(cached, caching.find_cut(cached), 8)
    keys = cache._keys(tf.constant(np.concatenate(
        [tokens[:4], tokens[:4, ::-1]])))
    longer = cache._keys(tf.constant(np.pad(tokens[:4], [[0, 0], [0, 1]])))
    assert len(set(keys.numpy()) | set(longer.numpy())) == 12


def test_arguments_are_validated_and_serialised():
    with pytest.raises(ValueError, match="cache_activations='yes'"):
        FreezingCallback(ScriptedPolicy({}), cache_activations="yes")
    with pytest.raises(ValueError, match="cache_budget_bytes=0"):
        FreezingCallback(ScriptedPolicy({}), cache_budget_bytes=0)
    config = _freezer({}, cache_budget_bytes=1234).get_config()
    assert config["cache_activations"] is True
    assert config["cache_budget_bytes"] == 1234


def test_release_with_backup_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="release_optimizer_state=True"):
        FreezingCallback(ScriptedPolicy({}), release_optimizer_state=True,
                         backup_dir=str(tmp_path))


def test_release_optimizer_state_through_the_callback():
    """The callback frees the frozen units' Adam moments at the freeze and
    the rest trains as without the release."""
    plain, _, _ = _train(False, False, False, epochs=3, plan={0: ["d0"]})
    released, freezer, _ = _train(False, False, False, epochs=3,
                                  plan={0: ["d0"]},
                                  release_optimizer_state=True)
    # d0 (6x16 + 16) and bn0's gamma and beta (16 + 16): two Adam slots each.
    assert freezer.optimizer_bytes_released == 2 * 4 * (6 * 16 + 16 + 32)
    assert len(released.optimizer.variables) == (
        len(plain.optimizer.variables) - 2 * 4)
    for a, b in zip(plain.weights, released.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def _hub_resnet():
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 64], stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(12, 12, 1))
    model = keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=2, preprocessor=None)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(True))
    return model


def test_cut_inside_a_keras_hub_backbone():
    """A keras-hub task model holds its backbone as one nested model: the
    cut is found inside it (after the first stage), and training on the
    cache equals training without it."""
    rng = np.random.default_rng(0)
    x = rng.random((48, 12, 12, 1), dtype=np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("int32")
    plan = {0: ["conv1_conv", "stack0_block0_1_conv",
                "stack0_block0_2_conv"]}
    trained = []
    for cache in (False, True):
        model = _hub_resnet()
        config = model.get_config()
        freezer = _freezer(plan, cache=cache)
        model.fit(x, y, batch_size=16, epochs=4, shuffle=False,
                  callbacks=[freezer], verbose=0)
        trained.append(model)
    info = freezer.cache_info
    assert info["cut"] == "stack0_block0_out", info
    assert info["hits"] == [3, 3] and info["misses"] == [0, 0], info
    for a, b in zip(*(m.weights for m in trained)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=a.path)
    # The user's model and its backbone are as they were.
    model = trained[1]
    assert model.get_config() == config
    assert model.backbone.output.shape == (None, 2, 2, 64)
    assert all(len(l._inbound_nodes) == 1
               for l in model.backbone.layers[1:])


def _tiny_bert(jit_compile=False):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=3, num_heads=2, hidden_dim=16,
        intermediate_dim=32, dropout=0.0, max_sequence_length=12)
    model = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=0.0)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(True),
                  jit_compile=jit_compile)
    return model


def _bert_front():
    """The units of the embeddings and the first encoder layer."""
    from keras_smartfrz import find_units

    return [u.name for u in find_units(_tiny_bert())
            if not u.name.startswith(("transformer_layer_1",
                                      "transformer_layer_2", "pooled",
                                      "logits"))]


def _token_batches(lengths):
    """Padded token batches of 16 (`lengths[i]` tokens in batch i)."""
    rng = np.random.default_rng(0)
    batches = []
    for length in lengths:
        tokens = rng.integers(1, 50, size=(16, length)).astype("int32")
        real = rng.integers(3, length + 1, size=(16, 1))
        mask = np.arange(length)[None, :] < real
        tokens = np.where(mask, tokens, 0).astype("int32")
        batches.append(({"token_ids": tokens,
                         "segment_ids": np.zeros_like(tokens),
                         "padding_mask": mask.astype("int32")},
                        (tokens[:, 0] > 25).astype("int32")))
    return batches


def _dataset(batches):
    def generate():
        yield from batches

    spec = ({"token_ids": tf.TensorSpec((None, None), tf.int32),
             "segment_ids": tf.TensorSpec((None, None), tf.int32),
             "padding_mask": tf.TensorSpec((None, None), tf.int32)},
            tf.TensorSpec((None,), tf.int32))
    if len({b[0]["token_ids"].shape for b in batches}) == 1:
        # One length: the static shape the step is traced with says it.
        length = batches[0][0]["token_ids"].shape[1]
        spec = keras.tree.map_structure(
            lambda s: tf.TensorSpec((None, length) if s.shape.rank == 2
                                    else s.shape, s.dtype), spec)
    return tf.data.Dataset.from_generator(
        generate, output_signature=spec).apply(
            tf.data.experimental.assert_cardinality(len(batches)))


@pytest.mark.parametrize("jit_compile, progressive", [
    (False, False), (True, False), (False, True)])
def test_cut_inside_a_bert_backbone_caches_hidden_states_and_mask(
        jit_compile, progressive):
    """In a BERT-style encoder every layer reads the padding mask: the cut
    after a frozen encoder layer holds its hidden states and the mask (a
    shape known only from the data: the backbone takes any length).
    Progressively: the token embedding first (cut: its output, the segment
    ids and the mask), the rest at epoch 1 (the new cache is derived; the
    mask is copied over)."""
    batches = _token_batches([12] * 4)
    front = _bert_front()
    plan = ({0: front[:1], 1: front[1:]} if progressive else {0: front})
    trained = []
    for cache in (False, True):
        model = _tiny_bert(jit_compile)
        freezer = _freezer(plan, cache=cache)
        model.fit(_dataset(batches), epochs=4, callbacks=[freezer],
                  verbose=0)
        trained.append(model)
    info = freezer.cache_info
    assert info["cut"] == "transformer_layer_0", info
    # 64 examples x (12 x 16 float32 hidden states + 12 int32 mask values).
    assert info["bytes"] == 64 * (12 * 16 + 12) * 4, info
    if progressive:
        # Epoch 1 filled the first cache (64 x (12 x 16 + 2 x 12) x 4
        # bytes); the second, derived from it, served epochs 2 and 3.
        assert [(c["cut"], c["derived_from"], c["bytes"], c["hits"])
                for c in info["cuts"]] == [
            ("token_embedding", None, 64 * (12 * 16 + 24) * 4, []),
            ("transformer_layer_0", "token_embedding",
             64 * (12 * 16 + 12) * 4, [4, 4])], info
    else:
        assert info["hits"] == [4, 4] and info["misses"] == [0, 0], info
    for a, b in zip(*(m.weights for m in trained)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=a.path)
    assert "train_step" not in vars(trained[1])


def test_cut_of_unknown_size_in_the_data_turns_caching_off():
    """Batches of varying length: the cut's size is unknown when the step is
    traced, so the fill epoch runs as usual and caching turns off."""
    model = _tiny_bert()
    freezer = _freezer({0: _bert_front()})
    with pytest.warns(UserWarning, match="unknown shape"):
        model.fit(_dataset(_token_batches([12, 10, 12, 8])), epochs=3,
                  callbacks=[freezer], verbose=0)
    assert freezer.cache_info["status"] == "off"
    assert "unknown shape" in freezer.cache_info["reason"]
    assert "train_step" not in vars(model)
