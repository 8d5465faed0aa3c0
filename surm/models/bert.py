"""BERT encoder with a sequence-classification head, parameter names as in Hugging Face.

The parameter tree mirrors the Hugging Face module names, so the loader is a rename plus a
transpose of the linear weights::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale,bias}
    encoder/layer/{i}/attention/self/{query,key,value}/{kernel,bias}    kernel (in, out)
    encoder/layer/{i}/attention/output/dense/{kernel,bias}
    encoder/layer/{i}/attention/output/LayerNorm/{scale,bias}
    encoder/layer/{i}/intermediate/dense/{kernel,bias}
    encoder/layer/{i}/output/dense/{kernel,bias}
    encoder/layer/{i}/output/LayerNorm/{scale,bias}
    pooler/dense/{kernel,bias}                                          only with pooling='pooler'
    classifier/{kernel,bias}                                            (hidden, num_labels)

Reading and writing Hugging Face and sentence-transformers folders is `surm.models.bert_io`.

Every linear layer is an `nn.Dense` sub-module applied through its ``__call__``, so parameter
surgery can intercept it (`nn.intercept_methods`).

"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from surm.models import layers

POOLINGS = ("pooler", "cls", "mean")
ACTIVATIONS = {
    "gelu": layers.gelu,  # Hugging Face "gelu" is exact (erf).
    "gelu_new": functools.partial(layers.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(layers.gelu, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture and head. `from_hf` reads a Hugging Face ``config.json`` dict.

    Attributes:
      vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
      max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_act: as in Hugging Face
        (`hidden_act` one of `ACTIVATIONS`).
      hidden_dropout: dropout on embeddings and after each sub-layer.
      attention_dropout: dropout on the attention weights.
      classifier_dropout: dropout before the classifier; None means `hidden_dropout`.
      num_labels: classifier outputs; 1 means regression (e.g. STS-B).
      pooling: sentence representation fed to the classifier: 'pooler' (tanh dense on [CLS], as
        BertForSequenceClassification), 'cls' (the [CLS] hidden state) or 'mean' (mean over the
        non-padding tokens, as sentence-transformers MiniLM).
      dtype: compute dtype (e.g. "bfloat16"); parameters stay float32 and logits are float32.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float | None = None
    num_labels: int = 2
    pooling: str = "pooler"
    dtype: Any = "float32"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; expected one of {POOLINGS}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels}; expected at least 1")
        jnp.dtype(self.dtype)  # Fails early on an unknown dtype name.

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "BertConfig":
        """From a Hugging Face BERT ``config.json`` dict; `overrides` sets other fields."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type={hf['position_embedding_type']!r}: only 'absolute' "
                "position embeddings are implemented")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf["type_vocab_size"],
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            classifier_dropout=hf.get("classifier_dropout"),
        )
        return cls(**{**fields, **overrides})


def _dense(features: int, dtype, name: str, **kwargs) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(0.02), name=name,
                    **kwargs)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, *, train: bool):
        cfg = self.config
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise ValueError(f"Sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        embed = lambda num, name: nn.Embed(
            num, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), name=name)
        positions = jnp.arange(input_ids.shape[-1])
        x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
             + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
             + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
        x = nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype), name="LayerNorm")(x)
        return layers.Dropout(cfg.hidden_dropout)(x, deterministic=not train)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention; `mask` is (B, 1, 1, L) bool, True where keys are tokens."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, *, train: bool):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        head_dim = cfg.hidden_size // cfg.num_heads

        def heads(name):
            y = _dense(cfg.hidden_size, dtype, name)(x)
            return y.reshape(*y.shape[:-1], cfg.num_heads, head_dim)

        dropout = train and cfg.attention_dropout > 0
        # Softmax in float32 (keeps bfloat16 attention close to the float32 result).
        y = layers.dot_product_attention(
            heads("query"), heads("key"), heads("value"), mask=mask,
            dropout_rate=cfg.attention_dropout,
            dropout_rng=self.make_rng("dropout") if dropout else None,
            deterministic=not dropout, dtype=dtype)
        return y.reshape(*y.shape[:-2], cfg.hidden_size)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): Hugging Face BertSelfOutput / BertOutput."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, residual, *, train: bool):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = _dense(cfg.hidden_size, dtype, "dense")(x)
        x = layers.Dropout(cfg.hidden_dropout)(x, deterministic=not train)
        return nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="LayerNorm")(x + residual)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, *, train: bool):
        y = BertSelfAttention(self.config, name="self")(x, mask, train=train)
        return BertResidualOutput(self.config, name="output")(y, x, train=train)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _dense(cfg.intermediate_size, jnp.dtype(cfg.dtype), "dense")(x)
        return ACTIVATIONS[cfg.hidden_act](x)


