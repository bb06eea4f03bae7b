"""The downstream benchmark's seeded stream of pairs (`pairs.stream_pairs`) on the demo's real pairs."""

from __future__ import annotations

from itertools import islice

import numpy as np

from skindual import pairs


def test_a_small_selection_is_decoded_once_and_streams_as_if_decoded_every_epoch(demo_real, monkeypatch):
    """A selection of fewer distinct pairs than the shuffle buffer holds (a pretraining stage on a few synthetic
    pairs, say) is decoded once and kept: the stream is the one that decodes every epoch again, pair for pair,
    with each key as often as its count; a larger selection is never held."""
    index = pairs.read_index(str(demo_real))
    selection = pairs.selection_of(index.slice(0, 40))
    weighted = {shard: {key: 1 + i % 3 for i, key in enumerate(keys)} for shard, keys in selection.items()}
    decoded = []
    monkeypatch.setattr(pairs, "decode_sample", lambda sample, size, real=pairs.decode_sample: (
        decoded.append(sample["__key__"]) or real(sample, size)))

    def first(n: int, buffer_size: int = 64, hold: bool = True) -> list[dict]:
        decoded.clear()
        stream = pairs.stream_pairs([(str(demo_real), weighted)], 16, seed=3, buffer_size=buffer_size, hold=hold)
        return list(islice(stream, n))

    held, fresh = first(400), first(400, hold=False)
    assert len(decoded) > 200  # decoding every epoch: the 40 pairs over and over (about 6 epochs)
    assert [p["key"] for p in held] == [p["key"] for p in fresh]
    assert all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
               for a, b in zip(held, fresh))
    first(400)
    assert sorted(decoded) == sorted(k for keys in selection.values() for k in keys)  # each once
    # one epoch holds each key as often as its count
    counts = {k: c for keys in weighted.values() for k, c in keys.items()}
    epoch = first(sum(counts.values()), buffer_size=1)
    assert {k: [p["key"] for p in epoch].count(k) for k in counts} == counts
    first(200, buffer_size=39)  # more distinct pairs than the buffer: nothing held, each epoch decodes again
    assert len(decoded) > 40
