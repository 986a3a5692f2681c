"""Tiny random models, tokenizers and LoRA adapters for tests and benchmarks (no network)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "the movie was wonderful and the acting was great",
    "a dull boring film with a terrible plot",
    "Review: an absolute delight\nSentiment (positive or negative): positive",
    "Review: a waste of time\nSentiment (positive or negative): negative",
    "question: is the sky blue? answer: yes",
    "question: is fire cold? answer: no",
    "Natalia sold clips to 48 of her friends in April #### 72",
    "def f(x): return x + 1",
] * 4

VOCAB = 320


def make_tokenizer(out: Path, vocab_size: int = VOCAB):
    """A byte-level BPE tokenizer trained on a few sentences, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = VOCAB):
    import transformers as tf

    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "gemma":
        return tf.Gemma3TextConfig(**common, head_dim=8, tie_word_embeddings=True, sliding_window=16)
    if arch == "llama-tied":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "llama-bias":  # biases on the attention projections (lora_bias, bias="all")
        return tf.LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True)
    if arch == "gpt2":  # Conv1D layers: weights stored (in, out), PEFT's fan_in_fan_out
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=256,
                             bos_token_id=0, eos_token_id=0)
    if arch == "mixtral":  # experts stored one matrix each (w1/w2/w3), stacked in the module tree
        return tf.MixtralConfig(**{**common, "num_hidden_layers": 1}, num_local_experts=4, num_experts_per_tok=2,
                                tie_word_embeddings=False)
    if arch == "qwen3moe":
        return tf.Qwen3MoeConfig(**{**common, "num_hidden_layers": 1}, moe_intermediate_size=48, num_experts=4,
                                 num_experts_per_tok=2, head_dim=8, tie_word_embeddings=False)
    if arch == "gemma3mm":  # Gemma3ForConditionalGeneration: language_model.model.* on disk
        text = dict(common, head_dim=8, sliding_window=16)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            text.pop(k)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=16, patch_size=8)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               image_token_index=vocab_size - 20, boi_token_index=vocab_size - 19,
                               eoi_token_index=vocab_size - 18)
    raise ValueError(arch)


def make_model(
    out: Path,
    arch: str = "llama",
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer_from: Path | None = None,
):
    """Build a tiny random causal LM, save it (optionally sharded) with a tokenizer; return the model."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model = model.to(getattr(torch, dtype))
    model.eval()
    out = Path(out)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if tokenizer_from is not None:
        import shutil

        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, out / f.name)
    else:
        make_tokenizer(out)
    return model


def copy_model(src: Path, dst: Path, tensors: dict) -> Path:
    """``src``'s config and tokenizer with ``tensors`` as its only weights (model.safetensors)."""
    import shutil

    from portllm_cli.io.safetensors import save_tensors

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    save_tensors(dst / "model.safetensors", tensors)
    return dst


def run(*args):
    """The portllm command line in-process (typer's CliRunner), every argument as a string."""
    from typer.testing import CliRunner

    from portllm_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args) -> dict:
    """run(*args, "--json"), which must succeed; its JSON document."""
    res = run(*args, "--json")
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def perturb_model(src: Path, out: Path, *, scale: float = 0.02, seed: int = 1):
    """An 'evolved' copy of a model: every floating weight moved by a small random amount."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale * p.float().std().clamp_min(1e-3).to(p.dtype))
    model.save_pretrained(out)
    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            import shutil

            shutil.copy(f, Path(out) / f.name)
    return model


def make_lora(
    model_dir: Path,
    out: Path,
    *,
    targets=("q_proj", "v_proj"),
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
):
    """A PEFT LoRA adapter with random non-zero A and B, saved as PEFT does."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=False,  # random B too, so the delta is not zero
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    cfg_path = Path(out) / "adapter_config.json"
    doc = json.loads(cfg_path.read_text())
    doc["base_model_name_or_path"] = str(model_dir)
    cfg_path.write_text(json.dumps(doc, indent=2))
    return peft_model


# labelled sentences for tiny sst2 training runs (1 = positive)
SENTENCES = [
    ("the movie was wonderful and the acting was great", 1),
    ("a dull boring film with a terrible plot", 0),
    ("an absolute delight", 1),
    ("a waste of time", 0),
    ("great fun and wonderful acting", 1),
    ("terrible and boring", 0),
    ("the plot was great", 1),
    ("a dull film", 0),
]
