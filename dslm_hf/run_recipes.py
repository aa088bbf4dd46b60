"""Recipes: the settings of a pretraining run as a JSON file, so that a shipped checkpoint is rebuilt by
`dslm pretrain --recipe NAME`; and `--config_overrides`, read with transformers' `PretrainedConfig.update_from_string`.

A recipe is a JSON object (never a pickle) whose keys are

* `dslm-pretrain` argument names (`PretrainingArguments` fields: objective, learning_rate, max_steps,
  per_device_train_batch_size, block_size, validation_fraction, dataset, ...): they become the parser's defaults,
  so a flag given on the command line wins;
* `model`: `{"preset": NAME, FIELD: VALUE, ...}`, a preset of dslm_hf/presets and `DeepScaleLMConfig` fields laid
  over it; `--config_overrides` applies on top; an explicit `--preset` or `--config_name` replaces the whole section;
* `description`, `notes`: prose; `corpus`: what text the recipe trains on. A recipe with a `corpus` and no `dataset`
  leaves the text file to the command line (`--dataset PATH`), which is then required.

`--recipe NAME` is a shipped recipe (dslm_hf/recipes/NAME.json); anything ending in .json, or an existing file, is
a path. Unknown keys are refused with the closest valid one. The run records the recipe's name and content in its
arguments: the first line of metrics.jsonl and, through scripts/build_checkpoint.py, training["recipe"] of the
evaluation record.
"""

import argparse
import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from .cli import UserError, check_known_keys, usage_errors_as_user_errors
from .configuration_deepscalelm import DeepScaleLMConfig

RECIPES_DIR = Path(__file__).parent / "recipes"
PRESETS_DIR = Path(__file__).parent / "presets"
MODEL_SECTION = "model"
PROSE_KEYS = ("description", "notes", "corpus")
# Arguments that belong to one machine's run, not to a recipe: a recipe holding them is refused.
NOT_IN_RECIPES = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "recipe")


@dataclass(frozen=True)
class Recipe:
    name: str  # as given after --recipe
    path: Path
    content: dict  # the file's JSON object

    @property
    def run(self) -> dict:
        """The dslm-pretrain arguments the recipe sets."""
        return {key: value for key, value in self.content.items() if key not in (MODEL_SECTION, *PROSE_KEYS)}

    @property
    def model(self) -> dict:
        return dict(self.content.get(MODEL_SECTION) or {})

    @property
    def leaves_dataset_to_the_command_line(self) -> bool:
        return "corpus" in self.content and "dataset" not in self.content


def shipped_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.json"))


def recipe_path(name: str) -> Path:
    """A shipped recipe's file, or the path itself for something that names a file (ends in .json or exists)."""
    if name in shipped_recipes():
        return RECIPES_DIR / f"{name}.json"
    if name.endswith(".json") or Path(name).is_file() or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--recipe {name}: no such file; give a recipe JSON file or one of the shipped "
                            f"recipes: {', '.join(shipped_recipes())}")
        return path
    close = difflib.get_close_matches(name, shipped_recipes(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"--recipe {name}: no shipped recipe of that name; {hint}shipped recipes: "
                    f"{', '.join(shipped_recipes())} (or give the path of a recipe JSON file)")


def load_recipe(name: str, arguments_class) -> Recipe:
    """The recipe `name` (shipped name or JSON path), its keys and value types checked against the fields of
    `arguments_class` (the pretraining arguments) and DeepScaleLMConfig."""
    path = recipe_path(name)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"--recipe {name}: {path} is not JSON ({error}): a recipe is a JSON object") from None
    if not isinstance(content, dict):
        raise UserError(f"--recipe {name}: {path} holds a JSON {type(content).__name__}: a recipe is a JSON object")
    recipe = Recipe(name, path, content)
    fields = {field.name: field for field in dataclasses.fields(arguments_class) if field.init}
    source = f"--recipe {name} ({path})"
    for key in NOT_IN_RECIPES:
        if key in content:
            raise UserError(f"{source}: {key!r} belongs to one run, not to a recipe: remove it and give --{key} on "
                            "the command line")
    check_known_keys(recipe.run, set(fields) - set(NOT_IN_RECIPES) | {MODEL_SECTION, *PROSE_KEYS}, source)
    for key, value in recipe.run.items():
        check_type(source, key, value, fields[key].type)
    for key in PROSE_KEYS:
        if key in content and not isinstance(content[key], str):
            raise UserError(f"{source}: {key!r} is prose: give a string")
    check_model_section(source, content.get(MODEL_SECTION))
    return recipe


def check_model_section(source: str, model) -> None:
    if model is None:
        raise UserError(f"{source}: no 'model' section: give {{\"preset\": NAME, ...}} (presets: "
                        f"{', '.join(available_presets())})")
    if not isinstance(model, dict):
        raise UserError(f"{source}: 'model' must be a JSON object of a preset and DeepScaleLMConfig fields")
    if model.get("preset") not in available_presets():
        raise UserError(f"{source}: model.preset={model.get('preset')!r} is invalid: expected one of "
                        f"{available_presets()}")
    known = {field.name for field in dataclasses.fields(DeepScaleLMConfig)}
    check_known_keys(model, known | {"preset"}, f"{source}: model")


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


