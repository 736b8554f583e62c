"""Hidden states (and logprobs) from the Engine, as in SGLang's hidden-states example.

    python examples/hidden_states.py                      # the bundled model, on the CPU
    python examples/hidden_states.py --model-path /path/to/hf-dir

meta_info["hidden_states"] is a list: first the prompt's [prompt_tokens][hidden_size] matrix,
then one [hidden_size] vector per generated token fed back to the model (so the last generated
token has none, and there are completion_tokens entries in all). They are the final layer's
output after the final norm: what Hugging Face reports as hidden_states[-1] with
output_hidden_states=True, and what the LM head turns into logits.

The engine must be created with enable_return_hidden_states=True. Decode steps that include a
request asking for hidden states run without CUDA graphs, and such a request recomputes prompt
positions the prefix cache already holds; requests that do not ask pay nothing.
"""

from __future__ import annotations

import argparse

import torch

import pipeline_infer as sgl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    args = ap.parse_args()

    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    llm = sgl.Engine(model_path=args.model_path, enable_return_hidden_states=True)
    sampling_params = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": args.max_new_tokens}
    outputs = llm.generate(prompts, sampling_params=sampling_params, return_hidden_states=True,
                           return_logprob=True)
    for prompt, output in zip(prompts, outputs):
        meta = output["meta_info"]
        # One [tokens, hidden_size] tensor: the prompt rows, then a row per fed generated token.
        hidden = torch.cat([torch.tensor(h).view(-1, len(meta["hidden_states"][0][0])) for h in meta["hidden_states"]])
        logprobs = [round(lp, 3) for lp, _, _ in meta["output_token_logprobs"]]
        print("===============================")
        print(f"Prompt: {prompt}\nGenerated text: {output['text']}")
        print(f"Prompt_Tokens: {meta['prompt_tokens']}\tCompletion_tokens: {meta['completion_tokens']}")
        print(f"Hidden states: {tuple(hidden.shape)} (prompt matrix {len(meta['hidden_states'][0])} rows "
              f"+ {len(meta['hidden_states']) - 1} generated), mean norm {hidden.norm(dim=-1).mean():.2f}")
        print(f"Output token logprobs: {logprobs}")
    llm.shutdown()


if __name__ == "__main__":
    main()
