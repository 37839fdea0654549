"""The models, written for one device; :mod:`.parallelize` spreads them over devices afterwards.

``Transformer`` is the native decoder: token embedding, ``layers`` × (RMSNorm → grouped-query attention
with RoPE through ``scaled_dot_product_attention`` → RMSNorm → SwiGLU MLP), final RMSNorm, lm_head
(optionally tied to the embedding). Parameter names are Hugging Face Llama's, so the export is the state
dict as is and ``LlamaForCausalLM`` reproduces the logits.

The encoder (masked LM) and encoder-decoder (span corruption) architectures use transformers' BERT and T5
models (:func:`build_model`), trained by the same loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge_jobs.pretrain.config import Architecture, ModelShape

VOCAB_MULTIPLE = 64


@dataclass
class ModelArgs:
    """Everything needed to rebuild the model (stored in every checkpoint's lmforge.json)."""

    architecture: str
    vocab_size: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    decoder_layers: int | None = None
    tokenizer_vocab: int | None = None
    special_ids: dict[str, int] | None = None
    """Token ids the objective needs: eos, pad, mask (encoder), sentinel0 (encoder-decoder, counting down)."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_shape(cls, shape: ModelShape, vocab_size: int, **extra: Any) -> ModelArgs:
        return cls(
            architecture=shape.architecture.value,
            vocab_size=vocab_size,
            layers=shape.layers,
            hidden=shape.hidden,
            heads=shape.heads,
            kv_heads=shape.n_kv_heads,
            ffn_hidden=shape.ffn_size,
            seq_len=shape.seq_len,
            rope_theta=shape.rope_theta,
            norm_eps=shape.norm_eps,
            tie_embeddings=shape.tie_embeddings,
            decoder_layers=shape.decoder_layers,
            **extra,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 and cast back before the weight, as Llama does (bit-compatible export)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(
    head_dim: int, seq_len: int, theta: float, device: torch.device | None = None
) -> torch.Tensor:
    """cos and sin (2, seq_len, head_dim) in fp32, in Llama's rotate-half layout."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    )
    t = torch.arange(seq_len, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin()))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = args.heads, args.kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden, args.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden, args.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden, args.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(args.heads * self.head_dim, args.hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallel the projections give this rank's heads only
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope[0, :s].to(q.dtype), rope[1, :s].to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden, args.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(args.hidden, args.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(args.ffn_hidden, args.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(args.vocab_size, args.hidden)
        # keyed by index (the same state-dict names as a ModuleList): a pipeline stage deletes the blocks
        # it does not hold and the rest keep their names
        self.layers = nn.ModuleDict({str(i): Block(args) for i in range(args.layers)})
        self.norm: RMSNorm | None = RMSNorm(args.hidden, args.norm_eps)


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` into a parameter, or this rank's shard of it when it is a DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
        index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
        param.to_local().copy_(full[index])
    else:
        param.copy_(full)


def _canonical(name: str) -> str:
    """A parameter's name in the plain model (without activation-checkpointing or compile wrappers)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


class Transformer(nn.Module):
    """Decoder-only causal LM: ``model(input_ids)`` gives logits, ``model(input_ids, labels)`` the loss."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head: nn.Linear | None = nn.Linear(args.hidden, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer(
            "rope", rope_tables(args.head_dim, args.seq_len, args.rope_theta), persistent=False
        )

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Normal(0, 0.02) weights; residual output projections scaled by 1/√(2·layers) (GPT-2).

        Works on parameters already sharded by FSDP2 or tensor parallel (DTensors, e.g. after a meta-device
        build) and on a pipeline stage that holds only some blocks: every rank draws each full tensor of the
        whole model, in the whole model's order, from the same CPU generator and keeps what it holds, so
        the weights are those of the unsharded model with the same seed, one parameter in memory at a time.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        resid_std = std / (2 * self.args.layers) ** 0.5
        self.rope.copy_(rope_tables(self.args.head_dim, self.args.seq_len, self.args.rope_theta))
        held = {_canonical(name): p for name, p in self.named_parameters()}
        with torch.device("meta"):
            whole = Transformer(self.args)
        for name, p in whole.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                full = torch.ones(p.shape)
            else:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                full = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, s, generator=gen)
            if name in held:
                _copy_full(held[name], full)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab); with ``labels`` the mean next-token cross-entropy instead.

        A pipeline stage without the embedding takes hidden states instead of ``input_ids``, and one
        without the output projection returns hidden states."""
        h = self.model.embed_tokens(input_ids) if self.model.embed_tokens is not None else input_ids
        for layer in self.model.layers.values():
            h = layer(h, self.rope)
        if self.lm_head is None:
            return h
        logits = self.lm_head(self.model.norm(h))
        if labels is None:
            return logits
        return next_token_loss(logits, labels)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (-100: ignored)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


# ------------------------------------------------------------------------ encoder / encoder-decoder (HF)
class HFObjective(nn.Module):
    """A transformers BERT (masked LM) or T5 (span corruption) model behind the trainer's interface."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = build_hf_model(args)

    def init_weights(self, seed: int | None = None) -> None:
        if seed is not None:
            torch.manual_seed(seed)
        self.model.apply(self.model._init_weights)
        if self.args.tie_embeddings and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        if self.args.architecture == Architecture.encoder.value:
            return self.model.bert.encoder.layer
        return nn.ModuleList([*self.model.encoder.block, *self.model.decoder.block])

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """The loss when ``labels`` are given, else the logits."""
        out = self.model(**batch)
        return out.loss if "labels" in batch else out.logits


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers config of the exported model."""
    import transformers

    special = args.special_ids or {}
    if args.architecture == Architecture.decoder.value:
        return transformers.LlamaConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden,
            intermediate_size=args.ffn_hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim,
            max_position_embeddings=args.seq_len,
            rms_norm_eps=args.norm_eps,
            rope_theta=args.rope_theta,
            tie_word_embeddings=args.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            bos_token_id=special.get("bos", special.get("eos")),
            eos_token_id=special.get("eos"),
            pad_token_id=special.get("pad"),
            dtype=dtype,
            architectures=["LlamaForCausalLM"],
        )
    if args.architecture == Architecture.encoder.value:
        return transformers.BertConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=args.ffn_hidden,
            max_position_embeddings=args.seq_len,
            type_vocab_size=1,
            layer_norm_eps=args.norm_eps,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=special.get("pad", 0),
            tie_word_embeddings=args.tie_embeddings,
            dtype=dtype,
            architectures=["BertForMaskedLM"],
        )
    return transformers.T5Config(
        vocab_size=args.vocab_size,
        d_model=args.hidden,
        d_kv=args.head_dim,
        d_ff=args.ffn_hidden,
        num_layers=args.layers,
        num_decoder_layers=args.decoder_layers or args.layers,
        num_heads=args.heads,
        dropout_rate=0.0,
        layer_norm_epsilon=args.norm_eps,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=args.tie_embeddings,
        pad_token_id=special.get("pad", 0),
        eos_token_id=special.get("eos", 1),
        decoder_start_token_id=special.get("pad", 0),
        dtype=dtype,
        architectures=["T5ForConditionalGeneration"],
    )


def build_hf_model(args: ModelArgs) -> nn.Module:
    import transformers

    config = hf_config(args)
    config._attn_implementation = "sdpa" if args.architecture == Architecture.encoder.value else "eager"
    if args.architecture == Architecture.encoder.value:
        return transformers.BertForMaskedLM(config)
    return transformers.T5ForConditionalGeneration(config)


def build_model(args: ModelArgs) -> nn.Module:
    """The model for ``args.architecture`` (weights uninitialised when built on the meta device)."""
    if args.architecture == Architecture.decoder.value:
        return Transformer(args)
    return HFObjective(args)


def blocks_of(model: nn.Module) -> nn.ModuleDict | nn.ModuleList:
    """The transformer blocks (units of activation checkpointing, compile and FSDP sharding), by index."""
    if isinstance(model, Transformer):
        return model.model.layers
    return model.blocks  # type: ignore[return-value]


def block_list(model: nn.Module) -> list[nn.Module]:
    blocks = blocks_of(model)
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "VOCAB_MULTIPLE",
    "HFObjective",
    "ModelArgs",
    "Transformer",
    "block_list",
    "blocks_of",
    "build_model",
    "count_parameters",
    "hf_config",
    "next_token_loss",
]
