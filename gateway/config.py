"""The gateway's configuration: one object built from YAML (`--config`) or from the quick-start flags.

`load_config(path)` and `config_from_mapping(data)` decode over defaults and reject unknown keys and
wrong types with a ValueError naming the offending key, so a typo fails at startup, not at runtime.
See config/kvgate.example.yaml for every key with its meaning.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml
from msgspec import Meta

from router.discovery.config import KubernetesDiscovery, validate_kubernetes
from router.endpoint import Role
from router.pd import DEFAULT_PREFILL_TIMEOUT_S, DEFAULT_THRESHOLD_TOKENS
from router.replicas.config import ReplicasConfig, validate_replicas

# Bounds declared on the types: the decoder checks them (naming the key) and the JSON Schema carries them
Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
Share = Annotated[float, Meta(gt=0, le=1)]  # a fraction that must not be 0
Count = Annotated[int, Meta(ge=0)]
AtLeastOne = Annotated[int, Meta(ge=1)]
Port = Annotated[int, Meta(ge=0, le=65535)]  # 0: a free port from the OS
HttpStatus = Annotated[int, Meta(ge=100, le=599)]


@dataclass(slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: Port = 8080


@dataclass(slots=True)
class Auth:
    """API keys clients must present as `Authorization: Bearer KEY`; none configured: no auth."""

    api_keys_file: str | None = None  # one key per line; blank lines and '#' comments ignored
    api_keys_env: str | None = None  # name of an environment variable holding comma-separated keys


@dataclass(slots=True)
class Limits:
    max_body_bytes: AtLeastOne = 8 << 20


@dataclass(slots=True)
class Forwarded:
    """What pods are told about the client (X-Forwarded-For, and Forwarded of RFC 7239). `append`: the
    client's own values (untrusted) followed by its address as the gateway saw it, so a pod trusting
    the gateway reads the last entry; `replace`: only that address; `off`: neither header is sent."""

    mode: Literal["append", "replace", "off"] = "append"


@dataclass(slots=True)
class Logs:
    rejected_interval: Positive = 10.0  # seconds between summary lines counting the requests refused
    access: bool = True  # one line per request on stdout (gateway/access_log.py)
    format: Literal["json", "text"] = "json"  # of the access log and of the gateway's own log (stderr)
    # refused requests (4xx the gateway answers itself) logged one by one per rejected_interval; the
    # rest only counted in that interval's summary line, so a flood of bad requests stays a few lines
    access_refused_per_interval: Count = 100
    access_queue: AtLeastOne = 10000  # lines waiting for the writer thread; beyond, dropped and counted


@dataclass(slots=True)
class Tracing:
    """OpenTelemetry traces (the `otel` extra; gateway/tracing.py): a span per request, W3C traceparent
    read from the client and sent to the pods."""

    enabled: bool = False  # a span per request, with children for routing, attempts and P/D steps
    # auto: OTLP when opentelemetry-exporter-otlp is installed (OTEL_EXPORTER_OTLP_* variables), else
    # console (stderr); none: spans made and propagated, not exported
    exporter: Literal["auto", "otlp", "console", "none"] = "auto"
    service_name: str = "kvgate"  # the service.name resource attribute
    sample_ratio: Fraction = 1.0  # of the traces a client did not start (theirs follow its sampled flag)


@dataclass(slots=True)
class Timeouts:
    connect: Positive = 2.0  # TCP connect to a pod
    read: Positive = 600.0  # longest silence from a pod, before or during its answer
    shutdown: NonNegative = 30.0  # graceful shutdown: how long in-flight streams may run on
    client_body: Positive = 60.0  # longest silence from a client before its request body is complete


@dataclass(slots=True)
class Retries:
    max_retries: Count = 2  # extra attempts, each on a pod not tried yet
    on_status: list[HttpStatus] = field(default_factory=lambda: [502, 503])


@dataclass(slots=True)
class Health:
    interval: Positive = 1.0  # active GET /health period
    timeout: Positive = 0.5
    eject_after: AtLeastOne = 3  # consecutive failed proxy attempts that eject a pod (passive check)
    eject_after_timeouts: AtLeastOne = 2  # timed-out checks in a row that eject a pod (refused/5xx: at once)
    panic_threshold: Fraction = 0.0  # healthy share of a pool below which it routes over all its pods
    path: str = "/health"


@dataclass(slots=True)
class Scrape:
    # GET /metrics period; 0 disables scraping. A slow reconciliation: the gateway's own accounting is
    # the primary load signal, and each scrape costs the pod's API server CPU (bench.real_vllm --scrape-sweep)
    interval: NonNegative = 2.0
    timeout: Positive = 1.0
    path: str = "/metrics"


@dataclass(slots=True)
class Reload:
    """Live reload (gateway/reload.py): SIGHUP, or a change of the --config file or auth.api_keys_file
    seen by polling their content, applies the new config without dropping requests."""

    interval: NonNegative = 5.0  # seconds between checks of the files for a change; 0: only on SIGHUP


@dataclass(slots=True)
class EndpointSpec:
    url: str
    role: Role = "both"
    version: str = ""
    weight: Positive = 1.0
    kv_events: str | None = None
    kv_events_replay: str | None = None


@dataclass(slots=True)
class PolicySpec:
    name: str = "least_request"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PDSpec:
    """Prefill/decode disaggregation of a pool (active when the pool has a `role: prefill` endpoint).

    `compatibility` maps a decode version to the prefill versions (besides its own) it can read.
    """

    # uncached prompt tokens below which the decode pod prefills itself
    threshold_tokens: Count = DEFAULT_THRESHOLD_TOKENS
    # a prefill step slower than this falls back to local prefill
    prefill_timeout_s: Positive = DEFAULT_PREFILL_TIMEOUT_S
    compatibility: dict[str, list[str]] = field(default_factory=dict)


@dataclass(slots=True)
class PoolSpec:
    """The endpoints serving one model and the policy choosing among them."""

    model: str
    endpoints: list[EndpointSpec] = field(default_factory=list)
    policy: PolicySpec = field(default_factory=PolicySpec)
    tokenizer: str | None = None
    block_size: AtLeastOne | None = None
    pd: PDSpec | None = None
    # LoRA adapters the pods serve on top of `model`: a request naming one routes to this pool, its
    # block keys rooted at the adapter (more are learned from the pods' /v1/models)
    adapters: list[str] = field(default_factory=list)
    # `kubernetes`: the pool's pods are also found by watching the API server (the `kubernetes` key;
    # router/discovery), joining and leaving as they turn Ready or go; `endpoints` may then be empty
    discovery: Literal["static", "kubernetes"] = "static"
    kubernetes: KubernetesDiscovery | None = None


@dataclass(slots=True)
class ModelAccess:
    """A model or LoRA adapter a tenant may use, and the conditions on it."""

    name: str
    max_prompt_tokens: Count | None = None  # longer prompts get 403 (None: no limit)


@dataclass(slots=True)
class TenantSpec:
    """One tenant of admission control: a flow of the fair queue, with its own limits."""

    name: str
    weight: Positive = 1.0  # share of dispatch (estimated tokens) against the other tenants of its priority
    priority: int = 0  # higher is dispatched first (admission.aging_s keeps lower ones moving)
    api_keys: list[str] = field(default_factory=list)  # keys identifying it (they also pass auth)
    models: list[ModelAccess] | None = None  # None: every model and adapter
    max_queued: Count | None = None  # requests waiting in the queue at once (None: only the total applies)
    max_queued_bytes: Count | None = None  # request body bytes waiting at once
    requests_per_minute: NonNegative | None = None
    tokens_per_minute: NonNegative | None = None  # estimated prompt + expected output tokens
    queue_timeout_s: NonNegative | None = None  # longest wait in the queue (None: admission.queue_timeout_s)


@dataclass(slots=True)
class Admission:
    """Admission control: requests wait in the gateway while their pool is saturated (gateway/admission)."""

    order: Literal["fair", "fifo"] = "fair"  # fifo: one queue in arrival order (for comparison)
    tenants: list[TenantSpec] = field(default_factory=list)
    default_tenant: str = "default"  # whose spec applies to requests naming no configured tenant
    max_queued: Count = 10000  # requests waiting in total
    max_queued_bytes: Count = 256 << 20  # request body bytes waiting in total
    queue_timeout_s: NonNegative = 30.0  # default longest wait in the queue; x-kvgate-queue-timeout lowers it
    max_queue_timeout_s: NonNegative = 300.0  # the most a client's x-kvgate-queue-timeout may ask for
    aging_s: NonNegative = 10.0  # a waiting request gains one priority level per aging_s seconds (0: never)
    default_output_tokens: Count = 256  # expected output of a request without max_tokens (its cost)
    max_in_flight_per_pod: AtLeastOne | None = None  # None: the policy's learned batch size, else 256
    headroom_per_pod: Count = 1  # requests beyond that limit, so a pod's batch never waits for the gateway
    max_kv_usage: Share = 0.98  # a pod scraped at or above this KV usage takes no new request
    max_predicted_ttft_s: Positive | None = None  # cache_aware: a pod predicted slower takes none
    recheck_interval_s: Positive = 0.05  # re-reads the load signals this often while requests wait
    # a freed slot takes, of the next tenant's first affinity_window queued requests, the one with the
    # most prompt cached on a pod with a free slot (1: oldest first); none is passed over more often
    affinity_window: AtLeastOne = 8
    drain_timeout_s: NonNegative = 10.0  # on SIGTERM: queued requests still waiting after this get 503


@dataclass(slots=True)
class GatewayConfig:
    pools: list[PoolSpec]
    listen: Listen = field(default_factory=Listen)
    auth: Auth = field(default_factory=Auth)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: Retries = field(default_factory=Retries)
    health: Health = field(default_factory=Health)
    scrape: Scrape = field(default_factory=Scrape)
    forwarded: Forwarded = field(default_factory=Forwarded)
    logs: Logs = field(default_factory=Logs)
    tracing: Tracing = field(default_factory=Tracing)
    reload: Reload = field(default_factory=Reload)
    admission: Admission | None = None  # None: no admission control (every request dispatched at once)
    # replicas behind one load balancer share prefix learning and load through Redis (router/replicas)
    replicas: ReplicasConfig | None = None
    # other names clients may use for a pool's model or adapter (alias -> served name); the pod is sent
    # the served name, and lists it in its answer
    aliases: dict[str, str] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        validate(self)


def load_config(path: str) -> GatewayConfig:
    """Read and validate a YAML config file."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the top level must be a mapping")
    return config_from_mapping(data)


