"""models.py: shipped architectures, the offline tokenizer, load_model for arch: and local models."""
from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llm_dvfs.workload import models  # noqa: E402
from llm_dvfs.errors import ConfigError, DataNotFound  # noqa: E402
from llm_dvfs.workload.models import (ModelSpec, arch_info, build_offline_tokenizer, list_arch,  # noqa: E402
                             load_model)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one tokenizer cache per test session, never the user's
    monkeypatch.setenv("LLM_DVFS_CACHE", str(tmp_path_factory.getbasetemp() / "llm_dvfs_cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LLM_DVFS_CACHE", str(tmp_path_factory.getbasetemp() / "llm_dvfs_cache"))
    try:
        yield load_model("arch:tiny", device="cpu", seed=0)
    finally:
        mp.undo()


# published parameter counts of the real checkpoints (tied embeddings counted once)
EXPECTED = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b-v0.1": 7_241_732_096,
    "gpt-neo-2.7b": 2_651_307_520,
    "falcon-7b": 6_921_720_704,
}


def test_list_arch_has_the_five_models_and_tiny():
    assert list_arch() == sorted(["falcon-7b", "gpt-neo-2.7b", "llama-3.2-1b", "llama-3.2-3b",
                                  "mistral-7b-v0.1", "tiny"])


def test_arch_info_matches_public_configs():
    l1 = arch_info("llama-3.2-1b")
    assert (l1["layers"], l1["hidden"], l1["intermediate"], l1["heads"], l1["kv_heads"]) == \
        (16, 2048, 8192, 32, 8)
    assert (l1["vocab"], l1["max_positions"], l1["rope_theta"], l1["activation"]) == \
        (128256, 131072, 500000.0, "silu")
    assert l1["hub_id"] == "meta-llama/Llama-3.2-1B"
    l3 = arch_info("arch:llama-3.2-3b")
    assert (l3["layers"], l3["hidden"], l3["heads"], l3["kv_heads"]) == (28, 3072, 24, 8)
    mi = arch_info("mistral-7b-v0.1")
    assert (mi["layers"], mi["hidden"], mi["intermediate"], mi["kv_heads"], mi["vocab"],
            mi["max_positions"]) == (32, 4096, 14336, 8, 32000, 32768)
    fa = arch_info("falcon-7b")
    assert (fa["layers"], fa["hidden"], fa["intermediate"], fa["heads"], fa["kv_heads"],
            fa["vocab"], fa["activation"]) == (32, 4544, 18176, 71, 1, 65024, "gelu")
    gn = arch_info("gpt-neo-2.7b")
    assert (gn["layers"], gn["hidden"], gn["intermediate"], gn["heads"], gn["vocab"],
            gn["max_positions"], gn["activation"]) == (32, 2560, 10240, 20, 50257, 2048, "gelu_new")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_big_arch_on_meta_device_has_real_parameter_count(name):
    lm = load_model(f"arch:{name}", device="meta", dtype="bfloat16")
    params = list(lm.model.parameters())
    assert all(p.device.type == "meta" for p in params)  # nothing allocated
    assert lm.n_params == EXPECTED[name] == models.arch_info(name)["expected_params"]
    assert lm.weights == "random" and not lm.quality_valid
    assert lm.dtype == "bfloat16" and lm.device == "meta"
    # the offline tokenizer fits the embedding and its special ids are the model's
    assert len(lm.tokenizer) <= lm.model.config.vocab_size
    assert lm.model.config.eos_token_id == lm.tokenizer.eos_token_id
    assert lm.model.generation_config.pad_token_id == lm.tokenizer.pad_token_id


def test_tiny_generates_with_offline_tokenizer(tiny):
    assert tiny.n_params == 354_624 and tiny.dtype == "float32" and tiny.device == "cpu"
    assert tiny.tokenizer_source == "offline-bpe" and len(tiny.tokenizer) == 4096
    tok = tiny.tokenizer
    enc = tok(["The river begins as a thin stream.", "Hello"], return_tensors="pt", padding=True)
    assert enc["attention_mask"][1, 0] == 0  # left padding for batched generation
    out = tiny.model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, enc["input_ids"].shape[1] + 5)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    d = tiny.describe()
    assert d["weights"] == "random" and d["model"] == "arch:tiny" and d["tokenizer_vocab"] == 4096


def test_arch_weights_are_seeded_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a = load_model("arch:tiny", device="cpu", seed=3).model
    assert torch.equal(state, torch.random.get_rng_state())
    b = load_model("arch:tiny", device="cpu", seed=3).model
    c = load_model("arch:tiny", device="cpu", seed=4).model
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert 0.01 < float(wa.detach().std()) < 0.03  # transformers' init (std 0.02), not zeros or junk


