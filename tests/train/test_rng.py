"""Random streams of a phase: seeds, checkpointing, and resuming where the saved streams do not fit."""

import torch

from supcon.core.runtime import resolve_precision
from supcon.train.rng import Streams, restore_streams, stream_seeds


def _ckpt(streams_by_rank, epoch=2, step=0):
    g = torch.Generator().manual_seed(1)
    return {"g_data": g.get_state(), "streams": streams_by_rank, "epoch": epoch, "step": step}


def test_seeds_differ_by_rank_except_the_data_order():
    a, b = stream_seeds(3, 2, 0), stream_seeds(3, 2, 1)
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]
    assert len({*stream_seeds(3, 1, 0), *stream_seeds(3, 2, 0), *stream_seeds(4, 1, 0)}) == 9


def test_saved_streams_continue_exactly():
    s = Streams.for_rank(0, 2, 0, torch.device("cpu"))
    torch.rand(3, generator=s.augment)
    saved = s.rank_state()
    expected = torch.rand(5, generator=s.augment), torch.rand(5)
    t = Streams.for_rank(0, 2, 0, torch.device("cpu"))
    assert restore_streams(t, _ckpt([saved]), 0) == []
    assert torch.equal(torch.rand(5, generator=t.augment), expected[0])
    assert torch.equal(torch.rand(5), expected[1])


def test_more_ranks_than_saved_get_fresh_streams_not_copies():
    saved = Streams.for_rank(0, 2, 0, torch.device("cpu")).rank_state()
    draws = []
    for rank in (0, 1, 2):
        s = Streams.for_rank(0, 2, rank, torch.device("cpu"))
        notes = restore_streams(s, _ckpt([saved]), rank)
        assert bool(notes) == (rank > 0)
        draws.append(torch.rand(4, generator=s.augment))
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])


def test_a_stream_saved_on_another_device_type_is_reseeded_with_a_note():
    saved = Streams.for_rank(0, 2, 0, torch.device("cpu")).rank_state()
    saved["augment"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}  # a CUDA state
    s = Streams.for_rank(0, 2, 0, torch.device("cpu"))
    notes = restore_streams(s, _ckpt([saved]), 0)
    assert notes and "saved on cuda" in notes[0]
    torch.rand(2, generator=s.augment)  # a working stream


def test_auto_precision_is_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    cuda = torch.device("cuda", 0)
    for capability, expected in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert resolve_precision("auto", cuda) is expected
    assert resolve_precision("fp32", cuda) is None
