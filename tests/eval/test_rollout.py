"""The rollout engine (refinery.tasks.rollout): greedy equal to ``model.generate`` per prompt under left
padding and bucketing, per-sequence stops on EOS and stop strings, seeded sampling, dropped rows."""
from __future__ import annotations

import pytest

NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 64-wide model: more threads only spin (and cost CPU on a shared machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm(tiny_causal_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_causal_lm_dir)


@pytest.fixture(scope="module")
def prompts():
    import torch

    g = torch.Generator().manual_seed(3)
    return [[0] + torch.randint(2, 512, (n,), generator=g).tolist() for n in (4, 11, 1, 7, 15, 2, 9)]


@pytest.fixture(scope="module")
def greedy(lm, prompts):
    from refinery.tasks.rollout import SamplingParams, sample

    return sample(*lm, prompts, SamplingParams(max_new_tokens=NEW, batch_size=3, logprobs=True))


def test_greedy_equals_generate_per_prompt_in_input_order(lm, prompts, greedy):
    import torch

    model, _ = lm
    assert greedy.batches == 3 and greedy.tokens == sum(len(c.ids) for c in greedy.completions)
    assert greedy.tokens_per_s > 0 and set(greedy.stats()) >= {"rollout_tokens", "rollout_tokens_per_s"}
    for p, c in zip(prompts, greedy.completions):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=1, temperature=None, top_p=None, top_k=None)
        assert c.ids == out[0, len(p):].tolist()
        assert c.finish_reason == ("eos" if c.ids[-1] == 0 else "length")
        assert len(c.logprobs) == len(c.ids) and all(lp <= 0 for lp in c.logprobs)


def test_buckets_group_similar_lengths_and_cover_every_prompt():
    from refinery.tasks.rollout import _chunks, buckets

    lengths = [5, 1, 9, 3, 9, 7, 2]
    groups = buckets(lengths, 3)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert [[lengths[i] for i in g] for g in groups] == [[9, 9, 7], [5, 3, 2], [1]]
    assert _chunks([16, 12, 10, 8, 5, 3, 2], 0.25) == [[0, 1], [2, 3], [4], [5], [6]]   # prefill chunks


def test_stop_strings_and_eos_stop_each_sequence_alone(lm, prompts, greedy):
    from refinery.tasks.rollout import SamplingParams, sample

    model, tok = lm
    base = [c for c in greedy.completions]
    ref = next(c for c in base if c.finish_reason == "length" and len(c.text) > 6)
    stop = ref.text[3:6]
    res = sample(model, tok, prompts, SamplingParams(max_new_tokens=NEW, batch_size=4, stop=(stop,)))
    stopped = 0
    for b, c in zip(base, res.completions):
        if stop in b.text:
            stopped += 1
            assert c.finish_reason == "stop" and c.text == b.text[:b.text.index(stop)]
            assert b.ids[:len(c.ids)] == c.ids and stop in tok.decode(c.ids, skip_special_tokens=True)
            assert stop not in tok.decode(c.ids[:-1], skip_special_tokens=True)
        else:
            assert (c.ids, c.text, c.finish_reason) == (b.ids, b.text, b.finish_reason)
    assert stopped >= 1 and stopped < len(prompts) or all(stop in b.text for b in base)

    eos = ref.ids[4]
    res = sample(model, tok, prompts, SamplingParams(max_new_tokens=NEW, batch_size=4, eos_ids=(eos, 0)))
    for b, c in zip(base, res.completions):
        hits = [i for i, t in enumerate(b.ids) if t in (eos, 0)]
        if hits:
            assert c.ids == b.ids[:hits[0] + 1] and c.finish_reason == "eos"
        else:
            assert c.ids == b.ids and c.finish_reason == "length"
    assert res.completions[base.index(ref)].ids == ref.ids[:ref.ids.index(eos) + 1]


def test_dropping_finished_rows_changes_nothing(lm, prompts, greedy):
    from refinery.tasks.rollout import SamplingParams, sample

    eos = greedy.completions[1].ids[2]
    kw = dict(max_new_tokens=NEW, batch_size=7, eos_ids=(eos, 0))
    drop = sample(*lm, prompts, SamplingParams(drop_fraction=0.0, **kw))
    keep = sample(*lm, prompts, SamplingParams(drop_fraction=2.0, **kw))
    assert [c.ids for c in drop.completions] == [c.ids for c in keep.completions]
    assert drop.batches == 1 and any(c.finish_reason == "eos" for c in drop.completions)


