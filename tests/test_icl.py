"""In-context learning prompts: demonstration choice and token layout for both families."""

from __future__ import annotations

from collections import Counter

from dpzo.baselines.icl import choose_demonstrations, encode_with_demonstrations
from dpzo.data.splits import Example

from .tiny import make_clf


def test_demonstrations_are_balanced_and_seeded():
    train = [Example([f"x{i}"], i % 3) for i in range(30)]
    a = choose_demonstrations(train, 6, 3, seed=1)
    assert Counter(e.label for e in a) == {0: 2, 1: 2, 2: 2}
    assert [e.texts for e in a] == [e.texts for e in choose_demonstrations(train, 6, 3, seed=1)]
    assert [e.texts for e in a] != [e.texts for e in choose_demonstrations(train, 6, 3, seed=2)]
    small = [Example(["only"], 0)] + [Example([f"y{i}"], 1) for i in range(5)]
    assert Counter(e.label for e in choose_demonstrations(small, 4, 2, seed=0)) == {0: 1, 1: 3}


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_causal_prompt_is_bos_demos_with_labels_then_query(tokenizer):
    clf = make_clf(tokenizer, "causal")
    demos = [Example(["fun film"], 1), Example(["dull plot"], 0)]
    enc = encode_with_demonstrations(clf, [Example(["a movie"], 1)], demos)
    seq = enc.input_ids[0, : int(enc.lengths[0])].tolist()
    # causal template "*cls**sent_0*_It_was" + label word for each demonstration, query last
    expected = (
        [tokenizer.bos_token_id]
        + ids(tokenizer, "fun film")
        + ids(tokenizer, " It was")
        + ids(tokenizer, " good")
        + ids(tokenizer, "dull plot")
        + ids(tokenizer, " It was")
        + ids(tokenizer, " bad")
        + ids(tokenizer, "a movie")
        + ids(tokenizer, " It was")
    )
    assert seq == expected
    assert int(enc.score_pos[0]) == len(seq) - 1


def test_masked_prompt_is_query_then_demos_with_the_label_in_place_of_the_mask(tokenizer):
    clf = make_clf(tokenizer, "mlm")
    enc = encode_with_demonstrations(clf, [Example(["a movie"], 0)], [Example(["fun film"], 1)])
    seq = enc.input_ids[0, : int(enc.lengths[0])].tolist()
    query = (
        [tokenizer.cls_token_id]
        + ids(tokenizer, "a movie It was")
        + [tokenizer.mask_token_id]
        + ids(tokenizer, ".")
        + [tokenizer.sep_token_id]
    )
    demo = ids(tokenizer, "fun film It was good .") + [tokenizer.sep_token_id]
    assert seq == query + demo
    assert seq[int(enc.score_pos[0])] == tokenizer.mask_token_id


def test_demonstrations_that_do_not_fit_are_dropped_and_the_query_kept(tokenizer):
    clf = make_clf(tokenizer, "causal")
    clf.max_length = 11  # query: 5 tokens; first demo: 7 (dropped); second: 4 (kept)
    demos = [Example(["fun film very fun"], 1), Example(["dull"], 0)]
    enc = encode_with_demonstrations(clf, [Example(["a movie"], 1)], demos)
    seq = enc.input_ids[0, : int(enc.lengths[0])].tolist()
    assert len(seq) == 9 and seq[-4:] == ids(tokenizer, "a movie It was")
    assert ids(tokenizer, " bad")[0] in seq and ids(tokenizer, " good")[0] not in seq[:-4]
