"""Checkpoint IO: index (file | sharded dir | pickle | PEFT adapter), lazy reads, pairing, writing."""

from .checkpoint import Checkpoint, read_ref
from .opener import open_checkpoint
from .pairing import Pairing, pair_checkpoints

__all__ = ["Checkpoint", "open_checkpoint", "read_ref", "Pairing", "pair_checkpoints"]
