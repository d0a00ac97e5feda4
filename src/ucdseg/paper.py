"""Published numbers, declared as data: UCD's Table 1 (Pascal VOC 2012, mIoU old / new / all).

Keys: (task, setting) -> method -> (old, new, all), in the MiB convention (without background).
"""

from __future__ import annotations

UCD_TABLE1: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {}

_ROWS = {
    "ft": ["5.8/12.3/6.2", "6.8/12.9/7.1", "1.1/33.6/9.2", "2.1/33.1/9.8", "0.2/1.8/0.6", "0.2/1.8/0.6"],
    "lwf": ["53.0/9.1/50.8", "51.2/8.5/49.1", "58.4/37.4/53.1", "58.9/36.6/53.3", "0.8/3.6/1.5", "1.0/3.9/1.8"],
    "ilt": ["69.1/16.4/66.4", "67.1/12.3/64.4", "63.2/39.5/57.3", "66.3/40.6/59.9", "3.7/5.7/4.2", "4.9/7.8/5.7"],
    "mib": ["69.6/25.6/67.4", "70.2/22.1/67.8", "71.8/43.3/64.7", "75.5/49.4/69.0", "46.2/12.9/37.9",
            "35.1/13.5/29.7"],
    "mib+ucd": ["74.3/28.4/72.0", "73.7/34.0/71.7", "73.0/46.2/66.3", "78.5/50.7/71.5", "53.3/14.4/43.5",
                "51.9/13.1/42.2"],
    "plop": ["75.1/38.2/73.2", "75.0/39.1/73.2", "66.5/39.6/59.8", "74.7/49.8/68.5", "49.0/13.8/40.2",
             "65.2/22.4/54.5"],
    "plop+ucd": ["75.7/31.8/73.5", "75.9/39.5/74.0", "67.0/39.3/60.1", "75.0/51.8/69.2", "50.8/13.3/41.4",
                 "66.3/21.6/55.1"],
    "joint": ["77.4/78.0/77.4", "77.4/78.0/77.4", "79.1/72.6/77.4", "79.1/72.6/77.4", "79.1/72.6/77.4",
              "79.1/72.6/77.4"],
}
_COLUMNS = [("19-1", "disjoint"), ("19-1", "overlapped"), ("15-5", "disjoint"), ("15-5", "overlapped"),
            ("15-1", "disjoint"), ("15-1", "overlapped")]

for _method, _cells in _ROWS.items():
    for _column, _cell in zip(_COLUMNS, _cells):
        UCD_TABLE1.setdefault(_column, {})[_method] = tuple(float(v) for v in _cell.split("/"))  # type: ignore


def paper_value(dataset: str, task: str, setting: str, method: str) -> tuple[float, float, float] | None:
    """UCD Table 1's (old, new, all) for a VOC run, or None when the paper has no such cell."""
    if dataset != "voc":
        return None
    return UCD_TABLE1.get((task, setting), {}).get(method)