def config_from_mapping(data: Mapping[str, Any]) -> GatewayConfig:
    """Decode a mapping shaped like the YAML file. `pools` maps model name -> pool settings."""
    data = dict(data)
    pools = data.pop("pools", None)
    if not isinstance(pools, Mapping) or not pools:
        raise ValueError("pools: expected a mapping of model name -> {policy, endpoints}")
    specs = []
    for model, pool in pools.items():
        if not isinstance(pool, Mapping):
            raise ValueError(f"pools.{model}: expected a mapping")
        specs.append(_decode(PoolSpec, {**pool, "model": str(model)}, f"pools.{model}"))
    return _decode(GatewayConfig, {**data, "pools": specs}, "")


def validate(cfg: GatewayConfig) -> None:
    """The bounds declared on the types (check_bounds), then cross-field checks."""
    check_bounds(cfg)
    if cfg.health.timeout > cfg.health.interval:
        # checks must not overlap: a hung pod is out within eject_after_timeouts intervals plus a timeout
        raise ValueError("health.timeout must not exceed health.interval")
    models = set()
    for pool in cfg.pools:
        if pool.model in models:
            raise ValueError(f"pools: model {pool.model!r} appears twice")
        models.add(pool.model)
        validate_discovery(pool)
        if not pool.endpoints and pool.discovery == "static":
            raise ValueError(f"pools.{pool.model}.endpoints: at least one endpoint is needed")
        for ep in pool.endpoints:
            if not ep.url.startswith(("http://", "https://")):
                raise ValueError(f"pools.{pool.model}: endpoint url {ep.url!r} must start with http(s)://")
            ep.url = ep.url.rstrip("/")
        validate_pd(pool)
    validate_adapters(cfg.pools)
    if cfg.admission is not None:
        validate_admission(cfg.admission)
    if cfg.replicas is not None:
        validate_replicas(cfg.replicas)
    validate_aliases(cfg.aliases, cfg.pools)


