"""An embedding looked up from quantized rows, as llama.cpp looks up `token_embd`.

A GGUF file stores its token embedding in blocks (the default model's is Q8_0). Dequantizing the whole table
to fp32 for lookups costs vocab x hidden x 4 bytes (113 MB for SmolLM2, six times the head it ties to) when a
step reads one row. `QuantEmbedding` keeps the table as a quantized linear module (a `GGUFLinear`: row i is
token i's vector) and dequantizes only the rows it is asked for, exactly (each value is the fp32 value of its
block, as `GGUFLinear.dequantize` gives it). A tied head is the same module, so the table is held once.
"""

from __future__ import annotations

import torch
from torch import nn


class QuantEmbedding(nn.Module):
    """`nn.Embedding`'s lookup over a quantized table with `dequantize(rows)` (rows are tokens)."""

    def __init__(self, table: nn.Module) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        # The output dtype: an empty float buffer follows the model's `.to(dtype)` as a weight would.
        self.register_buffer("like", torch.empty(0), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize(input_ids.reshape(-1))
        return rows.to(self.like.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, looked up from its quantized rows"
