"""The checkpointer's registry of stateful parts: a part registered by name where the run is built is saved
under that name and restored from it, with no change to the checkpointer."""

from __future__ import annotations

import logging

import pytest
import torch

from fastclip.checkpoint.checkpointer import Checkpointer, StatefulParts
from fastclip.checkpoint.files import CheckpointError
from fastclip.losses.openclip import OpenCLIPObjective
from fastclip.train.progress import Progress


class MixingWeights:
    """A part the checkpointer has never heard of (say, a data-mixing state)."""

    def __init__(self) -> None:
        self.weights = torch.full((3,), 1 / 3)
        self.updates = 0

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.weights.copy_(state["weights"])
        self.updates = state["updates"]


def checkpointer(directory, required: tuple[str, ...] = (), **states) -> Checkpointer:
    model = torch.nn.Linear(2, 2)
    parts = StatefulParts(model, OpenCLIPObjective(False, False, 0, 1),
                          {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1), **states}, required=required)
    return Checkpointer(directory, parts, steps_per_epoch=4)


def test_a_registered_part_is_saved_under_its_name_and_restored(tmp_path):
    trained = MixingWeights()
    trained.weights.copy_(torch.tensor([0.5, 0.3, 0.2]))
    trained.updates = 7
    path = checkpointer(tmp_path, mixing=trained).save(Progress(1, 0, 4), "epoch_1")
    saved = torch.load(path, weights_only=True)
    assert saved["mixing"]["updates"] == 7 and set(saved["state_dict"]) == {"weight", "bias"}
    fresh = MixingWeights()
    progress, restored = checkpointer(tmp_path, mixing=fresh).restore([path], explicit=True)
    assert (progress, restored) == (Progress(1, 0, 4), path)
    assert fresh.updates == 7 and torch.equal(fresh.weights, trained.weights)


def test_a_part_the_checkpoint_predates_starts_afresh(tmp_path, caplog):
    path = checkpointer(tmp_path).save(Progress(1, 0, 4), "epoch_1")
    added = MixingWeights()
    with caplog.at_level(logging.WARNING, logger="fastclip"):
        checkpointer(tmp_path, mixing=added).restore([path], explicit=True)
    assert added.updates == 0 and "holds no 'mixing' state" in caplog.text


def test_a_checkpoint_without_a_required_part_is_refused(tmp_path):
    path = checkpointer(tmp_path).save(Progress(1, 0, 4), "epoch_1")
    with pytest.raises(CheckpointError, match="holds no 'mixing' state, so it cannot be resumed: to start from "
                                              "its weights, pass --pretrained"):
        checkpointer(tmp_path, required=("mixing",), mixing=MixingWeights()).restore([path], explicit=True)


@pytest.mark.parametrize("name", ["state_dict", "ranks", "epoch"])
def test_a_part_cannot_take_the_name_of_another_entry(name, tmp_path):
    with pytest.raises(ValueError, match=name):
        checkpointer(tmp_path, **{name: MixingWeights()})
