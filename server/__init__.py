"""EdgeGuide server: model registry, deployment over MQTT, on-device acceptance gating, reports.

`registry` (SQLite via the `db` adapter) holds artifacts, devices, deployments and events;
`deployer` ships a signed manifest and chunks, gates the device's report (`gate` + `policy`) and
sends the signed verdict; `service` runs it all on one MQTT link; `cli` is `edgeguide-server`;
`demo` runs the whole loop with an `embedded_broker` and a `local_agent`.
Importing this package is cheap: TensorFlow is only imported by the compression steps that need it.
"""
