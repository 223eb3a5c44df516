"""EdgeGuide compression: data pipeline, reference recommender, TFLite export, runtime checks.

This is the only package allowed to import TensorFlow. Models are built with ``tf_keras``
(tfmot does not support Keras 3), so the legacy-Keras switch is set here, before any
submodule can import TensorFlow.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) drowns the progress output; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
