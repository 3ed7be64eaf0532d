"""Per-tensor GGUF type mixtures: llama.cpp's named presets, llama-quantize's `--tensor-type REGEX=TYPE`, the
embedding and output types, with every shape fallback resolved explicitly.

A preset means what `llama-quantize MODEL OUT <PRESET>` chooses (llama.cpp `src/llama-quant.cpp`,
`llama_tensor_get_type`), for the tensors it quantizes (2-D `*.weight` that are not norms or position embeddings):

    q4_0 q4_1 q5_0 q5_1 q8_0   every tensor at that type; with an importance matrix (slimlm always has one
                               when calibrated) the first n/8 ffn_down at q4_1 / q5_1 for q4_0 / q5_0
    q4_k_m                     q4_k; attn_v and ffn_down at q6_k in the layers `use_more_bits` picks (the first
                               and last eighth, every third in between)
    q5_k_m                     q5_k; the same attn_v / ffn_down at q6_k
    q6_k                       q6_k
    output (and a tied token_embd): q6_k, or q8_0 when its rows do not split into the preset type's blocks or
    the preset is q8_0

Then `tensor_type_fallback`: a k-quant on rows that are not a multiple of 256 becomes q4_k -> q5_0, q5_k -> q5_1,
q6_k -> q8_0, q2_k/q3_k -> q4_0 (f16 if even 32 does not divide). The order of precedence is llama-quantize's:
--embedding-type (token_embd), --output-type (output, or token_embd when tied), the first --tensor-type regex
that `re.search`es the name, the preset. Types the user names are not silently changed: one a tensor's shape cannot
hold is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.export.gguf_types import TYPES, WRITABLE, gguf_type, tensor_bytes, types_for_shape

PRESETS = {
    "q4_0": "q4_0",
    "q4_1": "q4_1",
    "q5_0": "q5_0",
    "q5_1": "q5_1",
    "q8_0": "q8_0",
    "q4_k_m": "q4_k",
    "q5_k_m": "q5_k",
    "q6_k": "q6_k",
}  # preset -> its default type
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0"}
QUANTIZED = tuple(name for name in WRITABLE if TYPES[name].block > 1)


@dataclass(frozen=True)
class TypeChoice:
    type: str
    why: str  # "preset q4_k_m", "--tensor-type blk\\.\\d+\\.ffn_down", "fallback q4_k→q5_0 (rows of 576)", ...


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """The tensors llama-quantize quantizes (`tensor_allows_quantization`): 2-D weights, not norms or positions."""
    return (
        len(shape) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and name not in ("position_embd.weight", "token_types.weight")
    )


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's layers that get the higher type in the *_M mixes."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _layer(name: str) -> int | None:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _fallback(name: str, shape: Sequence[int], wanted: str, why: str) -> TypeChoice:
    if shape[-1] % TYPES[wanted].block == 0:
        return TypeChoice(wanted, why)
    fallback = FALLBACK.get(wanted, wanted)
    if shape[-1] % TYPES[fallback].block:
        fallback = "f16"
    return TypeChoice(fallback, f"{why}, fallback {wanted}→{fallback} (rows of {shape[-1]})")


def _preset_choice(name: str, shape, preset: str, tied: bool, layers: int, imatrix: bool) -> TypeChoice:
    base = PRESETS[preset]
    why = f"preset {preset}"
    wanted = base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        wanted = "q8_0" if shape[-1] % TYPES[base].block or base == "q8_0" else "q6_k"
    elif name == "token_embd.weight":
        wanted = base
    elif "attn_v.weight" in name and preset in ("q4_k_m", "q5_k_m") and use_more_bits(_layer(name) or 0, layers):
        wanted = "q6_k"
    elif "ffn_down" in name:
        layer = _layer(name) or 0
        if preset in ("q4_k_m", "q5_k_m") and use_more_bits(layer, layers):
            wanted = "q6_k"
        elif preset in ("q4_0", "q5_0") and imatrix and layer < layers // 8:
            wanted = {"q4_0": "q4_1", "q5_0": "q5_1"}[preset]
    return _fallback(name, shape, wanted, why)


def check_type_name(name: str, kind: str) -> str:
    if name not in TYPES or not TYPES[name].packed:
        raise SlimlmError(f"unknown GGUF type '{name}' for {kind}", f"use one of: {', '.join(WRITABLE)}")
    return name


def _user_choice(tensor: str, shape, wanted: str, why: str) -> TypeChoice:
    if shape[-1] % gguf_type(wanted).block:
        raise SlimlmError(
            f"{why} asks for {wanted} on {tensor} of shape {tuple(shape)}, but its rows of {shape[-1]} do not split "
            f"into {TYPES[wanted].block}-weight blocks",
            f"types that hold it: {', '.join(t for t in types_for_shape(shape))}",
        )
    return TypeChoice(wanted, why)


def parse_tensor_type(spec: str) -> tuple[str, str]:
    """'REGEX=TYPE' (llama-quantize's --tensor-type) -> (regex, type); the regex compiled to check it."""
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern:
        raise SlimlmError(
            f"--tensor-type '{spec}' is not REGEX=TYPE", r"write e.g. --tensor-type 'blk\.\d+\.ffn_down\.weight=q6_k'"
        )
    try:
        re.compile(pattern)
    except re.error as err:
        raise SlimlmError(
            f"--tensor-type '{spec}': '{pattern}' is not a regular expression ({err})", "fix the pattern"
        ) from None
    return pattern, check_type_name(type_name.strip().lower(), f"--tensor-type {pattern}")


def resolve_tensor_types(
    shapes: Mapping[str, Sequence[int]],
    default: str,
    patterns: Sequence[tuple[str, str]] = (),
    embedding_type: str | None = None,
    output_type: str | None = None,
    imatrix: bool = True,
) -> dict[str, TypeChoice]:
    """GGUF tensor name -> its type and why, for every tensor llama.cpp quantizes.

    `shapes` are torch shapes (rows last) by GGUF name; `default` a preset name or a type (every tensor at that
    type, shape fallbacks as llama-quantize --pure); `patterns` (regex, type) pairs in order, first match wins."""
    if default not in PRESETS and default not in QUANTIZED:
        raise SlimlmError(
            f"unknown GGUF preset or type '{default}'", f"presets: {', '.join(PRESETS)}; types: {', '.join(QUANTIZED)}"
        )
    for kind, value in (("--embedding-type", embedding_type), ("--output-type", output_type)):
        if value is not None:
            check_type_name(value, kind)
    names = [name for name, shape in shapes.items() if quantizable(name, shape)]
    tied = "output.weight" not in shapes
    layers = 1 + max((_layer(name) or 0 for name in names), default=0)
    matched: set[str] = set()
    chosen = {}
    for name in names:
        shape = shapes[name]
        pattern = next(((p, t) for p, t in patterns if re.search(p, name)), None)
        if pattern is not None:
            matched.add(pattern[0])
        if embedding_type is not None and name == "token_embd.weight":
            chosen[name] = _user_choice(name, shape, embedding_type, "--embedding-type")
        elif output_type is not None and (name == "output.weight" or (tied and name == "token_embd.weight")):
            chosen[name] = _user_choice(name, shape, output_type, "--output-type")
        elif pattern is not None:
            chosen[name] = _user_choice(name, shape, pattern[1], f"--tensor-type {pattern[0]}")
        elif default in PRESETS:
            chosen[name] = _preset_choice(name, shape, default, tied, layers, imatrix)
        else:
            chosen[name] = _fallback(name, shape, default, f"--gguf-type {default}")
    unmatched = [p for p, _ in patterns if p not in matched]
    if unmatched:
        raise SlimlmError(
            f"--tensor-type '{unmatched[0]}' matches no tensor of this model",
            f"GGUF tensor names look like: {', '.join(names[:3])}, …, {names[-1]}",
        )
    return chosen


def preset_tensor_types(model_or_shapes, preset: str, imatrix: bool = True) -> dict[str, str]:
    """llama.cpp's per-tensor choice for `preset` (fallbacks resolved): GGUF tensor name -> type.

    `model_or_shapes`: a model slimlm's GGUF writer takes, or {GGUF name: torch shape}."""
    if preset not in PRESETS:
        raise SlimlmError(f"unknown GGUF preset '{preset}'", f"use one of: {', '.join(PRESETS)}")
    shapes = model_or_shapes if isinstance(model_or_shapes, Mapping) else gguf_tensor_shapes(model_or_shapes)
    return {name: choice.type for name, choice in resolve_tensor_types(shapes, preset, imatrix=imatrix).items()}


def gguf_tensor_shapes(model) -> dict[str, tuple[int, ...]]:
    """{GGUF tensor name: torch shape} of every tensor slimlm's writer would put in the file, nothing quantized."""
    from slimlm.export.gguf import tensor_layout

    return {name: tuple(shape) for name, shape in tensor_layout(model).items()}


def mixture_bytes(shapes: Mapping[str, Sequence[int]], types: Mapping[str, str]) -> int:
    """Bytes of the quantizable tensors at `types` (the rest: 1-D as F32, others F16)."""
    total = 0
    for name, shape in shapes.items():
        default = "f32" if len(shape) == 1 else "f16"
        total += tensor_bytes(types.get(name, default), shape)
    return total
