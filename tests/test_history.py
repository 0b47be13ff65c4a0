import numpy as np

from keras_smartfrz.history import SnapshotCadence
from keras_smartfrz.history import SnapshotHistory


def test_history_keeps_the_last_window_oldest_first():
    history = SnapshotHistory(num_units=2, window_size=3, sample_size=1)
    assert history.window().shape == (2, 0, 1)
    for value in range(5):
        history.append(np.full((2, 1), value))
    assert len(history) == 3
    np.testing.assert_array_equal(history.window()[0, :, 0], [2, 3, 4])


def test_history_drops_frozen_units():
    history = SnapshotHistory(num_units=3, window_size=2, sample_size=1)
    history.append(np.array([[0.0], [1.0], [2.0]]))
    history.keep_units([True, False, True])
    history.append(np.array([[5.0], [6.0]]))
    np.testing.assert_array_equal(history.window()[:, :, 0], [[0, 5], [2, 6]])


def due_steps(cadence, steps):
    return [s for s in range(1, steps + 1) if cadence.due(s)]


def test_known_stage_length_spreads_window_evenly():
    cadence = SnapshotCadence(window_size=10, steps_per_stage=100)
    assert due_steps(cadence, 100) == list(range(10, 101, 10))


def test_short_stage_samples_every_step():
    assert due_steps(SnapshotCadence(10, 4), 4) == [1, 2, 3, 4]


def test_unknown_stage_length_doubles_the_interval():
    cadence = SnapshotCadence(window_size=4)
    steps = due_steps(cadence, 40)
    assert steps[:4] == [1, 2, 3, 4]
    assert steps[4:8] == [6, 8, 10, 12]
    assert steps[8:12] == [16, 20, 24, 28]
    cadence.set_steps_per_stage(40, current_step=40)
    assert [s for s in range(41, 81) if cadence.due(s)] == [50, 60, 70, 80]
