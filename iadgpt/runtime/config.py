"""``station.yaml`` -> `StationConfig`, strictly checked, and the sinks it asks for.

Why strict: a typo in a station file (``sinks.mqtt.prot``) that is silently ignored shows up
weeks later as missing data. Unknown keys, wrong types and missing required keys are a
`ConfigError` naming the file and the dotted key. Relative paths (bundle, source files,
event log, overlay folder, the describer's llm / examples / bridge / bridge_llm) are resolved
against the YAML file's folder, so a station folder can be moved as a whole. See
``iadgpt run --example-config`` (iadgpt/examples/station.yaml) for every key.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from iadgpt.errors import ConfigError
from iadgpt.runtime.detector import BACKENDS
from iadgpt.runtime.sinks import FSYNC_POLICIES, JsonlSink, MqttSink, OverlaySink, Sink

log = logging.getLogger(__name__)

_STATION_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_REQUIRED = object()


@dataclass
class EventsConfig:
    path: Path
    fsync: str = "interval"
    max_bytes: int = 50_000_000
    backups: int = 5


@dataclass
class OverlaysConfig:
    dir: Path
    only_anomalous: bool = True
    max_files: Optional[int] = None


@dataclass
class MqttConfig:
    host: str
    port: int = 1883
    topic: str = "iadgpt/{station}/events"
    qos: int = 1
    client_id: Optional[str] = None
    buffer_max: int = 10_000
    username: Optional[str] = None  # brokers that require a login
    password: Optional[str] = None
    # longest wait between reconnect attempts: events beyond buffer_max are lost while it waits
    # (30 s lost ~300 events at 15 fps after a 70 s outage)
    reconnect_max_s: float = 5.0


@dataclass
class SinksConfig:
    events: Optional[EventsConfig] = None
    overlays: Optional[OverlaysConfig] = None
    mqtt: Optional[MqttConfig] = None


@dataclass
class DescriberConfig:
    """`enabled` is checked here; the other keys belong to the describer, which checks them."""

    enabled: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StationConfig:
    bundle: Path
    source: str
    backend: str = "onnxruntime"
    threads: Optional[int] = None
    threshold: Optional[float] = None  # overrides the bundle's calibrated threshold
    weights: Optional[Path] = None  # CLIP weights folder the torch / cuda-graph backends rebuild from
    station_id: str = "station"
    queue_size: int = 4
    stats_interval_s: float = 10.0
    sinks: SinksConfig = field(default_factory=SinksConfig)
    describer: DescriberConfig = field(default_factory=DescriberConfig)
    path: Optional[Path] = None  # the YAML file this came from


class _Section:
    """One mapping of the YAML file, read key by key with type checks and dotted error names."""

    def __init__(self, data: Any, prefix: str, file: Path, known: tuple[str, ...]) -> None:
        self.prefix, self.file = prefix, file
        if not isinstance(data, dict):
            where = prefix or "the top level"
            raise self.error(prefix, f"{where} must be a mapping of keys, got {_kind(data)}")
        self.data = data
        for key in data:
            if not isinstance(key, str) or key not in known:
                near = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {self.dotted(near[0])!r}? " if near else ""
                raise self.error(self.dotted(str(key)), f"unknown key: {hint}known keys here: {', '.join(known)}")

    def dotted(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {key}: {message}")

    def _raw(self, key: str, default: Any) -> Any:
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is _REQUIRED:
            raise self.error(self.dotted(key), "missing required key (`iadgpt run --example-config` shows every key)")
        return default

    def text(self, key: str, default: Any = _REQUIRED, *, choices: Optional[tuple[str, ...]] = None) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.error(self.dotted(key), f"expected a non-empty string, got {_kind(value)}")
        if choices is not None and value not in choices:
            raise self.error(self.dotted(key), f"{value!r} is not one of {', '.join(choices)}")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, *, lo: Optional[int] = None, hi: Optional[int] = None) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(self.dotted(key), f"expected an integer, got {_kind(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise self.error(self.dotted(key), f"{value} is out of range: use a value {rng}")
        return value

    def number(self, key: str, default: Any = _REQUIRED, *, positive: bool = False) -> Any:
        value = self._raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(self.dotted(key), f"expected a number, got {_kind(value)}")
        if not math.isfinite(value):  # `score >= nan` is never true: a NaN threshold would pass every part
            raise self.error(self.dotted(key), f"{value} is not a finite number")
        if positive and value <= 0:
            raise self.error(self.dotted(key), f"{value} must be > 0")
        return float(value)

    def flag(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._raw(key, default)
        if not isinstance(value, bool):
            raise self.error(self.dotted(key), f"expected true or false, got {_kind(value)}")
        return value

    def section(self, key: str, known: tuple[str, ...]) -> Optional["_Section"]:
        if self.data.get(key) is None:
            return None
        return _Section(self.data[key], self.dotted(key), self.file, known)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # a list or mapping as key: SafeLoader refuses it itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{value!r} ({type(value).__name__})"


DESCRIBER_PATHS = ("llm", "examples", "bridge", "bridge_llm")  # folders in describer:, resolved like the others


def _resolve(base: Path, value: Union[str, Path]) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def _resolve_source(base: Path, source: str) -> str:
    """File paths and globs are relative to the YAML folder; URIs, cameras and pipelines are not."""
    if source.isdigit() or "://" in source or source.startswith(("gst:", "/dev/")):
        return source
    return str(_resolve(base, source))


def load_station_config(path: Union[str, Path]) -> StationConfig:
    """Read and check ``station.yaml``; every problem is a ConfigError naming the file and key."""
    file = Path(path).expanduser().resolve()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read station config {file}: {exc.strerror or exc}; pass the path to station.yaml "
                          "(`iadgpt run --example-config > station.yaml` writes one)") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}: not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{file}: the file is empty; start from `iadgpt run --example-config`")
    base = file.parent
    top = _Section(data, "", file, tuple(f for f in StationConfig.__dataclass_fields__ if f != "path"))

    source_raw = top._raw("source", _REQUIRED)
    if isinstance(source_raw, bool) or not isinstance(source_raw, (str, int)) or not str(source_raw).strip():
        raise top.error("source", f"expected a URI, path or camera index, got {_kind(source_raw)}")
    station_id = top.text("station_id", "station")
    if not _STATION_ID.match(station_id):
        raise top.error("station_id", f"{station_id!r} may only use letters, digits, '_', '.' and '-' "
                                      "(it becomes part of MQTT topics and file names)")

    weights_raw = top.text("weights", None)
    cfg = StationConfig(
        bundle=_resolve(base, top.text("bundle")),
        source=_resolve_source(base, str(source_raw).strip()),
        backend=top.text("backend", "onnxruntime", choices=BACKENDS),
        threads=top.integer("threads", None, lo=1),
        threshold=top.number("threshold", None),
        weights=_resolve(base, weights_raw) if weights_raw is not None else None,
        station_id=station_id,
        queue_size=top.integer("queue_size", 4, lo=1, hi=1000),
        stats_interval_s=top.number("stats_interval_s", 10.0, positive=True),
        path=file,
    )

    sinks = top.section("sinks", tuple(SinksConfig.__dataclass_fields__))
    if sinks is not None:
        ev = sinks.section("events", tuple(EventsConfig.__dataclass_fields__))
        if ev is not None:
            cfg.sinks.events = EventsConfig(
                path=_resolve(base, ev.text("path")), fsync=ev.text("fsync", "interval", choices=FSYNC_POLICIES),
                max_bytes=ev.integer("max_bytes", 50_000_000, lo=1), backups=ev.integer("backups", 5, lo=0, hi=1000))
        ov = sinks.section("overlays", tuple(OverlaysConfig.__dataclass_fields__))
        if ov is not None:
            cfg.sinks.overlays = OverlaysConfig(
                dir=_resolve(base, ov.text("dir")), only_anomalous=ov.flag("only_anomalous", True),
                max_files=ov.integer("max_files", None, lo=1))
        mq = sinks.section("mqtt", tuple(MqttConfig.__dataclass_fields__))
        if mq is not None:
            topic = mq.text("topic", "iadgpt/{station}/events")
            if "+" in topic or "#" in topic:
                raise mq.error(mq.dotted("topic"), f"{topic!r} contains an MQTT wildcard (+ or #); "
                                                   "publish to a plain topic such as iadgpt/{station}/events")
            cfg.sinks.mqtt = MqttConfig(
                host=mq.text("host"), port=mq.integer("port", 1883, lo=1, hi=65535), topic=topic,
                qos=mq.integer("qos", 1, lo=0, hi=2), client_id=mq.text("client_id", None),
                buffer_max=mq.integer("buffer_max", 10_000, lo=1), username=mq.text("username", None),
                password=mq.text("password", None),
                reconnect_max_s=mq.number("reconnect_max_s", 5.0, positive=True))
            if cfg.sinks.mqtt.reconnect_max_s < 1.0:  # the first retry comes after 1 s
                raise mq.error(mq.dotted("reconnect_max_s"), f"{cfg.sinks.mqtt.reconnect_max_s} is below the first "
                                                             "retry's 1 s; give 1 or more")
            if cfg.sinks.mqtt.password is not None and cfg.sinks.mqtt.username is None:
                raise mq.error(mq.dotted("password"), "a password without a username; add sinks.mqtt.username")
    if not (cfg.sinks.events or cfg.sinks.overlays or cfg.sinks.mqtt):
        log.warning("%s: no sinks configured: verdicts will only be counted, not recorded", file)

    raw_desc = top.data.get("describer")
    if raw_desc is not None:
        if not isinstance(raw_desc, dict):
            raise top.error("describer", f"must be a mapping such as {{enabled: false}}, got {_kind(raw_desc)}")
        bad = [k for k in raw_desc if not isinstance(k, str)]
        if bad:
            raise top.error(f"describer.{bad[0]}", "keys must be strings")
        desc = _Section({"enabled": raw_desc.get("enabled", False)}, "describer", file, ("enabled",))
        cfg.describer = DescriberConfig(enabled=desc.flag("enabled", False), options={
            k: str(_resolve(base, v)) if k in DESCRIBER_PATHS and isinstance(v, str) and v not in ("none", "fake") else v
            for k, v in raw_desc.items() if k != "enabled"})
    return cfg


def _same_disk(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def build_sinks(config: StationConfig) -> list[Sink]:
    """The sinks `config` asks for, overlays first (so events carry ``extra["overlay"]``)."""
    sinks: list[Sink] = []
    s = config.sinks
    try:
        overlays = None
        if s.overlays is not None:
            overlays = OverlaySink(s.overlays.dir, only_anomalous=s.overlays.only_anomalous,
                                   max_files=s.overlays.max_files)
            sinks.append(overlays)
        if s.events is not None:
            events = JsonlSink(s.events.path, fsync=s.events.fsync, max_bytes=s.events.max_bytes,
                               backups=s.events.backups)
            sinks.append(events)
            if overlays is not None and _same_disk(overlays.directory, events.path.parent):
                overlays.yield_to = lambda: events.waiting_for_space  # records before pictures on a full disk
        if s.mqtt is not None:
            sinks.append(MqttSink(s.mqtt.host, s.mqtt.port, topic=s.mqtt.topic, client_id=s.mqtt.client_id,
                                  qos=s.mqtt.qos, buffer_max=s.mqtt.buffer_max, station_id=config.station_id,
                                  username=s.mqtt.username, password=s.mqtt.password,
                                  reconnect_max_s=s.mqtt.reconnect_max_s))
    except ConfigError as exc:
        for sink in sinks:
            sink.close()
        if config.path is None:  # built from command-line flags: no file to name
            raise
        raise ConfigError(f"{config.path}: {exc}") from None
    return sinks
