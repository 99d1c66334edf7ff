"""The ZeRO slice format (llama_recipe/zero_slices.py) in-process: each rank's slices reassemble into
exactly the slice ColossalAI 0.5.0 would give a rank under another number of replicas, and the
safetensors files are written as the safetensors library reads them. (Real zero2 runs saving and
resuming in this format across 1 and 2 processes: tests/test_elastic.py, tests/test_checkpoints.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llama_recipe.files import write_safetensors
from llama_recipe.zero_slices import rank_file, reslice


def colossalai_slices(whole: torch.Tensor, world: int) -> list[torch.Tensor]:
    """LowLevelZeroOptimizer's rule (0.5.0, load_state_dict): flatten, zero-pad to a multiple of the
    world size, split in equal slices; rank r keeps slice r."""
    flat = whole.flatten()
    flat = torch.nn.functional.pad(flat, [0, (world - flat.numel() % world) % world])
    return list(flat.split(flat.numel() // world))


@pytest.mark.parametrize("numel", [1, 7, 12, 13])
@pytest.mark.parametrize("old_world", [1, 2, 3, 4])
def test_slices_saved_under_one_world_size_reslice_as_colossalai_would_under_another(tmp_path, numel, old_world):
    whole = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    for r, part in enumerate(colossalai_slices(whole, old_world)):
        write_safetensors({"0.exp_avg": part, "0.step": torch.tensor(5.0)}, rank_file(tmp_path, r))
    files = [safe_open(str(rank_file(tmp_path, r)), framework="pt") for r in range(old_world)]
    entry = dict(numel=numel, shape=[numel], sliced=["exp_avg"], whole=["step"], values={"note": 1})
    for world in (1, 2, 3, 5):  # 5 > 1 element: some slices are all padding
        expected = colossalai_slices(whole, world)
        for r in range(world):
            state = reslice(entry, 0, files, old_world, r, world)
            assert torch.equal(state["exp_avg"], expected[r]), (numel, old_world, world, r)
            assert state["step"].item() == 5.0 and state["note"] == 1


def test_safetensors_written_from_memory_read_back_bit_for_bit(tmp_path):
    tensors = {
        "weight": torch.randn(5, 3),
        "bf16": torch.randn(4, 2).bfloat16(),
        "ids": torch.arange(7),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0),
        "flag": torch.tensor([True, False]),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(tensors, path, {"note": "ours"})
    read = load_file(str(path))
    assert read.keys() == tensors.keys()
    assert all(
        read[k].dtype == t.dtype and read[k].shape == t.shape and torch.equal(read[k], t) for k, t in tensors.items()
    )
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "ours", "format": "pt"}
        assert torch.equal(f.get_slice("ids")[2:5], torch.arange(2, 5))
