"""A fleet simulator that scales: many MQTT 5 device sessions multiplexed on one asyncio loop per process.

`mqtt5.py` is a minimal MQTT 5 client over asyncio streams (epoll through the default selector,
so no per-connection thread and no select() limit of 1,024 descriptors), `device.py` the device
side of the EdgeGuide protocol, `simproc.py` one simulator process, `stack.py` the brokers
(edge mosquittos bridged to a core one), PostgreSQL and the server processes.
"""
