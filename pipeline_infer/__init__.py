"""pipeline-infer: run LLMs over datasets with a persistent paged-KV engine.

`import pipeline_infer as sgl` gives SGLang's offline Engine API:
`sgl.Engine(model_path=None)`; `model_path=None` loads the bundled SmolLM2-135M-Instruct.
"""

def __getattr__(name: str):
    # Engine pulls in torch and transformers: import it on first use so that
    # `import pipeline_infer.operators` in a light worker process stays cheap.
    if name == "Engine":
        from pipeline_infer.engine import Engine

        return Engine
    if name == "SamplingParams":
        from pipeline_infer.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pipeline_infer' has no attribute {name!r}")


__all__ = ["Engine", "SamplingParams"]
__version__ = "0.1.0"
