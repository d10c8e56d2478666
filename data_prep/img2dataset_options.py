"""img2dataset's own options: those vlp sets are accepted only with vlp's value, those vlp has a
flag for are refused with the flag's name, the others pass through to img2dataset as given
(KEY=VALUE, the value converted to the type of the option's default).
"""
from __future__ import annotations

import inspect
import json
import typing

from vlp.pipeline.data.errors import UserError

# What vlp gives img2dataset, and why the user cannot change it.
SET_BY_VLP = {
    "output_format": ("webdataset", "the format training reads"),
    "url_col": ("url", "the column of the sanitised list; name your list's column with --url-col"),
    "caption_col": ("caption", "the column of the sanitised list; name your list's column with "
                               "--caption-col"),
    "incremental_mode": ("incremental", "an interrupted download resumes; --no-resume starts "
                                        "over"),
    "url_list": (None, "give it as --url-list"),
    "output_folder": (None, "give it as --out"),
}
OWN_FLAGS = {
    "input_format": "--input_format (one of the list's formats)",
    "image_size": "--image-size", "resize_mode": "--resize-mode", "processes_count": "--processes",
    "thread_count": "--threads", "number_sample_per_shard": "--samples-per-shard",
    "timeout": "--timeout", "retries": "--retries", "distributor": "--distributor",
    "save_additional_columns": "--save-additional-columns",
}  # fmt: skip
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def check_set_by_vlp(name: str, value) -> None:
    """Refuse, in one line, a value for an option vlp sets that is not vlp's value."""
    wanted, why = SET_BY_VLP[name]
    if value is not None and value != wanted:
        setting = f"sets it to {wanted}" if wanted else "sets it"
        raise UserError(f"img2dataset's {name}={value}: vlp {setting} ({why})")


def _parameters() -> dict[str, inspect.Parameter]:
    import img2dataset

    return dict(inspect.signature(img2dataset.download).parameters)


def parse_bool(text: str) -> bool:
    """img2dataset's spellings of a boolean option value (True, false, 1, ...)."""
    if text.lower() in TRUE + FALSE:
        return text.lower() in TRUE
    raise UserError(f"{text!r} is not a boolean: use true or false")


def _convert(name: str, text: str, parameter: inspect.Parameter):
    """`text` as the type of the option: its default's, or a list for a list option."""
    default, annotation = parameter.default, parameter.annotation
    if list in (typing.get_origin(a) for a in (annotation, *typing.get_args(annotation))):
        return json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t]
    kind = type(default) if default is not None else str
    try:
        return parse_bool(text) if kind is bool else kind(text)
    except ValueError as exc:
        raise UserError(f"img2dataset option {name}={text}: not a {kind.__name__}") from exc


def passed_options(pairs: list[str]) -> dict:
    """The img2dataset options of `--img2dataset-option KEY=VALUE` arguments, checked."""
    options = {}
    parameters = _parameters() if pairs else {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        if not equals:
            raise UserError(f"--img2dataset-option {pair!r}: write it as KEY=VALUE")
        if name in SET_BY_VLP:
            check_set_by_vlp(name, text)
            continue
        if name in OWN_FLAGS:
            raise UserError(f"img2dataset's {name}: vlp has it as {OWN_FLAGS[name]}; use that")
        if name not in parameters:
            raise UserError(f"--img2dataset-option {name}: img2dataset has no such option")
        options[name] = _convert(name, text, parameters[name])
    return options
