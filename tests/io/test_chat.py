"""Chat templates render exactly as transformers' apply_chat_template."""

import pytest

from llamalab.errors import LlamalabError
from llamalab.io.chat import render_chat
from tests.tiny import CHATML

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": 'Tell me a joke with "quotes" and <tags> & émojis 😀'},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_model_template_equals_transformers(smollm, smollm_path, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_list_of_parts_content_is_flattened():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat(CHATML, parts) == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"


def test_template_cannot_reach_python_internals():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match="unsafe|access"):
        render_chat(evil, [{"role": "user", "content": "x"}])


def test_template_errors_are_one_line():
    with pytest.raises(LlamalabError, match="does not parse"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])
    with pytest.raises(LlamalabError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])
    raising = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(LlamalabError, match="roles must alternate"):
        render_chat(raising, [{"role": "user", "content": "x"}])
