"""YAML reading that avoids YAML 1.1's traps.

PyYAML follows YAML 1.1, where ``lr: 2e-5`` is the *string* "2e-5", ``on`` is True, ``010`` is 8
and a duplicated key silently wins. Here: floats follow YAML 1.2 (``2e-5`` is a float), the
words yes/no/on/off are refused (write true or false), leading-zero numbers are refused, and a
duplicated key is an error naming its line. Only ``SafeLoader`` is ever used, so tags such as
``!!python/object`` are rejected.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from adaptkit.errors import ConfigError


class _Ambiguous(yaml.YAMLError):
    pass


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers, no yes/no/on/off booleans and no duplicate keys."""


# Drop the YAML 1.1 implicit resolvers for bool, int and float, then add stricter ones.
StrictLoader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_AMBIGUOUS = re.compile(r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF|[-+]?0[0-9_]+)$")
_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$")
_FLOAT = re.compile(
    r"^[-+]?(?:(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"
)
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
StrictLoader.add_implicit_resolver("tag:adaptkit,ambiguous", _AMBIGUOUS, list("yYnNoO-+0"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    if text.startswith("0x"):
        return sign * int(text[2:], 16)
    if text.startswith("0o"):
        return sign * int(text[2:], 8)
    return sign * int(text)


def _construct_ambiguous(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    value = loader.construct_scalar(node)
    raise _Ambiguous(
        f"line {node.start_mark.line + 1}: '{value}' is ambiguous in YAML "
        "(yes/no/on/off may be read as booleans and leading zeros as octal); "
        "write true or false, a plain number, or quote it to mean the text"
    )


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    result: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in result:
            raise _Ambiguous(f"line {key_node.start_mark.line + 1}: duplicate key '{key}'")
        result[key] = loader.construct_object(value_node, deep=deep)
    return result


StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
StrictLoader.add_constructor("tag:adaptkit,ambiguous", _construct_ambiguous)
StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text strictly; any problem is a ConfigError naming ``source`` and the line."""
    try:
        loader = StrictLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _Ambiguous as exc:
        raise ConfigError(str(exc), source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}".replace("\n", " "), source=source) from None


class StrictDumper(yaml.SafeDumper):
    """SafeDumper that quotes every string ``StrictLoader`` would read as something else.

    PyYAML's own dumper follows YAML 1.1 and writes the string "2e-5" or "0o7" unquoted, which
    ``StrictLoader`` then reads as a number (and "y" as an ambiguous word): a resolved recipe
    would not read back as the same recipe.
    """


StrictDumper.yaml_implicit_resolvers = {
    first: list(rs) for first, rs in StrictLoader.yaml_implicit_resolvers.items()
}


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # PyYAML writes NEL and the Unicode line and paragraph separators raw in its other styles,
    # where reading folds them into spaces; double quotes escape them
    style = '"' if any(c in data for c in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


StrictDumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """YAML text that ``load_yaml`` reads back as ``data`` (keys in their given order)."""
    return yaml.dump(data, Dumper=StrictDumper, sort_keys=False, allow_unicode=True)


def parse_scalar(text: str) -> Any:
    """Parse a command-line override value with the same rules as a recipe."""
    return load_yaml(text, source="override")
