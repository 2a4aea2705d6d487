"""LongRoPE2's search: genome constraints, determinism, exact resume from the checkpoint, needle fitness
documents, and the command end to end (killed and resumed) on a tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llamalab.errors import LlamalabError
from llamalab.longctx.longrope_search import (
    Checkpoint,
    Search,
    SearchSettings,
    full_factors,
    longrope_scaling,
)
from llamalab.longctx.needle_ppl import needle_samples

SETTINGS = dict(target_len=16384, original=8192, head_dim=64, theta=1e5, population=10, iterations=3,
                parents=5, mutations=4, crossovers=4, seed=3)  # fmt: skip


def bowl(target: np.ndarray):
    """A smooth fitness with its minimum at `target` (so the search has something to find)."""
    return lambda factors: float(np.sum((np.array(factors) - target) ** 2))


def test_genomes_keep_the_constraints_and_the_search_improves():
    s = SearchSettings(**SETTINGS)
    assert s.critical == 19 and s.scale == 2.0 and s.max_scale == 4.0  # SmolLM2: reference's cd = 20 - 1
    target = full_factors(np.linspace(3.3, 3.9, 32 - s.critical), s.critical)
    search = Search(s, bowl(target), progress=False)
    result = search.run()
    genomes = [g for g, _ in search.history]
    assert len(genomes) == s.evaluations == 10 + 3 * 8
    for g in genomes:
        assert np.all(np.diff(g) >= 0) and g[0] >= s.scale - 1e-9 and g[-1] <= s.max_scale + 1e-9
        assert np.allclose(g / s.step, np.round(g / s.step))  # on the 0.01 grid
    assert len({tuple(np.round(g, 6)) for g in genomes}) == len(genomes)  # no duplicates
    assert all(b <= a for a, b in zip(result.curve, result.curve[1:]))  # parents survive: never worse
    assert result.curve[-1] < result.curve[0]
    full = np.array(result.factors)
    # Below the critical pair: the geometric ramp lambda_r^(i/r), starting from 1 (no interpolation).
    np.testing.assert_allclose(full[: s.critical], full[s.critical] ** (np.arange(s.critical) / s.critical))
    assert np.all(np.diff(full) >= 0)


def test_resume_after_a_kill_reaches_the_uninterrupted_result(tmp_path):
    s = SearchSettings(**SETTINGS)
    target = full_factors(np.linspace(2.2, 3.9, 32 - s.critical), s.critical)
    whole = Search(s, bowl(target), progress=False).run()

    calls = {"n": 0}

    def dies_after_15(factors):
        calls["n"] += 1
        if calls["n"] > 15:
            raise KeyboardInterrupt  # a kill between two evaluations
        return bowl(target)(factors)

    path = tmp_path / "ckpt.json"
    with pytest.raises(KeyboardInterrupt):
        Search(s, dies_after_15, Checkpoint(path, s), progress=False).run()
    assert len(json.loads(path.read_text())["evaluated"]) == 15
    resumed = Search(s, bowl(target), Checkpoint(path, s), progress=False).run()
    assert resumed.evaluated == s.evaluations - 15  # nothing evaluated twice
    assert resumed.factors == whole.factors and resumed.fitness == whole.fitness
    assert resumed.curve == whole.curve
    other = SearchSettings(**{**SETTINGS, "seed": 4})
    with pytest.raises(LlamalabError, match="checkpoint of another search"):
        Checkpoint(path, other)


def test_v1_space_starts_from_yarns_ramp_and_searches_every_pair_in_1_to_1_plus_s():
    s = SearchSettings(**SETTINGS, space="v1", mscale="yarn")
    assert s.critical == 0 and s.max_scale == 3.0 and s.low == 1.0
    assert s.attention_factor == pytest.approx(0.1 * np.log(2) + 1)
    search = Search(s, bowl(np.linspace(1.0, 2.8, 32)), progress=False)
    (init,) = search.initial_genomes()
    # SmolLM2 (d 64, theta 1e5, L0 8192): YaRN's ramp runs from pair floor(10.3) = 10 (32 rotations in L0) to
    # ceil(19.9) = 20 (one rotation), so pairs <= 10 keep their frequency and pairs >= 20 are divided by s = 2.
    by_hand = [1.0] * 11 + [1 + (i - 10) / 10 for i in range(11, 20)] + [2.0] * 12
    np.testing.assert_allclose(init, by_hand, atol=1e-9)
    result = search.run()
    for g, _ in search.history:
        assert len(g) == 32 and np.all(np.diff(g) >= 0) and g[0] >= 1 - 1e-9 and g[-1] <= 3 + 1e-9
    assert result.fitness < search.history[0][1]  # improved on the YaRN start
    assert result.factors == [float(x) for x in min(search.history, key=lambda h: h[1])[0]]  # no ramp added
    scaling = longrope_scaling(result.factors, s)
    assert scaling["attention_factor"] == s.attention_factor and len(scaling["long_factor"]) == 32


def test_the_attention_factor_policies():
    su = SearchSettings(**SETTINGS).attention_factor
    assert su == pytest.approx(np.sqrt(1 + np.log(2) / np.log(8192)))  # transformers' longrope default
    assert SearchSettings(**SETTINGS, mscale="1.1").attention_factor == 1.1


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(target_len=8192), "must exceed the model's original context 8192"),
        (dict(critical=40), "--critical-pair must be in 1..31"),
        (dict(space="v3"), "--space must be one of v2, v1"),
        (dict(space="v1", critical=19), "--critical-pair belongs to --space v2"),
        (dict(mscale="big"), "--mscale must be su, yarn or a positive number"),
        (dict(mscale="-1"), "--mscale must be su, yarn or a positive number"),
        (dict(max_scale=1.5), "--max-scale must exceed s = 2"),
        (dict(parents=20), "parents <= population"),
    ],
)
def test_bad_search_settings(kw, message):
    with pytest.raises(LlamalabError, match=message):
        SearchSettings(**{**SETTINGS, **kw})


def test_needle_documents_have_the_target_length_and_the_answer_last(alice_text):
    from llamalab.io.tokenizer import Tokenizer
    from tests.tiny import tiny_bpe

    tok = Tokenizer(tiny_bpe(), eos_token="<|im_end|>")
    docs = needle_samples(tok, alice_text, 3000, 4, seed=1)
    assert [len(d.ids) for d in docs] == [3000] * 4
    for i, d in enumerate(docs):
        assert tok.decode(d.ids[d.answer_start :]).strip() == d.needle and len(d.needle) == 7
        assert i / 4 - 0.05 <= d.depth <= (i + 1) / 4 + 0.05  # one depth per quarter, at a line break
        assert f"wandering-age is: {d.needle}." in tok.decode(d.ids[: d.answer_start])


# Enough evaluations (6 + 30 x 4) that the run cannot end between two polls of its checkpoint on a fast,
# quiet machine (with 14 it did); each is a tiny model's 512 tokens, so the whole search is seconds.
ITERATIONS = "30"


def test_the_command_runs_is_killed_resumes_and_writes_a_usable_config(tiny_dir, tmp_path):
    out = tmp_path / "rope.json"
    cmd = [sys.executable, "-m", "llamalab.cli", "longrope", "search", "--model", str(tiny_dir), "--target-len",
           "512", "--out", str(out), "--samples", "1", "--population", "6", "--iterations", ITERATIONS, "--parents", "3",
           "--mutations", "2", "--crossovers", "2", "--seed", "1"]  # fmt: skip
    ckpt = tmp_path / "rope.json.checkpoint.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and len(json.loads(ckpt.read_text())["evaluated"]) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert not out.exists() and ckpt.exists()
    done = len(json.loads(ckpt.read_text())["evaluated"])
    finished = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert f"{done} already in" in finished.stdout
    report = json.loads(out.read_text())
    assert report["longrope_search"]["evaluations"] == 6 + int(ITERATIONS) * 4
    assert report["longrope_search"]["evaluated_in_this_run"] == 6 + int(ITERATIONS) * 4 - done
    best, yarn = report["longrope_search"]["best"], report["longrope_search"]["yarn"]
    assert best > 0 and yarn > 0
    # The file is a --rope-config every command takes.
    info = subprocess.run([sys.executable, "-m", "llamalab.cli", "info", "--model", str(tiny_dir), "--json",
                           "--rope-config", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert info.returncode == 0, info.stderr
    assert '"context": 512' in info.stdout or "512" in info.stdout