def test_seeded_sampling_is_reproducible(lm, prompts):
    from refinery.tasks.rollout import SamplingParams, sample

    def run(seed, **kw):
        p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=seed, batch_size=4,
                           logprobs=True, **kw)
        return [(c.ids, c.logprobs) for c in sample(*lm, prompts, p).completions]

    a = run(5)
    assert a == run(5) and a != run(6)
    assert all(len(ids) == len(lps) and all(lp <= 0 for lp in lps) for ids, lps in a)


def test_generate_goes_through_the_engine(tiny_causal_lm_dir, lm, greedy, prompts):
    from refinery.tasks.eval.generate import LoadedModel, generate, generate_many, prompt_ids

    model, tok = lm
    loaded = LoadedModel(str(tiny_causal_lm_dir), model, tok, "cpu")
    texts = ["Once upon a time", "The", "A much longer prompt than the others, to pad the rest"]
    many = generate_many(loaded, texts, max_new_tokens=8, batch_size=2)
    assert many == [generate(loaded, t, max_new_tokens=8) for t in texts]
    assert prompt_ids(tok, "The", chat=False)[0] == 0
    with pytest.raises(ValueError, match="empty prompt"):
        from refinery.tasks.rollout import sample

        sample(model, tok, [[]])


def test_padded_completions_are_what_a_trainer_scores(lm, prompts):
    """``padded``: completions right-padded with the pad id after their EOS, the mask 1 through the
    EOS (what ``reply_mask`` gives on ``generate``'s output), and seeded sampling from the global
    generator repeats (a trainer seeds it per rollout)."""
    import torch

    from refinery.tasks.align.ppo import reply_mask
    from refinery.tasks.rollout import SamplingParams, sample

    torch.manual_seed(11)
    first = sample(*lm, prompts, SamplingParams(max_new_tokens=NEW, temperature=1.0, batch_size=7)).completions
    eos = first[0].ids[0]   # the same seed draws the same first tokens: completion 0 ends at once
    p = SamplingParams(max_new_tokens=NEW, temperature=1.0, batch_size=7, eos_ids=(eos,))
    torch.manual_seed(11)
    res = sample(*lm, prompts, p)
    torch.manual_seed(11)
    assert [c.ids for c in sample(*lm, prompts, p).completions] == [c.ids for c in res.completions]
    ids, mask = res.padded(pad_id=1)
    assert ids.shape == (len(prompts), max(len(c.ids) for c in res.completions))
    for row, m, c in zip(ids.tolist(), mask.tolist(), res.completions):
        assert row[:len(c.ids)] == c.ids and set(row[len(c.ids):]) <= {1} and sum(m) == len(c.ids)
    assert torch.equal(mask, reply_mask(ids, eos)) and res.completions[0].ids == [eos]
    assert torch.equal(res.padded(eos)[1], mask)   # pad == EOS: the mask still comes from the lengths


def test_suppressed_tokens_and_the_callers_stop(lm, prompts, greedy):
    """The generation config's suppress_tokens are never picked (greedy still equals generate's), and
    ``stop_when`` ends the live sequences after the token it was asked on (a server's cancel)."""
    import torch

    from refinery.tasks.rollout import SamplingParams, sample

    model, tok = lm
    banned = sorted({c.ids[0] for c in greedy.completions if c.ids})[:3]
    res = sample(model, tok, prompts, SamplingParams(max_new_tokens=NEW, greedy=True, suppress_ids=tuple(banned)))
    assert not {t for c in res.completions for t in c.ids} & set(banned)
    for p, c in zip(prompts, res.completions):
        x = torch.tensor([p])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                             suppress_tokens=banned, pad_token_id=0)
        assert c.ids == out[0, len(p):].tolist()[:len(c.ids)]
    asked = []
    res = sample(model, tok, prompts[:1], SamplingParams(max_new_tokens=NEW, greedy=True),
                 stop_when=lambda: asked.append(1) or len(asked) >= 3)
    assert len(res.completions[0].ids) == 3 and res.completions[0].finish_reason == "stop"
