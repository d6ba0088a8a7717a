"""Load a job YAML plus `key=value` overrides into a typed, validated OmegaConf config.

Every failure becomes one SpecError paragraph that names the file and line (or the override),
the key path and the value at fault, so `orch submit` can print it and exit 2. A YAML file that
would load but not mean what it says is refused too: an empty file, a key written twice.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import fields, is_dataclass
from typing import Iterable, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jobspec import atomic
from jobspec.checks import SpecError, check_launch, check_plain_values, check_values
from jobspec.kinds import KINDS
from jobspec.trl_aliases import apply_aliases
from jobspec.prepared_data import check_prepared, default_dir
from jobspec.schedule_fit import fit_schedule
from jobspec.starting_points import FindRun, resolve_starting_points
from model.config import SIZES, size_keys


def schema_keys(schema, prefix: str = "") -> list[str]:
    """Every dotted key a schema accepts: ['kind', 'model.n_layer', ...]."""
    keys = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += schema_keys(type(default), key + ".")
        else:
            keys.append(key)
    return keys


def schema_shapes(schema, prefix: str = "") -> dict[str, str]:
    """Every dotted key a schema accepts, and what it holds: 'section' (keys of its own), 'list' or 'value'."""
    shapes = {}
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            shapes[key] = "section"
            shapes.update(schema_shapes(type(default), key + "."))
        elif f.metadata.get("entries"):  # a list of mappings, each with the keys of that dataclass (grpo.rewards)
            shapes[key] = "records"
        else:
            shapes[key] = "list" if isinstance(default, list) else "mapping" if isinstance(default, dict) else "value"
    return shapes


def _check_shapes(node: dict, where, shapes: dict[str, str], prefix: str = "") -> None:
    """A section given a value, a list given a single value or a value given a list or mapping: one paragraph
    naming the key, instead of OmegaConf's words for it ("AnyNode is not a ListConfig"). Unknown keys are
    left to _check_known."""
    for name, value in node.items():
        key, shape = f"{prefix}{name}", shapes.get(f"{prefix}{name}")
        if shape == "section" and isinstance(value, dict):
            _check_shapes(value, where, shapes, key + ".")
        elif shape == "section":
            keys = [k[len(key) + 1 :] for k in shapes if k.startswith(key + ".") and "." not in k[len(key) + 1 :]]
            raise SpecError(
                f"{where(key)}: key '{key}' has the value {value!r}, but '{key}' is a section: set "
                f"its keys (e.g. {key}.{keys[0]}=...). Its keys: {', '.join(keys)}."
            )
        elif shape == "records" and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise SpecError(
                f"{where(key)}: key '{key}' has the value {value!r}, but it must be a list of mappings, "
                f"e.g. [{{fn: name, weight: 1.0}}]."
            )
        elif shape in ("list", "records") and not isinstance(value, list):
            raise SpecError(
                f"{where(key)}: key '{key}' has the value {value!r}, but it must be a list: "
                f"{key}=[a,b] on the command line, [a, b] in a file."
            )
        elif shape == "list" and any(isinstance(v, (list, dict)) for v in value):
            raise SpecError(
                f"{where(key)}: key '{key}' has the value {value!r}, but each of its entries must be "
                "a single value, not a list or a mapping."
            )
        elif shape == "mapping" and not (
            isinstance(value, dict) and not any(isinstance(v, (list, dict)) for v in value.values())
        ):
            raise SpecError(
                f"{where(key)}: key '{key}' has the value {value!r}, but it must be a mapping of names to single "
                f"values: {key}.NAME=value on the command line, NAME: value under it in a file."
            )
        elif shape == "value" and isinstance(value, (list, dict)):
            raise SpecError(
                f"{where(key)}: key '{key}' has the value {value!r}, but it takes a single value, "
                "not a list or a mapping."
            )


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


ALIAS_EXPANSION = 10_000  # values that aliases (*name) may add to a file: shared sections, never a bomb
MAX_DEPTH = 32  # levels of lists and mappings inside one another: a job file needs about five


def _check_depth(node, path: str) -> None:
    """Refuse YAML nested deeper than MAX_DEPTH, walked without recursion (whatever the recursion limit is)."""
    stack = [(node, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RecursionError  # reported below as "nested too deeply", like a parser that ran out of stack
        if isinstance(node, yaml.SequenceNode):
            stack += [(child, depth + 1) for child in node.value]
        elif isinstance(node, yaml.MappingNode):
            stack += [(child, depth + 1) for pair in node.value for child in pair]


def _check_aliases(root, path: str) -> None:
    """Refuse a file whose aliases would expand to more than ALIAS_EXPANSION extra values, or whose alias sits
    inside its own anchor's value: every later pass (line numbers, checks, the merge) walks each copy, so eight
    lines of nested aliases are a million values. Counted once per distinct node: the cost is the file's."""
    sizes: dict[int, Optional[int]] = {}

    def size(node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] is None:
                raise SpecError(
                    f"{path}, line {node.start_mark.line + 1}: the value anchored there (&name) holds an "
                    "alias to itself (*name), which would make it contain itself. Write it out instead."
                )
            return sizes[id(node)]  # type: ignore[return-value]
        sizes[id(node)] = None
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = total = 1 + sum(size(child) for child in children)
        return total

    if root is not None and size(root) - len(sizes) > ALIAS_EXPANSION:
        raise SpecError(
            f"{path}: its aliases (*name) expand to {size(root):,} values from {len(sizes):,} written "
            f"ones, more than the {ALIAS_EXPANSION:,} extra values a job file may get from aliases. "
            "Use fewer nested aliases, or write the values out."
        )


