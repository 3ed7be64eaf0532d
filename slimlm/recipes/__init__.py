"""Recipes: YAML lists of stages, each parsed into its method's frozen config dataclass and validated on load.

    - method: magnitude
      pattern: "2:4"
    - method: rtn
      bits: 8
      group_size: null

A file may also be a mapping with `description:` and `stages:`. Shipped recipes live in `recipes/shipped/`.
"""

from __future__ import annotations

import dataclasses
import difflib
import reprlib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from slimlm.errors import SlimlmError
from slimlm.recipes.registry import METHODS
from slimlm.stage import StageConfig


@dataclass(frozen=True)
class ExportStep:
    """The recipe's `export:` key: after the result is saved, also write it in an engine's format beside it
    (`OUT.gguf`, or `OUT-compressed-tensors` / `OUT-hf`), through `slimlm.export.export_model`."""

    format: str  # gguf, compressed-tensors or hf
    gguf_type: str = "auto"  # gguf only: auto (keep the quantizer's codes where a block type holds them), f16, bf16, q8_0, q4_0, q4_1, ...
    preset: str | None = None  # gguf only: llama.cpp's per-tensor mix (q4_0 … q8_0, q4_k_m, q5_k_m, q6_k)
    tensor_types: tuple[tuple[str, str], ...] = ()  # gguf only: (regex over GGUF tensor names, type), first match wins
    embedding_type: str | None = None  # gguf only: token_embd.weight's type
    output_type: str | None = None  # gguf only: output.weight's type
    method: str = "rtn"  # gguf only: rtn, imatrix or gptq (codes chosen on the recipe's default calibration data)
    # what `slimlm search` writes (gguf, compressed-tensors): every tensor's TYPE/METHOD (base numbering), the blocks removed and the
    # calibration windows of its statistics; replayed by `slimlm.search.replay`, the same bytes as the searched file
    tensors: tuple[tuple[str, str], ...] = ()
    remove_blocks: tuple[int, ...] = ()
    calibration: object = None  # CalibrationSettings of the replay's statistics (with `tensors`)

    def gguf_options(self):
        """The `export.GGUFOptions` this step asks for."""
        from slimlm.export import GGUFOptions

        return GGUFOptions(
            preset=self.preset,
            tensor_types=tuple(f"{p}={t}" for p, t in self.tensor_types),
            embedding_type=self.embedding_type,
            output_type=self.output_type,
            method=self.method,
        )


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    stages: tuple[StageConfig, ...]
    export: ExportStep | None = None

    def to_list(self) -> list[dict]:
        """The recipe as plain data (what the manifest records)."""
        return [{"method": stage.method, **dataclasses.asdict(stage)} for stage in self.stages]


def shipped_dir() -> Path:
    return Path(str(resources.files("slimlm.recipes") / "shipped"))


def shipped_recipes() -> dict[str, Path]:
    return {path.stem: path for path in sorted(shipped_dir().glob("*.yaml"))}


TOP_LEVEL_KEYS = ("name", "description", "stages", "export")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few lines; anything near this is not one


def _short(value: object) -> str:
    """repr(value) cut to a few dozen characters: an error message never prints an unbounded value."""
    bounded = reprlib.Repr()
    bounded.maxstring = bounded.maxother = 60
    bounded.maxlevel = 2
    return bounded.repr(value)


def _closest(key: object, allowed) -> str:
    """' (closest: 'x')' for a likely typo of an allowed key, else ''."""
    match = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (closest: '{match[0]}')" if match else ""


def _unknown_keys(where: str, keys, allowed) -> None:
    unknown = [key for key in keys if key not in allowed]
    if unknown:
        key = unknown[0]
        raise SlimlmError(
            f"{where}: unknown key {_short(key)}",
            f"allowed keys: {', '.join(map(str, allowed))}{_closest(key, allowed)}",
        )


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors/aliases: nested aliases expand exponentially ("billion laughs"), and a
    recipe never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise SlimlmError(
                f"recipe '{mark.name}' uses a YAML alias at line {mark.line + 1}, column {mark.column + 1}",
                "write the value out in full: slimlm reads recipes without YAML anchors and aliases",
            )
        return super().compose_node(parent, index)


def read_recipe_yaml(path: Path) -> object:
    """The YAML of a recipe file, bounded: refused past MAX_RECIPE_BYTES and when it uses aliases."""
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise SlimlmError(
            f"recipe '{path}' is {size} bytes",
            f"a recipe is a short YAML list of stages (at most {MAX_RECIPE_BYTES} bytes)",
        )
    return yaml.load(path.read_text(), Loader=_NoAliasLoader)


