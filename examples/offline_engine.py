"""The four modes of SGLang's offline Engine page, run against pipeline-infer.

Only the imports differ from the SGLang page: `import pipeline_infer as sgl` and
`from pipeline_infer.utils import ...`. With no model_path the engine loads the
bundled SmolLM2-135M-Instruct (on the CPU here; a GPU is used when there is one).
"""

import asyncio
import sys

import pipeline_infer as sgl
from pipeline_infer.utils import async_stream_and_merge, stream_and_merge


def main(model_path: str | None = None) -> None:
    llm = sgl.Engine(model_path=model_path)

    # Non-streaming synchronous generation
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = {"temperature": 0.8, "top_p": 0.95}
    outputs = llm.generate(prompts, sampling_params)
    for prompt, output in zip(prompts, outputs):
        print("===============================")
        print(f"Prompt: {prompt}\nGenerated text: {output['text']}")

    # Streaming synchronous generation
    prompts = [
        "Write a short, neutral self-introduction for a fictional character. Hello, my name is",
        "Provide a concise factual statement about France’s capital city. The capital of France is",
        "Explain possible future trends in artificial intelligence. The future of AI is",
    ]
    sampling_params = {"temperature": 0.2, "top_p": 0.9}
    print("\n=== Testing synchronous streaming generation with overlap removal ===\n")
    for prompt in prompts:
        print(f"Prompt: {prompt}")
        merged_output = stream_and_merge(llm, prompt, sampling_params)
        print("Generated text:", merged_output)
        print()

    # Non-streaming asynchronous generation
    sampling_params = {"temperature": 0.8, "top_p": 0.95}
    print("\n=== Testing asynchronous batch generation ===")

    async def batch() -> None:
        outputs = await llm.async_generate(prompts, sampling_params)
        for prompt, output in zip(prompts, outputs):
            print(f"\nPrompt: {prompt}")
            print(f"Generated text: {output['text']}")

    asyncio.run(batch())

    # Streaming asynchronous generation
    print("\n=== Testing asynchronous streaming generation (no repeats) ===")

    async def streaming() -> None:
        for prompt in prompts:
            print(f"\nPrompt: {prompt}")
            print("Generated text: ", end="", flush=True)
            async for cleaned_chunk in async_stream_and_merge(llm, prompt, sampling_params):
                print(cleaned_chunk, end="", flush=True)
            print()

    asyncio.run(streaming())
    llm.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
