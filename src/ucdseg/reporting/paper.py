"""The comparison with the published numbers (``ucdseg report --paper``): a last column of the
pooled table with the cell of :mod:`ucdseg.paper` (UCD's Table 1, the SSUL and DKD READMEs) for
the row's benchmark and method."""

from __future__ import annotations

from ..paper import paper_cell

HEAD, SEP = " paper old/new/all |", "---|"  # the column's header and separator cells


def cell(row: dict) -> str:
    """The published old/new/all of a pooled row's benchmark and method (its default weights only:
    the label of a run with other weights names no published cell), ``-`` when there is none."""
    value = paper_cell(row["dataset"], row["task"], row["setting"], row["method"])
    return value.text() if value else "-"
