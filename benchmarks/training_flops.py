"""Analytic FLOPs of a training step, with any set of variables frozen.

`TrainingFlops(model, input_spec)` traces `model(x, training=True)` once for
one example into a TensorFlow graph and gives every operation an analytic
forward cost from its static shapes:

- contractions, 2 FLOPs per multiply-add: `MatMul` and `BatchMatMul`
  (`2 * output size * contracted size`), `Einsum` (`2 *` the product of the
  sizes of every index of the equation, which counts the attention matmuls
  of keras-hub transformers), convolutions (`2 * output size * kernel
  height * kernel width * input channels per group`; depthwise
  `2 * output size * kernel height * kernel width`);
- reductions (`Mean`, `Sum`, ...): one FLOP per input element;
- every other operation that computes (activations, normalisation,
  softmax, additions, casts, gathers): one FLOP per output element;
- operations that only move or describe data (`Reshape`, `Transpose`,
  `Identity`, slicing, variable reads, constants) cost nothing.

A training step's cost is the forward cost of every operation plus its
backward cost, decided by the graph: an operation needs a gradient towards an
input only when that input depends on a trainable variable (the variable
itself, or anything computed from it, gradients stopping at
`StopGradient`) and the operation lies on the path to the model's outputs.
Each such input costs one forward of the operation (a contraction's gradient
towards its activation, and towards its weight, each cost one forward; an
elementwise operation's one gradient costs about one forward). So a layer
whose weights train and whose input carries gradient costs 3x its forward
(forward + 2x backward), a layer without weights between the loss and the
first trainable weight costs 2x (forward + 1x backward), and a frozen
prefix, which no gradient reaches, costs its forward only. The first
trainable layer after a frozen prefix needs no gradient towards its input,
so it costs 2x. The loss and the optimizer's update (a few FLOPs per
trainable weight) are left out: they are small next to the layers.

Checked against hand-computed numbers and TensorFlow's own profiler
(`tf.compat.v1.profiler`, which does not count `Einsum`) in
`tests/test_training_flops.py`.
"""

import collections
import re

import numpy as np
import tensorflow as tf

# Operations that compute nothing (or whose cost is memory, not arithmetic).
_FREE_OPS = frozenset(
    """
    Const Placeholder Identity IdentityN NoOp Reshape Squeeze ExpandDims
    Shape ShapeN Size Rank StridedSlice Slice Transpose ConcatV2 Concat Pack
    Unpack Split SplitV Fill ZerosLike OnesLike ReadVariableOp VarHandleOp
    AssignVariableOp AssignAddVariableOp AssignSubVariableOp StopGradient
    PreventGradient Tile BroadcastTo BroadcastArgs Range
    StatelessRandomGetKeyCounter StatelessRandomGetAlg RngReadAndSkip
    TensorListFromTensor PlaceholderWithDefault EnsureShape CheckNumerics
    """.split()
)
_REDUCTIONS = frozenset(
    "Mean Sum Max Min Prod ArgMax ArgMin All Any".split()
)
_CONVOLUTIONS = frozenset(
    "Conv2D Conv3D Conv1D Conv DepthwiseConv2dNative".split()
)
_CONTRACTIONS = frozenset(
    ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum")
) | _CONVOLUTIONS
# Gradient never flows through these outputs.
_NO_GRADIENT = frozenset(("StopGradient", "PreventGradient")) | frozenset(
    "Shape ShapeN Size Rank ArgMax ArgMin Less LessEqual Greater "
    "GreaterEqual Equal NotEqual LogicalAnd LogicalOr LogicalNot "
    "ZerosLike OnesLike".split()
)


