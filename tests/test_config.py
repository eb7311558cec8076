"""station.yaml: a good file loads with paths resolved; every kind of mistake names its dotted key."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from iadgpt.errors import ConfigError
from iadgpt.runtime.config import StationConfig, _same_disk, build_sinks, load_station_config
from iadgpt.runtime.sinks import JsonlSink, OverlaySink

GOOD = """\
bundle: bundles/plate
source: images/
backend: tensorrt
threads: 2
threshold: 0.42
weights: models/clip-vit-l14-336
station_id: line1-cam1
queue_size: 8
stats_interval_s: 5
sinks:
  events: {path: out/events.jsonl, fsync: always, max_bytes: 1000000}
  overlays: {dir: out/overlays, only_anomalous: false}
  mqtt: {host: 127.0.0.1, port: 1884, topic: "factory/{station}/ev", qos: 0, username: cam1, password: "s3cret"}
describer:
  enabled: true
  model: qwen2-vl-2b
  max_queue: 8
"""

EXAMPLE = Path(__file__).resolve().parents[1] / "iadgpt" / "examples" / "station.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(text)
    return path


def test_good_file_loads_with_paths_resolved(tmp_path: Path) -> None:
    cfg = load_station_config(_write(tmp_path, GOOD))
    assert isinstance(cfg, StationConfig) and cfg.path == (tmp_path / "station.yaml").resolve()
    base = tmp_path.resolve()
    assert cfg.bundle == base / "bundles/plate" and cfg.source == str(base / "images")
    assert (cfg.backend, cfg.threads, cfg.threshold, cfg.station_id) == ("tensorrt", 2, 0.42, "line1-cam1")
    assert cfg.weights == base / "models/clip-vit-l14-336"
    assert (cfg.queue_size, cfg.stats_interval_s) == (8, 5.0)
    ev, ov, mq = cfg.sinks.events, cfg.sinks.overlays, cfg.sinks.mqtt
    assert ev.path == base / "out/events.jsonl" and ev.fsync == "always" and ev.max_bytes == 1_000_000
    assert ev.backups == 5 and ov.dir == base / "out/overlays" and ov.only_anomalous is False
    assert (mq.host, mq.port, mq.topic, mq.qos, mq.buffer_max) == ("127.0.0.1", 1884, "factory/{station}/ev", 0, 10_000)
    assert (mq.username, mq.password) == ("cam1", "s3cret")  # brokers with a login (was refused as unknown keys)
    assert cfg.describer.enabled and cfg.describer.options == {"model": "qwen2-vl-2b", "max_queue": 8}


def test_minimal_file_defaults_and_sources_that_are_not_paths(tmp_path: Path) -> None:
    for source, expected in [("synthetic://part?seed=1", "synthetic://part?seed=1"), (0, "0"),
                             ("/dev/video2", "/dev/video2"), ("rtsp://cam/stream", "rtsp://cam/stream"),
                             ("gst:videotestsrc ! appsink", "gst:videotestsrc ! appsink"),
                             ("/abs/part.mp4", "/abs/part.mp4")]:
        cfg = load_station_config(_write(tmp_path, f"bundle: /b\nsource: {source!r}\n".replace("'", '"')))
        assert cfg.source == expected
    assert (cfg.backend, cfg.threads, cfg.threshold, cfg.queue_size, cfg.station_id) == ("onnxruntime", None, None,
                                                                                         4, "station")
    assert cfg.sinks.events is None and cfg.sinks.mqtt is None and not cfg.describer.enabled


def test_example_file_is_valid() -> None:
    cfg = load_station_config(EXAMPLE)
    assert cfg.sinks.events is not None and cfg.sinks.mqtt is not None and cfg.station_id == "line1-cam1"


def test_the_example_is_printed_from_the_package(capsys) -> None:
    # a wheel install has no examples/ folder, yet the errors point to the example
    from iadgpt.cli import main
    assert main(["run", "--example-config"]) == 0
    assert capsys.readouterr().out == EXAMPLE.read_text(encoding="utf-8")


def test_the_example_service_stops_within_its_timeout_and_restarts_after_a_failure(capsys) -> None:
    """The systemd unit: systemd takes no comment after a value, SIGTERM is the station's clean stop,
    and the stop timeout outlasts the describer's drain (a kill mid-flush would lose events)."""
    import configparser

    from iadgpt.cli import main
    from iadgpt.commands.run import EXAMPLE_SERVICE, SIGNAL_DRAIN_S
    assert main(["run", "--example-service"]) == 0
    text = capsys.readouterr().out
    assert text == EXAMPLE_SERVICE.read_text(encoding="utf-8")
    unit = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#",),
                                     inline_comment_prefixes=None)
    unit.optionxform = str
    unit.read_string(text)
    assert sorted(unit.sections()) == ["Install", "Service", "Unit"]
    service = unit["Service"]
    assert service["ExecStart"].split()[-3:] == ["run", "--station", "/etc/iadgpt/station.yaml"]
    # a blocked read (10 s) + the drain + a part being described (30 s) + worker (3 s) + MQTT (5 s)
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) >= 10 + SIGNAL_DRAIN_S + 30 + 3 + 5
    assert service["Restart"] == "on-failure" and unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert all("#" not in value for section in unit.values() for value in section.values())


