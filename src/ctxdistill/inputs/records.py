"""Structured inputs for the methods that do not read plain documents (entity records, example pools,
QA records, replay pairs): read with the corpus readers, checked field by field before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..inputs.corpus import CorpusReport, load_records
from ..errors import CtxDistillError


@dataclass(frozen=True)
class Record:
    id: str
    fields: dict

    def __getitem__(self, name):
        return self.fields[name]

    def get(self, name, default=None):
        return self.fields.get(name, default)


def check_value(where: str, name: str, value, kind: str) -> None:
    if kind == "str" and not isinstance(value, str):
        raise CtxDistillError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if kind == "list[str]" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise CtxDistillError(f"{where}: field {name!r} must be a list of strings, got {type(value).__name__}")


def load_checked_records(
    spec: str,
    method: str,
    required: dict[str, str],
    optional: dict[str, str] | None = None,
    input_format: str = "",
    example: str = "",
    id_field: str = "id",
    option: str = "corpus",
) -> tuple[list[Record], CorpusReport]:
    """Records with every required field (a string, or a list of strings), in file order.

    A missing field or a wrong type is an error naming the record's location and the field; records
    with an empty required string are skipped and reported.
    """
    optional = optional or {}
    report = CorpusReport()
    records: list[Record] = []
    hint = f"; for an example pass --{option.replace('_', '-')} {example}" if example and example not in input_format else ""
    for where, raw in load_records(spec):
        report.read += 1
        if raw is None:
            report.skip("non-UTF-8", where)
            continue
        missing = [name for name in required if name not in raw]
        if missing:
            raise CtxDistillError(
                f"{where}: {method} needs field {missing[0]!r} in every record, but it is missing "
                f"(fields present: {', '.join(raw) or 'none'}); expected {input_format}{hint}"
            )
        for name, kind in (required | optional).items():
            if name in raw and raw[name] is not None:
                check_value(where, name, raw[name], kind)
        empty = [name for name, kind in required.items() if kind == "str" and not raw[name].strip()]
        if empty:
            report.skip(f"empty-{empty[0]}", where)
            continue
        values = {name: raw[name] for name in (required | optional) if raw.get(name) is not None}
        records.append(Record(str(raw.get(id_field, where)), values))
    report.kept = len(records)
    if not records:
        detail = "; ".join(report.summary()) or "the input is empty"
        raise CtxDistillError(f"no usable records in {spec} for {method}: {detail}")
    return records, report
