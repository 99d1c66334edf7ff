"""Finetune a LLaMA model on prompt/completion pairs (self_instruct by default), loss on completions only.

    torchrun --standalone --nproc_per_node 2 finetune.py --model_path runs/demo/checkpoints/step-40 \
        -p zero2 -d data/self_instruct --task_name self_instruct -l 256 --max_steps 20
    colossalai run --nproc_per_node 8 finetune.py --model_path meta-llama/Llama-2-7b-hf -p gemini -g -a
"""

from llama_recipe.cli import run_script
from llama_recipe.recipes import finetune

if __name__ == "__main__":
    run_script("finetune", finetune)