@pytest.mark.parametrize("text, key, words", [
    # unknown keys
    ("bundle: b\nsource: s\nbakend: torch\n", "bakend", "did you mean 'backend'"),
    ("bundle: b\nsource: s\nsinks: {mqtt: {host: h, prot: 1}}\n", "sinks.mqtt.prot", "did you mean 'sinks.mqtt.port'"),
    ("bundle: b\nsource: s\nsinks: {kafka: {}}\n", "sinks.kafka", "unknown key"),
    # wrong types and values
    ("bundle: b\nsource: s\nsinks: {mqtt: {host: h, port: abc}}\n", "sinks.mqtt.port", "expected an integer"),
    ("bundle: b\nsource: s\nsinks: {mqtt: {host: h, port: 70000}}\n", "sinks.mqtt.port", "out of range"),
    ("bundle: b\nsource: s\nsinks: {mqtt: {host: h, qos: true}}\n", "sinks.mqtt.qos", "expected an integer"),
    ("bundle: b\nsource: s\nsinks: {mqtt: {host: h, topic: 'a/#'}}\n", "sinks.mqtt.topic", "wildcard"),
    ("bundle: b\nsource: s\nsinks: {mqtt: {host: h, topic: 'a/+/b'}}\n", "sinks.mqtt.topic", "wildcard"),
    ("bundle: b\nsource: s\nsinks: {events: {path: e.jsonl, backups: 1001}}\n", "sinks.events.backups", "out of range"),
    ("bundle: b\nsource: s\nsinks: {events: {path: e, fsync: sometimes}}\n", "sinks.events.fsync", "always"),
    ("bundle: b\nsource: s\nsinks: {overlays: {dir: o, only_anomalous: 'yes'}}\n", "sinks.overlays.only_anomalous",
     "true or false"),
    ("bundle: b\nsource: s\nsinks: [events]\n", "sinks", "mapping"),
    ("bundle: b\nsource: s\nbackend: tflite\n", "backend", "onnxruntime"),
    ("bundle: b\nsource: s\nthreshold: high\n", "threshold", "expected a number"),
    ("bundle: b\nsource: s\nthreshold: .nan\n", "threshold", "not a finite number"),  # would pass every part
    ("bundle: b\nsource: s\nthreshold: .inf\n", "threshold", "not a finite number"),
    ("bundle: b\nsource: s\nqueue_size: 0\n", "queue_size", "out of range"),
    ("bundle: b\nsource: s\nqueue_size: 1001\n", "queue_size", "out of range"),
    ("bundle: b\nsource: s\nstats_interval_s: 0\n", "stats_interval_s", "> 0"),
    ("bundle: b\nsource: s\nstation_id: line 1/cam\n", "station_id", "letters, digits"),
    ("bundle: b\nsource: [1, 2]\n", "source", "URI, path or camera index"),
    ("bundle: b\nsource: s\ndescriber: {enabled: 1}\n", "describer.enabled", "true or false"),
    # missing required keys
    ("source: s\n", "bundle", "missing required key"),
    ("bundle: b\n", "source", "missing required key"),
    ("bundle: b\nsource: s\nsinks: {events: {fsync: never}}\n", "sinks.events.path", "missing required key"),
    ("bundle: b\nsource: s\nsinks: {mqtt: {port: 1883}}\n", "sinks.mqtt.host", "missing required key"),
    ("bundle: b\nsource: s\nsinks: {mqtt: {host: h, password: pw}}\n", "sinks.mqtt.password", "without a username"),
    ("bundle: b\nsource: s\nsinks: {mqtt: {host: h, reconnect_max_s: 0.5}}\n", "sinks.mqtt.reconnect_max_s", "give 1"),
])
def test_errors_name_the_file_and_dotted_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_station_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path.resolve()}: {key}: ") and words in msg, msg


@pytest.mark.parametrize("text, words", [
    ("bundle: [unclosed\n", "not valid YAML at line"),
    ("", "empty"),
    ("- a\n- b\n", "must be a mapping"),
    ("bundle: b\nsource: s\nsource: t\n", "line 3.*'source' is given twice"),  # plain YAML keeps the last
    ("bundle: b\nsource: s\nsinks: {events: {path: e, path: f}}\n", "'path' is given twice"),
])
def test_unreadable_files(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_station_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match="cannot read station config"):
        load_station_config(tmp_path / "missing.yaml")


