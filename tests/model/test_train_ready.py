"""The model is safe to train: each weight is one registered parameter, fusion is an inference step that
`unfuse()` undoes, `forward` takes a positions tensor, returns hidden states for chunked losses, and keeps
packed documents apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.tiny import hf_model, ours_from_hf


def tiny(**overrides):
    return ours_from_hf(hf_model(**overrides))


def checkpoint_size(state: dict[str, torch.Tensor], tied: bool) -> tuple[int, int]:
    tensors = [t for k, t in state.items() if not (tied and k == "lm_head.weight")]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def no_unregistered_weight_copies(model) -> None:
    """No module keeps a tensor attribute holding (a view of) a parameter's storage outside its registry."""
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                assert value.untyped_storage().data_ptr() not in storages, f"{name}.{attr}"


def test_each_weight_is_held_once_fused_or_not():
    for tied in (False, True):
        hf = hf_model(tie_word_embeddings=tied)
        model = ours_from_hf(hf)
        n, nbytes = checkpoint_size(hf.state_dict(), tied)
        assert model.num_parameters() == n and model.weight_bytes() == nbytes
        model.fuse()
        assert model.num_parameters() == n and model.weight_bytes() == nbytes
        assert set(model.state_dict()) == set(hf.state_dict())  # HF names (a tied head under both)
        no_unregistered_weight_copies(model)
        model.unfuse()
        assert model.num_parameters() == n and model.weight_bytes() == nbytes
        no_unregistered_weight_copies(model)


def test_fusion_is_an_inference_step_that_unfuse_undoes():
    model = tiny(num_key_value_heads=2)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        plain = model(ids)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.fuse()
        assert "qkv_proj" in model.model.layers[0].self_attn._modules
        torch.testing.assert_close(model(ids), plain)
        # HF names in, HF names out, while fused
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
        model.load_state_dict(state)
        model.to(torch.bfloat16)  # one registered copy: a cast leaves nothing stale behind
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        model.to(torch.float32)
        model.unfuse()
        assert "q_proj" in model.model.layers[0].self_attn._modules
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, state[k].to(torch.bfloat16).float())
    assert all(p.requires_grad for p in model.parameters())


def test_swapping_a_part_unfuses_its_parent():
    from llamalab.model.linear import Linear
    from llamalab.model.modules import get_module, set_module

    model = tiny()
    model.fuse()
    name = "model.layers.1.self_attn.k_proj"
    old = get_module(model, name)  # unfuses layer 1's attention only
    assert "qkv_proj" not in model.model.layers[1].self_attn._modules
    assert "qkv_proj" in model.model.layers[0].self_attn._modules
    new = Linear(old.in_features, old.out_features, bias=False)
    set_module(model, name, new)
    assert model.model.layers[1].self_attn.k_proj is new


def test_positions_tensor_equals_start_positions():
    model = tiny()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        by_int = model(ids, 5)
        by_list = model(ids, [5, 5])
        by_tensor = model(ids, torch.arange(5, 14))
    torch.testing.assert_close(by_tensor, by_int)
    torch.testing.assert_close(by_list, by_int)


def test_packed_documents_do_not_attend_across():
    model = tiny(num_key_value_heads=2)
    docs = [torch.randint(0, 512, (n,)) for n in (7, 12, 5)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        together = model(packed, doc_ids=doc_ids)[0]  # positions restart at each document
        alone = torch.cat([model(d[None])[0] for d in docs])
        causal_only = model(packed)[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(causal_only[7:], alone[7:], atol=1e-3)  # without the mask they do
    # Rows that are each one document take the plain causal path, with the same result as the mask gives.
    rows = torch.stack([packed[0, :12], packed[0, 12:]])
    one_doc = torch.tensor([[3] * 12, [5] * 12])
    with torch.no_grad():
        torch.testing.assert_close(model(rows, doc_ids=one_doc), model(rows), atol=0, rtol=0)
        mixed = torch.tensor([[3] * 12, [5] * 6 + [6] * 6])
        torch.testing.assert_close(model(rows, doc_ids=mixed)[0], model(rows)[0], atol=1e-5, rtol=1e-5)


def test_trains_through_forward_with_a_document_mask():
    torch.manual_seed(0)
    model = tiny(num_key_value_heads=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    docs = [torch.randint(0, 64, (n,)) for n in (16, 9, 23)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    # A document's last token predicts nothing of the next document.
    labels = torch.where(doc_ids[:, 1:] == doc_ids[:, :-1], packed[:, 1:], -100)
    losses = []
    for _ in range(30):
        logits = model(packed, doc_ids=doc_ids)[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_loss_from_hidden_states_in_chunks_equals_the_full_loss_with_equal_gradients():
    ids = torch.randint(0, 512, (2, 24))
    targets = torch.randint(0, 512, (2, 24))

    def grads(model, chunked: bool):
        model.zero_grad()
        if chunked:  # the head applied to 5-token chunks of the hidden states, token losses summed
            hidden = model(ids, hidden=True)
            total = sum(
                F.cross_entropy(model.lm_head(h).flatten(0, 1), t.flatten(), reduction="sum")
                for h, t in zip(hidden.split(5, dim=1), targets.split(5, dim=1))
            )
            loss = total / targets.numel()
        else:
            loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model = tiny(tie_word_embeddings=True)
    full_loss, full = grads(model, False)
    chunk_loss, chunked = grads(model, True)
    torch.testing.assert_close(chunk_loss, full_loss)
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], atol=1e-6, rtol=1e-5)


def test_non_causal_attention_sees_the_future():
    model = tiny()
    ids = torch.randint(0, 512, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 512
    with torch.no_grad():
        causal = model(ids)[0, 0], model(changed)[0, 0]
        full = model(ids, causal=False)[0, 0], model(changed, causal=False)[0, 0]
    torch.testing.assert_close(*causal)
    assert not torch.allclose(*full)


def test_activation_checkpointing_gives_the_same_gradients_with_dropout_in_adapters():
    from llamalab.train.config import LoRAConfig
    from llamalab.train.lora import apply_lora

    ids = torch.randint(0, 512, (2, 16))
    grads = []
    for recompute in (False, True):
        model = tiny(num_key_value_heads=2).train()
        apply_lora(model, LoRAConfig(r=4, dropout=0.3, targets=["q_proj", "up_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
        model.set_activation_checkpointing(recompute)
        torch.manual_seed(7)  # the same dropout masks, drawn again when blocks are recomputed
        model(ids).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
