"""The files Triton serves: an encoder exported to ONNX or TorchScript embeds as the torch module does."""

import numpy as np
import onnxruntime
import pytest
import torch

from es_ray.config import TritonSettings, load_settings
from es_ray.inference import triton_repo
from es_ray.inference.encoder import INPUT_NAMES, OUTPUT_NAME, load_encoder
from tests.tiny_model import tiny_encoder_dir


def _inputs(batch: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 1000, (batch, width), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, width // 2:] = 0  # a padded row: the mean must skip padding
    return ids, mask


def test_onnx_file_embeds_as_torch_at_any_batch_and_length(tmp_path):
    encoder = load_encoder(tiny_encoder_dir(tmp_path / "tiny"))
    repo = tmp_path / "repo"
    triton_repo.write_version(repo, 1, {"query_encoder": encoder, "item_encoder": encoder}, 32, TritonSettings(),
                              runtime="onnx")
    files = [triton_repo.version_dir(repo, name, 1) / "model.onnx" for name in triton_repo.ENCODERS]
    assert files[0].stat().st_ino == files[1].stat().st_ino       # one file on disk, hard-linked
    assert triton_repo.has_version(repo, 1) and not (files[0].parent / "model.pt").exists()
    assert 'string_value: "model.onnx"' in (repo / "query_encoder_v1" / "config.pbtxt").read_text()
    session = onnxruntime.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    # Triton's onnxruntime backend matches tensors by name with config.pbtxt's (the python backend does not)
    assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    for batch, width in ((1, 16), (5, 48), (3, 7)):  # shapes other than the export's example (2 x 16)
        ids, mask = _inputs(batch, width, seed=width)
        served = session.run(None, dict(zip(INPUT_NAMES, (ids.numpy(), mask.numpy()))))[0]
        with torch.inference_mode():
            local = encoder(ids, mask).numpy()
        assert served.shape == local.shape == (batch, 32)
        np.testing.assert_allclose(served, local, atol=1e-5)


def test_linear_weights_are_stored_as_their_matmul_reads_them(tmp_path):
    """No Transpose of a weight is left for ONNX Runtime to fold at load (it would keep both copies): every
    Linear's weight is stored transposed under <parameter>::T, and the graph computes as before."""
    import onnx

    from es_ray.inference.encoder import export_onnx
    from es_ray.inference.onnx_refit import TRANSPOSED, fold_weight_transposes

    encoder = load_encoder(tiny_encoder_dir(tmp_path / "tiny"))
    model = onnx.load(str(export_onnx(encoder, tmp_path / "model.onnx")))
    stored = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in stored]
    linears = {name for name, module in encoder.named_modules()  # BERT's pooler is not in the graph: mean pooling
               if isinstance(module, torch.nn.Linear) and ".pooler." not in name}
    assert linears and {f"{name}.weight{TRANSPOSED}" for name in linears} <= set(stored)
    for name in linears:
        weight = encoder.get_submodule(name).weight
        assert stored[f"{name}.weight{TRANSPOSED}"] == tuple(weight.shape[::-1]) and f"{name}.weight" not in stored
    assert fold_weight_transposes(model) == 0  # nothing left to fold the second time


def test_a_graph_exported_before_the_fold_is_taken_and_folded(tmp_path, monkeypatch):
    """A repository written by an es-ray that stored weights as the exporter left them: the next version of
    that architecture takes its graph (the same digest) and is written folded."""
    import onnx

    from es_ray.inference import onnx_refit

    first, second = (load_encoder(tiny_encoder_dir(tmp_path / f"tiny-{seed}", seed=seed)) for seed in (0, 1))
    repo = tmp_path / "repo"
    with monkeypatch.context() as earlier:
        earlier.setattr(onnx_refit, "fold_weight_transposes", lambda model: 0)
        triton_repo.write_version(repo, 1, {"query_encoder": first, "item_encoder": first}, 32, TritonSettings(),
                                  runtime="onnx")
    names = {i.name for i in onnx.load(str(triton_repo.version_dir(repo, "query_encoder", 1) / "model.onnx"))
             .graph.initializer}
    assert not any(n.endswith(onnx_refit.TRANSPOSED) for n in names)
    made = triton_repo.write_version(repo, 2, {"query_encoder": second, "item_encoder": second}, 32,
                                     TritonSettings(), runtime="onnx")
    assert made["query_encoder_v2"].startswith("refit from ")
    path = triton_repo.version_dir(repo, "query_encoder", 2) / "model.onnx"
    graph = onnx.load(str(path)).graph
    stored = {i.name for i in graph.initializer}
    assert any(n.endswith(onnx_refit.TRANSPOSED) for n in stored)
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in stored]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = _inputs(3, 21, seed=3)
    with torch.inference_mode():
        np.testing.assert_allclose(session.run(None, dict(zip(INPUT_NAMES, (ids.numpy(), mask.numpy()))))[0],
                                   second(ids, mask).numpy(), atol=1e-5)


def test_torchscript_file_is_traced_from_the_encoder(tmp_path):
    encoder = load_encoder(tiny_encoder_dir(tmp_path / "tiny"))
    repo = tmp_path / "repo"
    triton_repo.write_version(repo, 3, {"query_encoder": encoder, "item_encoder": encoder}, 32, TritonSettings(),
                              runtime="torchscript")
    path = triton_repo.version_dir(repo, "item_encoder", 3) / "model.pt"
    assert triton_repo.deployed_versions(repo) == {"query_encoder_v3": 3, "item_encoder_v3": 3}
    ids, mask = _inputs(4, 24, seed=0)
    with torch.inference_mode():
        torch.testing.assert_close(torch.jit.load(str(path))(ids, mask), encoder(ids, mask))


