"""Settings: configs/stack.yaml, overridden by ES_RAY_* environment variables.

One pydantic model per component so every part of the code receives only what it needs and the
YAML file documents every knob. `load_settings()` is the single entry point.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from limits import parse as parse_limit
from pydantic import BaseModel, Field, NonNegativeFloat, PositiveFloat, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PACKAGE_ROOT = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_ROOT.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "stack.yaml"


class RaySettings(BaseModel):
    address: str = ""
    node_ip_address: str = "127.0.0.1"
    num_cpus: int = 0
    gcs_port: int = 0
    dashboard_port: int = 8265
    client_server_port: int = 0
    metrics_export_port: int = 0
    namespace: str = "es-ray"
    batch_nice: int = Field(10, ge=0, le=19)
    log_monitor: bool = False
    env: dict[str, str] = {}


class PostgresSettings(BaseModel):
    dsn: str = ""
    pool_size: int = 4
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 100
    maintenance_work_mem: str = "1GB"
    shared_buffers: str = Field("25%", pattern=r"^([1-4]?\d(\.\d+)?%|50%|\d+\s*(kB|MB|GB|TB))$")  # a share: 0-50 %
    pool_timeout_s: float = 5.0
    search_timeout_ms: int = Field(3000, ge=1)


# Bind parameters one statement may have (the protocol's 16-bit count), less the search query's own.
FILTER_MAX_PARAMETERS = 65_535 - 16


class FilterLimits(BaseModel):
    """How large a search filter may be (es_ray/store/filters.py): width as well as depth, so no filter
    exceeds Postgres' parameter limit or makes one search scan for long."""

    max_depth: int = Field(16, ge=1)
    max_leaves: int = Field(256, ge=1)       # comparisons (eq, ne, exists, gt.., in: one each)
    max_in_values: int = Field(1000, ge=1)   # values of one `in` list
    max_values: int = Field(4000, ge=1)      # `in` values in the whole filter
    max_fields: int = Field(64, ge=1)        # distinct fields named

    @model_validator(mode="after")
    def _fits_in_one_statement(self) -> "FilterLimits":
        # A comparison takes at most 3 parameters and an `in` value 2 (filters.py).
        worst = 3 * self.max_leaves + 2 * self.max_values
        if worst > FILTER_MAX_PARAMETERS:
            raise ValueError(f"filter limits allow {worst} query parameters; one query takes {FILTER_MAX_PARAMETERS}")
        return self


class RateLimitSettings(BaseModel):
    """Requests one client (or one session) may send without an API key (es_ray/serve/rate_limits.py), in
    the `limits` library's notation: "<count>/<second|minute|hour|day>" or "<count> per <n> <unit>"."""

    search: str = "120/minute"          # POST /v1/search, per client
    clickstream: str = "60/minute"      # click events and irrelevant marks, per client
    session_writes: str = "20/minute"   # click events and irrelevant marks into one session
    session_reads: str = "60/minute"    # GET /v1/sessions/{id}, per client

    @field_validator("*")
    @classmethod
    def _check_notation(cls, value: str) -> str:
        if parse_limit(value).amount < 1:  # parse's ValueError names a text it cannot read
            raise ValueError(f"{value!r} allows no request at all")
        return value


class TritonSettings(BaseModel):
    url: str = ""
    grpc_port: int = 0
    backend: str = Field("python", pattern="^(python|pytorch|onnxruntime)$")
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    instances: int = Field(1, ge=1)        # the query encoder's model instances
    item_instances: int = Field(2, ge=1)   # the item encoder's (configs/stack.yaml says why two)
    timeout_s: float = 30.0
    max_queue_size: int = Field(64, ge=1)
    queue_timeout_s: float = Field(20.0, gt=0)
    shm_batches: int = Field(16, ge=1)
    arena_shrink_above_tokens: int = Field(1024, ge=0)
    arena_shrink_idle_s: float = Field(1.0, ge=0)
    reconcile_interval_s: float = 2.0
    reconcile_max_interval_s: float = 8.0


class MlflowSettings(BaseModel):
    tracking_uri: str = ""
    registered_model: str = "es-ray-embedding"
    registered_fusion: str = "es-ray-fusion"


class ModelSettings(BaseModel):
    source: str = ""
    max_length: int = Field(256, ge=16, le=512)
    chunk_overlap: int = Field(32, ge=0)
    max_chunks: int = Field(16, ge=1)
    torch_threads: int = Field(1, ge=0)
    lone_query_threads: int = Field(2, ge=0)
    query_pad_multiple: int = Field(16, ge=1)
    runtime: Literal["onnx", "torchscript"] = "onnx"


# The file each runtime serves and the production Triton backends that can run it.
RUNTIME_BACKENDS = {"onnx": {"python", "onnxruntime"}, "torchscript": {"python", "pytorch"}}


class ServeSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "es-ray"
    replicas: int = Field(1, ge=1)
    ingress: Literal["direct", "proxy"] = "direct"
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=1)
    num_cpus: float = Field(0.0, ge=0)
    health_check_period_s: float = Field(2.0, gt=0)
    max_limit: int = 100
    max_offset: int = 10000
    max_id_length: int = 512
    max_text_chars: int = 1_000_000
    max_items_per_request: int = 1000
    max_query_chars: int = 2048
    max_payload_depth: int = 32
    max_body_bytes: int = 16 * 1024 * 1024
    max_search_body_bytes: int = Field(256 * 1024, ge=1024)
    blue_refresh_s: float = Field(30.0, gt=0)
    swap_share: float = Field(0.25, ge=0, le=1)
    swap_max_rank: int = Field(10, ge=2)
    filter_limits: FilterLimits = FilterLimits()
    health_cache_s: float = Field(2.0, ge=0)
    query_cache_entries: int = Field(1024, ge=0)
    rate_limits: RateLimitSettings = RateLimitSettings()
    max_results_per_session: int = Field(100, ge=1)



class SearchSettings(BaseModel):
    """Search modes: dense (vectors), lexical (Postgres full-text search), hybrid (both fused)."""

    default_mode: Literal["dense", "lexical", "hybrid"] = "dense"
    text_search_config: str = Field("english", pattern="^[a-z_][a-z0-9_]*$")  # a Postgres regconfig name
    lexical_payload_fields: list[str] = []
    lexical_common_share: float = Field(0.05, gt=0, le=1)
    max_query_terms: int = Field(64, ge=1)
    fusion: Literal["rrf", "weighted"] = "rrf"
    rrf_k: float = Field(60.0, gt=0)
    dense_weight: float = Field(1.0, ge=0)
    lexical_weight: float = Field(0.5, ge=0)
    depth: int = Field(100, ge=1)
    learned_lexical_weights: list[NonNegativeFloat] = Field([0.25, 0.5, 0.75, 1.0, 1.5], min_length=1)
    learned_rrf_ks: list[PositiveFloat] = Field([20.0, 60.0], min_length=1)
    fusion_explore_share: float = Field(0.2, ge=0, le=1)
    fusion_explore_over: Literal["neighbours", "grid"] = "neighbours"


class UpsertSettings(BaseModel):
    batch_size: int = 32
    rows_per_request: int = Field(16, ge=1)
    encoders: int = 1


class AdjusterSettings(BaseModel):
    learning_rate: float = 0.01
    iterations: int = 10
    pull: float = 1.0
    push: float = 0.3
    margin: float = 0.05
    irrelevant: float = 0.5
    irrelevant_floor: float = 0.2
    anchor: float = 0.3
    max_step: float = 0.5


class MemorySettings(BaseModel):
    weight: float = Field(0.8, ge=0)
    evidence_half: float = Field(0.5, ge=0)


class ImproveSettings(BaseModel):
    enabled: bool = True
    interval_s: float = 10.0
    max_interval_s: float = 80.0
    settle_s: float = 5.0
    batch_sessions: int = Field(256, ge=1)
    max_pass_results: int = Field(25_600, ge=1)
    adjuster: AdjusterSettings = AdjusterSettings()
    memory: MemorySettings = MemorySettings()


class RetentionSettings(BaseModel):
    """How long sessions are kept (es_ray/store/retention.py). Only sessions whose lessons are kept
    elsewhere are pruned: consumed by the improvement loop (their counts are in the click or user
    evidence), or of an excluded source and past the age."""

    interval_s: float = Field(3600.0, gt=0)
    max_age_days: float | None = Field(90.0, gt=0)
    max_sessions: int | None = Field(1_000_000, ge=0)
    delete_batch: int = Field(1000, ge=1)
    max_batches: int = Field(100, ge=1)


class TasksSettings(BaseModel):
    heartbeat_s: float = 10.0
    lease_s: float = 120.0
    check_interval_s: float = 15.0
    check_max_interval_s: float = 120.0


class ReindexSettings(BaseModel):
    range_items: int = Field(500, ge=1)
    workers: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    rows_per_request: int = Field(16, ge=1)
    embed_timeout_s: float = Field(120.0, gt=0)
    passes: int = Field(2, ge=1)
    hnsw: str = Field("after", pattern="^(after|during)$")
    adjustments: str = Field("rederive", pattern="^(rederive|drop)$")
    switch: str = Field("auto", pattern="^(auto|force|never)$")
    reuse_item_vectors: bool = True


class RetryPolicy(BaseModel):
    """How one kind of call is tried again (es_ray/retries.py turns it into a tenacity policy)."""

    attempts: int = Field(ge=1)                                   # tries in all, the first included
    wait: str = Field(pattern="^(exponential|linear)$")
    first_wait_s: float = Field(ge=0)                             # exponential doubles it, linear adds it
    max_wait_s: float | None = Field(None, gt=0)
    retry_on: str = Field(pattern="^(any_error|aborted_transaction)$")