def validate_aliases(aliases: dict[str, str], pools: list[PoolSpec]) -> None:
    """An alias names a pool's model or configured adapter, and takes no name already served."""
    served = {pool.model for pool in pools} | {name for pool in pools for name in pool.adapters}
    for alias, target in aliases.items():
        if not alias:
            raise ValueError("aliases: an alias must not be empty")
        if alias in served:
            raise ValueError(f"aliases.{alias}: already the name of a pool's model or adapter")
        if target not in served:
            raise ValueError(f"aliases.{alias}: {target!r} is no pool's model or adapter")


def validate_discovery(pool: PoolSpec) -> None:
    """`discovery: kubernetes` comes with its `kubernetes` settings; static pools have none."""
    where = f"pools.{pool.model}"
    if pool.discovery == "kubernetes":
        if pool.kubernetes is None:
            raise ValueError(f"{where}.kubernetes: required with discovery: kubernetes (label_selector, ...)")
        validate_kubernetes(pool.kubernetes, f"{where}.kubernetes")
    elif pool.kubernetes is not None:
        raise ValueError(f"{where}.kubernetes: applies only with discovery: kubernetes")


def validate_admission(adm: Admission) -> None:
    """Unique tenant names and API keys."""
    names: set[str] = set()
    keys: set[str] = set()
    for i, t in enumerate(adm.tenants):
        where = f"admission.tenants[{i}]"
        if not t.name or t.name in names:
            raise ValueError(f"{where}: tenant name {t.name!r} is empty or repeated")
        names.add(t.name)
        for key in t.api_keys:
            if not key or key in keys:
                raise ValueError(f"{where}.api_keys: a key is empty or belongs to two tenants")
            keys.add(key)