def check_type(source: str, key: str, value, annotation) -> None:
    """Refuse a recipe value the argument's type does not take (a string for an int, a float for a count)."""
    allowed = typing.get_args(annotation) or (annotation,)
    ok = (value is None and type(None) in allowed) or any(
        (kind is bool and isinstance(value, bool)) or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str)) for kind in allowed)
    if not ok:
        names = " or ".join("null" if kind is type(None) else getattr(kind, "__name__", str(kind)) for kind in allowed)
        raise UserError(f"{source}: {key}={json.dumps(value)} is invalid: expected {names}")


# ----------------------------------------------------------------------------------------------------------------
# The command line: which recipe, and which of its parts the command line replaces
# ----------------------------------------------------------------------------------------------------------------
def _flags(name: str) -> list[str]:
    """HfArgumentParser's spellings of a field's flag: --snake_case and --kebab-case."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def explicit_values(argv: list[str], names: tuple[str, ...], prog: str = "dslm-pretrain") -> dict:
    """The values of the flags `names` that `argv` gives explicitly (argparse reads them; dslm-pretrain refuses abbreviated flags, so none slips past)."""
    scout = usage_errors_as_user_errors(argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False))
    for name in names:
        scout.add_argument(*_flags(name), dest=name, default=None)
    known, _ = scout.parse_known_args(argv)
    return {name: value for name, value in vars(known).items() if value is not None}


def recipe_defaults(recipe: Recipe, argv: list[str]) -> tuple[dict, dict | None]:
    """(parser defaults from the recipe, the model section that applies or None when --preset/--config_name
    replace it). Explicit flags still win over these defaults, because argparse applies them first."""
    given = explicit_values(argv, ("preset", "config_name", "dataset"))
    defaults = recipe.run
    model = None
    if "preset" not in given and "config_name" not in given:
        model = recipe.model
        defaults["preset"] = model.pop("preset")
    if recipe.leaves_dataset_to_the_command_line and "dataset" not in given:
        raise UserError(f"--recipe {recipe.name} trains on {recipe.content['corpus']}: give that text file with "
                        "--dataset PATH")
    return defaults, model


def resolved_content(recipe: Recipe, model: dict | None) -> dict:
    """What the run records: the recipe's name and content, its model section as applied (null when --preset or
    --config_name replaced it)."""
    content = dict(recipe.content)
    if model is None:
        content[MODEL_SECTION] = None
    return {"name": recipe.name, "file": recipe.path.name, "content": content}


# ----------------------------------------------------------------------------------------------------------------
# --config_overrides
# ----------------------------------------------------------------------------------------------------------------
class _OverrideTarget:
    """An object with one attribute per config field, holding a value of the field's scalar type, so that
    `PretrainedConfig.update_from_string` converts each value to that type (int, float, bool as true/false/1/0/yes/no,
    str) whatever the field's current value (many are None until the config fills them). Records what it is given."""

    def __init__(self, kinds: dict[str, type | None]):
        self.__dict__["given"] = {}
        for name, kind in kinds.items():
            self.__dict__[name] = None if kind is None else kind()

    def __setattr__(self, name, value):
        self.given[name] = value
        self.__dict__[name] = value


SCALARS = {"float": float, "int": int, "bool": bool, "str": str, "None": type(None)}


def scalar_kind(annotation) -> type | None:
    """The type update_from_string converts a field's value to: float when the field takes floats, then int, bool,
    str (Literal choices are strings); None for fields that take no scalar (lists, dicts)."""
    if isinstance(annotation, str):  # a postponed annotation (the base class's fields): 'bool | None', 'Literal[...]'
        allowed = [str if part.strip().startswith("Literal") else SCALARS.get(part.strip(), list)
                   for part in annotation.split("|")]
    else:
        parts = typing.get_args(annotation) if typing.get_origin(annotation) is not typing.Literal else ()
        allowed = [str if typing.get_origin(kind) is typing.Literal else kind for kind in parts or (annotation,)]
    for kind in (float, int, bool, str):
        if kind in allowed:
            return kind
    return None


def config_field_kinds() -> dict[str, type | None]:
    return {field.name: scalar_kind(field.type) for field in dataclasses.fields(DeepScaleLMConfig)}


def parse_config_overrides(text: str | None) -> dict:
    """'num_hidden_layers=4,hidden_dropout_prob=0,hidden_act=gelu' -> {"num_hidden_layers": 4,
    "hidden_dropout_prob": 0.0, "hidden_act": "gelu"}, with transformers' `PretrainedConfig.update_from_string`:
    items split at commas, each key=value, the value converted to the field's type. An unknown key (with the
    closest valid one) or a value that does not convert is a one-line UserError naming the item."""
    if not text:
        return {}
    kinds = config_field_kinds()
    target = _OverrideTarget(kinds)
    items = [item.strip() for item in text.split(",")]  # update_from_string's own split, blanks around items allowed
    for item in filter(None, items):  # one item at a time, so an error names its item; a trailing comma is harmless
        key, sep, _ = item.partition("=")
        if sep and key not in kinds:
            check_known_keys([key], kinds, "--config_overrides")
        try:
            PretrainedConfig.update_from_string(target, item)
        except (ValueError, TypeError) as error:
            why = f"{item!r} is not key=value" if not sep or "=" in item[len(key) + 1:] else f"item {item!r}: {error}"
            raise UserError(f"--config_overrides gives an invalid model configuration ({why}): give comma-separated "
                            "key=value pairs, e.g. num_hidden_layers=4,hidden_dropout_prob=0") from None
    return dict(target.given)
