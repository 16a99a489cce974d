"""Run `llamatron train` in this process, dying abruptly (os._exit, no cleanup) at a chosen point of the
N-th checkpoint save. Used by test_checkpoint_crash.py; argv: CRASH_POINT SAVE_NUMBER train-args..."""

from __future__ import annotations

import os
import sys

import torch.distributed.checkpoint as dcp

from llamatron.cli.main import main
from llamatron.train import checkpointing

point, save_number, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = {"save": 0}
real_save, real_marker, real_rename = dcp.save, checkpointing.atomic_write_bytes, checkpointing.Path.rename


def dcp_save(state, *, checkpoint_id):
    calls["save"] += 1
    if calls["save"] == save_number and point == "during_shards":
        (checkpointing.Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        os._exit(137)
    return real_save(state, checkpoint_id=checkpoint_id)


def rename(self, target):
    if calls["save"] == save_number and point == "before_rename" and self.name.endswith(".tmp"):
        os._exit(137)
    return real_rename(self, target)


def marker(path, data):
    if calls["save"] == save_number and point == "before_marker" and path.name == "latest":
        os._exit(137)
    return real_marker(path, data)


checkpointing.dcp.save = dcp_save
checkpointing.Path.rename = rename
checkpointing.atomic_write_bytes = marker
sys.exit(main(args))
