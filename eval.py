"""Score a trained model on held-out text: token perplexity, bits per byte and word perplexity over
sliding windows, or cloze accuracy (the last word of each document, greedily, as LAMBADA).

python eval.py --model_path checkpoint/latest                     (the shipped held-out text)
python eval.py --model_path exported/llama-tiny -d wikitext.jsonl -l 1024 --stride 512
torchrun --nproc_per_node 2 eval.py --model_path checkpoint/step-100 --task cloze -d lambada.jsonl
"""

from llama_recipe.cli import run_script
from llama_recipe.recipes import evaluate

if __name__ == "__main__":
    run_script("eval", evaluate)