def _key_lines(node, path: str, prefix: str = "", lines: Optional[dict] = None) -> dict[str, int]:
    """Dotted key -> line number (1-based) for every key of a composed YAML mapping; a key written twice in
    one mapping (YAML would silently keep the last) is a SpecError naming both lines."""
    lines = {} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                raise SpecError(
                    f"{path}, line {line}: key '{prefix}{key}' is written twice (first at line "
                    f"{seen[key]}); YAML would keep only the second. Merge them into one."
                )
            seen[key] = lines[prefix + key] = line
            _key_lines(value_node, path, f"{prefix}{key}.", lines)
    return lines


def read_yaml(path: str, lines: Optional[dict] = None) -> dict:
    """A job or pipeline file as a dict; `lines`, if given, gets each dotted key's line number."""
    if not os.path.exists(path):
        raise SpecError(f"{path}: no such job file.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_aliases(node, path)  # first: it refuses an alias inside its own anchor, a cycle for the walk below
        _check_depth(node, path)
        found = _key_lines(node, path)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown place"
        raise SpecError(
            f"{path}: the YAML is malformed at {where}: {e.problem}. "
            "Fix the syntax there (indentation, a missing ':' or an unclosed quote or bracket) "
            "and submit again."
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: the file can't be read as YAML ({e}).") from None
    except RecursionError:
        raise SpecError(
            f"{path}: the YAML is nested too deeply to read (lists or mappings inside one another "
            f"more than {MAX_DEPTH} levels deep)."
        ) from None
    if raw is None:
        raise SpecError(
            f"{path}: the file is empty (or only comments): a job file says at least its kind, "
            "e.g. `kind: pretrain`. See jobs/ for examples."
        )
    if not isinstance(raw, dict):
        raise SpecError(
            f"{path}: a job file must be a mapping of keys to values, but its top level is a {type(raw).__name__}."
        )
    if lines is not None:
        lines.update(found)
    return raw


def _flatten(raw: dict, prefix: str = "") -> dict:
    """{'train': {'max_steps': 5}} -> {'train.max_steps': 5}; lists stay leaves."""
    flat = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _check_known(key: str, value, source: str, valid_keys: list[str], mappings: Sequence[str] = ()) -> None:
    """An unknown key is an error naming it, its value, the nearest valid key and its siblings."""
    sections = {k.rsplit(".", i)[0] for k in valid_keys for i in range(1, k.count(".") + 1)}  # every enclosing one
    if key in valid_keys or key in sections or any(key.startswith(k + ".") for k in mappings):
        return  # a name inside a mapping: resources.env.NAME
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    while parent and parent not in sections:  # the nearest section that exists (curate.filters for a bad filter name)
        parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    under = lambda k: (k.rsplit(".", 1)[0] if "." in k else "") == parent  # noqa: E731
    siblings = sorted({k[len(parent) + 1 :] if parent else k for k in [*valid_keys, *sections] if under(k)})
    where = f"under '{parent}'" if parent else "at the top level"
    raise SpecError(
        f"{source}: unknown key '{key}' (value {value!r}).{did_you_mean(key, valid_keys)} "
        f"Valid keys {where}: {', '.join(siblings)}."
    )


def _explain(e: OmegaConfBaseException, where) -> SpecError:
    """Turn an OmegaConf type or value error into one paragraph naming source, key and value."""
    key = getattr(e, "full_key", None) or "?"
    value = getattr(e, "value", None)
    msg = str(e).splitlines()[0]
    return SpecError(f"{where(key)}: key '{key}' has the value {value!r}, which is not valid: {msg}.")


class Origins:
    """Where each key's value came from, for error messages: "jobs/x.yaml, line 12" or the override."""

    def __init__(self, path: str, lines: dict[str, int]):
        self.path, self.lines, self.overrides = path, lines, {}

    def __call__(self, key: str, *also: str) -> str:
        """Where key's value came from; given the other keys a check read too, a command-line override of any
        of them is what gets blamed (the user's latest word), else the file's line for key, else theirs."""
        tops = [k.split("[", 1)[0] for k in (key, *also)]
        for top in tops:
            if top in self.overrides:
                return f"command line override {self.overrides[top]!r}"
        for k in (key, tops[0], *tops[1:], tops[0].rsplit(".", 1)[0]):
            if k in self.lines:
                return f"{self.path}, line {self.lines[k]}"
        return self.path


def load_spec(
    path: str,
    overrides: Sequence[str] = (),
    *,
    launch: bool = False,
    find_run: Optional[FindRun] = None,
    set_later: tuple[str, ...] = (),
) -> DictConfig:
    """YAML file + overrides -> typed config (struct mode: unknown keys are errors). launch=True adds the
    checks of what the job asks of the machines (`orch submit`, `orch config`; not torchrun's trainer): the
    starting points (checkpoint.init_from, eval.source) exist and hold a model, a run name among them resolved
    by `find_run` to its folder (jobspec/starting_points.py), except keys in `set_later` (a pipeline fills
    them in); the prepared data folder matches the data config; a warmup that does not fit the run is scaled
    (jobspec/schedule_fit.py), with a note on stderr."""
    lines: dict[str, int] = {}
    raw = read_yaml(path, lines)
    raw, overrides = apply_aliases(raw, overrides, lines, path)  # TRL's names (grpo.num_generations...) as ours
    where = Origins(path, lines)
    check_plain_values(raw, where)
    kind = raw.get("kind", "pretrain")
    for ov in overrides:
        if ov.startswith("kind="):
            kind = ov.split("=", 1)[1]
    if kind not in KINDS:
        raise SpecError(
            f"{path}: key 'kind' has the value {kind!r}, which is not a job kind.{did_you_mean(kind, KINDS)} "
            f"Known kinds: {', '.join(sorted(KINDS))}."
        )
    schema = KINDS[kind]
    valid_keys, shapes = schema_keys(schema), schema_shapes(schema)
    mappings = [k for k, shape in shapes.items() if shape == "mapping"]
    cfg = OmegaConf.structured(schema)
    _check_shapes(raw, where, shapes)
    for key, value in _flatten(raw).items():
        _check_known(key, value, where(key), valid_keys, mappings)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(raw))
    except OmegaConfBaseException as e:
        raise _explain(e, where) from None
    for ov in overrides:
        if "=" not in ov:
            raise SpecError(
                f"command line: the override {ov!r} is not of the form key=value (for example train.max_steps=50)."
            )
        source = f"command line override {ov!r}"
        key = ov.split("=", 1)[0].strip()
        _check_known(key, ov.split("=", 1)[1], source, valid_keys, mappings)
        where.overrides[key] = ov
        try:
            override = OmegaConf.from_dotlist([ov])
            check_plain_values(OmegaConf.to_container(override), where)
            _check_shapes(OmegaConf.to_container(override), where, shapes)
            cfg = OmegaConf.merge(cfg, override)
        except OmegaConfBaseException as e:
            raise _explain(e, where) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SpecError(
            f"{path}: required key '{missing[0]}' has no value; set it in the file "
            f"or on the command line ({missing[0]}=...)."
        )
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, where) from None
    _apply_size(cfg, raw, overrides, where)
    if "data" in cfg and cfg.data.dir is None:  # its own folder, named by what decides the bytes in it
        cfg.data.dir = default_dir(cfg.data)
    check_plain_values(OmegaConf.to_container(cfg), where)  # again: ${...} may have brought anything
    check_values(cfg, where)
    if launch:
        bad = _blame(cfg, where)
        resolve_starting_points(cfg, bad, find_run, skip=set_later)
        check_prepared(cfg, bad)
        note = fit_schedule(cfg)
        if note:
            print(note, file=sys.stderr)
        check_launch(cfg, where)
    return cfg