class RetrySettings(BaseModel):
    mlflow: RetryPolicy = RetryPolicy(attempts=5, wait="exponential", first_wait_s=0.2, retry_on="any_error")
    embed: RetryPolicy = RetryPolicy(attempts=9, wait="exponential", first_wait_s=1.0, max_wait_s=15.0,
                                     retry_on="any_error")
    write: RetryPolicy = RetryPolicy(attempts=5, wait="linear", first_wait_s=0.05, retry_on="aborted_transaction")
    reindex_write: RetryPolicy = RetryPolicy(attempts=5, wait="linear", first_wait_s=0.1,
                                             retry_on="aborted_transaction")


class LifecycleSettings(BaseModel):
    grace_s: float = Field(600.0, ge=0)
    lock_lease_s: float = Field(60.0, gt=0)
    switch_pause_s: float = Field(0.0, ge=0)


class ApiKeyEntry(BaseModel):
    name: str = Field(min_length=1)
    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="hex SHA-256 of the key; the key itself is never stored")


class AuthSettings(BaseModel):
    api_keys: list[ApiKeyEntry] = []
    public_search: bool = True
    public_clickstream: bool = True
    user_token_secret: str = ""
    user_token_ttl_s: float = Field(86_400.0, gt=0)


# Who recorded a session (the `source` column of `sessions`, es_ray/store/clickstream.py).
SessionSource = Literal["served", "ingested", "unverified"]


class LearningSettings(BaseModel):
    """What the learners (improvement loop, its replay on a new collection, the fine-tune) read."""

    exclude_sources: list[SessionSource] = ["unverified"]
    # What one client can teach everybody (es_ray/train/learning_guards.py); configs/stack.yaml says why.
    min_clients: int = Field(3, ge=1)
    max_votes_per_client: int = Field(1, ge=1)
    max_sessions_per_client: int = Field(100, ge=1)


class ClientSettings(BaseModel):
    """What identifies a client: the peer address, or a forwarded-for header set by a trusted proxy."""

    trusted_proxies: list[str] = Field([], description="addresses or networks (CIDR) of proxies whose "
                                       "X-Forwarded-For is believed")

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)  # ValueError names the bad entry
        return values


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ES_RAY_CONFIG (default configs/stack.yaml)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = Path(os.environ.get("ES_RAY_CONFIG", DEFAULT_CONFIG))
        if not path.exists():
            return {}
        return yaml.safe_load(path.read_text()) or {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ES_RAY_", env_nested_delimiter="__", extra="ignore")

    state_dir: Path = Path(".es-ray")
    ray: RaySettings = RaySettings()
    postgres: PostgresSettings = PostgresSettings()
    triton: TritonSettings = TritonSettings()
    mlflow: MlflowSettings = MlflowSettings()
    model: ModelSettings = ModelSettings()
    serve: ServeSettings = ServeSettings()
    search: SearchSettings = SearchSettings()
    upsert: UpsertSettings = UpsertSettings()
    improve: ImproveSettings = ImproveSettings()
    retention: RetentionSettings = RetentionSettings()
    tasks: TasksSettings = TasksSettings()
    reindex: ReindexSettings = ReindexSettings()
    retries: RetrySettings = RetrySettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    auth: AuthSettings = AuthSettings()
    learning: LearningSettings = LearningSettings()
    clients: ClientSettings = ClientSettings()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # Precedence: explicit arguments, then the environment, then the YAML file.
        return init_settings, env_settings, _YamlSource(settings_cls)

    @property
    def direct_ingress(self) -> bool:
        """serve.ingress direct takes effect: only in a Ray head that `es-ray up` starts (its environment has
        it); an external cluster (ray.address) always serves through Serve's proxy."""
        return self.serve.ingress == "direct" and not self.ray.address

    @model_validator(mode="after")
    def _one_direct_replica(self) -> "Settings":
        if self.direct_ingress and self.serve.replicas != 1:
            raise ValueError(f"serve.ingress 'direct' has the one replica serve serve.port itself; with "
                             f"serve.replicas {self.serve.replicas} set serve.ingress: proxy (Serve's proxy "
                             "spreads requests over them)")
        return self

    @model_validator(mode="after")
    def _backend_runs_runtime(self) -> "Settings":
        if self.triton.backend not in RUNTIME_BACKENDS[self.model.runtime]:
            raise ValueError(f"triton.backend {self.triton.backend!r} cannot serve model.runtime "
                             f"{self.model.runtime!r}; it takes one of {sorted(RUNTIME_BACKENDS[self.model.runtime])}")
        return self

    @property
    def state_path(self) -> Path:
        return self.state_dir.expanduser().resolve()


def load_settings(state_dir: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from YAML + environment; `state_dir` (the CLI's --state-dir) wins over both."""
    if state_dir is not None:
        overrides["state_dir"] = Path(state_dir)
    settings = Settings(**overrides)
    settings.state_dir = settings.state_path
    return settings
