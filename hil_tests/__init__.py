"""Hardware-in-the-loop suite: the same tests against agents on this machine or a real device.

`plugin.py` is the pytest plugin (`-p hil_tests.plugin`: options, fixtures, the HIL report);
`targets.py` holds the drivers that start/restart a device's agent, `profiles.py` the local device
profiles, `legacy_env.py` the tflite-runtime 2.14 environment, `rig.py` the real server that
drives a device and `watch.py` the read-only broker view of it. Tests talk to the device only
through the broker and the server, as production does. See docs/hil.md.
"""
