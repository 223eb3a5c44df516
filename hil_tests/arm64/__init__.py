"""Raspberry Pi OS 64-bit's userland (Debian 12 bookworm arm64, Python 3.11) under qemu-user, as HIL devices.

`python -m hil_tests.arm64 run` (what `make hil-arm64` calls) builds that userland once with
debootstrap (cached under `.cache/arm64/`), installs the agent into it from this checkout's own
wheel (two venvs: LiteRT with numpy 2, tflite-runtime 2.14 with numpy 1), starts one
`edgeguide-agent` per venv inside it against a mosquitto on this machine, and drives both with the
HIL suite's `remote` target, exactly as a real Pi would be driven. Needs root (debootstrap, chroot,
mounts); every mount lives in a private mount namespace of the process that needs it, so nothing
stays mounted when a step ends or fails.
"""
