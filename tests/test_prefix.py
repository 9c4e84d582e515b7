"""Prefix tuning against an independent implementation: peft's PrefixTuning.

peft hands the prefix to the model as a key/value cache, so the model places the real tokens at
positions P..P+n-1; ``dpzo.models.prefix`` keeps them at 0..n-1 (as MeZO and Li & Liang do).
With the positions shifted by hand the two must agree exactly, and without the shift they must
not (the documented reason for our own implementation).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from dpzo.models.prefix import install_prefix, prefix_modules

from .tiny import make_clf, tiny_llama, word_tokenizer

P, N = 3, 7


def _tiny(family: str) -> transformers.PreTrainedModel:
    if family == "llama":
        return tiny_llama()
    return make_clf(word_tokenizer(), "causal").model


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_prefix_equals_peft_prefix_tuning_with_positions_shifted(family):
    peft = pytest.importorskip("peft")
    ours = _tiny(family)
    reference = copy.deepcopy(ours)
    install_prefix(ours, P, seed=1)
    theirs = peft.get_peft_model(reference, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    theirs.prompt_encoder.double()
    # peft's table: one row per virtual token holding, layer by layer, the keys then the values
    # with heads flattened ([P, layers * 2 * kv_heads * head_dim]).
    rows = [t.detach().permute(1, 0, 2).reshape(P, -1) for m in prefix_modules(ours) for t in (m.key, m.value)]
    table = theirs.prompt_encoder["default"].embedding.weight
    assert table.shape == (P, sum(r.shape[1] for r in rows))
    with torch.no_grad():
        table.copy_(torch.cat(rows, dim=1))
        ids = torch.randint(3, 50, (2, N), generator=torch.Generator().manual_seed(0))
        reference_logits = theirs(input_ids=ids).logits
        shifted = ours(input_ids=ids, position_ids=torch.arange(P, P + N).expand(2, -1)).logits
        unshifted = ours(input_ids=ids).logits
    torch.testing.assert_close(shifted, reference_logits, rtol=0, atol=1e-12)
    # our prefix leaves the real tokens at their own positions, peft's does not
    assert float((unshifted - reference_logits).abs().max()) > 1e-4


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_prefix_under_cached_generation_equals_uncached(family):
    """Generation (SQuAD, DROP) decodes with a key/value cache that holds the real tokens' keys
    only; the prefix is put in front at every step, so cached decoding scores every new token
    exactly as recomputing the whole sequence does."""
    model = _tiny(family)
    install_prefix(model, P, seed=2)
    ids = torch.randint(3, 50, (2, N), generator=torch.Generator().manual_seed(1))
    runs = {}
    for cached in (True, False):
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=4,
                do_sample=False,
                use_cache=cached,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        runs[cached] = out
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    torch.testing.assert_close(torch.stack(runs[True].logits), torch.stack(runs[False].logits), rtol=0, atol=1e-12)
