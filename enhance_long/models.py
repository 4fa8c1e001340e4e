"""Model loading: the embedded SmolLM2, any hub id or local folder, or a tiny random Llama built in code.

`model_cfg` is a `conf/model/*.yaml` mapping (DictConfig or dict):

    name        label used in results
    path        hub id or local folder; null = the embedded SmolLM2-135M-Instruct (see enhance_long.assets)
    gguf_file   GGUF file inside `path` to dequantize on load (optional)
    revision    hub branch, tag or commit (optional)
    train_len   context length the model was trained on; null = read it from the model config
    dtype       float32 | bfloat16 | float16 | auto (the checkpoint's own dtype)
    device_map  null (load on CPU) | auto (accelerate spreads layers over the GPUs) | cpu | cuda | cuda:1 | ...
    cache_dir   null = default: the enhance_long cache for the embedded model, Hugging Face's cache for hub ids
    random      null, or the shape of a tiny random Llama (tests): hidden_size, num_hidden_layers,
                num_attention_heads, num_key_value_heads, intermediate_size, max_position_embeddings, rope_theta, seed

Usage:
    model, tokenizer = load_model({"name": "smollm2_135m", "path": None})
    trained_length(model.config)  # 8192
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from enhance_long import assets
from enhance_long.attention import check_backend, check_flex_kernel
from enhance_long.patch import trained_length

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
RANDOM_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "rope_theta",
    "seed",
)
BOS, EOS = "<s>", "</s>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """An offline byte-level tokenizer: 256 byte tokens, then <s> (256, prepended like Llama's BOS) and </s> (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS, EOS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, len(alphabet))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def _random_llama(spec: Mapping, dtype: torch.dtype | str, attention: str, tokenizer) -> PreTrainedModel:
    missing = [key for key in RANDOM_KEYS if spec.get(key) is None]
    unknown = sorted(set(spec) - set(RANDOM_KEYS))
    if missing or unknown:
        raise ValueError(
            f"model.random has missing keys {missing} / unknown keys {unknown}; it takes exactly {list(RANDOM_KEYS)}"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(spec["hidden_size"]),
        num_hidden_layers=int(spec["num_hidden_layers"]),
        num_attention_heads=int(spec["num_attention_heads"]),
        num_key_value_heads=int(spec["num_key_value_heads"]),
        intermediate_size=int(spec["intermediate_size"]),
        max_position_embeddings=int(spec["max_position_embeddings"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(spec["rope_theta"])},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(int(spec["seed"]))
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    return model.to(torch.float32 if dtype == "auto" else dtype)


def _record_train_len(config: Any, train_len: int) -> None:
    """Record `model.train_len` where `trained_length` reads it, for checkpoints whose max_position_embeddings is not
    their trained length (Mistral-7B-v0.1's config says 32768; it was trained at 8192).

    The top-level `original_max_position_embeddings` is transformers' legacy field for the pretraining length; a
    value already inside `rope_parameters` (a checkpoint shipping a RoPE extension) is overridden too.
    """
    config.original_max_position_embeddings = train_len
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "original_max_position_embeddings" in rope:
        rope["original_max_position_embeddings"] = train_len


def _random_device(device_map: str | None) -> str:
    if device_map in (None, "auto"):
        return "cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu"
    return device_map


def _is_local_path(path: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, ./, ~, deeper) or an existing folder is local."""
    return Path(path).expanduser().exists() or path.startswith(("/", ".", "~")) or path.count("/") > 1


def _hub_offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _from_pretrained(path: str, cfg: Mapping, dtype: torch.dtype | str, attention: str, local: bool):
    common: dict[str, Any] = {"revision": cfg.get("revision"), "cache_dir": None if local else cfg.get("cache_dir")}
    if cfg.get("gguf_file"):
        common["gguf_file"] = cfg["gguf_file"]
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    if cfg.get("device_map") is not None:
        kwargs["device_map"] = cfg["device_map"]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **common, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    except (OSError, SafetensorError) as err:
        if local:
            raise RuntimeError(
                f"cannot load model.path {path!r} ({str(err).splitlines()[0]}): its files are incomplete or corrupt; "
                f"download or save them again"
            ) from err
        mode = "HF_HUB_OFFLINE is set" if _hub_offline() else "no network or no access"
        raise RuntimeError(
            f"cannot load hub model {path!r} ({mode}) and it is not in the Hugging Face cache: run "
            f"`hf download {path}` on a machine with access (then use HF_HUB_OFFLINE=1), "
            f"accept its license on the hub if it is gated, or set model.path to a local folder"
        ) from err
    return model, tokenizer


def model_dtype(name: str | None):
    """The torch dtype (or "auto") that ``model.dtype`` names; a name not in ``DTYPES`` is a one-line error."""
    name = name or "auto"
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {list(DTYPES)}; set model.dtype=bfloat16 or so")
    return DTYPES[name]


def load_model(model_cfg: Mapping, attention: str = "sdpa") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer `model_cfg` describes, with attention backend `attention`, in eval mode."""
    if isinstance(model_cfg, DictConfig) and OmegaConf.missing_keys(model_cfg):
        missing = sorted(OmegaConf.missing_keys(model_cfg))
        raise ValueError(f"model.{missing[0]} is required by this model option (???); set it: model.{missing[0]}=...")
    dtype = model_dtype(model_cfg.get("dtype"))
    check_backend(attention)  # before transformers, which would otherwise fetch a flash kernel from the hub
    path = model_cfg.get("path")

    if model_cfg.get("random") is not None:
        tokenizer = byte_tokenizer()
        model = _random_llama(model_cfg["random"], dtype, attention, tokenizer)
        model = model.to(_random_device(model_cfg.get("device_map")))
    elif path is None:
        if model_cfg.get("gguf_file"):
            raise ValueError("model.gguf_file needs model.path (the folder or hub id holding it); set both or neither")
        entry = assets.ensure("smollm2_135m", model_cfg.get("cache_dir"))
        model, tokenizer = _from_pretrained(os.fspath(entry), model_cfg, dtype, attention, local=True)
    else:
        path = os.fspath(path)
        local = _is_local_path(path)
        if local:
            path = os.fspath(Path(path).expanduser())
            if not Path(path).is_dir():
                raise ValueError(
                    f"model.path={path!r} is not a folder; give a folder holding config.json (or a GGUF with "
                    f"model.gguf_file), or a hub id like meta-llama/Llama-2-7b-hf"
                )
            needed = model_cfg.get("gguf_file") or "config.json"
            if not (Path(path) / needed).is_file():
                raise ValueError(
                    f"model.path={path!r} has no {needed}; point it at the folder of a saved model "
                    f"(save_pretrained / hf download --local-dir) or set model.gguf_file to the GGUF inside it"
                )
        model, tokenizer = _from_pretrained(path, model_cfg, dtype, attention, local)

    if attention == "flex_attention":
        check_flex_kernel(next(model.parameters()).device)  # the stock rows too run on this kernel
    if model_cfg.get("train_len"):
        _record_train_len(model.config, int(model_cfg["train_len"]))
    logger.info(
        "loaded %s (%s, %s, attention=%s, trained length %d)",
        model_cfg.get("name") or path or "smollm2_135m",
        type(model).__name__,
        model.dtype,
        attention,
        trained_length(model.config),
    )
    return model.eval(), tokenizer