def test_production_backend_config_names_the_runtime_file():
    onnx_cfg = triton_repo.config_pbtxt("query_encoder", 384, TritonSettings(backend="onnxruntime"), runtime="onnx",
                                      bounded=False)
    assert 'backend: "onnxruntime"' in onnx_cfg and 'default_model_filename: "model.onnx"' in onnx_cfg
    assert "python_path" not in onnx_cfg
    python_cfg = triton_repo.config_pbtxt("query_encoder", 384, TritonSettings(backend="python"), runtime="torchscript",
                                        bounded=False)
    assert 'key: "model_filename" value: { string_value: "model.pt" }' in python_cfg


@pytest.mark.parametrize("backend,runtime", [("pytorch", "onnx"), ("onnxruntime", "torchscript")])
def test_a_backend_that_cannot_run_the_runtime_is_refused(monkeypatch, backend, runtime):
    monkeypatch.setenv("ES_RAY_TRITON__BACKEND", backend)
    monkeypatch.setenv("ES_RAY_MODEL__RUNTIME", runtime)
    with pytest.raises(ValueError, match="cannot serve model.runtime"):
        load_settings()


def test_a_child_process_exports_both_towers_of_a_version(tmp_path):
    import shutil

    from es_ray.inference import export
    from es_ray.inference.encoder import QUERY_TOWER_DIR

    model_dir = tiny_encoder_dir(tmp_path / "tiny", seed=0)
    shutil.copytree(tiny_encoder_dir(tmp_path / "query", seed=1), model_dir / QUERY_TOWER_DIR)  # a query-tower fine-tune
    repo = tmp_path / "repo"
    export.write_version(repo, 2, model_dir, 32, TritonSettings(), 1, "onnx")
    ids, mask = _inputs(2, 12, seed=3)
    for name, tower_dir in (("query_encoder", model_dir / QUERY_TOWER_DIR), ("item_encoder", model_dir)):
        session = onnxruntime.InferenceSession(str(triton_repo.version_dir(repo, name, 2) / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            local = load_encoder(tower_dir)(ids, mask).numpy()
        served = session.run(None, dict(zip(INPUT_NAMES, (ids.numpy(), mask.numpy()))))[0]
        np.testing.assert_allclose(served, local, atol=1e-5)
    with pytest.raises(RuntimeError, match="exporting version 3"):
        export.write_version(repo, 3, tmp_path / "missing", 32, TritonSettings(), 1, "onnx")
    assert not triton_repo.has_version(repo, 3)


def test_a_later_tower_of_the_same_architecture_takes_the_exported_graph_with_its_own_weights(tmp_path):
    """A new version's ONNX file is the earlier export's graph with the new weights (onnx_refit.py), and
    embeds as its own torch module does; another architecture, or a graph its weights do not fit, is
    exported in full."""
    import json

    from es_ray.inference import onnx_refit

    first, second = (load_encoder(tiny_encoder_dir(tmp_path / f"tiny-{seed}", seed=seed)) for seed in (0, 1))
    repo = tmp_path / "repo"
    made = triton_repo.write_version(repo, 1, {"query_encoder": first, "item_encoder": first}, 32, TritonSettings(),
                                     runtime="onnx")
    assert made == {"query_encoder_v1": "exported", "item_encoder_v1": "linked"}
    made = triton_repo.write_version(repo, 2, {"query_encoder": second, "item_encoder": first}, 32, TritonSettings(),
                                     runtime="onnx")
    assert made["query_encoder_v2"].startswith("refit from ") and made["item_encoder_v2"].startswith("refit from ")
    for name, encoder in (("query_encoder", second), ("item_encoder", first)):
        session = onnxruntime.InferenceSession(str(triton_repo.version_dir(repo, name, 2) / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
        for batch, width in ((1, 9), (4, 33)):
            ids, mask = _inputs(batch, width, seed=width)
            with torch.inference_mode():
                local = encoder(ids, mask).numpy()
            np.testing.assert_allclose(session.run(None, dict(zip(INPUT_NAMES, (ids.numpy(), mask.numpy()))))[0],
                                       local, atol=1e-5)

    # Three layers instead of two: another architecture, exported in full.
    from transformers import BertConfig, BertModel

    from es_ray.inference.encoder import SentenceEncoder

    config = BertConfig(vocab_size=first.transformer.config.vocab_size, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    deeper = SentenceEncoder(BertModel(config)).eval()
    assert triton_repo.write_version(repo, 3, {"query_encoder": deeper, "item_encoder": deeper}, 32, TritonSettings(),
                                     runtime="onnx")["query_encoder_v3"] == "exported"
    # A record that claims the architecture of a graph whose weights are other shapes: not taken.
    wider = SentenceEncoder(BertModel(BertConfig(**{**config.to_dict(), "hidden_size": 48, "intermediate_size": 96,
                                                    "num_hidden_layers": 2}))).eval()
    for path in repo.glob(f"*/*/{onnx_refit.RECORD}"):
        path.write_text(json.dumps({"architecture": onnx_refit.architecture(wider)}))
    made = triton_repo.write_version(repo, 4, {"query_encoder": wider, "item_encoder": wider}, 48, TritonSettings(),
                                     runtime="onnx")
    assert made["query_encoder_v4"].startswith("exported (the graph of ") and "did not fit" in made["query_encoder_v4"]
    ids, mask = _inputs(2, 11, seed=5)
    session = onnxruntime.InferenceSession(str(triton_repo.version_dir(repo, "query_encoder", 4) / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        np.testing.assert_allclose(session.run(None, dict(zip(INPUT_NAMES, (ids.numpy(), mask.numpy()))))[0],
                                   wider(ids, mask).numpy(), atol=1e-5)
