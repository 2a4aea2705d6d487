"""Training configs: YAML plus KEY=VALUE overrides, every mistake named before any work."""

import pytest

from llamalab.errors import LlamalabError
from llamalab.train.config import load_config


def test_overrides_and_nested_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: smollm2-135m\nobjective: sft\nlora: {r: 4}\ndata: {seq_len: 128}\n")
    cfg = load_config(
        path, ["optim.lr=1e-4", "lora.targets=[q_proj, k_proj]", "data.train=[{source: x.jsonl}]"]
    )
    assert cfg.optim.lr == 1e-4 and cfg.lora.r == 4 and cfg.lora.targets == ["q_proj", "k_proj"]
    assert (
        cfg.data.seq_len == 128 and cfg.data.train[0].source == "x.jsonl" and cfg.data.train[0].weight == 1.0
    )
    assert load_config(None, ["model=m", "lora=true"]).lora.r == 8  # a section with its defaults


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=m", "optim.lrr=1"], r"config.optim: unknown setting\(s\) lrr; known: betas, eps"),
        (["model=m", "steps=ten"], r"config.steps: expected int, got 'ten'"),
        (["model=m", "objective=ppo"], r"objective 'ppo'; use one of clm, sft, dpo"),
        ([], r"set exactly one of `model`"),
        (["init={hidden_size: 8}"], r"`init` needs `tokenizer`"),
        (["model=m", "qlora=true"], r"qlora needs a lora section"),
        (["model=m", "data.eval_pairs=p.jsonl"], r"data.eval_pairs \(held-out preference pairs\) is for objective dpo"),
        (["model=m", "lr"], r"override 'lr' is not KEY=VALUE"),
    ],
)
def test_mistakes_are_named(overrides, message):
    with pytest.raises(LlamalabError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(LlamalabError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(LlamalabError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_every_recipe_is_a_valid_config():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        cfg = load_config(path)
        for src in cfg.data.train:
            assert src.source in ("alice", "alice-heldout") or (path.parents[1] / src.source).exists(), (
                src.source
            )
