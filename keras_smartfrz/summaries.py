"""Per-stage TensorBoard summaries: what froze, when, and what it saved.

A freezing callback given `log_dir=` writes, at each freezing stage and only
then, to the run `<log_dir>/smartfrz` (beside the `train` and `validation`
runs of `keras.callbacks.TensorBoard`, so both can share one `log_dir`). The
step is the 0-based epoch index, as `keras.callbacks.TensorBoard` uses for
its epoch summaries.

- Scalars: `smartfrz/frozen_fraction` (share of the units frozen),
  `smartfrz/frozen_param_fraction` (share of the trainable parameters
  frozen), `smartfrz/compute_saved` (estimated share of the training compute
  saved so far), `smartfrz/step_compute_saved` (estimated share of a train
  step's compute saved from the next epoch on), and `smartfrz/score/<unit>`
  for each unit the policy scored at this stage.
- Text: `smartfrz/decisions`, a Markdown table of every unit's state.
- Tensor: `smartfrz/state`, the callback's state as JSON (units in forward
  order, parameter counts, the epoch each unit froze at, this stage's scores
  and verdicts), read by the SmartFRZ dashboard.

Estimated compute. The cost of a unit is taken as proportional to its number
of trainable parameters (counted when `fit` starts), which is its forward
multiply-adds per example for a `Dense` layer. For convolutions it leaves out
the size of the feature map, so it over-weights late, wide, low-resolution
layers against early, high-resolution ones; it is an estimate, not a
measurement. A train step costs each unit a forward pass (1x), an input
gradient (about 1x) and a weight gradient (about 1x). A frozen unit skips
its weight gradient; when every unit before it is frozen too (always so in
`"prefix"` mode) back-propagation stops in front of it and it skips its input
gradient as well, saving 2 of its 3 shares. Savings start with the epoch after
the stage that froze the unit; every epoch is assumed to have as many steps.
"""

import json
import os

import numpy as np
import tensorflow as tf

from keras_smartfrz.tensorboard_plugin import metadata

_DESCRIPTIONS = {
    metadata.FROZEN_FRACTION_TAG: "Share of the freezable units frozen.",
    metadata.FROZEN_PARAM_FRACTION_TAG: (
        "Share of the units' trainable parameters (counted when fit started) "
        "that are frozen."
    ),
    metadata.COMPUTE_SAVED_TAG: (
        "Estimated share of the training compute saved so far (epochs run in "
        "this fit), from parameter counts: a frozen unit saves 2/3 of its "
        "cost behind a frozen prefix, 1/3 otherwise."
    ),
    metadata.STEP_COMPUTE_SAVED_TAG: (
        "Estimated share of one train step's compute saved from the next "
        "epoch on, from parameter counts."
    ),
}


def step_compute_saved(costs, frozen):
    """Estimated share of a train step's compute that frozen units save.

    Args:
        costs: each unit's cost (here its parameter count), forward order.
        frozen: whether each unit is frozen.

    Returns:
        A float in `[0, 2/3]`: a frozen unit saves 2 of its 3 shares (weight
        and input gradient) when every unit before it is frozen, 1 (the weight
        gradient) otherwise.
    """
    costs = np.asarray(costs, dtype=np.float64)
    frozen = np.asarray(frozen, dtype=bool)
    total = 3.0 * costs.sum()
    if total <= 0.0:
        return 0.0
    behind_frozen_prefix = np.cumprod(frozen).astype(bool)
    saved = np.where(frozen, np.where(behind_frozen_prefix, 2.0, 1.0), 0.0)
    return float((saved * costs).sum() / total)


def _code(name):
    # Backticks keep underscores and pipes in layer paths literal in Markdown.
    return "`" + str(name).replace("`", "'") + "`"


def decisions_table(epoch, unit_names, num_params, frozen_epochs, scores):
    """The Markdown table of one stage, every unit in forward order.

    Args:
        epoch: 0-based epoch index of the stage.
        unit_names: all units, forward order (the head last).
        num_params: each unit's parameter count.
        frozen_epochs: `{unit name: 0-based epoch it froze at}`.
        scores: `{unit name: score}` of the units scored at this stage.

    Returns:
        A Markdown string; epochs are counted from 1, as Keras prints them.
    """
    rows = [
        "| unit | parameters | score | state |",
        "|---|---:|---:|---|",
    ]
    for index, name in enumerate(unit_names):
        score = scores.get(name)
        shown = "" if score is None else f"{score:.3f}"
        if frozen_epochs.get(name) == epoch:
            state = f"**froze** (end of epoch {epoch + 1})"
        elif name in frozen_epochs:
            state = f"frozen since epoch {frozen_epochs[name] + 1}"
        elif index == len(unit_names) - 1:
            state = "trains (the head never freezes)"
        else:
            state = "trains"
        rows.append(
            f"| {_code(name)} | {int(num_params[index])} | {shown} | {state} |"
        )
    return "\n".join(rows)


