"""The short history of sampled weights, and when to take a snapshot."""

import numpy as np


class SnapshotHistory:
    """A rolling window of the last `window_size` snapshots of each unit.

    Args:
        num_units: number of units sampled in each snapshot.
        window_size: snapshots kept per unit; older ones are dropped.
        sample_size: sampled values per unit and snapshot.
    """

    def __init__(self, num_units, window_size, sample_size):
        self.window_size = window_size
        self._buffer = np.zeros(
            (num_units, window_size, sample_size), dtype=np.float32
        )
        self._count = 0

    def __len__(self):
        return min(self._count, self.window_size)

    def append(self, snapshot):
        """Adds one snapshot of shape `(num_units, sample_size)`."""
        self._buffer[:, self._count % self.window_size] = snapshot
        self._count += 1

    def window(self):
        """The kept snapshots, `(num_units, len(self), sample_size)`, oldest first."""
        n = len(self)
        order = (np.arange(self._count - n, self._count)) % self.window_size
        return self._buffer[:, order]

    def keep_units(self, keep):
        """Drops the units whose entry in the boolean mask `keep` is False."""
        self._buffer = self._buffer[np.asarray(keep, dtype=bool)]


class SnapshotCadence:
    """Decides at which training steps a snapshot is taken.

    The aim is `window_size` evenly spaced snapshots per freezing stage. When
    the number of steps per stage is known, the interval is
    `steps_per_stage // window_size` (at least 1). When it is not (a dataset of
    unknown length in the first epoch), snapshots start at every step and the
    interval doubles each time a full window has been taken, so the window
    always covers a growing, evenly spaced stretch of recent training.

    Args:
        window_size: snapshots wanted per stage.
        steps_per_stage: training steps per freezing stage, or `None`.
    """

    def __init__(self, window_size, steps_per_stage=None):
        self.window_size = window_size
        self.steps_per_stage = None
        self._adaptive = True
        self.interval = 1
        self.next_step = 1
        self._taken = 0
        if steps_per_stage:
            self.set_steps_per_stage(steps_per_stage)

    def set_steps_per_stage(self, steps_per_stage, current_step=0):
        """Switches to a fixed interval once the stage length is known."""
        self.steps_per_stage = int(steps_per_stage)
        self._adaptive = False
        self.interval = max(1, self.steps_per_stage // self.window_size)
        self.next_step = current_step + self.interval

    def skip_to(self, step):
        """Moves the next snapshot to the first step at or after `step` on
        the fixed schedule (no-op while the interval is adaptive), as if
        the skipped steps had been sampled."""
        if self._adaptive or self.next_step >= step:
            return
        behind = -(-(step - self.next_step) // self.interval)
        self.next_step += behind * self.interval

    def due(self, step):
        """True if a snapshot is due at global training step `step` (1-based).

        Advances the schedule when it returns True.
        """
        if step < self.next_step:
            return False
        self._taken += 1
        if self._adaptive and self._taken % self.window_size == 0:
            self.interval *= 2
        self.next_step = step + self.interval
        return True
