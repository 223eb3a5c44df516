"""EdgeGuide device agent: receives signed models over MQTT, measures them, serves recommendations.

It never imports TensorFlow (nor anything that does): models run on LiteRT / tflite-runtime via
`agent.runtime`. `agent.daemon.Agent` is the long-running process, `agent.cli` its command line.
"""

__version__ = "0.1.0"
