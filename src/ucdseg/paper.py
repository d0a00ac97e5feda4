"""Published numbers, declared as data: UCD's Table 1 and the SSUL and DKD releases' tables.

* ``UCD_TABLE1``: UCD's Table 1 (Pascal VOC 2012), every row, mIoU old / new / all in the MiB
  convention (background not scored). UCD copies its baselines: fine-tuning, LwF, LwF-MC, ILT,
  EWC, PI, RW and MiB from MiB's Table 1 (fcdl94/MiB voc-tab.png), MiB+SDR from SDR's
  (Michieli and Zanuttigh, CVPR 2021, Table 1), PLOP from PLOP's.
* ``RELEASE_TABLES``: SSUL's and DKD's READMEs (clovaai/SSUL README.md:33-38, cvlab-yonsei/DKD
  README.md): mIoU over all classes, background included (those papers' convention), VOC
  overlapped; the DKD README's hIoU is not kept.

:func:`paper_cell` finds the published cell of a run; ``ucdseg report --paper`` prints it beside
the run's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperCell:
    """A published result: mIoU (%) of the old, new and all classes after the last step (old and
    new None where the source gives mIoU over all classes only), in ``convention``."""

    old: float | None
    new: float | None
    all: float
    convention: str  # "without_background" (MiB, UCD) | "with_background" (SSUL, DKD)
    source: str

    def text(self) -> str:
        cells = "/".join("-" if v is None else f"{v:.1f}" for v in (self.old, self.new, self.all))
        return cells if self.convention == "without_background" else f"{cells} (with bg)"


_COLUMNS = [("19-1", "disjoint"), ("19-1", "overlapped"), ("15-5", "disjoint"), ("15-5", "overlapped"),
            ("15-1", "disjoint"), ("15-1", "overlapped")]

# UCD Table 1, old/new/all per column of _COLUMNS (../shared/SPEC.md §5 and SPEC-2 §1; LwF-MC: MiB's Table 1;
# MiB+SDR: SDR's Table 1).
_ROWS = {
    "ft": ["5.8/12.3/6.2", "6.8/12.9/7.1", "1.1/33.6/9.2", "2.1/33.1/9.8", "0.2/1.8/0.6", "0.2/1.8/0.6"],
    "pi": ["5.4/14.1/5.9", "7.5/14.0/7.8", "1.3/34.1/9.5", "1.6/33.3/9.5", "0.0/1.8/0.4", "0.0/1.8/0.5"],
    "ewc": ["23.2/16.0/22.9", "26.9/14.0/26.3", "26.7/37.7/29.4", "24.3/35.5/27.1", "0.3/4.3/1.3", "0.3/4.3/1.3"],
    "rw": ["19.4/15.7/19.2", "23.3/14.2/22.9", "17.9/36.9/22.7", "16.6/34.9/21.2", "0.2/5.4/1.5", "0.0/5.2/1.3"],
    "lwf": ["53.0/9.1/50.8", "51.2/8.5/49.1", "58.4/37.4/53.1", "58.9/36.6/53.3", "0.8/3.6/1.5", "1.0/3.9/1.8"],
    "lwf-mc": ["63.0/13.2/60.5", "64.4/13.3/61.9", "67.2/41.2/60.7", "58.1/35.0/52.3", "4.5/7.0/5.2",
               "6.4/8.4/6.9"],
    "ilt": ["69.1/16.4/66.4", "67.1/12.3/64.4", "63.2/39.5/57.3", "66.3/40.6/59.9", "3.7/5.7/4.2", "4.9/7.8/5.7"],
    "mib": ["69.6/25.6/67.4", "70.2/22.1/67.8", "71.8/43.3/64.7", "75.5/49.4/69.0", "46.2/12.9/37.9",
            "35.1/13.5/29.7"],
    "mib+sdr": ["69.9/37.3/68.4", "69.1/32.6/67.4", "73.5/47.3/67.2", "75.4/52.6/69.9", "59.2/12.9/48.1",
                "44.7/21.8/39.2"],
    "plop": ["75.1/38.2/73.2", "75.0/39.1/73.2", "66.5/39.6/59.8", "74.7/49.8/68.5", "49.0/13.8/40.2",
             "65.2/22.4/54.5"],
    "mib+ucd": ["74.3/28.4/72.0", "73.7/34.0/71.7", "73.0/46.2/66.3", "78.5/50.7/71.5", "53.3/14.4/43.5",
                "51.9/13.1/42.2"],
    "plop+ucd": ["75.7/31.8/73.5", "75.9/39.5/74.0", "67.0/39.3/60.1", "75.0/51.8/69.2", "50.8/13.3/41.4",
                 "66.3/21.6/55.1"],
    "joint": ["77.4/78.0/77.4", "77.4/78.0/77.4", "79.1/72.6/77.4", "79.1/72.6/77.4", "79.1/72.6/77.4",
              "79.1/72.6/77.4"],
}
#: (task, setting) -> method -> (old, new, all): UCD's Table 1.
UCD_TABLE1: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {}
for _method, _cells in _ROWS.items():
    for _column, _cell in zip(_COLUMNS, _cells):
        UCD_TABLE1.setdefault(_column, {})[_method] = tuple(float(v) for v in _cell.split("/"))  # type: ignore

#: (task, setting) -> method -> mIoU of all classes, background included: the SSUL and DKD READMEs.
RELEASE_TABLES: dict[tuple[str, str], dict[str, float]] = {}
_RELEASES = {  # VOC overlapped 19-1, 15-5, 15-1, 10-1 (SPEC-2 §3-4)
    "ssul": (75.44, 71.22, 67.61, 59.25), "ssul-m": (76.49, 73.02, 71.37, 64.12),
    "dkd": (76.13, 73.95, 70.50, 60.43), "dkd-m": (77.04, 74.84, 72.95, 66.20),
}
for _method, _values in _RELEASES.items():
    for _task, _value in zip(("19-1", "15-5", "15-1", "10-1"), _values):
        RELEASE_TABLES.setdefault((_task, "overlapped"), {})[_method] = _value

_SOURCES = {"ssul": "SSUL README", "ssul-m": "SSUL README", "dkd": "DKD README", "dkd-m": "DKD README"}


def paper_cell(dataset: str, task: str, setting: str, method: str) -> PaperCell | None:
    """The published cell of a VOC run of ``method`` on ``task`` / ``setting``, or None."""
    if dataset != "voc":
        return None
    value = UCD_TABLE1.get((task, setting), {}).get(method)
    if value is not None:
        return PaperCell(*value, convention="without_background", source="UCD Table 1")
    total = RELEASE_TABLES.get((task, setting), {}).get(method)
    if total is not None:
        return PaperCell(None, None, total, convention="with_background", source=_SOURCES[method])
    return None


def paper_value(dataset: str, task: str, setting: str, method: str) -> tuple[float, float, float] | None:
    """UCD Table 1's (old, new, all) for a VOC run, or None when the table has no such cell."""
    if dataset != "voc":
        return None
    return UCD_TABLE1.get((task, setting), {}).get(method)
