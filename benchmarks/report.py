"""Markdown tables from ``benchmarks.json`` (used by ``run.py``; ``python benchmarks/report.py FILE`` re-renders)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ok(flag: bool | None) -> str:
    return "n/a" if flag is None else ("**met**" if flag else "**missed**")


def _s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


def _run_lines(m: dict, run: dict, sections: str = "") -> list[str]:
    return [
        f"Machine: {m['cpu_model']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB; "
        f"torch {m['torch']}, torchvision {m['torchvision']}, python {m['python']}; "
        f"torch threads {m['torch_threads']}.",
        f"Run{sections}: {'quick' if run['quick'] else 'full'}, {run['started']}, {run['wall_s'] / 60:.1f} min; "
        f"load average (1/5/15 min) at start {run['load_start']}, at end {run['load_end']}"
        + (f" -- {run['note']}" if run.get("note") else "") + ".",
    ]


def machine_md(res: dict) -> list[str]:
    earlier = res.get("earlier_runs", [])
    if not earlier:
        return _run_lines(res["machine"], res["run"])
    now = [k for k in res["benchmarks"] if not any(k in r["sections"] for r in earlier)]
    lines = _run_lines(res["machine"], res["run"], f" ({', '.join(now)})")
    for r in earlier:
        lines += [""] + _run_lines(r["machine"], r["run"], f" ({', '.join(r['sections'])})")
    return lines


def _opt(x: float | None, fmt: str, suffix: str = "") -> str:
    return "n/m" if x is None else f"{x:{fmt}}{suffix}"


def _mib(memory: dict | None) -> str:
    return "n/m" if memory is None else f"{memory['peak_mib']:.0f}"


def contrastive_md(r: dict) -> list[str]:
    t = r["targets"]
    threads = r.get("threads") or "torch's default"
    lines = [
        f"### 1. Contrastive distillation (forward + backward), D = {r['dim']}, batch {r['batch']}",
        "",
        "Ours = `ucdseg.losses.contrastive_distillation`; release = the UCD release's dense formulation "
        "(`pre_contrastive_pixel` v2 + `PixelConLossV2`) copied into `benchmarks/bench_contrastive.py`; "
        "matmul = a bare |A| x |C| x D `torch.mm` (the floor: UCD needs at least one such product). "
        f"Times: medians over round-robin rounds in one process per size (torch threads: {threads}); "
        "speed-up and x-matmul columns are medians of per-round ratios. Peak added memory: "
        f"{r['memory_method']}. Process peak RSS (noisier) is in the JSON (`rss_peak_mib`).",
        "",
        "| anchors | contrast | formulation | rounds | ours s | release s | matmul s | speed-up "
        "(release/ours) | ours / matmul | ours / oneDNN matmul | release / matmul | ours peak MiB "
        "| release peak MiB | memory ratio | value rel. diff | grad rel. diff |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["cases"]:
        onednn = f"{c['ours_over_matmul_onednn']:.2f}" if "ours_over_matmul_onednn" in c else "n/a"
        lines.append(
            f"| {c['anchors']} | {c['contrast']} | {c['formulation']} | {c['rounds']} "
            f"| {_s(c['ours_s']['median_s'])} | {_s(c['release_s']['median_s'])} | {_s(c['matmul_s']['median_s'])} "
            f"| {c['speedup']:.1f}x | {c['ours_over_matmul']:.2f} | {onednn} | {c['release_over_matmul']:.1f} "
            f"| {c['ours_memory']['peak_mib']:.0f} | {_mib(c['release_memory'])} "
            f"| {_opt(c['memory_ratio'], '.1f', 'x')} | {_opt(c['value_rel_diff'], '.1e')} "
            f"| {_opt(c['grad_rel_diff'], '.1e')} |"
        )
    if any(c["release_memory"] is None for c in r["cases"]):
        lines += ["", "n/m: not measured -- the release's peak at this size (about 12 GB, it grows as |A| x |C|) "
                  "does not fit beside the timing process on the development machine, so neither its memory "
                  "nor its value and gradient are compared there."]
    lines += [
        "",
        f"Targets at |A| = {t['at_anchors']}: at least {t['time_ratio_min']:.0f}x faster than the release "
        f"{_ok(t['time_met'])}; at least {t['memory_ratio_min']:.0f}x less added memory {_ok(t['memory_met'])}; "
        f"values within {t['value_rel_max']:.0e} relative (all sizes) {_ok(t['values_met'])}; gradients within "
        f"{t['grad_rel_max']:.0e} relative (max abs difference / max abs) {_ok(t['grads_met'])}.",
    ]
    at = [c for c in r["cases"] if c["anchors"] == t["at_anchors"] and c.get("matmul_s")]
    if at:  # the floor a forward + backward cannot beat by much: three products of |A| x |C| x D
        lines += ["", "Against the three-product floor (3 x the matmul column, measured in the same run) at "
                  f"|A| = {t['at_anchors']}: " + "; ".join(
                      f"{c['formulation']} {c['ours_s']['median_s'] / (3 * c['matmul_s']['median_s']):.2f} of it for ours, "
                      f"{c['release_s']['median_s'] / (3 * c['matmul_s']['median_s']):.1f}x it for the release" for c in at) + "."]
    g = r.get("global_batch")
    if g:
        lines += [
            "",
            f"Global batch (`method.options.gather`): {g['anchors_per_process']} local anchors against the contrast "
            "sets of W simulated processes (one process), ours:",
            "",
            "| W | contrast | s (median) | s / W=1 | peak MiB | ours / matmul |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        base = g["simulated"][0]["median_s"]
        for s in g["simulated"]:
            lines.append(f"| {s['world']} | {s['contrast']} | {_s(s['median_s'])} | {s['median_s'] / base:.2f} "
                         f"| {s['peak_mib']:.0f} | {s['ratio_to_matmul']:.2f} |")
        gl = g["gloo"]
        if "unavailable" in gl:
            lines += ["", f"Two gloo processes: unavailable ({gl['unavailable']})."]
        else:
            per = ", ".join(f"rank {i}: {gt:.3f} s vs {lo:.3f} s ({q:.2f}x)" for i, (gt, lo, q)
                            in enumerate(zip(gl["gathered_median_s"], gl["local_median_s"], gl["ratio"])))
            lines += ["", f"Two gloo processes (one thread each, {gl['anchors_per_process']} anchors each), "
                      f"`gathered_contrastive_distillation` vs the local loss, medians of {gl['rounds']} "
                      f"round-robin rounds: {per}."]
    return lines


def train_md(r: dict) -> list[str]:
    c = r["config"]
    lines = [
        f"### 2. Training step, {c['backbone']} DeepLab-v3 (OS 16), batch {c['batch']}, "
        f"{c['crop']} x {c['crop']} crops, classes per step {c['classes_per_step']}",
        "",
        "| method | step s (median) | forward new + old s | losses s | backward + SGD s | UCD anchors / contrast |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in r["steps"].items():
        p = s["phases_median_s"]
        ac = f"{s['anchors']} / {s['contrast']}" if "anchors" in s else ""
        lines.append(f"| {name} | {_s(s['median_s'])} | {_s(p['forward'])} | {_s(p['losses'])} "
                     f"| {_s(p['backward_sgd'])} | {ac} |")
    lines += ["", "| UCD overhead | UCD term alone (fwd + bwd) | UCD term alone / base step "
              "| step time, median of per-round ratios | target <= 15 % (term alone) |",
              "|---|---:|---:|---:|---|"]
    for name, o in r["overhead"].items():
        lines.append(f"| {name} over {o['over']} | {_s(o['ucd_term_alone_s'])} s "
                     f"| {100 * o['ucd_term_alone_fraction_of_base_step']:.1f} % "
                     f"| {_pct(o['overhead_median_of_round_ratios'])} | {_ok(o['target_le_15pct'])} |")
    lines += ["", "UCD adds only its own term (its gradient adds into the features' gradient), so the "
              "target is judged on the term alone; the step-time ratio is the difference of two steps "
              f"timed {c['repeats']} times each and moves with the machine's load."]
    return lines


def frozen_md(r: dict) -> list[str]:
    c = r["config"]
    lines = [
        f"### Frozen backbone: SSUL vs MiB at step 1, {c['backbone']} DeepLab-v3 (OS 16), batch {c['batch']}, "
        f"{c['crop']} x {c['crop']}, classes per step {c['classes_per_step']}",
        "",
        "| case | iteration s (median) | trained parameters | one trunk forward for both models |",
        "|---|---:|---:|---|",
    ]
    for name, s in r["steps"].items():
        lines.append(f"| {name} | {_s(s['median_s'])} | {s['trained_parameters']:,} | {'yes' if s['shared_trunk'] else 'no'} |")
    lines += ["", f"SSUL / MiB, median of per-round ratios: **{r['ssul_over_mib_median_of_round_ratios']:.2f}** "
              f"(target <= 0.4: {_ok(r['target_le_0.4'])}); without the shared trunk "
              f"{r['unshared_over_mib_median_of_round_ratios']:.2f}."]
    return lines


def options_md(r: dict) -> list[str]:
    c = r["config"]
    lines = [
        f"### 2b. Training-step options, {c['method']}, {c['backbone']} DeepLab-v3 (OS 16), batch {c['batch']}, "
        f"{c['crop']} x {c['crop']} crops",
        "",
        "| variant | step s (median) | ratio to default (median of per-round ratios) | first call s "
        "| first-step loss rel. diff |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {_s(v['median_s'])} | {v['ratio_to_default']:.2f} | {_s(v['first_call_s'])} "
                     f"| {v['first_loss_rel_diff']:.1e} |")
    for name, reason in r.get("unavailable", {}).items():
        lines.append(f"| {name} | unavailable: {reason} | | | |")
    lines += ["", f"Variants timed round-robin, {c['repeats']} rounds after {c['warmup_steps']} warm-up steps each; "
              "the first call of `compile` is its compilation (`train.compile=true` pays it at every step "
              "of a task" + ("; it is much shorter when torch's on-disk inductor cache already holds the graphs, "
                             "e.g. from an earlier run" if c.get("inductor_fx_graph_cache") else "")
              + "). A ratio below 1 is faster than the default."]
    return lines


def profile_md(r: dict) -> list[str]:
    c, p, u = r["config"], r["profiled"], r["unprofiled"]
    ours = set(r["groups"]["ours"])
    lines = [
        f"### 2c. Profile of a {c['method']} training step, {c['backbone']} DeepLab-v3 (OS 16), batch {c['batch']}, "
        f"{c['crop']} x {c['crop']} crops",
        "",
        f"One iteration = fetch of a batch of the embedded benchmark ({c['data']['task']} step {c['data']['step']}, "
        f"workers={c['data']['workers']}) + one training step; {c['iterations']} iterations after "
        f"{c['warmup_iterations']} warm-up. Wall: without the profiler (median); CPU: inclusive CPU time "
        "under `torch.profiler`, per iteration.",
        "",
        "| phase | code | wall s | % of iteration | profiled CPU s | % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    wall_total = sum(u["phases_wall_s"].values())
    cpu_total = sum(p["phases_cpu_s"].values())
    for name, cpu in p["phases_cpu_s"].items():
        wall = u["phases_wall_s"][name]
        lines.append(f"| {name} | {'ours' if name in ours else 'PyTorch (new model)'} | {_s(wall)} "
                     f"| {100 * wall / wall_total:.1f} % | {_s(cpu)} | {100 * cpu / cpu_total:.1f} % |")
    fu, fp = u["fractions"], p["fractions"]
    parts = ", ".join(f"{k.split(': ', 1)[1]} {_s(v)} s" for k, v in p["data_parts_cpu_s"].items())
    lines += [
        "",
        f"Our code takes {100 * fu['ours']:.1f} % of the iteration (profiled: {100 * fp['ours']:.1f} %): "
        f"data {100 * fu['data']:.1f} %, old-model forward {100 * fu['old_model_forward']:.1f} %, "
        f"loss terms (forward + backward) {100 * fu['loss_terms']:.1f} %. Of the training step alone (without "
        f"the data fetch): {100 * fu['step_ours']:.1f} % ours, of which loss terms "
        f"{100 * fu['step_loss_terms']:.1f} %. Data fetch parts (profiled CPU per iteration): {parts}.",
        "",
        f"Top {len(p['top_self_cpu'])} operators by self CPU time (profiled, per iteration; % of all self CPU time):",
        "",
        "| operator | self CPU s | % | calls |",
        "|---|---:|---:|---:|",
    ]
    for e in p["top_self_cpu"]:
        lines.append(f"| `{e['name']}` | {_s(e['self_cpu_s'])} | {e['self_cpu_pct']:.1f} % | {e['calls']} |")
    return lines


def data_md(r: dict) -> list[str]:
    g, ix, ld = r["generation"], r["index"], r["loader"]
    lines = [
        "### 3. Data (embedded benchmark)",
        "",
        "| what | images | images/s |",
        "|---|---:|---:|",
        f"| generate (`prepare_embedded`, {g['num_train']} + {g['num_val']} at {g['image_size']} px) "
        f"| {g['num_train'] + g['num_val']} | {g['images_per_s']:.0f} |",
    ]
    for key, label in (("workers_auto", "workers=None (auto)"), ("workers_0", "workers=0")):
        v = ix[key]
        lines.append(f"| index (`scan_presence`), first build, {label} | {ix['images']} "
                     f"| {v['first_build']['images_per_s']:.0f} |")
        lines.append(f"| index, cached, {label} | {ix['images']} | {v['cached']['images_per_s']:.0f} "
                     f"({v['cached_speedup']:.0f}x) |")
    for w in (0, 2):
        v = ld[f"workers_{w}"]
        lines.append(f"| DataLoader, train transforms (crop {ld['crop']}, batch {ld['batch_size']}), "
                     f"workers={w}, one epoch | {ld['images']} | {v['images_per_s']:.0f} |")
    return lines


def eval_md(r: dict) -> list[str]:
    e, cm = r["evaluate"], r["confusion_matrix"]
    lines = [
        "### 4. Evaluation",
        "",
        "| what | figure |",
        "|---|---:|",
        f"| `evaluate`, {e['backbone']}, {e['images']} val images at {e['image_size']} px, batch {e['batch_size']} "
        f"| {e['images_per_s']:.0f} images/s |",
        f"| model forward alone, same images | {e['model_forward_only']['images_per_s']:.0f} images/s |",
    ]
    for key, v in cm.items():
        if key.startswith("classes_"):
            lines.append(f"| `ConfusionMatrix.update`, {key.split('_')[1]} classes | "
                         f"{v['ms_per_megapixel']:.1f} ms per megapixel |")
    return lines


def render(res: dict) -> str:
    lines = ["# ucdseg benchmarks", "", *machine_md(res), ""]
    sections = res["benchmarks"]
    for key, fn in (("contrastive", contrastive_md), ("train_step", train_md), ("frozen", frozen_md),
                    ("options", options_md),
                    ("profile", profile_md), ("data", data_md), ("evaluation", eval_md)):
        if key in sections:
            lines += [*fn(sections[key]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "benchmarks.json")
    print(render(json.loads(path.read_text(encoding="utf-8"))))
