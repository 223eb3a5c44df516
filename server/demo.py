"""`edgeguide-server demo`: the whole loop on one machine, narrated.

Loads Online Retail, trains the quick preset, exports float32 and int8 artifacts, registers the
int8 one, starts a broker (embedded amqtt unless --broker), the server in-process and one real
agent as a child process, deploys, waits for the on-device verdict and asks the agent's HTTP
API for a recommendation. Everything it starts is stopped in `finally` (also on Ctrl-C).
TensorFlow is imported only for training and export, never by the agent.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from protocol.redact import redact_url
from server.gate import format_figure

_LOGGER = logging.getLogger(__name__)

DEMO_DEVICE = "demo-device"
DEMO_MODEL = "shopping-guide"


@dataclass(frozen=True)
class DemoOptions:
    """What `edgeguide-server demo` was asked to do."""

    full: bool = False
    broker: str | None = None
    max_customers: int | None = None
    workdir: Path | None = None
    measure_mode: str = "quick"
    verbose: int = 0
    keep: bool = False  # keep the temporary work dir (a --workdir is always kept)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    deploy_timeout_s: float = 600.0


@dataclass
class BuiltArtifacts:
    """Folders written by `build_artifacts` and the figures the demo prints."""

    float_dir: Path
    int8_dir: Path
    data: dict[str, Any]
    training: dict[str, Any]


def build_artifacts(out_dir: Path, *, model_id: str = DEMO_MODEL, full: bool = False, max_customers: int | None = None,
                    train_overrides: dict[str, Any] | None = None, progress: bool = True,
                    console: Console | None = None, show_paths: bool = True) -> BuiltArtifacts:
    """Train the quick (or full) preset and export a float32 and an int8 artifact under `out_dir`.

    `show_paths=False` when `out_dir` is deleted afterwards: never print a path that will not exist.
    """
    console = console or Console(quiet=True)
    import compression  # noqa: F401 - sets TF_USE_LEGACY_KERAS before TensorFlow loads
    from compression.data import load_dataset
    from compression.export import export_artifact
    from compression.train import TrainConfig, train_reference

    with console.status("loading Online Retail ..."):
        dataset = load_dataset(max_customers=max_customers)
    data = {"source": dataset.source, "customers": len(dataset.customers), "items": dataset.num_items,
            "interactions": dataset.num_interactions}
    console.print(f"[bold]data[/]: {data['customers']:,} customers, {data['items']:,} items, "
                  f"{data['interactions']:,} interactions ({data['source']})")
    preset = TrainConfig.full if full else TrainConfig.quick
    config = preset(max_customers=max_customers, **(train_overrides or {}))
    console.print(f"[bold]training[/] the {'full' if full else 'quick'} preset: {config.to_dict()}")
    start = time.monotonic()
    model, history = train_reference(dataset, config, progress=progress)
    training = {"config": config.to_dict(), "seconds": time.monotonic() - start, "loss": history["loss"],
                "val_hr10": history["val_hr10"]}
    console.print(f"trained in {training['seconds']:.0f} s; validation HR@10 per epoch: "
                  f"{', '.join(f'{v:.3f}' for v in history['val_hr10'])}")
    out_dir = Path(out_dir)
    dirs = {}
    for quantization, name in (("none", "float32"), ("int8", "int8")):
        with console.status(f"exporting {name} TFLite and evaluating it on every test customer ..."):
            techniques = [] if name == "float32" else ["ptq-int8"]
            dirs[name] = export_artifact(model, dataset, out_dir / name, model_id=model_id, quantization=quantization,
                                         training=config.to_dict(), techniques=techniques, check_compat=False)
        console.print(f"exported {name} artifact" + (f" to {dirs[name]}" if show_paths else ""))
    return BuiltArtifacts(dirs["float32"], dirs["int8"], data, training)


def _quality_table(float_metrics: dict, int8_metrics: dict) -> Table:
    table = Table(title="Recommendation quality (full ranking, leave-last-out test)")
    for col in ("model", "HR@10", "NDCG@10", "MRR", ".tflite bytes", "gzip bytes"):
        table.add_column(col, justify="right" if col != "model" else "left")
    base = float_metrics.get("baselines") or {}
    for name, label in (("popularity", "popularity baseline"), ("itemknn", "item-to-item (untuned)"),
                        ("itemknn_tuned", "item-to-item (tuned on val)")):
        b = base.get(name) or {}
        table.add_row(label, _f(b.get("hr10")), _f(b.get("ndcg10")), _f(b.get("mrr")), "-", "-")
    for label, m in (("reference float32", float_metrics), ("int8 (deployed)", int8_metrics)):
        table.add_row(label, _f(m.get("hr10")), _f(m.get("ndcg10")), _f(m.get("mrr")),
                      f"{m.get('tflite_bytes', 0):,}", f"{m.get('gzip_bytes', 0):,}")
    return table


def _f(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _device_table(report: dict) -> Table:
    lat = report.get("latency_ms") or {}
    mem = report.get("memory") or {}
    energy = report.get("energy") or {}
    quality = report.get("quality") or {}
    runtime = report.get("runtime") or {}
    table = Table(title=f"Measured on the device ({report.get('mode')} mode, {runtime.get('name')} "
                        f"{runtime.get('version')})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [("latency p50 / p90 / p99 (ms)", f"{_f(lat.get('p50'), '.3f')} / {_f(lat.get('p90'), '.3f')} / "
                                             f"{_f(lat.get('p99'), '.3f')}  (n={lat.get('n')})"),
            ("cold start (ms)", _f(lat.get("cold_start_ms"), ".1f")),
            ("peak RSS (MiB)", _f(mem.get("peak_rss_mib"), ".1f")),
            ("model load RSS delta (MiB)", _f(mem.get("load_delta_mib"), ".1f")),
            ("energy source", f"{energy.get('source')} ({'measured' if energy.get('available') else 'unavailable'})"),
            ("net energy / inference (mJ)", _f(energy.get("net_mj_per_inference"), ".3f")),
            ("top-K agreement with host golden set", _f(quality.get("agreement_at_k"), ".3f")),
            ("model bytes", f"{report.get('model_bytes', 0):,}")]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _verdict_table(verdict: dict) -> Table:
    table = Table(title=f"Gate verdict: {verdict.get('verdict')}", caption=verdict.get("reason"))
    table.add_column("check", no_wrap=True)
    for col in ("figure", "limit", "outcome"):
        table.add_column(col)
    for c in verdict.get("checks", []):
        unit = c.get("unit") or ""
        style = {"pass": "green", "fail": "bold red", "unavailable-failed": "bold red"}.get(c.get("outcome"), "yellow")
        table.add_row(c.get("name", "?"), format_figure(c.get("figure"), unit),
                      f"{c.get('op', '')} {format_figure(c.get('limit'), unit)}", f"[{style}]{c.get('outcome')}[/]")
    return table


def _verdict_notes(verdict: dict) -> list[str]:
    return [f"  {c['name']}: {c['note']}" for c in verdict.get("checks", []) if c.get("note")]


def _quality_summary(float_metrics: dict, int8_metrics: dict) -> str:
    base = float_metrics.get("baselines") or {}
    pop = (base.get("popularity") or {}).get("hr10")
    knn = (base.get("itemknn_tuned") or base.get("itemknn") or {}).get("hr10")
    hr, ref = int8_metrics.get("hr10"), float_metrics.get("hr10")
    if not (isinstance(pop, int | float) and isinstance(knn, int | float) and isinstance(hr, int | float)
            and isinstance(ref, int | float) and min(pop, knn, hr, ref) > 0):
        return "quality figures incomplete in metrics.json"
    return (f"int8 HR@10 {hr:.4f}: {hr / pop:.1f}x the popularity baseline, {100 * (hr / knn - 1):+.1f}% vs "
            f"tuned item-to-item, {100 * (hr / ref - 1):+.1f}% vs its float32 reference; "
            f"{float_metrics['tflite_bytes'] / max(1, int8_metrics['tflite_bytes']):.1f}x smaller on disk")


def _sample_history(int8_dir: Path, golden_row: int = 0) -> list[str]:
    """Stock codes of a real test history from the artifact's golden set (most recent last)."""
    from protocol.artifact import read_golden, read_items

    items = read_items(int8_dir)["items"]
    history = [i for i in read_golden(int8_dir)["histories"][golden_row] if i > 0]
    return [items[i][0] for i in history[-5:]]


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    """Run the demo; returns 0 when the model was promoted and served a recommendation."""
    console = console or Console()
    started = time.monotonic()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter hides the story
    warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow\..*")
    tmp = None
    if options.workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="edgeguide-demo-"))
        workdir = tmp
    else:
        workdir = Path(options.workdir).expanduser()
        workdir.mkdir(parents=True, exist_ok=True)
    stack: list[Any] = []  # everything started, stopped in reverse order
    try:
        console.rule("[bold]EdgeGuide demo: train -> compress -> deploy -> measure on device -> gate -> serve")
        built = build_artifacts(workdir / "artifacts", full=options.full, max_customers=options.max_customers,
                                train_overrides=options.train_overrides, progress=True, console=console,
                                show_paths=tmp is None or options.keep)
        from protocol.artifact import read_metrics

        float_m, int8_m = read_metrics(built.float_dir), read_metrics(built.int8_dir)
        console.print(_quality_table(float_m, int8_m))
        console.print(_quality_summary(float_m, int8_m))

        from server.embedded_broker import EmbeddedBroker
        from server.keys import export_public_key
        from server.local_agent import LocalAgent
        from server.registry import Registry
        from server.service import EdgeGuideServer, ServerConfig

        broker_url = options.broker
        protocol = "auto"
        if broker_url is None:
            protocol = "3.1.1"  # amqtt speaks only 3.1.1: skip the MQTT 5 attempt
            broker = EmbeddedBroker(log_path=workdir / "amqtt.log")
            stack.append(broker)  # before start(): a Ctrl-C during start must still stop the child
            with console.status("starting the embedded amqtt broker (MQTT 3.1.1) ..."):
                broker.start()
            broker_url = broker.url
        console.print(f"[bold]broker[/]: {redact_url(broker_url)}")
        registry = Registry(workdir / "server")
        record = registry.register(built.int8_dir)
        console.print(f"[bold]registered[/] {record.id}: {record.size:,} bytes packed, sha256 {record.sha256[:16]}...")
        key_file = export_public_key(registry.data_dir, workdir / "server-key.pem")
        server = EdgeGuideServer(registry, ServerConfig(broker_url=broker_url, client_id="edgeguide-demo-server",
                                                        topic_prefix="edgeguide-demo", protocol=protocol))
        stack.append(server)
        server.start()
        agent = LocalAgent(DEMO_DEVICE, broker_url, workdir / "agent-state", key_file, topic_prefix="edgeguide-demo",
                           measure_mode=options.measure_mode, log_path=workdir / "agent.log",
                           mqtt_protocol=protocol)
        stack.append(agent)
        with console.status("starting the device agent (a separate process, no TensorFlow) ..."):
            agent.start()
        console.print(f"[bold]agent[/] {DEMO_DEVICE} up (pid {agent.proc.pid if agent.proc else '?'}, "
                      f"HTTP port {agent.http_port})")

        dep = server.deploy(record.model_id, DEMO_DEVICE, version=record.version, wait_seen_s=10.0)
        with console.status(f"deployment {dep.deployment_id}: {dep.status}") as status:
            def on_change(d: Any) -> None:
                status.update(f"deployment {d.deployment_id}: {d.status} (device measuring takes a few seconds "
                              f"in {options.measure_mode} mode)")
                console.print(f"  deployment {d.deployment_id}: [bold]{d.status}[/] {d.reason}".rstrip())

            from server.service import wait_for_deployment

            final = wait_for_deployment(registry, dep.deployment_id, options.deploy_timeout_s, on_change=on_change)
        if final.report:
            console.print(_device_table(final.report))
        if final.verdict:
            console.print(_verdict_table(final.verdict))
            for line in _verdict_notes(final.verdict):
                console.print(line)
        server.deployer.wait_reports()
        if tmp is None or options.keep:  # never print a path that is about to be deleted
            console.print(f"reports written to {registry.reports_dir / final.deployment_id}")
        else:
            console.print("the report files go with the temporary work dir; pass --keep (or --workdir DIR) to "
                          "keep them")
        if final.status != "promoted":
            console.print(Panel(f"deployment ended {final.status}: {final.reason}\nagent log: {agent.log_path}"
                                + ("" if tmp is None or options.keep else " (deleted on exit: pass --keep)"),
                                style="red"))
            return 1
        history = _sample_history(built.int8_dir)
        answer = agent.recommend(history, k=10)
        table = Table(title=f"POST /recommend on the device for a real basket history {history}")
        table.add_column("#", justify="right")
        table.add_column("stock code")
        table.add_column("description")
        table.add_column("score", justify="right")
        for rank, item in enumerate(answer.get("items", []), 1):
            table.add_row(str(rank), str(item.get("stock_code")), str(item.get("description")),
                          _f(item.get("score"), ".3f"))
        console.print(table)
        console.print(Panel(f"done in {time.monotonic() - started:.0f} s: model {record.id} promoted on {DEMO_DEVICE} "
                            f"and serving", style="green"))
        return 0
    finally:
        for thing in reversed(stack):
            try:
                thing.stop()
            except Exception:  # keep stopping the rest
                _LOGGER.exception("could not stop %r", thing)
        if tmp is not None and not options.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            console.print(f"demo files kept in {workdir} (data dir {workdir / 'server'}, agent log "
                          f"{workdir / 'agent.log'})")