class StageSummaryWriter:
    """Writes the freezing stages of one `fit` to `<log_dir>/smartfrz`.

    The freezing callbacks create one in `on_train_begin` when given
    `log_dir=`; it keeps what the timeline needs (the epoch each unit froze
    at, the compute saved) so that the summaries alone tell the whole story.

    Args:
        log_dir: the directory given to the callback; the summaries go to its
            `smartfrz` subdirectory.
        unit_names: the model's units, forward order.
        num_params: each unit's trainable parameter count at `fit` start.

    Example:

    ```python
    writer = StageSummaryWriter("logs", ["d0", "head"], [112, 34])
    writer.begin_epoch(0)
    writer.write_stage(0, [keras_smartfrz.FreezeDecision(0, "d0", 1.0, True)])
    writer.close()
    ```
    """

    def __init__(self, log_dir, unit_names, num_params):
        self.log_dir = os.path.join(
            os.fspath(log_dir), metadata.RUN_SUBDIRECTORY
        )
        self.unit_names = list(unit_names)
        self.num_params = np.asarray(num_params, dtype=np.int64)
        self.frozen_epochs = {}
        self.compute_saved = 0.0
        self.step_compute_saved = 0.0
        self._first_epoch = None
        self._epochs_counted = 0
        self._saved_epochs = 0.0
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def begin_epoch(self, epoch):
        """Marks where this `fit` starts (`initial_epoch` may not be 0)."""
        if self._first_epoch is None:
            self._first_epoch = epoch

    def write_stage(self, epoch, decisions):
        """Records one stage's `FreezeDecision`s and writes its summaries."""
        if self._first_epoch is None:
            self._first_epoch = epoch
        # Epochs since the last stage ran at the saving rate set back then;
        # this stage's freezes only pay off from the next epoch on.
        epochs_done = epoch + 1 - self._first_epoch
        self._saved_epochs += self.step_compute_saved * (
            epochs_done - self._epochs_counted
        )
        self._epochs_counted = epochs_done
        self.compute_saved = self._saved_epochs / max(1, epochs_done)

        scores = {}
        for decision in decisions:
            scores[decision.layer] = float(decision.score)
            if decision.frozen:
                self.frozen_epochs[decision.layer] = int(decision.epoch)
        frozen = np.array([n in self.frozen_epochs for n in self.unit_names])
        self.step_compute_saved = step_compute_saved(self.num_params, frozen)
        total_params = max(1, int(self.num_params.sum()))
        frozen_fraction = float(frozen.mean()) if len(frozen) else 0.0
        frozen_param_fraction = (
            float(self.num_params[frozen].sum()) / total_params
        )
        state = {
            "format": metadata.STATE_FORMAT,
            "epoch": int(epoch),
            "units": self.unit_names,
            "num_params": [int(n) for n in self.num_params],
            "frozen_epoch": [
                self.frozen_epochs.get(n) for n in self.unit_names
            ],
            "score": [scores.get(n) for n in self.unit_names],
            "frozen_now": [
                self.frozen_epochs.get(n) == epoch for n in self.unit_names
            ],
            "frozen_fraction": frozen_fraction,
            "frozen_param_fraction": frozen_param_fraction,
            "compute_saved": self.compute_saved,
            "step_compute_saved": self.step_compute_saved,
            "cost_model": "parameters",
        }
        scalars = {
            metadata.FROZEN_FRACTION_TAG: frozen_fraction,
            metadata.FROZEN_PARAM_FRACTION_TAG: frozen_param_fraction,
            metadata.COMPUTE_SAVED_TAG: self.compute_saved,
            metadata.STEP_COMPUTE_SAVED_TAG: self.step_compute_saved,
        }
        # record_if(True): keras.callbacks.TensorBoard with an integer
        # `update_freq` leaves a batch-based recording condition in force.
        with self._writer.as_default(step=epoch), tf.summary.record_if(True):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value, description=_DESCRIPTIONS[tag])
            for name, score in scores.items():
                tf.summary.scalar(metadata.score_tag(name), score)
            tf.summary.text(
                metadata.DECISIONS_TAG,
                decisions_table(
                    epoch,
                    self.unit_names,
                    self.num_params,
                    self.frozen_epochs,
                    scores,
                ),
            )
            tf.summary.write(
                metadata.STATE_TAG,
                tf.constant(json.dumps(state)),
                metadata=metadata.create_state_metadata(),
            )
        self._writer.flush()

    def close(self):
        """Flushes and closes the event file."""
        self._writer.close()
