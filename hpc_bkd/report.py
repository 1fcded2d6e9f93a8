"""The report: report.json for machines, summary.txt for people, gantt.png for the schedule."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from . import checkpoint

log = logging.getLogger("hpc_bkd")


def _rank_rows(gathered: list[dict], plan_predicted: list[float]) -> tuple[list[dict], float, float]:
    starts = [g["start"] for g in gathered]
    ends = [g["end"] for g in gathered]
    t0, t1 = min(starts), max(ends)
    rows = []
    for g in sorted(gathered, key=lambda g: g["rank"]):
        busy = g["end"] - g["start"]
        rows.append({"rank": g["rank"], "host": g["host"], "device": g["device"], "threads": g["threads"],
                     "blocks": g["blocks"], "busy_s": busy, "idle_s": (t1 - t0) - busy,
                     "predicted_s_per_batch": plan_predicted[g["rank"]], "peak_mem_mb": g["peak_mem_mb"],
                     "energy": g["energy"], "teacher_cache": g.get("teacher_cache")})
    return rows, t0, t1


def _energy_total(gathered: list[dict]) -> dict[str, Any]:
    gpu = [g["energy"].get("gpu_j") for g in gathered]
    per_host: dict[str, float | None] = {}
    for g in gathered:  # a CPU package counter is shared by all ranks of a host
        per_host.setdefault(g["host"], g["energy"].get("cpu_package_j"))
    cpu = list(per_host.values())
    out: dict[str, Any] = {
        "gpu_j": sum(gpu) if gpu and all(v is not None for v in gpu) else None,
        "cpu_package_j": sum(cpu) if cpu and all(v is not None for v in cpu) else None,
    }
    if out["gpu_j"] is None:
        out["gpu_unavailable"] = next((g["energy"].get("gpu_unavailable") for g in gathered), None)
    if out["cpu_package_j"] is None:
        out["cpu_unavailable"] = next((g["energy"].get("cpu_unavailable") for g in gathered), None)
    return out


def gantt(report: dict[str, Any], path: Path) -> None:
    """One row per rank, one bar per block span (blocks of a rank train concurrently: stacked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = report["distill"]["start"]
    ranks = report["ranks"]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.9 * len(ranks)))
    cmap = plt.get_cmap("tab20")
    for row in ranks:
        own = [b for b in report["blocks"] if b["rank"] == row["rank"] and b["spans"]]
        for k, b in enumerate(own):
            h = 0.8 / max(len(own), 1)
            for s, e in b["spans"]:
                ax.barh(row["rank"] - 0.4 + h * (k + 0.5), e - s, left=s - t0, height=h * 0.9,
                        color=cmap(b["index"] % 20), edgecolor="black", linewidth=0.3)
                ax.text(s - t0 + (e - s) / 2, row["rank"] - 0.4 + h * (k + 0.5), str(b["index"]),
                        ha="center", va="center", fontsize=7)
        if not own:
            ax.text(0, row["rank"], " idle", va="center", fontsize=8, color="gray")
    ax.set_yticks([r["rank"] for r in ranks])
    ax.set_yticklabels([f"rank {r['rank']}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since distillation start")
    ax.set_title(f"{report['config']['model']['arch']}: blocks per rank (labels = block index)")
    checkpoint.savefig(fig, path)
    plt.close(fig)


def summary_text(r: dict[str, Any]) -> str:
    acc, m = r["accuracy"], r["models"]
    lines = [f"hpc_bkd report: {r['config']['model']['arch']} on {r['config']['data']['dataset']}, "
             f"{r['world_size']} rank(s), run dir {r['run_dir']}", ""]
    lines.append(f"{'block':>5} {'name':<22} {'rank':>4} {'train s':>8} {'mse':>9} {'swap acc':>8} {'kept':>5} {'note':<10}")
    for b in r["blocks"]:
        note = "resumed" if b.get("resumed_finished") else ("early" if b.get("early_stopped") else "")
        if b.get("resumed") and not b.get("resumed_finished"):
            note = "continued"
        lines.append(f"{b['index']:>5} {b['name'][:22]:<22} {b['rank']:>4} {b['train_time_s']:>8.2f} "
                     f"{(b['final_loss'] or 0):>9.5f} {(b['swapped_val_acc'] or 0):>8.2f} "
                     f"{'yes' if b['accepted'] else 'NO':>5} {note:<10}")
    lines += ["", f"{'rank':>4} {'host':<14} {'busy s':>8} {'idle s':>8} {'pred s/batch':>12} {'peak MB':>8}  blocks"]
    for row in r["ranks"]:
        lines.append(f"{row['rank']:>4} {row['host'][:14]:<14} {row['busy_s']:>8.2f} {row['idle_s']:>8.2f} "
                     f"{row['predicted_s_per_batch']:>12.4f} {row['peak_mem_mb']:>8.0f}  "
                     f"{','.join(map(str, row['blocks'])) or 'idle'}")
    p = r["plan"]
    lines += ["", f"plan: {p['method']}{' (optimal)' if p['optimal'] else ''}, predicted speedup "
                  f"{p['predicted_speedup']:.2f}x over one rank, makespan {p['makespan']:.4f}s/batch "
                  f"(lower bound {p['lower_bound']:.4f})"]
    cache = r.get("teacher_cache")
    if cache:
        fills = [row["teacher_cache"]["fill_s"] for row in r["ranks"] if row.get("teacher_cache")]
        lines.append(f"teacher cache {cache['reason']}"
                     + (f"; filled in {max(fills):.1f}s (slowest rank)" if fills else ""))
    lines.append(f"accuracy (test): teacher {acc['teacher_test']:.2f}%, student {acc['student_before_finetune']:.2f}% "
                 f"before / {acc['student_after_finetune']:.2f}% after fine-tuning "
                 f"({acc['student_after_finetune'] - acc['teacher_test']:+.2f} points)")
    lines.append(f"size: params {m['teacher']['params']:,} -> {m['student']['params']:,}, conv params "
                 f"{m['teacher']['conv_params']:,} -> {m['student']['conv_params']:,} "
                 f"({100 * m['student']['conv_params'] / max(m['teacher']['conv_params'], 1):.1f}%), MACs "
                 f"{m['teacher']['macs'] / 1e6:.1f}M -> {m['student']['macs'] / 1e6:.1f}M")
    e = r["energy"]
    gpu = f"{e['gpu_j']:.0f} J" if e.get("gpu_j") is not None else f"unavailable ({e.get('gpu_unavailable')})"
    cpu = f"{e['cpu_package_j']:.0f} J" if e.get("cpu_package_j") is not None else f"unavailable ({e.get('cpu_unavailable')})"
    lines.append(f"energy (distillation): GPU {gpu}; CPU package {cpu}")
    lines.append("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["phases_s"].items())
                 + f"; total {r['wall_s']:.1f}s")
    return "\n".join(lines)


def write_report(cfg, run_dir: Path, rt, blocks, plan, shared, results, accepted, gathered, models, accuracy,
                 finetune_history, phases, comm, wall0) -> dict[str, Any]:
    rows, t0, t1 = _rank_rows(gathered, plan.predicted)
    block_rows = []
    for spec in blocks:
        m = results[spec.index]["metrics"] if spec.index in results else {}
        block_rows.append({
            "index": spec.index, "name": spec.name, "members": list(spec.members),
            "in_shape": list(spec.in_shape), "out_shape": list(spec.out_shape), "teacher_params": spec.params,
            "teacher_macs": spec.macs, "rank": m.get("rank"), "train_time_s": m.get("train_time_s", 0.0),
            "epochs": m.get("epochs"), "final_loss": m.get("final_loss"),
            "swapped_val_acc": m.get("swapped_val_acc"), "accepted": spec.index in accepted,
            "early_stopped": m.get("early_stopped", False), "resumed": m.get("resumed", False),
            "resumed_finished": m.get("resumed_finished", False), "spans": m.get("spans", []),
            "history": m.get("history", []),
            "cost": vars(shared["costs"][spec.index]),
        })
    phases.mark("report")
    report = {
        "status": "completed",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_dir": str(run_dir), "world_size": rt.size, "config": cfg.to_dict(),
        "teacher": shared["teacher_info"], "cost_model": shared["cost_model"],
        "member_share": {str(m): v for m, v in shared.get("member_share", {}).items()},  # JSON keys
        "teacher_cache": shared.get("teacher_cache"),
        "plan": plan.to_dict(), "blocks": block_rows, "ranks": rows,
        "distill": {"start": t0, "end": t1, "makespan_s": t1 - t0,
                    "resumed_blocks": [b["index"] for b in block_rows if b["resumed_finished"] or b["resumed"]],
                    **comm},
        "accepted_blocks": accepted, "accuracy": accuracy, "models": models,
        "finetune": finetune_history, "energy": _energy_total(gathered),
        "phases_s": dict(phases.times), "wall_s": time.time() - wall0,
    }
    checkpoint.write_json(run_dir / "report.json", report)
    text = summary_text(report)
    checkpoint.write_text(run_dir / "summary.txt", text + "\n")
    try:
        gantt(report, run_dir / "gantt.png")
    except Exception as exc:  # a plot must never cost the results
        log.warning("could not draw gantt.png: %s", exc)
    print(text, flush=True)
    log.info("report: %s, %s, %s", run_dir / "report.json", run_dir / "summary.txt", run_dir / "gantt.png")
    return report
