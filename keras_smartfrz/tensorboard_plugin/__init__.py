"""The SmartFRZ TensorBoard dashboard: every freeze decision, per run.

TensorBoard finds it through the `tensorboard_plugins` entry point of the
keras-smartfrz distribution (`plugin.SmartFRZLoader`). It reads what the
freezing callbacks write with `log_dir=` (see `keras_smartfrz.summaries`).
"""
