"""The parts every built-in-code model is made of: sizes, an offline tokenizer, seeded weights.

Why: tests and CI exercise the whole export path (routing, ONNX, parity) without
downloading a 7B checkpoint. Each family builds its tiny model from these parts with the
real HF classes, config fields, token conventions and preprocessing, only smaller
(`Family.tiny` in families/<family>.py: tiny-llava, tiny-qwen2.5-vl); `registry.build`
picks the family's builder for a graph spec.

The tokenizer is a byte-level BPE (256 byte tokens + a fixed list of merges, no training)
so any text round-trips; each family appends its special tokens like the real ones.
Weights are re-drawn from a seeded generator with a wide enough spread that attention
scores and logits differ between tokens (HF's 0.02 init makes a tiny model nearly flat).

The same builders make the benchmark models (`bench-llava`, `bench-qwen2.5-vl`: real
image sizes and 576 visual tokens, a 1024-wide decoder): every size is a field of
`Sizes`, read from the model's graph spec by `Sizes.from_spec`; the defaults are the tiny
models' own sizes.
"""

from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedConfig, PreTrainedModel

if TYPE_CHECKING:
    from reroute_export.preprocess import Preprocessor
    from reroute_export.spec import GraphSpec

# Sizes shared by both tiny text decoders.
TEXT_LAYERS = 8
TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2  # GQA on purpose: exports must repeat KV heads
TEXT_INTERMEDIATE = 128
MAX_POSITIONS = 2048

IMAGE_SIZE = 112  # tiny-llava's CLIP input; (112 // 14) ** 2 = 64 visual tokens
PATCH_SIZE = 14  # both families' ViT patch

WEIGHT_STD = 0.1  # matrices and embeddings; HF's 0.02 gives near-uniform attention
BIAS_STD = 0.02

# Words whose left-to-right merge chains become the BPE merges: a fixed list, so the
# tokenizer is identical on every run and prompts are a little shorter than bytes.
_MERGE_WORDS = [
    " the", " a", " an", " of", " in", " on", " is", " and", " to", " what", " this",
    " image", " picture", " describe", " Describe", " What", " You", " are", " helpful",
    "USER", " ASSISTANT", "system", "user", "assistant", "ing", "er", "th", "he",
]