class BertLayer(nn.Module):
    """attention/{self,output}, intermediate/dense, output/{dense,LayerNorm}."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, *, train: bool):
        cfg = self.config
        attention = BertAttention(cfg, name="attention")(x, mask, train=train)
        intermediate = BertIntermediate(cfg, name="intermediate")(attention)
        return BertResidualOutput(cfg, name="output")(intermediate, attention, train=train)


class BertLayers(nn.Module):
    """The `layer` collection: sub-modules named "0", "1", ... as in Hugging Face."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, *, train: bool):
        for i in range(self.config.num_layers):
            x = BertLayer(self.config, name=str(i))(x, mask, train=train)
        return x


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, *, train: bool):
        return BertLayers(self.config, name="layer")(x, mask, train=train)


class BertPooler(nn.Module):
    """tanh(dense(hidden state of [CLS]))."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        return jnp.tanh(_dense(cfg.hidden_size, jnp.dtype(cfg.dtype), "dense")(hidden[:, 0]))


class BERT(nn.Module):
    """BERT for sequence classification or regression.

    ``BERT(config).apply({"params": params}, input_ids, attention_mask, token_type_ids)`` gives
    (B, num_labels) float32 logits. Other outputs through ``method=``:
    ``"encode"`` -> (B, L, hidden) last hidden states, ``"embed"`` -> (B, hidden) pooled
    sentence representation. Inputs are (B, L) int arrays; `attention_mask` (1 = token,
    0 = padding) defaults to all ones and `token_type_ids` to zeros. With ``train=True`` and
    dropout > 0, pass ``rngs={"dropout": key}``.
    """

    config: BertConfig

    def setup(self):
        cfg = self.config
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        if cfg.pooling == "pooler":
            self.pooler = BertPooler(cfg)
        self.classifier_dropout = layers.Dropout(
            cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout)
        # Zero-initialised like the ViT head, so a fresh head is the same in `init` and `load`.
        self.classifier = nn.Dense(cfg.num_labels, dtype=jnp.dtype(cfg.dtype),
                                   kernel_init=nn.initializers.zeros)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, train: bool = False):
        """Last hidden states (B, L, hidden), in the compute dtype."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, train=train)
        mask = attention_mask[:, None, None, :].astype(bool)
        return self.encoder(x, mask, train=train)

    def embed(self, input_ids, attention_mask=None, token_type_ids=None, train: bool = False):
        """Pooled sentence representation (B, hidden), per `config.pooling`."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, train)
        if self.config.pooling == "pooler":
            return self.pooler(hidden)
        if self.config.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(axis=1)
        weights = attention_mask[..., None].astype(jnp.float32)
        summed = (hidden.astype(jnp.float32) * weights).sum(axis=1)
        # Same clamp as sentence-transformers' mean pooling.
        return (summed / jnp.maximum(weights.sum(axis=1), 1e-9)).astype(hidden.dtype)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train: bool = False):
        pooled = self.embed(input_ids, attention_mask, token_type_ids, train)
        pooled = self.classifier_dropout(pooled, deterministic=not train)
        return self.classifier(pooled).astype(jnp.float32)
