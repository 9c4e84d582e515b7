"""``dpzo bench``: the zeroth-order step against the released code's style, side by side.

For each model (built from its config with random weights: nothing is downloaded) and one
fixed batch on one device, it measures

* ``forward``: one batched forward of the per-example prompt loss (a ZO step needs two);
* ``official-style``: the step as the released DP-ZOSO / DPZero / MeZO code runs it
  (:func:`dpzo.bench.official.official_style_train`): z regenerated per tensor after
  ``torch.manual_seed`` for each of the four passes over the weights (+beta, -2 beta, +beta,
  update), the per-example losses pulled out of the batch one ``.item()`` at a time, clip,
  noise and sum in Python, in the model's dtype without autocast;
* ``dpzo``: :func:`dpzo.zo.loop.train_zo` itself, the code every training cell runs;

for the methods ``dp-zoso``, ``dp-zopo`` (a random mask of ``mask_ratio`` of the coordinates)
and ``mezo``, and reports milliseconds per step, the ratio to two forwards, the speed-up over
the official style and the peak GPU memory over the inference peak.

Both compute the same mathematics (see :mod:`dpzo.bench.official`), so only the mechanics differ.

With ``offload`` including ``streamed``, the model is then moved to host memory and the same
methods run streamed (``dpzo.zo.streamed``: blocks uploaded once per step, in place), reported
as ``impl: dpzo-streamed`` beside the resident in-place run: the step-time ratio and the peak
GPU memory against 3 blocks + the resident modules + the activations.

On the CPU without ``--models``, it runs the CPU targets (:data:`dpzo.bench.targets.CPU_TARGETS`):
``opt-125m`` and ``roberta-base`` at the batch shape each target is stated for (``opt-125m@8x64``,
``opt-125m@16x128``, ...) on one thread, and first z alone: ``dpzo.zo.philox.normal_`` against
``torch.randn`` filling one float32 vector, on one thread and on every core.

Every batch is the same: n equals the batch size, so Poisson sampling at q = 1 takes every
example each step (and MeZO's sampling without replacement a permutation of them).

The modules (importing the package loads nothing: ``dpzo --help`` stays instant):

* :mod:`dpzo.bench.catalogue`: the models (transformers configs of the released sizes and their
  CPU stand-ins), built with random weights, their fixed batches, and the ``model@BxS`` run names;
* :mod:`dpzo.bench.official`: the released code's step, rewritten as a reference;
* :mod:`dpzo.bench.timing`: the step settings and one timed run of each kind (z alone among them);
* :mod:`dpzo.bench.run`: a model's grid of runs and the JSON record of a benchmark;
* :mod:`dpzo.bench.targets`: the ratios each run is judged by, the issue's targets and the
  table for people;
* :mod:`dpzo.bench.cli`: the ``dpzo bench`` command line;
* :mod:`dpzo.bench.acceptance`: the acceptance run for a bare GPU box (``scripts/gpu-check.sh``),
  which the CPU runs with tiny models in CI.
"""
