"""The generation engine: batching, streaming, stopping, context limits."""

import pytest
import torch

from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.generate.sampling import SamplingParams
from tests.tiny import tiny_chat_llm


@pytest.fixture(scope="module")
def tiny_llm():
    return tiny_chat_llm(context=96)


PROMPTS = ["Alice was", "The Queen of Hearts, she made some tarts, all on a summer day", "Why"]


def test_batched_rows_equal_unbatched(tiny_llm):
    alone = [
        tiny_llm.generate_sequences([p], max_new_tokens=12, ignore_eos=True)[0].output_ids for p in PROMPTS
    ]
    together = tiny_llm.generate_sequences(PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert [s.output_ids for s in together] == alone


def test_stream_concatenates_to_generate(tiny_llm):
    kw = dict(max_new_tokens=20, temperature=0.9, seed=7, ignore_eos=True)
    assert "".join(tiny_llm.stream(PROMPTS[1], **kw)) == tiny_llm.generate(PROMPTS[1], **kw)


def test_same_seed_same_sample(tiny_llm):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
    assert tiny_llm.generate(PROMPTS[0], **kw) == tiny_llm.generate(PROMPTS[0], **kw)


def test_a_seeded_batch_gives_row_i_seed_plus_i(tiny_llm):
    kw = dict(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    batch = tiny_llm.generate_sequences([PROMPTS[0]] * 3, seed=5, **kw)
    alone = [tiny_llm.generate_sequences([PROMPTS[0]], seed=5 + i, **kw)[0].output_ids for i in range(3)]
    assert [s.output_ids for s in batch] == alone  # reproducible row by row
    assert len({tuple(a) for a in alone}) == 3  # and one prompt repeated gives different samples


def test_finish_reasons(tiny_llm):
    (seq,) = tiny_llm.generate_sequences([PROMPTS[0]], max_new_tokens=5, ignore_eos=True)
    assert seq.finish_reason == "length" and len(seq.output_ids) == 5
    first = seq.output_ids[0]
    (seq,) = tiny_llm.generate_sequences([PROMPTS[0]], max_new_tokens=5, stop_token_ids=[first])
    assert seq.finish_reason == "stop" and seq.output_ids == [first] and seq.text == ""


def test_context_limits(tiny_llm):
    ids = list(range(5, 5 + 96))
    with pytest.raises(ContextLengthError, match="prompt has 96 tokens, but the context is 96"):
        tiny_llm.generate(ids, max_new_tokens=1)
    (seq,) = tiny_llm.generate_sequences([ids[:90]], max_new_tokens=50, ignore_eos=True)
    assert seq.finish_reason == "length" and seq.length == 96  # capped by the context, not an error
    with pytest.raises(LlamalabError, match="unknown generation option"):
        tiny_llm.generate("x", max_tokens=3)
    with pytest.raises(LlamalabError, match="empty"):
        tiny_llm.generate([], max_new_tokens=3)


def test_cancel_frees_the_row(tiny_llm):
    engine = tiny_llm.engine(max_batch=2, max_len=64)
    a = engine.add(tiny_llm.encode(PROMPTS[0]), SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.add(tiny_llm.encode(PROMPTS[2]), SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert engine.free_rows == []
    engine.step()
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and engine.free_rows == [a.row]
    assert len(engine.step()) == 1


@pytest.mark.slow
def test_default_model_batch_equals_single_and_answers(smollm):
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived", "1, 2, 3,"]
    alone = [smollm.generate_sequences([p], max_new_tokens=24)[0].output_ids for p in prompts]
    together = [s.output_ids for s in smollm.generate_sequences(prompts, max_new_tokens=24)]
    assert together == alone
    answer = smollm.chat("What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer


@pytest.mark.slow
def test_bf16_generation_runs(smollm):
    import llamalab

    bf16 = llamalab.load("smollm2-135m", dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    assert "Paris" in bf16.chat("What is the capital of France?", max_new_tokens=20)


# --- chunked prefill and prefix reuse ------------------------------------------------------------------

LONG = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do"
)


def run_one(engine, prompt, n=12):
    """Generate `n` greedy tokens for `prompt` alone; the finished sequence."""
    seq = engine.add(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
    while engine.active:
        engine.step()
    return seq


def test_chunked_prefill_gives_the_whole_prompts_result(tiny_llm):
    prompt = tiny_llm.encode(LONG * 2)[:80]
    whole = run_one(tiny_llm.engine(max_len=96), prompt)
    chunked = run_one(tiny_llm.engine(max_len=96, prefill_chunk=7), prompt)
    assert chunked.output_ids == whole.output_ids


def test_a_long_prompt_joins_a_running_batch_one_chunk_at_a_time(tiny_llm):
    engine = tiny_llm.engine(max_batch=2, max_len=96, prefill_chunk=16)
    running = engine.add(tiny_llm.encode("Why"), SamplingParams(max_new_tokens=40, ignore_eos=True))
    engine.step()
    long = tiny_llm.encode(LONG * 2)[:80]
    joining = engine.add(long, SamplingParams(max_new_tokens=5, ignore_eos=True))
    steps = 0
    while not joining.output_ids:
        events = engine.step()
        steps += 1
        assert [e.seq for e in events if e.seq is running], "the running sequence waited for a prefill"
    assert steps == 5  # 80 prompt tokens in chunks of 16, one chunk per step beside the running decode
    assert joining.output_ids == run_one(tiny_llm.engine(max_len=96), long, 1).output_ids


def test_a_shared_prompt_prefix_is_not_computed_again(tiny_llm):
    engine = tiny_llm.engine(max_len=96)
    first = tiny_llm.encode(LONG)
    run_one(engine, first)
    second = first[:20] + tiny_llm.encode(" and the rabbit")
    reused = run_one(engine, second)
    assert reused.reused == 20
    assert reused.output_ids == run_one(tiny_llm.engine(max_len=96), second).output_ids
    again = run_one(engine, second)  # the whole prompt but its last token is in the row now
    assert again.reused == len(second) - 1 and again.output_ids == reused.output_ids


def test_every_row_of_a_mixed_batch_equals_its_unbatched_result(tiny_llm):
    """Penalties, biases, filters, seeds and logprobs are computed for the whole batch at once; each row's
    tokens and log-probabilities must still be exactly those of the sequence generated alone."""
    settings = [
        dict(repetition_penalty=1.5, logprobs=3),
        dict(temperature=0.9, top_k=20, seed=1, presence_penalty=1.0, frequency_penalty=0.5),
        dict(temperature=1.2, top_p=0.8, min_p=0.02, seed=2, logit_bias={5: 3.0, 6: -100.0}, logprobs=0),
        dict(temperature=0.7, top_p=0.9, seed=3, logprobs=5),  # with row 2: two rows ranked in one sort
    ]
    prompts = [tiny_llm.encode(p) for p in PROMPTS + ["Down the rabbit hole"]]

    def run(indices):
        engine = tiny_llm.engine(max_batch=len(indices), max_len=96)
        params = [SamplingParams(max_new_tokens=24, ignore_eos=True, **settings[i]) for i in indices]
        seqs = {}
        for event in engine.run([prompts[i] for i in indices], params):
            seqs.setdefault(id(event.seq), event.seq)
        return [(s.output_ids, [(lp.token, lp.logprob, lp.top) for lp in s.logprobs]) for s in seqs.values()]

    together = run([0, 1, 2, 3])
    assert together == [run([i])[0] for i in range(4)]
    assert len({tuple(ids) for ids, _ in together}) == 4
