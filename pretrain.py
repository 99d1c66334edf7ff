"""Pretrain a LLaMA model with a ColossalAI booster plugin.

torchrun --nproc_per_node 2 pretrain.py -c tiny -p zero2 -d data/redpajama-sample --max_steps 20
colossalai run --nproc_per_node 8 pretrain.py -c llama2-7b -p gemini -g -a -b 4
colossalai run --nproc_per_node 8 --hostfile hosts.txt pretrain.py -c llama2-70b -p hybrid_parallel --tp 8 --pp 4
"""

from llama_recipe.cli import run_script
from llama_recipe.recipes import pretrain

if __name__ == "__main__":
    run_script("pretrain", pretrain)
