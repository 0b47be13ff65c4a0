"""Finding the freezable units of a Keras model, in forward order.

A *unit* is the smallest thing the freezing callbacks freeze: a layer that owns
trainable weights, plus the `BatchNormalization` that directly follows it (the
normalisation belongs to the layer it normalises). Units are listed in the order
the forward pass uses them, so that "the first k units" is a prefix of the network.
"""

import dataclasses

import keras

_NORMALIZATION_FOLLOWERS = (keras.layers.BatchNormalization,)


@dataclasses.dataclass(eq=False)
class FreezeUnit:
    """One freezable unit: a weighted layer and the normalisation that follows it.

    Attributes:
        name: the unit's name, the `path` of its first layer (its `name` when
            the layer has no path).
        layers: the layers of the unit, the weighted layer first.
    """

    name: str
    layers: list

    @property
    def trainable_weights(self):
        """The unit's trainable variables, in layer order."""
        return [v for layer in self.layers for v in layer.trainable_weights]

    @property
    def num_params(self):
        """Number of trainable scalars in the unit."""
        return int(sum(_size(v) for v in self.trainable_weights))

    @property
    def layer_paths(self):
        return [layer_path(layer) for layer in self.layers]


def layer_path(layer):
    """A layer's `path` (unique inside its model), or its `name` if unset."""
    return getattr(layer, "path", None) or layer.name


def _size(variable):
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


def _children(layer):
    """Direct sub-layers of `layer`, in forward order where Keras knows it.

    Functional and Sequential models list their layers in topological order.
    Other layers (subclassed models, composite layers) list them in the order
    they were assigned as attributes, which is the forward order in the usual
    `__init__`/`build` style.
    """
    if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
        children = list(layer.layers)
    else:
        children = list(
            layer._flatten_layers(include_self=False, recursive=False)
        )
    return [c for c in children if not isinstance(c, keras.layers.InputLayer)]


def _weight_ids(layer):
    return {id(v) for v in layer.trainable_weights}


def _collect_weighted_layers(layer, seen, out):
    """Depth-first walk that appends every leaf layer owning trainable weights.

    A layer whose own variables are trainable (not only its children's) is a
    leaf even if it has sub-layers: freezing it freezes its children too.
    """
    if id(layer) in seen or not layer.trainable:
        return
    seen.add(id(layer))
    children = _children(layer)
    own = _weight_ids(layer)
    for child in children:
        own -= _weight_ids(child)
    if own or not children:
        if layer.trainable_weights:
            out.append(layer)
        return
    for child in children:
        _collect_weighted_layers(child, seen, out)


def find_units(model):
    """Lists the freezable units of `model` in forward order.

    Layers the user already froze (`trainable=False`) and layers without
    trainable weights are not units. A layer used twice (shared) is one unit,
    at its first use. Nested models and layers that hold other layers (such as
    the blocks of a keras-hub backbone) are searched down to the layers that
    own the weights.

    Args:
        model: a built Keras model (or layer).

    Returns:
        A list of `FreezeUnit`, first unit of the forward pass first.
    """
    layers, seen = [], set()
    for child in _children(model):
        _collect_weighted_layers(child, seen, layers)

    units, unit_of = [], {}
    for layer in layers:
        owner = _normalised_unit(layer, units, unit_of)
        if owner is not None:
            owner.layers.append(layer)
            continue
        unit = FreezeUnit(name=layer_path(layer), layers=[layer])
        units.append(unit)
        unit_of[id(layer)] = unit
    return units


def _input_producer(layer):
    """The operation whose output `layer` reads, from the functional graph.

    Returns `False` when the graph does not say (a subclassed model, a layer
    called several times or on several inputs). The operation may own no
    unit (an input, an `Add`); the caller decides what that means.
    """
    nodes = getattr(layer, "_inbound_nodes", None) or []
    if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
        return False
    history = getattr(nodes[0].input_tensors[0], "_keras_history", None)
    return history.operation if history is not None else False


def _normalised_unit(layer, units, unit_of):
    """The unit a normalisation layer joins, or `None` if it is a unit.

    A `BatchNormalization` joins the unit of the layer whose output it
    normalises. Where the graph does not tell (subclassed models), it joins
    the unit just before it in forward order.
    """
    if not isinstance(layer, _NORMALIZATION_FOLLOWERS) or not units:
        return None
    producer = _input_producer(layer)
    owner = units[-1] if producer is False else unit_of.get(id(producer))
    if owner is None or isinstance(owner.layers[-1], _NORMALIZATION_FOLLOWERS):
        return None
    return owner
