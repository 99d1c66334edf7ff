"""Show which attention kernel a run would use, and check it against eager attention.

    python attn.py        # PyTorch SDPA
    python attn.py -a     # flash-attn 2 where installed on a CUDA device, else SDPA (and says so)

The logic lives in llama_recipe/attention.py; pretrain.py/finetune.py/benchmark.py use it via -a.
"""

import torch

from llama_recipe.attention import select_attention
from llama_recipe.errors import OneLineErrorParser
from llama_recipe.model import build_model, get_model_config


def main() -> None:
    p = OneLineErrorParser(prog="attn.py", description=__doc__.splitlines()[0])
    p.add_argument("-a", "--flash_attention", action="store_true", help="ask for flash-attn 2")
    p.add_argument("-c", "--config", default="tiny", help="model preset used for the parity check")
    args = p.parse_args()

    implementation, message = select_attention(args.flash_attention)
    print(f"attention backend: {implementation}" + (f" ({message})" if message else ""))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if implementation == "flash_attention_2" else torch.float32
    torch.manual_seed(0)
    reference = build_model(get_model_config(args.config), "eager").to(device, dtype).eval()
    candidate = build_model(get_model_config(args.config), implementation).to(device, dtype).eval()
    candidate.load_state_dict(reference.state_dict())
    input_ids = torch.randint(0, reference.config.vocab_size, (2, 256), device=device)
    with torch.no_grad():
        diff = (reference(input_ids).logits.float() - candidate(input_ids).logits.float()).abs().max().item()
    print(f"max |logits({implementation}) - logits(eager)| = {diff:.2e} on a {args.config} model, {dtype}")


if __name__ == "__main__":
    main()
