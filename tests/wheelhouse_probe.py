"""Run by test_wheelhouse.py with the fresh venv's Python, after the wheelhouse is installed there:
imports every llama_recipe module, ColossalAI's booster plugins and HybridAdam, and uvicorn (serve.py's
server), writes where each top-level package was loaded from to OUT_JSON, then trains with
`pretrain.py ARGS` in this process.

    wheelhouse_probe.py OUT_JSON ARGS...
"""

import importlib
import json
import pkgutil
import runpy
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")  # ColossalAI's import-time notes (apex, fused kernels) say nothing here
REPO = Path(__file__).resolve().parent.parent

import llama_recipe  # noqa: E402
from llama_recipe.colossalai_patches import apply_patches  # noqa: E402
from llama_recipe.errors import UsageError  # noqa: E402

applied = apply_patches(cpu_only=True)  # what every script of the recipe does first (distributed.launch)
modules = [f"llama_recipe.{m.name}" for m in pkgutil.iter_modules(llama_recipe.__path__)]
for name in [*modules, "colossalai.booster.plugin", "colossalai.nn.optimizer", "uvicorn"]:  # uvicorn: serve.py
    importlib.import_module(name)
from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin  # noqa: E402, F401
from colossalai.nn.optimizer import GaLoreAdamW8bit, HybridAdam  # noqa: E402, F401

try:  # without bitsandbytes, the one thing that needs it refuses in one line
    GaLoreAdamW8bit([torch.nn.Parameter(torch.zeros(2))])
    refusal = None
except UsageError as e:
    refusal = str(e)

origins = {}
for name, module in list(sys.modules.items()):
    path = getattr(module, "__file__", None)
    if "." not in name and not name.startswith("__") and path and not path.startswith((sys.base_prefix, sys.prefix)):
        origins[name] = path  # not the standard library: the wheelhouse's target, the node's torch, or ours
report = {"modules": modules, "origins": origins, "sys_path": sys.path, "applied": applied, "galore_8bit": refusal}
Path(sys.argv[1]).write_text(json.dumps(report))
sys.argv = [str(REPO / "pretrain.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
