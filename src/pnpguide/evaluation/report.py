"""What `pnpguide eval` writes: report.json, report.md (tables), plots and side-by-side grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402

from .plots import captioned_grid  # noqa: E402

COLUMNS = (  # (row key, header, format)
    ("method", "method", "{}"),
    ("steps", "steps", "{}"),
    ("guidance_scale", "w", "{:g}"),
    ("fid", "FID", "{:.2f}"),
    ("adherence", "adherence", "{:.3f}"),
    ("adherence_one_object", "1 obj", "{:.3f}"),
    ("adherence_two_objects", "2 obj", "{:.3f}"),
    ("psnr_vs_cfg_db", "PSNR vs CFG (dB)", "{:.1f}"),
    ("image_gap_closed", "image gap closed", "{:.3f}"),
    ("step_gap_closed", "step gap closed", "{:.3f}"),
    ("output_mse_vs_cfg", "output MSE vs CFG", "{:.4f}"),
    ("unet_evals_per_image", "UNet evals", "{:g}"),
    ("guide_evals_per_image", "guide evals", "{:g}"),
    ("gflops_per_image", "GFLOPs", "{:.2f}"),
    ("seconds_per_image_b1", "s/img b1", "{:.4f}"),
    ("seconds_per_image_b8", "s/img b8", "{:.4f}"),
    ("peak_memory_mb_b8", "peak MB b8", "{:.0f}"),
)
NEGATIVE_COLUMN = ("avoids_negative", "avoids negative", "{:.3f}")  # after the adherence columns, with --negative-prompts


def columns(config: dict, rows: list[dict] = ()) -> tuple:
    """The table's columns: "avoids negative" only in a run with negative prompts, the image gap against CFG at the most
    steps run only when some row was sampled in fewer steps and that CFG and no guidance were run."""
    table = COLUMNS
    if any(row.get("reference_image_gap_closed") is not None for row in rows):
        steps = max(config["steps"] + config["cfg_steps"])
        table = _after(table, "image_gap_closed", ("reference_image_gap_closed", f"image gap vs CFG@{steps}", "{:.3f}"))
    return _after(table, "adherence_two_objects", NEGATIVE_COLUMN) if config.get("negative_prompts") else table


def _after(table: tuple, key: str, column: tuple) -> tuple:
    at = [k for k, _, _ in table].index(key) + 1
    return table[:at] + (column,) + table[at:]


def write_report(result: dict, grids: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "report.md"]
    written[0].write_text(json.dumps(result, indent=2, default=_jsonable))
    written[1].write_text(markdown(result))
    rows = result["rows"]
    written += [plot_fid_vs_steps(rows, out_dir), plot_adherence_vs_w(rows, out_dir), plot_quality_vs_time(rows, out_dir)]
    for model, grid in grids.items():
        if grid["prompts"]:  # --grid-prompts 0: no grid
            written.append(grid_figure(model, grid, out_dir / f"grid-{model}.png"))
    return [p for p in written if p is not None]


def _jsonable(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def format_cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if key == "fid" and len(row.get("fid_per_seed") or []) > 1:
        spread = (max(row["fid_per_seed"]) - min(row["fid_per_seed"])) / 2
        return f"{value:.2f} ± {spread:.2f}"
    return fmt.format(value)


def markdown(result: dict) -> str:
    config, features = result["config"], result["fid_features"]
    lines = ["# pnpguide eval", ""]
    lines.append(f"{config['images']} images per row and seed, seeds {config['seeds']}; prompts: {config['prompts'] or 'held-out shapes captions'}.")
    if features and any(r.get("fid") is not None for r in result["rows"]):
        lines.append(f"FID features: **{features['network']}** (weights {features['weights']}); compare FIDs only within one feature network.")
    if len(config["seeds"]) > 1:
        lines.append("FID is the mean over seeds ± half the range between them.")
    if config.get("guidance_interval"):
        low, high = config["guidance_interval"]
        lines.append(f"Guidance interval: w applies only at timesteps {low:g} <= t <= {high:g} (w = 1 elsewhere), for CFG and the guides alike.")
    if config.get("negative_prompts"):
        lines.append(f"Negative prompts: `{config['negative_prompts']}`; *avoids negative* is the share of images in which the analytic "
                     "judge finds nothing of the colour, shape or coloured shape the image's negative prompt names.")
    step_gap_images = _step_gap_images(result["rows"])
    if step_gap_images == "0":  # a run without CFG (e.g. --methods guide) has nothing to measure a gap against
        lines.append("Gap closed: not measured, since this run sampled no CFG to compare with (add cfg to --methods).")
    else:
        lines.append("Gap closed (1 = CFG's result, 0 = no closer than no guidance): *image* on the final images, pooled MSE against CFG's "
                     "relative to no guidance's (*vs CFG@N*: against CFG and no guidance at N steps, for rows sampled in fewer); *step* on the model outputs at the CFG teacher's own states, summed over steps, relative to "
                     f"the conditional output, on the first {step_gap_images} images of each seed (per step: `step_gap_closed_per_timestep` in report.json).")
    lines.append("Speed: whole pipeline calls (text encoder, sampling, VAE), median of 3 after a warm-up, on the first model only.")
    lines += [f"Note: {note}" for note in result.get("notes", [])]
    table = columns(config, result["rows"])
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        lines += ["", f"## {model}", "", "| " + " | ".join(h for _, h, _ in table) + " |", "|" + "---|" * len(table)]
        for row in (r for r in result["rows"] if r["model"] == model):
            lines.append("| " + " | ".join(format_cell(row, k, f) for k, _, f in table) + " |")
    return "\n".join(lines) + "\n"


def _step_gap_images(rows: list[dict]) -> str:
    counts = {r.get("step_gap_images") for r in rows} - {None, 0}
    return "/".join(str(c) for c in sorted(counts)) or "0"


def _by_method(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return groups


def _figure(rows: list[dict], path: Path, draw) -> Path | None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    drawn = [draw(ax, [r for r in rows if r["model"] == m], m) for ax, m in zip(axes[0], models)]
    if not any(drawn):
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _guided_scale(rows: list[dict]) -> float:
    scales = [r["guidance_scale"] for r in rows if r["method"] != "none"]
    return 7.5 if 7.5 in scales else max(scales, default=1.0)


def _at_scale(rows: list[dict], w: float) -> list[dict]:
    return [r for r in rows if r["guidance_scale"] == w or r["method"] == "none"]


def _plot_lines(ax, rows: list[dict], x: str, y: str, label_steps: bool = False) -> bool:
    """One line per method through its rows that have both values, joined in (steps, w) order; False if none."""
    drawn = False
    for method, group in _by_method(rows).items():
        points = sorted((r for r in group if r[x] is not None and r[y] is not None), key=lambda r: (r["steps"], r["guidance_scale"]))
        if not points:
            continue
        ax.plot([r[x] for r in points], [r[y] for r in points], marker="o", label=method)
        for r in points if label_steps else ():
            ax.annotate(str(r["steps"]), (r[x], r[y]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        drawn = True
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def plot_fid_vs_steps(rows: list[dict], out_dir: Path) -> Path | None:
    def draw(ax, model_rows, model):
        w, steps = _guided_scale(model_rows), sorted({r["steps"] for r in model_rows})
        ax.set(xscale="log", xlabel="sampling steps", ylabel="FID (lower is better)", title=f"{model}, w={w:g} (none: w=1)")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        return _plot_lines(ax, _at_scale(model_rows, w), "steps", "fid")

    return _figure(rows, out_dir / "fid-vs-steps.png", draw)


def plot_adherence_vs_w(rows: list[dict], out_dir: Path) -> Path | None:
    def draw(ax, model_rows, model):
        steps = 25 if any(r["steps"] == 25 for r in model_rows) else max(r["steps"] for r in model_rows)
        ax.set(xlabel="guidance scale w", ylabel="prompt adherence", title=f"{model}, {steps} steps")
        return _plot_lines(ax, [r for r in model_rows if r["steps"] == steps], "guidance_scale", "adherence")

    return _figure(rows, out_dir / "adherence-vs-w.png", draw)


def plot_quality_vs_time(rows: list[dict], out_dir: Path) -> Path | None:
    def draw(ax, model_rows, model):
        w = _guided_scale(model_rows)
        ax.set(xlabel="seconds per image (batch 8)", ylabel="FID", title=f"{model}, w={w:g} (labels: steps)")
        return _plot_lines(ax, _at_scale(model_rows, w), "seconds_per_image_b8", "fid", label_steps=True)

    return _figure(rows, out_dir / "quality-vs-time.png", draw)


def grid_figure(model: str, grid: dict, path: Path) -> Path:
    """Rows: method at a step count (in the order they ran: cfg, none, guides); columns: prompts, one seed each.
    With negative prompts each column names its negative, and the "(no neg)" rows show the guides without it."""
    rows = {f"{method}, {steps} st": images for (method, steps), images in grid["images"].items()}
    negatives = grid.get("negatives") or []
    captions = [f"{p} [negative: {n}]" for p, n in zip(grid["prompts"], negatives)] if negatives else grid["prompts"]
    title = f"{model}: same seeds, methods side by side" + (" (cfg and guides with the negative prompts)" if negatives else "")
    return captioned_grid(rows, captions, path, title=title)
