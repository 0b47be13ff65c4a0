import keras
import keras_hub
import numpy as np

from keras_smartfrz import find_units
from conftest import mlp


def names(units):
    return [[layer.name for layer in unit.layers] for unit in units]


def test_sequential_units_in_order_with_batchnorm_grouped():
    units = find_units(mlp(batchnorm=True))
    assert names(units) == [["d0", "bn0"], ["d1", "bn1"], ["d2", "bn2"], ["head"]]
    assert units[0].name == "mlp/d0"
    assert units[0].layer_paths == ["mlp/d0", "mlp/bn0"]
    # kernel 6x16 + bias 16 + gamma 16 + beta 16; moving stats are not trainable
    assert units[0].num_params == 6 * 16 + 16 + 16 + 16


def test_functional_branches_follow_topological_order_and_shared_layer_once():
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    a = keras.layers.Dense(4, name="a")(inputs)
    b = shared(a)
    c = shared(b)
    d = keras.layers.Dense(4, name="b")(a)
    out = keras.layers.Dense(1, name="head")(keras.layers.Concatenate()([c, d]))
    model = keras.Model(inputs, out)
    order = [u.layers[0].name for u in find_units(model)]
    assert order[0] == "a" and order[-1] == "head"
    assert sorted(order) == ["a", "b", "head", "shared"]


def test_nested_models_are_searched_down_to_weighted_layers():
    inner = keras.Sequential(
        [keras.layers.Dense(5, name="i0"), keras.layers.Dense(5, name="i1")],
        name="inner",
    )
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(5, name="first"), inner,
         keras.layers.Dense(2, name="head")],
        name="outer",
    )
    units = find_units(model)
    assert [u.name for u in units] == [
        "outer/first", "outer/inner/i0", "outer/inner/i1", "outer/head"]


class ListModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.blocks = [keras.layers.Dense(4, name=f"blk{i}") for i in range(2)]
        self.by_name = {"mid": keras.layers.Dense(4, name="mid")}
        self.dropout = keras.layers.Dropout(0.1)
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x, training=False):
        for block in self.blocks:
            x = block(x)
        x = self.by_name["mid"](x)
        return self.head(self.dropout(x, training=training))


def test_subclassed_model_with_layers_in_lists_and_dicts():
    model = ListModel()
    model(np.zeros((1, 3), "float32"))
    found = [u.layers[0].name for u in find_units(model)]
    assert found == ["blk0", "blk1", "mid", "head"]


def test_user_frozen_layers_and_weightless_layers_are_not_units():
    model = mlp()
    model.get_layer("d1").trainable = False
    assert [u.layers[0].name for u in find_units(model)] == ["d0", "d2", "head"]


class OwnWeightsBlock(keras.layers.Layer):
    def build(self, shape):
        self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")
        self.inner = keras.layers.Dense(shape[-1])
        self.inner.build(shape)

    def call(self, x):
        return self.inner(x) * self.scale


def test_layer_with_own_weights_and_sublayers_is_one_unit():
    model = keras.Sequential(
        [keras.Input((3,)), OwnWeightsBlock(name="blk"), keras.layers.Dense(1)]
    )
    units = find_units(model)
    assert [u.layers[0].name for u in units][0] == "blk"
    assert units[0].num_params == 3 + 3 * 3 + 3


def test_keras_hub_vit_blocks_are_opened():
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32,
    )
    units = find_units(backbone)
    paths = [u.name for u in units]
    assert paths[0].startswith("vit_patching_and_embedding")
    block1 = [i for i, p in enumerate(paths) if "transformer_block_1" in p]
    block2 = [i for i, p in enumerate(paths) if "transformer_block_2" in p]
    assert len(block1) > 4 and max(block1) < min(block2)
    assert paths[-1] == "vit_encoder/ln"
    total = sum(u.num_params for u in units)
    assert total == sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)


def test_batchnorm_joins_the_layer_it_normalises_not_its_predecessor():
    # Topological order here is conv_a, conv_b, bn_a, bn_b (a ResNet
    # shortcut block): each BN must still go with its own convolution.
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 1, name="conv_a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="conv_b")(inputs)
    a = keras.layers.BatchNormalization(name="bn_a")(a)
    b = keras.layers.BatchNormalization(name="bn_b")(b)
    x = keras.layers.Add()([a, b])
    x = keras.layers.BatchNormalization(name="bn_after_add")(x)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x))
    units = find_units(keras.Model(inputs, out))
    assert sorted(names(units)) == sorted(
        [["conv_a", "bn_a"], ["conv_b", "bn_b"], ["bn_after_add"], ["head"]])