@dataclass(frozen=True)
class Sizes:
    """Every size a built-in-code model takes; the defaults are tiny-llava's."""

    text_layers: int = TEXT_LAYERS
    text_hidden: int = TEXT_HIDDEN
    text_heads: int = TEXT_HEADS
    text_kv_heads: int = TEXT_KV_HEADS
    text_intermediate: int = TEXT_INTERMEDIATE
    image_size: int = IMAGE_SIZE  # square side in pixels (Qwen: the fixed H = W)
    vision_layers: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    vocab_size: int | None = None  # None: the tokenizer's length; a real spec's vocab for --random-weights

    @property
    def head_dim(self) -> int:
        return self.text_hidden // self.text_heads

    @property
    def weight_std(self) -> float:
        return weight_std_for(self.text_hidden)

    @property
    def mrope_section(self) -> list[int]:
        """(t, h, w) rotary frequencies, as Qwen2.5-VL: [16, 24, 24] for head_dim 128."""
        half = self.head_dim // 2
        t = half // 4
        return [t, (half - t) // 2, half - t - (half - t) // 2]

    def text_fields(self, tokenizer_size: int) -> dict[str, int]:
        """The decoder's sizes as HF text-config fields (LlamaConfig, Qwen2.5-VL's text_config)."""
        return dict(
            vocab_size=self.vocab_size or tokenizer_size,
            hidden_size=self.text_hidden,
            intermediate_size=self.text_intermediate,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            num_key_value_heads=self.text_kv_heads,
            max_position_embeddings=MAX_POSITIONS,
        )

    @classmethod
    def from_spec(cls, spec: "GraphSpec") -> "Sizes":
        t, v = spec.text, spec.vision
        return cls(
            text_layers=t.num_layers, text_hidden=t.hidden_size, text_heads=t.hidden_size // t.head_dim,
            text_kv_heads=t.num_kv_heads, text_intermediate=t.intermediate_size, image_size=v.image_size,
            vision_layers=v.num_layers, vision_hidden=v.hidden_size, vision_heads=max(2, v.hidden_size // 64),
            vision_intermediate=v.intermediate_size,
        )


def weight_std_for(text_hidden: int) -> float:
    """WEIGHT_STD for narrow models; ~2/sqrt(width) for wide ones, so a 1024-wide random
    decoder keeps O(1) activations and peaked (not one-hot) attention."""
    return min(WEIGHT_STD, 2.0 / math.sqrt(text_hidden))


# ----------------------------------------------------------------------------- tokenizers


def _byte_level_bpe(front_specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (front specials, 256 byte symbols, merge results) and merges, deterministically."""
    vocab = {token: i for i, token in enumerate(front_specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    byte_map = {chr(c): s for c, s in zip(range(256), _bytes_to_unicode())}
    merges: list[tuple[str, str]] = []
    for word in _MERGE_WORDS:
        pieces = [byte_map[ch] for ch in word]  # ASCII only, one byte symbol per char
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append(pair)
            pieces = [merged, *pieces[2:]]
    return vocab, merges


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses), indexed by byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tokenizer_object(front_specials: list[str], back_specials: list[str]) -> Tokenizer:
    """A `tokenizers.Tokenizer`: byte-level BPE plus special tokens appended at the end."""
    vocab, merges = _byte_level_bpe(front_specials)
    unk = "<unk>" if "<unk>" in vocab else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = front_specials + back_specials
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def save_checkpoint(model: PreTrainedModel, preprocessor: Preprocessor, directory: str | Path) -> None:
    """Save so that `<Model>.from_pretrained` and `Preprocessor.from_pretrained` load it back identically.

    The tokenizer carries the family's chat template (the tiny tokenizers are built with it), so
    HF writes chat_template.jinja, the file transformers 5 reads for the tokenizer and the
    processor alike: the folder works with `apply_chat_template` and AutoProcessor elsewhere."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    preprocessor.save_pretrained(directory)


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Where:
    """Dtype and device a --random-weights model is built in directly."""

    dtype: torch.dtype
    device: torch.device


def build_model(
    model_cls: type[PreTrainedModel], config: PreTrainedConfig, seed: int, attn_implementation: str,
    weight_std: float = WEIGHT_STD, where: Where | None = None,
) -> PreTrainedModel:
    """Construct under a forked RNG (caller's global RNG untouched), re-init, fp32, eval.

    With `where`: built in that dtype on that device, weights drawn there per tensor
    (`random_tensor`; the meta device draws nothing)."""
    config._attn_implementation = attn_implementation
    if where is not None:
        with meta_parameters():  # buffers (rotary tables) stay real, parameters allocate nothing
            model = model_cls._from_config(config, dtype=where.dtype)
        if where.device.type != "meta":
            materialize(model, lambda name, p: random_tensor(name, tuple(p.shape), where.dtype, weight_std, seed,
                                                             where.device))
            model.to(where.device)  # the buffers
        model.config.random_weight_std = weight_std  # the streaming export draws the same way
        return model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    _reinit(model, seed, weight_std)
    return model.float().eval()


def _reinit(model: torch.nn.Module, seed: int, weight_std: float = WEIGHT_STD) -> None:
    """Redraw every parameter from a private generator, in name order, so seed -> bitwise weights.

    Matrices/embeddings ~ N(0, weight_std); norm scales ~ 1 + N(0, BIAS_STD); biases ~ N(0, BIAS_STD).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(_weight_from_noise(name, torch.randn(param.shape, generator=gen, dtype=torch.float32),
                                           weight_std))


def _weight_from_noise(name: str, noise: torch.Tensor, weight_std: float) -> torch.Tensor:
    """Standard normal noise -> a parameter's value, by what the parameter is."""
    if noise.ndim >= 2:
        return noise * weight_std
    if _is_norm_scale(name):
        return 1.0 + noise * BIAS_STD
    return noise * BIAS_STD


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Every nn.Parameter registered inside lives on the meta device (no memory); buffers
    are created as usual. Like accelerate's init_empty_weights(include_buffers=False)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def materialize(model: torch.nn.Module, make: "Callable[[str, torch.nn.Parameter], torch.Tensor]") -> None:
    """Replace each meta parameter by make(name, param), one at a time (tied ones once)."""
    done: dict[int, torch.nn.Parameter] = {}
    for mname, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                name = f"{mname}.{pname}" if mname else pname
                done[id(param)] = torch.nn.Parameter(make(name, param), requires_grad=False)
            module._parameters[pname] = done[id(param)]


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, weight_std: float, seed: int = 0,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """One --random-weights parameter, a function of (seed, name, device type) alone: the same
    values whether the model is materialised at once or streamed tensor by tensor (a GPU's
    generator draws another stream than the CPU's). Matrices/embeddings ~ N(0, weight_std),
    norm scales ~ 1 + N(0, BIAS_STD), biases ~ N(0, BIAS_STD), as `_reinit`."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    rows = _rows_per_draw(shape) if device.type == "cpu" else None
    if rows is None:
        noise = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
        return _weight_from_noise(name, noise, weight_std).to(dtype)
    # A large matrix is drawn a block of rows at a time into its final dtype: the CPU
    # generator gives the same values as one draw when each block but the last holds a
    # multiple of 16 elements (normal_ fills 16 at a time from consecutive uniforms;
    # tests/test_stream.py checks it). The fp32 noise of a 7B's embeddings was 0.5 GB twice.
    out = torch.empty(shape, dtype=dtype, device=device)
    for start in range(0, shape[0], rows):
        block = (min(rows, shape[0] - start), *shape[1:])
        out[start:start + block[0]] = _weight_from_noise(
            name, torch.randn(block, generator=gen, dtype=torch.float32, device=device), weight_std)
    return out


DRAW_ELEMENTS = 1 << 22  # fp32 noise drawn at once for a large matrix (16 MiB)


def _rows_per_draw(shape: tuple[int, ...]) -> int | None:
    """Rows of a matrix drawn at once (a block of a multiple of 16 elements), None to draw it whole."""
    if len(shape) < 2 or math.prod(shape) <= DRAW_ELEMENTS:
        return None
    row = math.prod(shape[1:])
    unit = 16 // math.gcd(row, 16)  # rows whose elements make a multiple of 16
    return max(unit, DRAW_ELEMENTS // row // unit * unit)


def _is_norm_scale(name: str) -> bool:
    """LayerNorm / RMSNorm multiplicative weights (kept near 1 so activations keep their scale)."""
    return name.endswith(".weight") and any(k in name for k in ("norm", "ln_", "layer_norm"))


def set_generation_ids(model: PreTrainedModel, bos: int | None, eos: int | list[int], pad: int) -> None:
    """generate() reads these from generation_config; match the real checkpoints' conventions."""
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