def validate_adapters(pools: list[PoolSpec]) -> None:
    """Each adapter name routes to one pool: none is empty, repeated, or any pool's model."""
    models = {pool.model for pool in pools}
    seen: dict[str, str] = {}
    for pool in pools:
        for name in pool.adapters:
            where = f"pools.{pool.model}.adapters"
            if not name:
                raise ValueError(f"{where}: an adapter name must not be empty")
            if name in models:
                raise ValueError(f"{where}: {name!r} is the model of a pool")
            if name in seen:
                raise ValueError(f"{where}: {name!r} is already an adapter of pool {seen[name]!r}")
            seen[name] = pool.model


def validate_pd(pool: PoolSpec) -> None:
    """A P/D pool needs a pod for each role; versions in the compatibility map are strings."""
    where = f"pools.{pool.model}"
    roles = {ep.role for ep in pool.endpoints}
    if roles == {"prefill"}:
        raise ValueError(f"{where}: every endpoint is prefill-only; a decode or both endpoint is needed")
    pd = pool.pd
    if pd is None:
        return
    if "prefill" not in roles and pool.discovery == "static":  # discovered prefill pods come later
        raise ValueError(f"{where}.pd: the pool has no endpoint with role prefill")
    for decode, prefills in pd.compatibility.items():
        if not isinstance(decode, str) or not isinstance(prefills, list):
            raise ValueError(f"{where}.pd.compatibility: expected version -> list of versions (quote them)")
        if not all(isinstance(v, str) for v in prefills):
            raise ValueError(f"{where}.pd.compatibility.{decode}: versions must be strings (quote them)")


def _decode(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and (shallowly) value types."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}".lstrip("."))
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise ValueError(f"{where or 'config'}: {exc}") from exc


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(hint)
    if origin is Annotated:  # its bounds are checked on the whole config (check_bounds)
        return _coerce(typing.get_args(hint)[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _decode(hint, value, where)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any:
        return value
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value



def check_bounds(obj: Any, where: str = "") -> None:
    """Every value within the bounds its field's type declares (msgspec.Meta ge / gt / le / lt), over
    the whole tree of structs: decoded from YAML or set from a flag alike. Errors name the key path."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{where}.{f.name}".lstrip(".")
        for meta, items in _bounds_of(hints[f.name], value):
            for i, v in items:
                _check_value(meta, v, path if i is None else f"{path}[{i}]")
        if dataclasses.is_dataclass(value):
            check_bounds(value, path)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    key = f".{item.model}" if isinstance(item, PoolSpec) else f"[{i}]"  # pools by model
                    check_bounds(item, path + key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _bounds_of(hint: Any, value: Any) -> list[tuple[Meta, list[tuple[int | None, Any]]]]:
    """The Meta bounds of `hint` with the values they apply to: the value itself, or a list's items."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return []
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
    if origin is Annotated:
        return [(m, [(None, value)]) for m in typing.get_args(hint)[1:] if isinstance(m, Meta)]
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        if typing.get_origin(item) is Annotated:
            metas = [m for m in typing.get_args(item)[1:] if isinstance(m, Meta)]
            return [(m, list(enumerate(value))) for m in metas]
    return []


def _check_value(meta: Meta, value: Any, where: str) -> None:
    for bound, ok, word in (
        (meta.ge, lambda b: value >= b, ">="),
        (meta.gt, lambda b: value > b, ">"),
        (meta.le, lambda b: value <= b, "<="),
        (meta.lt, lambda b: value < b, "<"),
    ):
        if bound is not None and not ok(bound):
            raise ValueError(f"{where}: must be {word} {bound}, got {value!r}")