def test_dtype_option(tiny):
    lm = load_model("arch:tiny", device="cpu", dtype="bf16")
    assert lm.dtype == "bfloat16" and next(lm.model.parameters()).dtype == torch.bfloat16


def test_offline_tokenizer_is_cached_and_realistic():
    tok = build_offline_tokenizer(128256)
    path = models.offline_tokenizer_path()
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    again = build_offline_tokenizer(32000)
    assert path.stat().st_mtime_ns == mtime  # reused, not retrained
    assert len(tok) == len(again) < 32000  # the corpus caps the vocabulary
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    text = ("Most people who visit the town arrive by train. The station is small, "
            "with a single platform and a clock.")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless
    assert 1.0 <= len(ids) / len(text.split()) <= 1.5
    odd = "Ünïcödé ✓ 東京 — 3.14159"
    assert tok.decode(tok(odd)["input_ids"]) == odd
    # a smaller vocabulary is a prefix of the full one
    small = build_offline_tokenizer(1000)
    assert len(small) == 1000
    full_vocab = tok.get_vocab()
    assert all(full_vocab[t] == i for t, i in small.get_vocab().items())


def test_offline_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ConfigError, match="300"):
        build_offline_tokenizer(100)


def test_unknown_arch_lists_known_names():
    with pytest.raises(ConfigError) as ei:
        load_model("arch:llama-9000")
    msg = str(ei.value)
    assert "llama-9000" in msg
    for name in list_arch():
        assert "arch:" + name in msg


def test_bare_arch_name_is_ambiguous():
    with pytest.raises(ConfigError, match="arch:llama-3.2-1b.*meta-llama/Llama-3.2-1B"):
        ModelSpec.parse("llama-3.2-1b")


def test_spec_parsing(tmp_path):
    assert ModelSpec.parse("arch:tiny") == ModelSpec("arch:tiny", "arch", "tiny")
    assert ModelSpec.parse("meta-llama/Llama-3.2-1B").kind == "hub"
    assert ModelSpec.parse("meta-llama/Llama-3.2-1B").weights == "pretrained"
    assert ModelSpec.parse(tmp_path).kind == "local"
    with pytest.raises(DataNotFound, match="does not exist"):
        ModelSpec.parse(str(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        ModelSpec.parse("  ")


def test_bad_dtype_and_device():
    with pytest.raises(ConfigError, match="dtype"):
        load_model("arch:tiny", dtype="int3")
    with pytest.raises(ConfigError, match="device"):
        load_model("arch:tiny", device="tpu:0")
    with pytest.raises(ConfigError, match="device_map"):
        load_model("arch:tiny", device_map={"": 0})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model("arch:tiny", device="cuda:0")


def test_local_directory_loads_as_pretrained(tiny, tmp_path):
    d = tmp_path / "my-model"
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    lm = load_model(str(d), device="cpu")
    assert lm.weights == "pretrained" and lm.quality_valid and lm.name == "my-model"
    assert lm.spec.kind == "local" and lm.dtype == "float32"
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    p1 = dict(tiny.model.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
    p2 = dict(lm.model.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(p1, p2)


def test_arch_with_explicit_tokenizer(tiny, tmp_path):
    d = tmp_path / "tok"
    tiny.tokenizer.save_pretrained(d)
    lm = load_model("arch:tiny", device="cpu", tokenizer=str(d))
    assert lm.tokenizer_source == str(d) and len(lm.tokenizer) == 4096
    big = tmp_path / "bigtok"
    build_offline_tokenizer(10000).save_pretrained(big)
    with pytest.raises(ConfigError, match="overflow"):
        load_model("arch:tiny", device="cpu", tokenizer=str(big))


def test_hub_model_missing_offline_says_how_to_get_it(monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataNotFound) as ei:
        load_model("llm-dvfs-tests/no-such-model", device="cpu")
    msg = str(ei.value)
    assert "hf download llm-dvfs-tests/no-such-model" in msg and "arch:llama-3.2-1b" in msg


def test_arch_json_files_are_complete():
    for name in list_arch():
        doc = json.loads((models._arch_dir() / f"{name}.json").read_text())
        assert doc["name"] == name
        assert doc["config"]["model_type"] in ("llama", "mistral", "falcon", "gpt_neo")
        assert isinstance(doc["expected_params"], int)
    assert os.path.basename(str(models.offline_tokenizer_path())).startswith("bpe-en-")
