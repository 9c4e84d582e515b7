"""Offline "embedded demo": a synthetic world small enough to pretrain on a laptop CPU.

The real experiments fine-tune roberta-large / OPT on SST-2 and TREC. None of that can be
downloaded here, so this module generates a stand-in with the same *interfaces*:

* a pretraining corpus (one short document per line): movie-review-like sentences, three in
  four followed by a verdict sentence ("It was great."), questions annotated with their
  answer type (``Person: Who wrote Hamlet ?`` / ``Who wrote Hamlet ? Answer type: Person.``)
  and neutral filler documents;
* two labelled tasks written in the on-disk layouts LM-BFF uses for SST-2 (GLUE tsv with a
  header) and TREC (headerless csv), so the ordinary task loaders read them unchanged;
* a byte-level BPE tokenizer trained on the corpus and two tiny models (RoBERTa with an MLM
  head, OPT causal LM) pretrained with backprop and saved with ``save_pretrained``, so the
  pipeline loads them with ``AutoTokenizer`` / ``AutoModelFor*.from_pretrained(dir)``
  exactly like real checkpoints.

Design choices that make the prompts *meaningful but improvable*:

* Zero-shot headroom comes from a miscalibrated label-word prior, the way real LMs are
  miscalibrated. A negative verdict rarely says " terrible" (mostly bad / awful / poor)
  while " great" is the commonest positive one; verdicts after *mild* reviews ("rather
  flat") contradict them far more often than after strong ones. So the model tends to rate
  strongly negative sentences " terrible" but mildly negative ones " great": zero-shot is
  clearly above chance but far from perfect (68-74 % over eight pretrained models), and the
  spread of the negative sentences' scores keeps it from jumping between 50 and 100 %. Likewise answer types are mostly annotated with synonyms
  (Person, Place, Count, ...) and annotators fall back to the catch-all type (" Entity",
  Thing, ...) for many Description / Expression / Number questions, so zero-shot labels those
  " Entity". Fine-tuning mostly has to re-calibrate the label words, which zeroth-order
  methods do within a few hundred steps.
* Deviation from standard MLM (deliberate): with ordinary random masking a 2-layer RoBERTa
  never learns to put the sentiment into the ``<mask>`` of ``It was<mask>.`` within the
  budget (the signal is a tiny fraction of the targets), and SKEP-style masking of the
  sentiment words as well (each with probability 0.5) did not either in 1600 steps (tried
  at learning rate 2e-3). The
  RoBERTa model is therefore trained to fill exactly the prompts' slots: every verdict and
  answer-type word is masked, and nothing else. The causal OPT model uses the ordinary
  next-token objective on every token.
* The label words' dependence on the sentence appears abruptly after a plateau. Three things
  bring it well inside the step budget: untied input/output embeddings (``TIE_EMBEDDINGS``),
  a few frequent sentence adverbs in the reviews (``MARKERS``) and, for OPT, a constant
  learning rate before the final decay (``_lr_factor``).
* LM-BFF's TREC template puts the mask right after ``<s>`` and scores label words *with* a
  leading space (``<s><mask>: question``). So that the model has seen that, half of the
  documents are encoded with a leading space during pretraining (what RoBERTa's
  ``add_prefix_space`` would do).
* Everything is seeded; pretraining length is a step count, never a time budget, because
  zero-shot accuracy swings between nearby checkpoints. Each model takes about 80 s on one
  CPU thread (``DEFAULT_STEPS``).
"""
