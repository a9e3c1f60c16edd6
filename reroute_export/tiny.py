"""Tiny random-weight LLaVA-1.5 and Qwen2.5-VL built offline with the real HF classes.

Why: tests and CI exercise the whole export path (routing, ONNX, parity) without
downloading a 7B checkpoint. The models use the same transformers classes, config
fields, token conventions and preprocessing as the real ones, only smaller:

- tiny-llava: CLIP 112 px / patch 14 -> 8x8 = 64 visual tokens; Llama 8 layers,
  hidden 64, 4 heads, 2 KV heads (GQA), intermediate 128.
- tiny-qwen2.5-vl: 224x224 image -> grid (1, 16, 16) -> 64 visual tokens after the 2x2
  merger; text 8 layers, hidden 64, 4 heads, 2 KV heads, mRoPE sections [2, 3, 3].

The tokenizer is a byte-level BPE (256 byte tokens + a fixed list of merges, no training)
so any text round-trips; each family's special tokens are appended like the real ones.
Weights are re-drawn from a seeded generator with a wide enough spread that attention
scores and logits differ between tokens (HF's 0.02 init makes a tiny model nearly flat).

The same builders make the benchmark models (`bench-llava`, `bench-qwen2.5-vl`: real
image sizes and 576 visual tokens, a 1024-wide decoder): every size is a field of
`Sizes`, read from the model's graph spec by `build(spec)`; the tiny models' own
sizes are the defaults.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from reroute_export.preprocess import LLAVA, QWEN2_5_VL, Preprocessor, chat_template

if TYPE_CHECKING:
    from reroute_export.spec import GraphSpec

# Sizes shared by both tiny text decoders.
TEXT_LAYERS = 8
TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2  # GQA on purpose: exports must repeat KV heads
TEXT_INTERMEDIATE = 128
MAX_POSITIONS = 2048

LLAVA_IMAGE_SIZE = 112  # CLIP input; (112 // 14) ** 2 = 64 visual tokens
QWEN_IMAGE_SIZE = (224, 224)  # (H, W); grid (1, 16, 16) -> 16 * 16 / 2**2 = 64 tokens
PATCH_SIZE = 14

WEIGHT_STD = 0.1  # matrices and embeddings; HF's 0.02 gives near-uniform attention
BIAS_STD = 0.02

LLAVA_SPECIALS_FRONT = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama
LLAVA_SPECIALS_BACK = ["<image>", "<pad>"]  # appended after the vocab, as in llava-hf
QWEN_SPECIALS = [  # appended after the vocab, in Qwen2's order
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

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
    image_size: int = LLAVA_IMAGE_SIZE  # square side in pixels (Qwen: the fixed H = W)
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


TINY_LLAVA = Sizes()
TINY_QWEN = Sizes(image_size=QWEN_IMAGE_SIZE[0])


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


def _tokenizer_object(front_specials: list[str], back_specials: list[str]) -> Tokenizer:
    """A `tokenizers.Tokenizer`: byte-level BPE plus special tokens appended at the end."""
    vocab, merges = _byte_level_bpe(front_specials)
    unk = "<unk>" if "<unk>" in vocab else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = front_specials + back_specials
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def tiny_llava_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-style: BOS prepended by default (as llava-hf's tokenizer does), <image> and <pad> last."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(LLAVA_SPECIALS_FRONT, LLAVA_SPECIALS_BACK),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=chat_template(LLAVA),  # llava-hf's, saved as chat_template.jinja
    )


def tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2-style: no BOS, pad = <|endoftext|>, eos = <|im_end|>."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object([], QWEN_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        chat_template=chat_template(QWEN2_5_VL),  # Qwen2.5-VL-Instruct's processor template
    )


# ----------------------------------------------------------------------------- models


def tiny_llava(
    seed: int = 0, attn_implementation: str = "sdpa", sizes: Sizes = TINY_LLAVA, where: "Where | None" = None
) -> tuple[LlavaForConditionalGeneration, Preprocessor]:
    """Tiny LLaVA-1.5 (CLIP + projector + Llama), 64 visual tokens, seeded random weights;
    other `sizes` give the same model at another scale (e.g. bench-llava)."""
    tokenizer = tiny_llava_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    side = sizes.image_size
    vision = CLIPVisionConfig(
        image_size=side,
        patch_size=PATCH_SIZE,
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_intermediate,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=sizes.vocab_size or len(tokenizer),
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        image_seq_length=(side // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    model = _build(LlavaForConditionalGeneration, config, seed, attn_implementation, sizes.weight_std, where)
    _set_generation_ids(model, bos=ids["<s>"], eos=ids["</s>"], pad=ids["<pad>"])
    return model, _llava_preprocessor(tokenizer, side)


def _llava_preprocessor(tokenizer: PreTrainedTokenizerFast, side: int) -> Preprocessor:
    """llava-hf's CLIP preprocessing (resize shortest edge, centre crop) at `side` px."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    return Preprocessor(LLAVA, tokenizer, image_processor, patch_size=PATCH_SIZE)