def _field_types(config_class: type) -> dict[str, object]:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


_NOT_ALLOWED = object()  # what `_coerce` answers for a value its annotation does not allow


def _coerce(value: object, annotation: object) -> object:
    """A YAML scalar as the field annotation's type (int, float, bool, str, or X | None); `_NOT_ALLOWED` if none fits."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    return _NOT_ALLOWED


def _type_names(annotation: object) -> str:
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return " or ".join("null" if o is type(None) else o.__name__ for o in options)


def parse_stage(raw: object, where: str) -> StageConfig:
    if not isinstance(raw, dict) or "method" not in raw:
        raise SlimlmError(f"{where}: a stage must be a mapping with a 'method' key", "write e.g. '- method: magnitude'")
    method = raw["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise SlimlmError(
            f"{where}: unknown method {_short(method)}",
            f"known methods: {', '.join(sorted(METHODS))}{_closest(method, METHODS)}",
        )
    config_class = METHODS[method].config
    fields = _field_types(config_class)
    values = {}
    for key, value in raw.items():
        if key == "method":
            continue
        _unknown_keys(f"{where} ({method})", [key], fields)
        values[key] = _coerce(value, fields[key])
        if values[key] is _NOT_ALLOWED:
            hint = ' (YAML reads an unquoted 2:4 as a number: quote it, "2:4")' if key == "pattern" else ""
            expected = _type_names(fields[key])
            raise SlimlmError(
                f"{where} ({method}): '{key}' is {_short(value)}, expected {expected}{hint}",
                f"fix '{key}' in the recipe",
            )
    try:
        return config_class(**values)
    except SlimlmError as err:
        raise SlimlmError(f"{where}: {err.problem}", err.fix) from None


def parse_export(raw: object, name: str) -> ExportStep:
    """`export: gguf` or `export: {format: gguf, gguf_type: q4_0}`."""
    from slimlm.export import FORMATS
    from slimlm.export.gguf import GGUF_TYPES

    where = f"recipe '{name}', export"
    if isinstance(raw, str):
        raw = {"format": raw}
    if not isinstance(raw, dict) or "format" not in raw:
        raise SlimlmError(
            f"{where}: expected a format name or a mapping with 'format'",
            f"write e.g. 'export: gguf' or 'export: {{format: gguf, gguf_type: q4_0}}' (formats: {', '.join(FORMATS)})",
        )
    gguf_keys = ("preset", "tensor_types", "embedding_type", "output_type", "method")
    replay_keys = ("tensors", "remove_blocks", "calibration")
    _unknown_keys(where, raw, ("format", "gguf_type", *gguf_keys, *replay_keys))
    if "tensors" in raw:
        return _parse_replay(raw, where, gguf_keys)
    if any(key in raw for key in replay_keys):
        raise SlimlmError(
            f"{where}: {', '.join(k for k in replay_keys if k in raw)} go with 'tensors' (a searched file's recipe)",
            "add tensors: {GGUF name: TYPE/METHOD}, or drop them",
        )
    tensor_types = raw.get("tensor_types") or {}
    if not isinstance(tensor_types, dict):
        raise SlimlmError(
            f"{where}: tensor_types must map regexes to types",
            r"write e.g. tensor_types: {'blk\.\d+\.ffn_down\.weight': q6_k}",
        )
    optional = {
        key: None if raw.get(key) is None else str(raw[key]) for key in ("preset", "embedding_type", "output_type")
    }
    step = ExportStep(
        str(raw["format"]),
        str(raw.get("gguf_type", "auto")),
        tensor_types=tuple((str(p), str(t)) for p, t in tensor_types.items()),
        method=str(raw.get("method", "rtn")),
        **optional,
    )
    if step.format not in FORMATS:
        raise SlimlmError(f"{where}: unknown format '{step.format}'", f"use one of: {', '.join(FORMATS)}")
    if step.gguf_type != "auto" and (step.format != "gguf" or step.gguf_type not in GGUF_TYPES):
        raise SlimlmError(
            f"{where}: gguf_type '{step.gguf_type}' does not apply here",
            f"gguf_type is for format gguf: auto or one of {', '.join(GGUF_TYPES)}",
        )
    if step.format != "gguf" and any(key in raw for key in gguf_keys):
        raise SlimlmError(
            f"{where}: {', '.join(k for k in gguf_keys if k in raw)} apply to format gguf only",
            "drop them or use format: gguf",
        )
    if step.format == "gguf":
        from slimlm.export import check_gguf_options

        try:
            check_gguf_options(step.gguf_options())
        except SlimlmError as err:
            raise SlimlmError(f"{where}: {err.problem}", err.fix) from None
    return step


def _parse_replay(raw: dict, where: str, gguf_keys: tuple[str, ...]) -> ExportStep:
    """The export step of a `slimlm search` recipe: every tensor's TYPE/METHOD, removed blocks, calibration."""
    from slimlm.search.space import Option
    from slimlm.settings import CalibrationSettings

    if raw["format"] not in ("gguf", "compressed-tensors") or any(key in raw for key in (*gguf_keys, "gguf_type")):
        raise SlimlmError(
            f"{where}: 'tensors' (a searched file) goes with format gguf or compressed-tensors alone, without {', '.join(gguf_keys)} or gguf_type",
            "keep the export step slimlm search wrote",
        )
    tensors = raw["tensors"]
    if not isinstance(tensors, dict) or not tensors:
        raise SlimlmError(
            f"{where}: tensors must map GGUF tensor names to TYPE/METHOD",
            "write e.g. tensors: {blk.0.attn_q.weight: q4_0/gptq, ...}",
        )
    for tensor, label in tensors.items():
        try:
            Option.parse(str(label))
        except SlimlmError as err:
            raise SlimlmError(f"{where}: tensors: {tensor}: '{label}' is not TYPE/METHOD", err.fix) from None
    removed = raw.get("remove_blocks") or []
    if not isinstance(removed, list) or not all(isinstance(b, int) and b >= 0 for b in removed):
        raise SlimlmError(
            f"{where}: remove_blocks must be a list of block indices", "write e.g. remove_blocks: [27, 12]"
        )
    calibration = raw.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise SlimlmError(
            f"{where}: calibration must be a mapping", "write e.g. calibration: {samples: 8, seqlen: 512, seed: 0}"
        )
    _unknown_keys(f"{where}, calibration", calibration, ("data", "samples", "seqlen", "seed"))
    try:
        settings = CalibrationSettings(**calibration)
    except (TypeError, ValueError) as err:
        raise SlimlmError(
            f"{where}, calibration: {err}", "write e.g. calibration: {samples: 8, seqlen: 512, seed: 0}"
        ) from None
    return ExportStep(
        str(raw["format"]),
        tensors=tuple((str(t), str(o)) for t, o in tensors.items()),
        remove_blocks=tuple(removed),
        calibration=settings,
    )


