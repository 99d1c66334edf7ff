"""ZeRO's optimizer state saved as each rank's own slices, and reassembled for any number of replicas.

ColossalAI 0.5.0's `LowLevelZeroOptimizer` (-p zero2, zero2_cpu) keeps every state tensor of a
parameter (AdamW's `exp_avg` and `exp_avg_sq`, Collage's error terms) flattened, zero-padded to a
multiple of the data-parallel world size W and cut into W equal slices; rank r holds slice r. Its own
checkpoint all-gathers every tensor so that one rank can write the whole state: on 2 processes that
gather alone costs about as much as a plain `torch.save` of everything (docs/benchmarks.md). Here each
rank writes the slices it holds, at the same time as the others, and nothing is gathered:

    optimizer/
        zero-slices.json            W, and each parameter's size and shape (by its index in the
                                    optimizer's parameter groups), its sliced and whole state names
        pytorch_optim_group.bin     the parameter groups (lr, betas, ...): ColossalAI's own file
        zero-rank-<r>.safetensors   rank r's slices, "<index>.<name>"; whole tensors ("step") too

Loading under W' replicas reads, for each state tensor, exactly the range of the unpadded whole that
this rank's new slice covers, from whichever old slices hold it (safetensors reads byte ranges), so
a checkpoint moves between numbers of replicas as ColossalAI's own format does, without any rank
holding a whole tensor it does not need.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from .distributed import is_main_process
from .errors import UsageError
from .files import safetensors_header

INDEX = "zero-slices.json"
PARAM_GROUPS = "pytorch_optim_group.bin"  # the name ColossalAI's own format gives this file
FORMAT = "llama_recipe ZeRO slices, v1"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"zero-rank-{rank}.safetensors"


def holds_slices(directory: str | Path) -> bool:
    """Whether this optimizer directory was written in this format (else: ColossalAI's own)."""
    return (Path(directory) / INDEX).is_file()


def _slice_layout(optimizer) -> tuple[list, int, int]:
    """The torch optimizer's parameters in state-dict order, with the ZeRO rank and world size their
    slices follow (one data-parallel group for the whole model under zero2)."""
    from colossalai.zero.low_level._utils import get_nd_rank, get_nd_world_size

    params = [p for group in optimizer.optim.param_groups for p in group["params"]]
    groups = {id(optimizer.param_to_pg[optimizer.master_to_working_param[id(p)]]) for p in params}
    assert len(groups) == 1, "one data-parallel group expected under zero2"
    group = optimizer.param_to_pg[optimizer.master_to_working_param[id(params[0])]]
    return params, int(get_nd_rank(group)), int(get_nd_world_size(group))


def rank_slices(optimizer) -> tuple[dict[str, torch.Tensor], dict, int]:
    """This rank's optimizer state as it holds it (the live tensors, not copies), the index that
    describes every rank's file, and this rank. `optimizer`: the boosted LowLevelZeroOptimizer."""
    params, rank, world = _slice_layout(optimizer)
    tensors, entries = {}, []
    for index, master in enumerate(params):
        working = optimizer.master_to_working_param[id(master)]
        state = optimizer.optim.state.get(master, {})
        entry = dict(numel=working.numel(), shape=list(working.shape), sliced=[], whole=[], values={})
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                entry["sliced" if name != "step" else "whole"].append(name)
                tensors[f"{index}.{name}"] = value.detach().reshape(-1) if name != "step" else value.detach()
            else:
                entry["values"][name] = value
        entries.append(entry)
    return tensors, dict(format=FORMAT, world_size=world, params=entries), rank


def write_small_files(optimizer, directory: Path, index: dict) -> None:
    """Rank 0's index and parameter groups (small: written at once, also by --async_save)."""
    from colossalai.checkpoint_io.utils import save_param_groups

    if is_main_process():
        (directory / INDEX).write_text(json.dumps(index))
        save_param_groups(optimizer.optim.state_dict(), str(directory / PARAM_GROUPS))


def _read_range(files: list, name: str, old_slice: int, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of a whole (unpadded) state tensor, read from the old ranks' slices."""
    parts = []
    for old_rank in range(start // old_slice, (stop - 1) // old_slice + 1):
        lo, hi = max(start, old_rank * old_slice), min(stop, (old_rank + 1) * old_slice)
        base = old_rank * old_slice
        parts.append(files[old_rank].get_slice(name)[lo - base : hi - base])
    return torch.cat(parts)


def reslice(entry: dict, index: int, files: list, old_world: int, rank: int, world: int) -> dict:
    """One parameter's state as this rank's slice of it under `world` replicas."""
    numel = entry["numel"]
    old_slice, new_slice = -(-numel // old_world), -(-numel // world)  # ceil: the padded slice lengths
    start, stop = min(rank * new_slice, numel), min((rank + 1) * new_slice, numel)
    state = dict(entry["values"])
    for name in entry["whole"]:
        state[name] = files[0].get_tensor(f"{index}.{name}")
    for name in entry["sliced"]:  # a slice past the end (more ranks than elements) is all padding
        part = _read_range(files, f"{index}.{name}", old_slice, start, stop) if stop > start else None
        part = files[0].get_slice(f"{index}.{name}")[0:0] if part is None else part
        state[name] = torch.nn.functional.pad(part, [0, new_slice - part.numel()])
    return state


def _read_index(directory: Path) -> dict:
    """zero-slices.json, with the fields the loader reads and of the types it reads them as."""
    path = directory / INDEX
    try:
        index = json.loads(path.read_text())
        assert isinstance(index, dict) and index.get("format") == FORMAT
        assert type(index.get("world_size")) is int and index["world_size"] >= 1
        for entry in index["params"]:
            assert type(entry["numel"]) is int and entry["numel"] >= 0 and isinstance(entry["values"], dict)
            for kind in ("sliced", "whole"):
                assert isinstance(entry[kind], list) and all(isinstance(n, str) for n in entry[kind])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AssertionError, KeyError, TypeError):
        raise UsageError(
            f"{path} is missing or not a valid {FORMAT!r} index; pass -f with another checkpoint"
        ) from None
    return index


def check_slices(directory: str | Path) -> dict:
    """Every rank file the index names is whole and holds each state tensor at the size the index
    implies (a slice cut short would be read as zeros: the padding), from the files' headers
    alone. Returns the index; a UsageError names the file and the tensor otherwise."""
    directory, fix = Path(directory), "pass -f with another checkpoint"
    index = _read_index(directory)
    world = index["world_size"]
    for rank in range(world):
        file = rank_file(directory, rank)
        shapes = safetensors_header(file, fix)
        for i, entry in enumerate(index["params"]):
            slice_numel = -(-entry["numel"] // world)  # ceil: each rank's padded slice
            for name, numel in [*((n, slice_numel) for n in entry["sliced"]), *((n, None) for n in entry["whole"])]:
                shape = shapes.get(f"{i}.{name}")
                if shape is None:
                    raise UsageError(f"{file} holds no {i}.{name} ({INDEX} lists it); {fix}")
                if numel is not None and math.prod(shape) != numel:
                    raise UsageError(
                        f"{file}: {i}.{name} holds {math.prod(shape)} elements, but {INDEX} gives parameter {i} "
                        f"{entry['numel']} elements, so each of its {world} slices holds {numel}; {fix}"
                    )
    return index


def load_slices(optimizer, directory: str | Path) -> None:
    """Load slices saved under any number of replicas into this run's optimizer (every rank)."""
    from colossalai.checkpoint_io.utils import (
        load_param_groups_into_optimizer,
        load_states_into_optimizer,
        sharded_optimizer_loading_epilogue,
    )

    directory = Path(directory)
    index = check_slices(directory)
    params, rank, world = _slice_layout(optimizer)
    sizes = [optimizer.master_to_working_param[id(p)].numel() for p in params]
    if sizes != [entry["numel"] for entry in index["params"]]:
        raise UsageError(f"{directory} holds the optimizer state of another model; pass the -c it was trained with")
    old_world = index["world_size"]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(rank_file(directory, r)), framework="pt")) for r in range(old_world)]
        state = {
            i: reslice(entry, i, files, old_world, rank, world)
            for i, entry in enumerate(index["params"])
            if entry["sliced"] or entry["whole"] or entry["values"]
        }
    id_map = load_param_groups_into_optimizer(optimizer.optim, str(directory / PARAM_GROUPS))
    load_states_into_optimizer(optimizer.optim, state, id_map)
    sharded_optimizer_loading_epilogue(optimizer.optim)
