"""The random streams of a training phase on one rank, their seeds, and checkpointing them.

Three streams, each seeded from the run's seed, the phase and (where it must differ) the rank:
- data order: a CPU generator, the same on every rank (each rank takes its share of one permutation);
- augmentation: a generator on the training device, one stream per rank;
- the global generators (dropout and anything else drawing from torch's default), one per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Multipliers of the run's seed and the phase id: distinct primes, so that the streams of different
# seeds, phases and ranks do not start from the same seed.
_DATA, _STREAM, _PHASE_AUG, _PHASE_GLOBAL = 1009, 7919, 131, 104729


def stream_seeds(seed: int, phase_id: int, rank: int) -> tuple[int, int, int]:
    """Seeds of (data order, augmentation, global generators) for ``rank``."""
    return (
        seed * _DATA + phase_id,
        seed * _STREAM + phase_id * _PHASE_AUG + rank,
        seed * _STREAM + phase_id * _PHASE_GLOBAL + rank,
    )


@dataclass
class Streams:
    data: torch.Generator
    augment: torch.Generator
    seed: int
    phase_id: int
    rank: int

    @classmethod
    def for_rank(cls, seed: int, phase_id: int, rank: int, device: torch.device) -> Streams:
        s_data, s_aug, s_global = stream_seeds(seed, phase_id, rank)
        data = torch.Generator().manual_seed(s_data)
        augment = torch.Generator(device).manual_seed(s_aug)
        # Dropout masks differ per rank (each sees other samples); every rank starts from the same
        # weights, built before this.
        torch.manual_seed(s_global)
        return cls(data, augment, seed, phase_id, rank)

    def rank_state(self) -> dict:
        """This rank's augmentation and global generator states, tagged with their device type."""
        state = {
            "augment": {"device": self.augment.device.type, "state": self.augment.get_state()},
            "torch": torch.get_rng_state(),
        }
        if self.augment.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.augment.device)
        return state


def restore_streams(streams: Streams, ckpt: dict, rank: int) -> list[str]:
    """Continue the streams saved in ``ckpt``; returns notes on what could not continue exactly.

    A rank the checkpoint has no state for (more ranks than were saved), or an augmentation stream
    saved on another device type (CPU vs CUDA generators differ), gets a fresh stream seeded from
    the run's seed, the rank and the position, never a copy of another rank's stream.
    """
    streams.data.set_state(ckpt["g_data"])
    saved = ckpt.get("streams", [])
    position = ckpt["epoch"] * 1_000_003 + ckpt["step"]
    fresh = stream_seeds(streams.seed + position, streams.phase_id, rank)
    if rank >= len(saved):
        streams.augment.manual_seed(fresh[1])
        torch.manual_seed(fresh[2])
        return [
            f"no saved random state for this rank ({len(saved)} saved): fresh augmentation/dropout streams"
        ]
    mine, notes = saved[rank], []
    if mine["augment"]["device"] == streams.augment.device.type:
        streams.augment.set_state(mine["augment"]["state"])
    else:
        streams.augment.manual_seed(fresh[1])
        notes.append(f"augmentation stream saved on {mine['augment']['device']}: a fresh one continues")
    torch.set_rng_state(mine["torch"])
    if streams.augment.device.type == "cuda":
        if "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], streams.augment.device)
        else:
            torch.cuda.manual_seed(fresh[2])
    return notes
