"""What the search may choose: per tensor, a storage type of the target format and the method that fills it.

A *knob* is one tensor of the exported file (a block linear, the token embedding, an untied output head); its
*options* are (type, method) pairs the target engine holds on that tensor's shape:

    type    GGUF block types (q4_0, q4_1, q5_0, q5_1, q8_0, the k-quants where rows allow them, f16)
    method  rtn   importance-weighted round-to-nearest (the block search of `export.gguf_types`: llama.cpp's
                  imatrix weighting, from slimlm's calibration statistics; for the embedding, one weight per
                  element, and what it gets where GPTQ is asked)
            gptq  GPTQ's error feedback on the type's own grid (its 32-weight blocks or k-quant sub-blocks of
                  16/32, the scales as the file stores them, the type's code range and zero-point convention),
                  so the codes GPTQ chose are the codes the file holds
            ref   llama.cpp's reference quantizer without importance (what `llama-quantize` does without an
                  imatrix): searched where nothing better pays (Q8_0, F16), and the
                  encoding of llama.cpp's presets on the front

Blocks may also be removed whole (depth pruning); that choice lives beside the knobs (`SearchSpace.depth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import adapter_for, decoder_blocks, linear_weight

TARGETS = ("gguf", "compressed-tensors")  # the second: slimlm.search.compressed_tensors
# Block-linear types searched by default, cheapest first; k-quants join where slimlm packs them and rows allow.
GGUF_LINEAR_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16")
GGUF_KQUANT_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
GGUF_EMBEDDING_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16")
GPTQ_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q3_k", "q2_k")  # where error feedback pays
METHODS = ("rtn", "gptq", "ref")
DEFAULT_METHODS = (
    "gptq",
    "ref",
)  # GPTQ on 4/5-bit blocks (the embedding: importance-weighted rounding), the reference quantizer for Q8_0
REFERENCE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16")  # the types the gguf package quantizes itself


@dataclass(frozen=True, order=True)
class Option:
    type: str
    method: str

    @property
    def label(self) -> str:
        return f"{self.type}/{self.method}"

    @classmethod
    def parse(cls, label: str) -> Option:
        type_, _, method = label.partition("/")
        if not type_ or method not in METHODS:
            raise SlimlmError(
                f"'{label}' is not a search option",
                f"write TYPE/METHOD, e.g. q4_0/gptq (methods: {', '.join(METHODS)})",
            )
        return cls(type_, method)


@dataclass(frozen=True)
class Knob:
    module: str  # HF module name, e.g. model.layers.3.mlp.down_proj, or model.embed_tokens
    tensor: str  # GGUF tensor name at the base model's block numbering, e.g. blk.3.ffn_down.weight
    block: int | None  # decoder block index; None for the embedding / output head
    shape: tuple[int, int]  # (out, in) as the model computes with it (rows along in)
    options: tuple[Option, ...]  # searchable options (baseline-only `ref` options are added by the database)
    role: str = "linear"  # "linear", "embedding" (tied: also the output head), "output"
    shared: str = ""  # linears of one block reading the same input share this key (q/k/v, gate/up)


@dataclass(frozen=True)
class SearchSpace:
    target: str
    knobs: tuple[Knob, ...]
    depth: tuple[int, ...] = field(default=())  # blocks that may be removed whole (candidates, least harmful first)

    def knob(self, tensor: str) -> Knob:
        return next(k for k in self.knobs if k.tensor == tensor)

    def activation_kinds(self) -> tuple[str, ...]:
        """The activation types llama.cpp rounds the searched tensors' inputs to (`export.gguf_activations`)."""
        if self.target != "gguf":
            return ()
        from slimlm.export.gguf_types import TYPES

        return tuple(sorted({TYPES[o.type].activations for k in self.knobs for o in k.options}))


def _writable(type_: str) -> bool:
    from slimlm.export.gguf_types import TYPES

    return type_ in TYPES and TYPES[type_].packed


