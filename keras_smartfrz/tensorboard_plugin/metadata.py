"""What the freezing callbacks write to TensorBoard, and how it is tagged.

Shared by the writer (`keras_smartfrz.summaries`) and the dashboard plugin
(`keras_smartfrz.tensorboard_plugin.plugin`), so both agree on names.
"""

import json

from tensorboard.compat.proto import summary_pb2

PLUGIN_NAME = "smartfrz"

# The run a callback writes to is `<log_dir>/smartfrz`, beside the `train`
# and `validation` runs of `keras.callbacks.TensorBoard`.
RUN_SUBDIRECTORY = "smartfrz"

TAG_PREFIX = "smartfrz/"
FROZEN_FRACTION_TAG = "smartfrz/frozen_fraction"
FROZEN_PARAM_FRACTION_TAG = "smartfrz/frozen_param_fraction"
COMPUTE_SAVED_TAG = "smartfrz/compute_saved"
STEP_COMPUTE_SAVED_TAG = "smartfrz/step_compute_saved"
SCORE_TAG_PREFIX = "smartfrz/score/"
DECISIONS_TAG = "smartfrz/decisions"
STATE_TAG = "smartfrz/state"

# Version of the JSON held by the `smartfrz/state` tensor.
STATE_FORMAT = 1


def score_tag(unit_name):
    """The scalar tag of one unit's score."""
    return SCORE_TAG_PREFIX + unit_name


def create_state_metadata():
    """`SummaryMetadata` of the `smartfrz/state` tensor (owned by the plugin).

    The data class is set here because TensorBoard only infers it for its own
    plugins; without it the data provider would not list the tensor.
    """
    content = json.dumps({"format": STATE_FORMAT}).encode("utf-8")
    return summary_pb2.SummaryMetadata(
        summary_description=(
            "The freezing callback's state after one freezing stage, as JSON: "
            "units in forward order, their parameter counts, the epoch each "
            "froze at, this stage's scores and verdicts."
        ),
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content
        ),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )


def parse_state_metadata(content):
    """The `format` of a `smartfrz/state` tensor's plugin content.

    Returns `None` when the content is not ours or not understood.
    """
    try:
        value = json.loads(bytes(content).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    return value.get("format")