def tiny_qwen2_5_vl(
    seed: int = 0, attn_implementation: str = "sdpa", sizes: Sizes = TINY_QWEN, where: "Where | None" = None
) -> tuple[Qwen2_5_VLForConditionalGeneration, Preprocessor]:
    """Tiny Qwen2.5-VL (windowed ViT + 2x2 merger + mRoPE decoder), fixed 224x224 grid;
    other `sizes` give the same model at another scale (e.g. bench-qwen2.5-vl, 672x672)."""
    tokenizer = tiny_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = sizes.head_dim  # tiny: 16 -> 8 rotary frequencies = 2 (t) + 3 (h) + 3 (w)
    vision = dict(
        depth=sizes.vision_layers,
        hidden_size=sizes.vision_hidden,
        num_heads=sizes.vision_heads,
        intermediate_size=sizes.vision_intermediate,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[sizes.vision_layers - 1],
        out_hidden_size=sizes.text_hidden,
    )
    text = dict(
        vocab_size=sizes.vocab_size or len(tokenizer),
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sizes.mrope_section},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = _build(Qwen2_5_VLForConditionalGeneration, config, seed, attn_implementation, sizes.weight_std, where)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]  # as Qwen2.5-VL-Instruct's generation_config
    _set_generation_ids(model, bos=None, eos=eos, pad=ids["<|endoftext|>"])
    return model, _qwen_preprocessor(tokenizer, sizes.image_size)


def _qwen_preprocessor(tokenizer: PreTrainedTokenizerFast, side: int) -> Preprocessor:
    """Qwen2.5-VL-Instruct's image processor, every image resized to side x side (one fixed grid)."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 1280,
    )
    return Preprocessor(QWEN2_5_VL, tokenizer, image_processor, image_size=(side, side))


_BUILDERS = {LLAVA: tiny_llava, QWEN2_5_VL: tiny_qwen2_5_vl}


def build(spec: "GraphSpec", seed: int = 0, attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, Preprocessor]:
    """The built-in-code model a graph spec without a checkpoint describes (tiny-*, bench-*)."""
    return _BUILDERS[spec.family](seed, attn_implementation, Sizes.from_spec(spec))


def build_random(
    spec: "GraphSpec", dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, Preprocessor]:
    """`--random-weights`: a registered real architecture (e.g. llava-1.5-7b) at full size with
    seeded random weights, built directly in `dtype` on `device` (no fp32 copy: 7B in fp16 is
    14 GB, not 28). device "meta" allocates no parameter: the streaming export draws each
    one later, a tensor at a time, with `random_tensor`. A registered checkpoint's architecture
    is its published config.json (`published`), the offline byte-level tokenizer's token ids
    put in; a built-in-code spec (tiny-*, bench-*) keeps its own builder."""
    where = Where(dtype, torch.device(device))
    if spec.checkpoint is not None:
        return _published(spec, seed, attn_implementation, where)
    sizes = replace(Sizes.from_spec(spec), vocab_size=spec.text.vocab_size)
    return _BUILDERS[spec.family](seed, attn_implementation, sizes, where)


def parameter_count(spec: "GraphSpec") -> int:
    """Parameters of the model `spec` names, built on the meta device (no memory; tied ones once)."""
    model, _ = build_random(spec, torch.float32, "meta")
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


@dataclass(frozen=True)
class _Offline:
    """How a family's published config meets the offline tokenizer: which config fields hold
    token ids (dotted path -> the offline token whose id they take), and the generation ids.
    Only ids move: they size nothing, so the vocabulary and parameter count stay the published
    ones, and the offline prompt's image tokens land where the model looks for them."""

    model_cls: type[PreTrainedModel]
    tokenizer: Callable[[], PreTrainedTokenizerFast]
    preprocessor: Callable[[PreTrainedTokenizerFast, int], Preprocessor]
    ids: dict[str, str]
    bos: str | None
    eos: tuple[str, ...]  # generation stops at any; one -> an int, as the tiny builders set it
    pad: str