def _blame(cfg: DictConfig, where: Origins):
    """bad(key, why, *also) -> the SpecError naming where key's value came from, the key and the value."""

    def bad(key: str, why: str, *also: str) -> SpecError:
        return SpecError(f"{where(key, *also)}: key '{key}' has the value {OmegaConf.select(cfg, key)!r}, {why}.")

    return bad


def _apply_size(cfg: DictConfig, raw: dict, overrides: Sequence[str], where) -> None:
    """`model.size: 1.3b` fills the model's keys from model/config.py's SIZES; keys the file or the command line
    write themselves win over the size's."""
    size = OmegaConf.select(cfg, "model.size")
    if size is None:
        return
    if size not in SIZES:
        raise SpecError(
            f"{where('model.size')}: key 'model.size' has the value {size!r}, which is not a named size."
            f"{did_you_mean(str(size), SIZES)} Named sizes: {', '.join(SIZES)}."
        )
    written = {k.split(".", 1)[1] for k in _flatten(raw) if k.startswith("model.")}
    written |= {ov.split("=", 1)[0].strip().split(".", 1)[1] for ov in overrides if ov.startswith("model.")}
    for key, value in size_keys(size).items():
        if key not in written:
            cfg.model[key] = value


def save_config(cfg: DictConfig, path) -> None:
    """Write a resolved config as YAML atomically: a reader sees the old file or the new one, never half of one
    (a crash mid-write would otherwise leave an empty config that loads as the defaults)."""
    atomic.write_text(path, OmegaConf.to_yaml(cfg), durable=True)