def parse_recipe(data: object, name: str, description: str = "") -> Recipe:
    export = None
    if isinstance(data, dict):
        _unknown_keys(f"recipe '{name}'", data, TOP_LEVEL_KEYS)
        name = str(data.get("name") or name)  # the file's stem unless the recipe names itself
        description = data.get("description", description)
        export = parse_export(data["export"], name) if data.get("export") is not None else None
        data = data.get("stages")
        if export is not None and data in (None, []):
            return Recipe(name, description, (), export)  # export alone: the model as it is, in the export's format
    if not isinstance(data, list) or not data:
        raise SlimlmError(f"recipe '{name}' has no stages", "write a YAML list of stages, e.g. '- method: magnitude'")
    stages = tuple(parse_stage(raw, f"recipe '{name}', stage {i + 1}") for i, raw in enumerate(data))
    return Recipe(name, description, stages, export)


def recipe_outline(path: Path) -> tuple[str, list[str]]:
    """A shipped recipe's description and its stages' method names, read without building the stages (listing
    recipes needs no method module, hence no torch)."""
    data = read_recipe_yaml(path)
    stages = data.get("stages", []) if isinstance(data, dict) else data
    description = data.get("description", "") if isinstance(data, dict) else ""
    return description, [str(stage.get("method")) for stage in stages or [] if isinstance(stage, dict)]


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a YAML file by path."""
    shipped = shipped_recipes()
    if name_or_path in shipped:
        path = shipped[name_or_path]
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise SlimlmError(
                f"recipe '{name_or_path}' is neither a shipped recipe nor a file",
                f"shipped recipes: {', '.join(shipped)} (see 'slimlm recipes')",
            )
    try:
        data = read_recipe_yaml(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SlimlmError(f"recipe '{path}' is not valid YAML{where}: {problem}", "fix the YAML syntax") from None
    return parse_recipe(data, path.stem)
