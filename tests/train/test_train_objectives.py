"""The objectives' corruption statistics match their stated rates, on real tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train_fixtures import corpus_texts, corpus_tokens, one_thread, train_tokenizer_dir  # noqa: F401

from refinery.tasks.train.objectives import (IGNORE, corrupt_spans, mask_tokens, noise_mask, sentinel_token_ids,
                                    span_lengths, step_generator)


@pytest.fixture(scope="module")
def real_ids(corpus_tokens):
    ids = np.load(corpus_tokens["tokens"])
    return torch.from_numpy(ids[: 256 * 512].reshape(256, 512))


def test_mlm_rates(real_ids, train_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(train_tokenizer_dir))
    specials = tok.all_special_ids
    inputs, labels = mask_tokens(real_ids, mask_id=tok.mask_token_id, vocab_size=len(tok), special_ids=specials,
                                 generator=step_generator(0, 0, 0))
    is_special = torch.isin(real_ids, torch.tensor(specials))
    assert is_special.any(), "the corpus has EOS tokens between documents"
    selected = labels != IGNORE
    assert not (selected & is_special).any(), "special tokens are never selected"
    assert torch.equal(labels[selected], real_ids[selected])
    assert torch.equal(inputs[~selected], real_ids[~selected]), "unselected tokens are untouched"
    n_sel = int(selected.sum())
    rate = n_sel / int((~is_special).sum())
    assert abs(rate - 0.15) < 0.005, rate
    masked = (inputs == tok.mask_token_id) & selected
    unchanged = (inputs == real_ids) & selected
    randomised = selected & ~masked & ~unchanged
    # a random draw can hit the original token (1 in ~500): "unchanged" is 10% + a sliver
    assert abs(int(masked.sum()) / n_sel - 0.80) < 0.01
    assert abs(int(randomised.sum()) / n_sel - 0.10) < 0.01
    assert abs(int(unchanged.sum()) / n_sel - 0.10) < 0.01
    assert not torch.isin(inputs[randomised], torch.tensor(specials)).any(), "random tokens are never special"
    # deterministic: same generator seed -> same masks; another step -> other masks
    again, _ = mask_tokens(real_ids, mask_id=tok.mask_token_id, vocab_size=len(tok), special_ids=specials,
                           generator=step_generator(0, 0, 0))
    other, _ = mask_tokens(real_ids, mask_id=tok.mask_token_id, vocab_size=len(tok), special_ids=specials,
                           generator=step_generator(0, 1, 0))
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)


def test_span_noise_mask_rates():
    g = step_generator(1, 0, 0)
    L = 512
    num_noise, num_spans = span_lengths(L, 0.15, 3.0)
    assert (num_noise, num_spans) == (77, 26)
    noise_lengths, keep_first = [], 0
    for _ in range(200):
        m = noise_mask(L, 0.15, 3.0, g)
        assert m.shape == (L,) and int(m.sum()) == num_noise
        assert abs(int(m.sum()) / L - 0.15) < 0.002
        keep_first += int(not m[0])
        edges = torch.diff(torch.cat([torch.tensor([0]), m.int(), torch.tensor([0])]))
        starts, ends = torch.nonzero(edges == 1).squeeze(1), torch.nonzero(edges == -1).squeeze(1)
        assert len(starts) == num_spans
        noise_lengths += (ends - starts).tolist()
    assert keep_first == 200, "a sequence starts with non-noise, as in T5"
    assert abs(np.mean(noise_lengths) - 3.0) < 0.05
    assert min(noise_lengths) >= 1 and max(noise_lengths) > 3, "span lengths vary"


def test_span_corruption_round_trip(real_ids, train_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(train_tokenizer_dir))
    sentinels = sentinel_token_ids(tok)
    ids = real_ids[:16, :128]
    enc, dec = corrupt_spans(ids, sentinel_ids=sentinels, eos_id=tok.eos_token_id, generator=step_generator(0, 0, 0))
    num_noise, num_spans = span_lengths(128, 0.15, 3.0)
    assert enc.shape == (16, 128 - num_noise + num_spans + 1)
    assert dec.shape == (16, num_noise + num_spans + 1)
    sset = set(sentinels)
    for row, e, d in zip(ids.tolist(), enc.tolist(), dec.tolist()):
        assert e[-1] == d[-1] == tok.eos_token_id
        assert [t for t in e if t in sset] == sentinels[:num_spans] == [t for t in d if t in sset]
        # fill every sentinel of the input with the target's span: the original comes back
        spans, cur = {}, None
        for t in d[:-1]:
            if t in sset:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        restored = [x for t in e[:-1] for x in (spans[t] if t in sset else [t])]
        assert restored == row


def test_sentinels_required(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="sentinel"):
        sentinel_token_ids(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