_OFFLINE = {
    LLAVA: _Offline(
        LlavaForConditionalGeneration, tiny_llava_tokenizer, _llava_preprocessor,
        ids={"image_token_index": "<image>", "pad_token_id": "<pad>", "text_config.bos_token_id": "<s>",
             "text_config.eos_token_id": "</s>", "text_config.pad_token_id": "<pad>"},
        bos="<s>", eos=("</s>",), pad="<pad>",
    ),
    QWEN2_5_VL: _Offline(  # vision_token_id (<|vision_pad|>) is read by no transformers 5 code: left as published
        Qwen2_5_VLForConditionalGeneration, tiny_qwen_tokenizer, _qwen_preprocessor,
        ids={"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
             "text_config.bos_token_id": "<|endoftext|>", "text_config.eos_token_id": "<|im_end|>",
             "text_config.pad_token_id": "<|endoftext|>"},
        bos=None, eos=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
    ),
}


def _published(spec: "GraphSpec", seed: int, attn_implementation: str,
               where: Where) -> tuple[PreTrainedModel, Preprocessor]:
    """The checkpoint's own architecture from its published config, seeded random weights."""
    from . import published

    published.check_spec(spec)  # the plan reads the spec; the model must be the same one
    config, off = published.config(spec.name), _OFFLINE[spec.family]
    tokenizer = off.tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    for path, token in off.ids.items():
        _set_path(config, path, token_id(token))
    std = weight_std_for(config.text_config.hidden_size)
    model = _build(off.model_cls, config, seed, attn_implementation, std, where)
    eos = [token_id(t) for t in off.eos]
    _set_generation_ids(model, bos=token_id(off.bos) if off.bos else None, eos=eos[0] if len(eos) == 1 else eos,
                        pad=token_id(off.pad))
    return model, off.preprocessor(tokenizer, spec.vision.image_size)


def _set_path(config: PreTrainedConfig, path: str, value: int) -> None:
    """config.a.b = value for path "a.b"."""
    *parents, name = path.split(".")
    for part in parents:
        config = getattr(config, part)
    setattr(config, name, value)


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


def _build(
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
    import zlib

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
    return _weight_from_noise(name, noise, weight_std).to(dtype)


def _is_norm_scale(name: str) -> bool:
    """LayerNorm / RMSNorm multiplicative weights (kept near 1 so activations keep their scale)."""
    return name.endswith(".weight") and any(k in name for k in ("norm", "ln_", "layer_norm"))


def _set_generation_ids(model: PreTrainedModel, bos: int | None, eos: int | list[int], pad: int) -> None:
    """generate() reads these from generation_config; match the real checkpoints' conventions."""
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
