"""The counter-based z stream (``dpzo.zo.philox``): Philox4x32-10 against its published known
answers, a pure function of (seed, index) whatever the blocks, and standard normal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dpzo.zo import flat as flat_module
from dpzo.zo import philox
from dpzo.zo.flat import gaussian_chunks, gaussian_direction

# Random123's known-answer vectors for philox4x32_10: (counter, key, output)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox4x32_10_known_answers(counter, key, expected):
    seed = key[0] | key[1] << 32
    out = philox.philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), philox.philox_keys(seed))
    assert tuple(int(x) for x in out) == expected


def test_z_is_a_function_of_seed_and_index_only(monkeypatch):
    seed, n = 2**62 + 12345, 5000
    whole = gaussian_direction(seed, n)
    for chunk in (1, 7, 1024, 4999):
        pieces = torch.cat([z for _, z in gaussian_chunks(seed, n, dtype=torch.float32, device="cpu", chunk=chunk)])
        assert torch.equal(pieces, whole)
    # any window of the index range, e.g. a part of a placed model starting inside a block
    monkeypatch.setattr(philox, "CPU_SLICE", 3)
    assert torch.equal(philox.normal_(torch.empty(100), seed, 1234), whole[1234:1334])
    # float64 holds the float32 values exactly
    assert torch.equal(gaussian_direction(seed, n, dtype=torch.float64), whole.double())
    assert not torch.equal(gaussian_direction(seed + 1, n), whole)
    # indices beyond 2**32 (models of more than 4 B coordinates) use the counter's high word
    high = philox.normal_(torch.empty(4), seed, 2**32)
    assert not torch.equal(high, whole[:4])
    monkeypatch.setattr(flat_module, "DIRECTION_CHUNK", 10)
    assert torch.equal(gaussian_direction(seed, n), whole)


def test_z_is_standard_normal():
    z = gaussian_direction(7, 200_000, dtype=torch.float64).numpy()
    assert abs(z.mean()) < 4 / np.sqrt(z.size) and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # independent across seeds and neighbouring indices
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01
    other = gaussian_direction(8, 200_000, dtype=torch.float64).numpy()
    assert abs(np.corrcoef(z, other)[0, 1]) < 0.01
