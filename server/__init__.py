"""EdgeGuide server: model registry, deployment over MQTT, on-device acceptance gating, reports.

Importing this package is cheap: TensorFlow is only imported by the compression steps that need it.
"""
