"""The architecture registry and per-layer types: another architecture and a hybrid stack use the same
loader, engine and quantization as LLaMA, each checked against a slow reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import llamalab
from llamalab.errors import CheckpointError
from llamalab.io.hf import write_hf_dir
from llamalab.io.tokenizer import Tokenizer
from llamalab.model.build import build_model
from llamalab.model.config import ModelConfig
from llamalab.model.linear import Linear, LinearGroup
from llamalab.model.mixers import register_mixer
from llamalab.model.registry import Architecture, config_from_hf, register_architecture
from llamalab.model.transformer import Transformer
from tests.tiny import BASE, tiny_bpe


@register_mixer("test-token-shift")
class TokenShift(nn.Module):
    """A recurrent token mixer (y_t = W (x_t + x_{t-1}) / 2) whose state, the last input of each row, lives
    in the cache: what a state-space layer of a hybrid stack needs from the seam."""

    attribute = "mixer"

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.proj = Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        previous = torch.zeros_like(x[:, :1])
        if ctx.cache is not None:
            state = ctx.cache.state(self.layer_idx)
            if "last" not in state:
                state["last"] = x.new_zeros(ctx.cache.max_batch, x.shape[-1])
            fresh = torch.tensor([s == 0 for s in ctx.starts])[:, None, None]
            previous = torch.where(fresh, previous, state["last"][ctx.rows][:, None])
            state["last"][ctx.rows] = x[:, -1]
        shifted = torch.cat([previous, x[:, :-1]], dim=1)
        return self.proj((x + shifted) / 2)

    def linear_groups(self, input_op: str) -> list[LinearGroup]:
        return [LinearGroup(("mixer.proj",), input_op, "mixer")]


def hybrid_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, "num_hidden_layers": 3, **overrides},
                       layer_types=["attention", "test-token-shift", "attention"])  # fmt: skip


def random_model(config) -> Transformer:
    torch.manual_seed(0)
    shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    return build_model(config, {k: torch.randn(s) * 0.2 for k, s in shapes.items()})


def test_a_hybrid_stack_decodes_through_the_cache_as_its_full_forward():
    model = random_model(hybrid_config())
    assert type(model.model.layers[1].mixer) is TokenShift
    tok = Tokenizer(tiny_bpe())
    ckpt = llamalab.api.Checkpoint(model.config, {}, tok, {}, source=None, format="test")
    llm = llamalab.LLM(model, ckpt, "hybrid")
    engine = llm.engine(max_batch=2, max_len=64, prefill_chunk=5)  # chunks carry the recurrent state
    assert "attention-only" in engine.decode_path  # the native step takes attention-only stacks
    assert engine.cache.k[1] is None  # no key/value slots for the layer that is not attention
    prompts = [tok.encode("Alice was beginning to get very tired"), tok.encode("The Queen")]
    params = [llm.sampling(max_new_tokens=10, ignore_eos=True) for _ in prompts]
    got = {}
    for event in engine.run(prompts, params):
        if event.finished:
            got[len(event.seq.prompt_ids)] = event.seq.output_ids
    for prompt in prompts:  # reference: recompute the whole sequence at every step, no cache
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert got[len(prompt)] == ids[len(prompt) :]


def test_quantization_calibrates_the_linears_a_block_declares():
    from llamalab.quant import quantize_model
    from llamalab.quant.base import QuantLinear

    model = random_model(hybrid_config(hidden_size=64, intermediate_size=128))
    llm = llamalab.LLM(
        model, llamalab.api.Checkpoint(model.config, {}, Tokenizer(tiny_bpe()), {}, None, "t"), "h"
    )
    quantize_model(llm, "rtn", 4, 32, progress=False)
    assert isinstance(model.model.layers[1].mixer.proj, QuantLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


@dataclasses.dataclass
class BidirectionalConfig(ModelConfig):
    """A LLaMA-shaped masked-diffusion LM (as LLaDA is): the same blocks, every token sees every other."""

    @classmethod
    def from_hf(cls, cfg, source="config.json"):
        config = ModelConfig.from_hf.__func__(cls, cfg, source)
        config.causal = False
        return config


register_architecture(Architecture("TestBidirectionalLM", BidirectionalConfig, Transformer, ("test-bidir",)))


def test_another_architecture_loads_through_the_registry(tmp_path):
    config = ModelConfig(**BASE, architecture="TestBidirectionalLM", model_type="test-bidir")
    state = random_model(config).state_dict()
    write_hf_dir(tmp_path / "m", config.to_hf(), state, tokenizer=Tokenizer(tiny_bpe()))
    llm = llamalab.load(str(tmp_path / "m"))
    assert type(llm.config) is BidirectionalConfig and not llm.config.causal
    ids = torch.randint(0, 512, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 512
    with torch.no_grad():
        assert not torch.allclose(llm.model(ids)[0, 0], llm.model(changed)[0, 0])  # the first sees the last
    with pytest.raises(CheckpointError, match="architecture 'GPT2LMHeadModel' is not supported"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"]})
