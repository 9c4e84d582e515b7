"""What one zeroth-order step costs on the CPU, beside the inference it is meant to resemble.

    PYTHONPATH=<a checkout>/src python scripts/measure_step_cost.py --out cost.json

Builds a random OPT-125M-shaped causal LM (≈125 M parameters, fp32; no download) and a batch of
B random sequences scored at their last token, then measures with two dispatch modes
(``TorchDispatchMode``): one follows every tensor storage an op creates until it is freed (the
live bytes and their peak, as torch's ``MemTracker`` does, which refuses a module called more
than once), one counts host waits and copies:

* the tracked peak of live tensor bytes of one inference forward (no grad) on the batch;
* the tracked peak of building the parameter store (the first flatten) and of DP-ZOSO steps in
  place (q = 1, so every step's batch is the same B examples as the forward);
* the host synchronisations per step (``aten::_local_scalar_dense``: every ``.item()``,
  ``bool(t)``, ``int(t)``) and the bytes copied between devices (``_to_copy`` / ``copy_``
  across devices; zero when everything is on the CPU, by construction);
* wall time per step against one forward.

It imports only what every version of the package since the flat buffer has (``train_zo`` and
either ``zo.store.build_store`` or ``zo.flat.FlatParameters``), so the same script measures two
checkouts side by side.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes and their peak: every storage an op returns is counted until Python frees
    it (storages keep their Python object alive while in use, so a weakref finalizer sees the free)."""

    def __init__(self, *external: torch.nn.Module | torch.Tensor) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        for item in external:
            tensors = [*item.parameters(), *item.buffers()] if isinstance(item, torch.nn.Module) else [item]
            for t in tensors:
                self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or storage.device.type == "meta":
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class Counts(TorchDispatchMode):
    """Host synchronisations and bytes copied across devices, op by op."""

    def __init__(self) -> None:
        super().__init__()
        self.host_syncs = 0
        self.copied = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__
        if name.startswith("_local_scalar_dense"):
            self.host_syncs += 1
        elif name.startswith(("_to_copy", "copy_")) and args and isinstance(args[0], torch.Tensor):
            src = args[1] if name.startswith("copy_") else args[0]
            dst = args[0] if name.startswith("copy_") else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                self.copied += src.numel() * src.element_size()
        return out


def tracked_peak(fn, *external) -> tuple[int, object]:
    """(peak live tensor bytes while ``fn`` runs, its result), the tensors of ``external`` counted as live."""
    gc.collect()
    tracker = LiveBytes(*external)
    with tracker:
        result = fn()
    return tracker.peak, result


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def build_store(model: torch.nn.Module):
    try:
        from dpzo.zo.store import build_store as build

        return build(model, master_dtype=None), "store"
    except ImportError:  # before the ParameterStore contract
        from dpzo.zo.flat import FlatParameters

        return FlatParameters(model, master_dtype=None), "flat"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import OPTConfig, OPTForCausalLM

    from dpzo.methods.hyperparameters import ZOHyperparameters
    from dpzo.privacy.mechanisms import NoisySum
    from dpzo.privacy.secret import SecretRandom
    from dpzo.zo.loop import train_zo

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12)
    model = OPTForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    b, length = args.batch_size, args.seq_len
    tokens = torch.randint(4, config.vocab_size, (b, length))
    targets = torch.randint(4, config.vocab_size, (b,))

    def per_example_loss(index) -> torch.Tensor:
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        logits = model(input_ids=tokens[index]).logits[:, -1, :]
        return torch.nn.functional.cross_entropy(logits, targets[index], reduction="none")

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return per_example_loss(np.arange(b))

    inference_peak, _ = tracked_peak(forward, model, tokens, targets)
    forward_s = min(_seconds(forward) for _ in range(3))

    store_peak, (store, kind) = tracked_peak(lambda: build_store(model), model, tokens, targets)
    # one log window over all steps: the host waits counted are the steps' own plus one log line
    hp = ZOHyperparameters(steps=args.steps, batch_size=b, lr=1e-6, clip=1.0, log_every=args.steps)
    counts = Counts()

    def steps() -> dict:
        kw = {kind: store}
        with counts if counting else contextlib.nullcontext():
            return train_zo(
                model,
                per_example_loss,
                b,  # q = 1: every step's batch is the forward's B examples
                hp,
                method="dp-zoso",
                run_seed=13,
                noise=NoisySum("gaussian", 1.0, float(b)),
                secret=SecretRandom(insecure_test_seed=5),
                master_dtype=None,
                **kw,
            )

    counting = True
    step_peak, history = tracked_peak(steps, model, tokens, targets)
    counting = False  # then timed without the dispatch modes, whose per-op cost would dominate
    started = time.perf_counter()
    steps()
    step_s = (time.perf_counter() - started) / args.steps
    out = {
        "model": "OPT-125M shape, random, fp32",
        "n_params": n_params,
        "weight_mb": round(n_params * 4 / 2**20, 1),
        "batch": [b, length],
        "threads": args.threads,
        "inference_peak_mb": round(inference_peak / 2**20, 1),
        "store_build_peak_mb": round(store_peak / 2**20, 1),
        "step_peak_mb": round(step_peak / 2**20, 1),
        "step_peak_over_inference": round(step_peak / inference_peak, 3),
        "store_build_peak_over_inference": round(store_peak / inference_peak, 3),
        "host_syncs_per_step": counts.host_syncs / args.steps,
        "copied_mb_per_step": counts.copied / 2**20 / args.steps,
        "forward_s": round(forward_s, 3),
        "step_s": round(step_s, 3),
        "step_over_two_forwards": round(step_s / (2 * forward_s), 2),
        "steps_run": history["steps_run"],
    }
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