def _num_elements(shape):
    dims = shape.as_list() if shape.rank is not None else None
    if dims is None or any(d is None for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


def _einsum_flops(op):
    equation = op.get_attr("equation").decode()
    operands, _, _ = equation.partition("->")
    names = operands.split(",")
    sizes = {}
    for name, tensor in zip(names, op.inputs):
        dims = tensor.shape.as_list()
        if "..." in name:
            head, tail = name.split("...")
            ellipsis = dims[len(head): len(dims) - len(tail)]
            for i, size in enumerate(ellipsis):
                sizes[f"...{len(ellipsis) - i}"] = size
            name = head + tail
            dims = dims[: len(head)] + dims[len(dims) - len(tail):]
        for letter, size in zip(name, dims):
            sizes[letter] = max(sizes.get(letter) or 1, size or 1)
    product = int(np.prod(list(sizes.values()), dtype=np.int64))
    return 2 * product if len(names) > 1 else product


def op_forward_flops(op):
    """Analytic forward FLOPs of one graph operation (one example traced).

    Returns `None` when a shape is not static.
    """
    kind = op.type
    if kind in _FREE_OPS or not op.outputs:
        return 0
    if kind == "Einsum":
        return _einsum_flops(op)
    out = _num_elements(op.outputs[0].shape)
    if out is None:
        return None
    if kind == "MatMul":
        a = op.inputs[0].shape.as_list()
        contracted = a[0] if op.get_attr("transpose_a") else a[1]
        return 2 * out * contracted
    if kind.startswith("BatchMatMul"):
        a = op.inputs[0].shape.as_list()
        contracted = a[-2] if op.get_attr("adj_x") else a[-1]
        return 2 * out * contracted
    if kind == "DepthwiseConv2dNative":
        kernel = op.inputs[1].shape.as_list()
        return 2 * out * kernel[0] * kernel[1]
    if kind in _CONVOLUTIONS:
        kernel = op.inputs[1].shape.as_list()
        # The filter's last axis is the output channels; the others (spatial
        # sizes and input channels per group) are what each output reads.
        return 2 * out * int(np.prod(kernel[:-1], dtype=np.int64))
    if kind in _REDUCTIONS:
        return _num_elements(op.inputs[0].shape) or out
    return out


class TrainingFlops:
    """Forward and training-step FLOPs of a Keras model (TensorFlow backend).

    Args:
        model: a built Keras model.
        input_spec: a `tf.TensorSpec` (or a dict / list of them) of ONE
            example with its batch axis, e.g. `tf.TensorSpec((1, 28, 28, 1))`.
            All FLOPs are per example.

    Attributes:
        forward: forward FLOPs of one example (training-mode forward pass).
        unknown_ops: names of operations whose shapes were not static (counted
            as 0; empty for the models of the benchmark suite).

    Example:

    ```python
    flops = TrainingFlops(model, tf.TensorSpec((1, 28, 28, 1)))
    full = flops.step()                          # nothing frozen
    conv1 = model.get_layer("conv1")
    frozen = flops.step(frozen={v.path for v in conv1.weights})
    saved = 1 - frozen / full
    ```
    """

    def __init__(self, model, input_spec):
        self.model = model
        @tf.autograph.experimental.do_not_convert
        def forward(inputs):
            return model(inputs, training=True)

        function = tf.function(forward)
        graph = function.get_concrete_function(input_spec).graph
        self._graph = graph
        variables = {}
        by_handle = {}
        for variable in model.weights:
            handle = getattr(variable.value, "handle", None)
            if handle is not None:
                by_handle[id(handle)] = variable.path
        for external, internal in graph.captures:
            path = by_handle.get(id(external))
            if path is not None:
                variables[internal.op.name] = path
        self._resource_paths = variables
        self._ops = [op for op in graph.get_operations()]
        self._flops = {}
        self.unknown_ops = []
        for op in self._ops:
            flops = op_forward_flops(op)
            if flops is None:
                self.unknown_ops.append(op.name)
                flops = 0
            self._flops[op.name] = flops
        self._on_output_path = self._ancestors_of_outputs(graph)
        self.forward = float(sum(self._flops.values()))
        # Frozen later (say by a freezing callback) or not, these are the
        # variables that train when nothing is frozen.
        self._trainable = {v.path for v in model.trainable_weights}
        self._cache = {}

    def _ancestors_of_outputs(self, graph):
        seen = set()
        stack = [t.op for t in graph.outputs]
        while stack:
            op = stack.pop()
            if op.name in seen:
                continue
            seen.add(op.name)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
        return seen

    @property
    def variable_paths(self):
        """Paths of the model's variables that the forward pass reads."""
        return sorted(set(self._resource_paths.values()))

    def step(self, frozen=()):
        """FLOPs of one training step for one example.

        Args:
            frozen: paths (`variable.path`) of variables that do not train, in
                addition to those that were not trainable when this object
                was made (moving statistics and the like).

        Returns:
            Forward plus backward FLOPs per example (see the module doc).
        """
        key = frozenset(frozen)
        if key not in self._cache:
            self._cache[key] = self.forward + self._backward(key)
        return self._cache[key]

    def _backward(self, frozen):
        trainable = self._trainable - set(frozen)
        # Tensors that depend on a trainable variable, in graph order
        # (`get_operations` lists an op after its inputs).
        carries = set()
        for op in self._ops:
            if op.type == "Placeholder" and self._resource_paths.get(
                op.name
            ) in trainable:
                carries.add(op.outputs[0].name)
                continue
            if op.type in _NO_GRADIENT:
                continue
            if any(t.name in carries for t in op.inputs):
                carries.update(t.name for t in op.outputs)
        backward = 0
        for op in self._ops:
            if op.name not in self._on_output_path or op.type in _NO_GRADIENT:
                continue
            flops = self._flops[op.name]
            if not flops:
                continue
            if op.type in _CONTRACTIONS:
                needs = sum(t.name in carries for t in op.inputs[:2])
            else:
                needs = int(any(t.name in carries for t in op.inputs))
            backward += needs * flops
        return float(backward)

    def forward_by_scope(self, depth=2):
        """Forward FLOPs grouped by the first `depth` name scopes of each op."""
        totals = collections.Counter()
        for name, flops in self._flops.items():
            scope = "/".join(re.split("/", name)[:depth])
            totals[scope] += flops
        return dict(totals)