def test_build_sinks_puts_overlays_first(tmp_path: Path) -> None:
    cfg = load_station_config(_write(tmp_path, GOOD.split("  mqtt:")[0]))
    sinks = build_sinks(cfg)
    try:
        assert [type(s) for s in sinks] == [OverlaySink, JsonlSink]
        assert sinks[1].fsync == "always" and sinks[1].max_bytes == 1_000_000
        assert (tmp_path / "out" / "overlays").is_dir()
    finally:
        for s in sinks:
            s.close()


def test_build_sinks_gives_the_broker_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iadgpt.runtime import config as config_mod
    seen = {}
    monkeypatch.setattr(config_mod, "MqttSink", lambda *a, **k: seen.update(k) or object())
    build_sinks(load_station_config(_write(tmp_path, GOOD)))
    assert (seen["username"], seen["password"], seen["station_id"]) == ("cam1", "s3cret", "line1-cam1")
    assert seen["reconnect_max_s"] == 5.0  # was a fixed 30 s: ~300 more events lost after a 70 s outage


def test_build_sinks_without_paho_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_station_config(_write(tmp_path, GOOD))
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)
    with pytest.raises(ConfigError, match=r"station.yaml: .*pip install iadgpt\[mqtt\]"):
        build_sinks(cfg)


def test_describer_folders_resolve_against_the_file(tmp_path: Path) -> None:
    text = ("bundle: b\nsource: s\ndescriber: {enabled: true, llm: llm-int4, bridge: bridges/bottle, "
            "bridge_llm: llm-embeds, examples: /abs/ex, product: bridge}\n")
    opts = load_station_config(_write(tmp_path, text)).describer.options
    base = tmp_path.resolve()
    assert opts == {"llm": str(base / "llm-int4"), "bridge": str(base / "bridges/bottle"),
                    "bridge_llm": str(base / "llm-embeds"), "examples": "/abs/ex", "product": "bridge"}
    assert load_station_config(_write(tmp_path, "bundle: b\nsource: s\ndescriber: {llm: none}\n")).describer.options == {
        "llm": "none"}


def _cfg(tmp_path, text):
    return load_station_config(_write(tmp_path, "bundle: b\nsource: 0\n" + text))


def test_events_defaults_and_backups_reach_the_sink(tmp_path):
    cfg = _cfg(tmp_path, "sinks:\n  events: {path: ev.jsonl}\n")
    assert (cfg.sinks.events.max_bytes, cfg.sinks.events.backups) == (50_000_000, 5)
    cfg = _cfg(tmp_path, "sinks:\n  events: {path: ev.jsonl, backups: 2, max_bytes: 1000}\n")
    (sink,) = build_sinks(cfg)
    assert (sink.backups, sink.max_bytes) == (2, 1000)
    sink.close()


def test_same_disk(tmp_path):
    assert _same_disk(tmp_path, tmp_path)
    assert not _same_disk(tmp_path / "missing", tmp_path)
    assert not _same_disk(tmp_path, Path("/proc"))  # procfs: another device


def test_build_sinks_closes_what_it_opened_on_error(tmp_path, monkeypatch):
    from iadgpt.runtime import config as config_mod
    cfg = _cfg(tmp_path, "sinks:\n  events: {path: ev.jsonl}\n  mqtt: {host: h}\n")
    opened = []
    real = config_mod.JsonlSink

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opened.append(self)

    def boom(*a, **k):
        raise ConfigError("no broker client")
    monkeypatch.setattr(config_mod, "JsonlSink", Spy)
    monkeypatch.setattr(config_mod, "MqttSink", boom)
    with pytest.raises(ConfigError, match=r"station\.yaml: no broker client"):
        build_sinks(cfg)
    assert opened and opened[0]._fd is None
    cfg.path = None
    with pytest.raises(ConfigError) as exc:
        build_sinks(cfg)
    assert str(exc.value) == "no broker client"


def test_defaults_bounds_and_the_describers_special_llm_names(tmp_path):
    """Unset keys take the documented defaults (describer off, overlays of NG parts only, kept all);
    max_files 0 is refused; the describer's llm "fake" and "none" are names, not paths."""
    cfg = _cfg(tmp_path, "sinks:\n  overlays: {dir: ng}\ndescriber: {llm: fake, bridge_llm: none}\n")
    assert cfg.describer.enabled is False
    assert cfg.sinks.overlays.only_anomalous is True and cfg.sinks.overlays.max_files is None
    assert cfg.describer.options["llm"] == "fake" and cfg.describer.options["bridge_llm"] == "none"
    with pytest.raises(ConfigError, match="max_files"):
        _cfg(tmp_path, "sinks:\n  overlays: {dir: ng, max_files: 0}\n")