def gguf_options(shape: tuple[int, int], types: tuple[str, ...], methods: tuple[str, ...]) -> tuple[Option, ...]:
    """Every (type, method) slimlm can write on rows of shape[1]: GPTQ only where its error feedback pays, the
    reference quantizer where no other asked-for method applies (Q8_0, F16)."""
    from slimlm.export.gguf_types import TYPES

    options = []
    for type_ in types:
        if not _writable(type_) or shape[1] % TYPES[type_].block:
            continue
        chosen = {m for m in methods if m != "gptq" or type_ in GPTQ_TYPES}
        if "ref" in chosen and type_ not in REFERENCE_TYPES:
            chosen = (chosen - {"ref"}) | {"rtn"}  # k-quants: the gguf package has no reference quantizer for them
        if not chosen:
            chosen = {"ref" if type_ in REFERENCE_TYPES else "rtn"}
        options.extend(Option(type_, m) for m in METHODS if m in chosen)
    return tuple(options)


def gguf_tensor_name(model: nn.Module, module: str) -> str:
    """GGUF name of a block linear / the embedding / the head, in llama.cpp's LLM_TENSOR_* naming."""
    from slimlm.export.gguf import linear_tensor_name

    adapter = adapter_for(model)
    if module == adapter.embed:
        return "token_embd.weight"
    if module == adapter.lm_head:
        return "output.weight"
    index, _, rel = module.removeprefix(adapter.blocks + ".").partition(".")
    return linear_tensor_name(model, int(index), rel)


def tied_output(model: nn.Module) -> bool:
    adapter = adapter_for(model)
    return (
        model.get_submodule(adapter.lm_head).weight.data_ptr() == model.get_submodule(adapter.embed).weight.data_ptr()
    )


def gguf_search_space(
    model: nn.Module,
    linear_types: tuple[str, ...] | None = None,
    embedding_types: tuple[str, ...] = GGUF_EMBEDDING_TYPES,
    methods: tuple[str, ...] = DEFAULT_METHODS,
) -> SearchSpace:
    """One knob per block linear and for the embedding (and the output head when untied)."""
    from slimlm.export.gguf import check_gguf_config

    check_gguf_config(model.config)
    linear_types = linear_types or GGUF_LINEAR_TYPES + GGUF_KQUANT_TYPES
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SlimlmError(f"unknown search method(s): {', '.join(unknown)}", f"use some of: {', '.join(METHODS)}")
    adapter = adapter_for(model)
    knobs = []
    embed = model.get_submodule(adapter.embed).weight
    roles = [("embedding", adapter.embed, embed)]
    if not tied_output(model):
        roles.append(("output", adapter.lm_head, model.get_submodule(adapter.lm_head).weight))
    for role, module, weight in roles:
        shape = tuple(weight.shape)
        # GPTQ has no input to feed errors forward through in a lookup table: the embedding gets importance-weighted
        # rounding in its place (per weight, `search.statistics.embedding_importance`; 2.7x less KL at Q4_0's size)
        options = gguf_options(
            shape, embedding_types, tuple(dict.fromkeys("rtn" if m == "gptq" else m for m in methods))
        )
        knobs.append(Knob(module, gguf_tensor_name(model, module), None, shape, options, role))
    for index in range(len(decoder_blocks(model))):
        for rel in adapter.linears():
            module = f"{adapter.blocks}.{index}.{rel}"
            shape = tuple(linear_weight(model.get_submodule(module)).shape)
            options = gguf_options(shape, linear_types, methods)
            if not options:
                raise SlimlmError(
                    f"{module} {shape}: no searched GGUF type holds rows of {shape[1]}", "search other --types"
                )
            shared = next((group[0] for group in adapter.shared_inputs if rel in group), rel)
            knobs.append(Knob(module, gguf_tensor_name(model, module), index, shape, options, shared=shared))
    return SearchSpace("gguf", tuple(knobs))
