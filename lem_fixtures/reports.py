"""Reports of a run in reports/<run>/: upstream A/B JSONL per model, Markdown, PNG plots, one HTML page, run.json."""

from __future__ import annotations

import base64
import datetime
import html
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .results import ABWriter, summarize
from .statistics import paired_bootstrap_ci

logger = logging.getLogger(__name__)

BASELINE = "baseline"
TRAINED_SUFFIX = "+lek"
# Per-condition keys of a probe line beyond the upstream five, kept so a run can be audited.
EXTRA_RESPONSE_KEYS = ("finish_reason", "prompt_tokens", "generation_tokens", "mode")


@dataclass(frozen=True)
class Effect:
    """A paired difference of two conditions (or models) over the probes both have."""

    label: str
    model: str
    n: int
    mean: float
    low: float
    high: float


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def group_by_model(results: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        grouped.setdefault(result["model"], []).append(result)
    return grouped


def condition_order(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Conditions in order of first appearance, the baseline first."""
    seen: list[str] = []
    for result in results:
        if result["condition"] not in seen:
            seen.append(result["condition"])
    if BASELINE in seen:
        seen.remove(BASELINE)
        seen.insert(0, BASELINE)
    return seen


def probe_lines(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Build upstream probe lines (one per probe, every condition's response) from case results."""
    conditions = condition_order(results)
    lines: dict[str, dict[str, Any]] = {}
    for result in results:
        line = lines.setdefault(result["probe"], {
            "type": "probe",
            "id": result["probe"],
            "category": result["category"],
            "prompt": result["prompt"],
            "conditions": {},
            "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        })
        entry = {
            "response": result["response"],
            "lek_score": result["lek_score"],
            "heuristic": result["heuristic"],
            "chars": len(result["response"]),
            "time_s": round(float(result.get("seconds", 0.0)), 1),
        }
        for key in EXTRA_RESPONSE_KEYS:
            if key in result:
                entry[key] = result[key]
        line["conditions"][result["condition"]] = entry

    for line in lines.values():
        line["conditions"] = {name: line["conditions"][name] for name in conditions if name in line["conditions"]}
    return list(lines.values())


def scores_table(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for result in results:
        table.setdefault(result["probe"], {})[result["condition"]] = float(result["lek_score"])
    return table


def paired_effect(label: str, model: str, after: Mapping[str, float], before: Mapping[str, float]) -> Effect | None:
    probes = sorted(set(after) & set(before))
    if not probes:
        return None
    interval = paired_bootstrap_ci([after[probe] - before[probe] for probe in probes])
    return Effect(label, model, interval.n, interval.mean, interval.low, interval.high)


def kernel_effects(results: Sequence[Mapping[str, Any]]) -> list[Effect]:
    """Each kernel condition minus the baseline, per model, with a paired bootstrap 95% CI."""
    effects = []
    for model, model_results in group_by_model(results).items():
        table = scores_table(model_results)
        baseline = {probe: scores[BASELINE] for probe, scores in table.items() if BASELINE in scores}
        for condition in condition_order(model_results):
            if condition == BASELINE:
                continue
            treated = {probe: scores[condition] for probe, scores in table.items() if condition in scores}
            effect = paired_effect(f"{condition} - {BASELINE}", model, treated, baseline)
            if effect is not None:
                effects.append(effect)
    return effects


def training_effects(results: Sequence[Mapping[str, Any]]) -> list[Effect]:
    """Fine-tuning effect (trained baseline - base baseline) and kernel on the trained model, per trained model."""
    from .training import training_effects as training_rows

    grouped = group_by_model(results)
    effects = []
    for model, model_results in grouped.items():
        if not model.endswith(TRAINED_SUFFIX):
            continue

        base_name = model[: -len(TRAINED_SUFFIX)]
        base = scores_table(grouped.get(base_name, []))
        kernels = [condition for condition in condition_order(model_results) if condition != BASELINE]
        for row in training_rows(base, scores_table(model_results), kernels):
            if row["n"] == 0:
                continue
            label = f"{row['effect']} ({row['comparison']})"
            effects.append(Effect(label, model, row["n"], row["delta"], row["ci_low"], row["ci_high"]))
    return effects


def training_runs(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """How each trained model of the run was trained, read from its adapter's manifest in the cache.

    One entry per trained model with an adapter: the adapter key and directory, the config, and
    per phase the data, seconds per iteration and first and last validation loss. A phase on
    self-distilled data also gets the keep rate and mean kept score of its distill.json.
    """
    runs = []
    seen = set()
    scored = {result["probe"] for result in results}
    for result in results:
        adapter = result.get("adapter_path")
        if not adapter or (result["model"], adapter) in seen:
            continue
        seen.add((result["model"], adapter))
        run = describe_adapter(result["model"], Path(adapter))
        for phase in run["phases"]:
            distilled = phase.get("distillation")
            if distilled is not None:
                # Probes that were both distilled from and scored: the trained model's scores on them are in-sample.
                distilled["scored_probes_distilled"] = len(scored & set(distilled.pop("probe_ids")))
        runs.append(run)
    return runs


def describe_adapter(model: str, adapter_dir: Path) -> dict[str, Any]:
    """Summarize one adapter directory written by training.ensure_adapter or training.train_lora."""
    from .distill import MANIFEST_FILE as DISTILL_MANIFEST
    from .training import LOG_FILE, MANIFEST_FILE

    entry: dict[str, Any] = {"model": model, "adapter_path": str(adapter_dir)}
    manifest_path = adapter_dir / MANIFEST_FILE
    log_path = adapter_dir / LOG_FILE
    config_path = adapter_dir / "adapter_config.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    log = manifest.get("training") or (json.loads(log_path.read_text()) if log_path.is_file() else {})
    adapter_config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    entry["key"] = manifest.get("key")
    entry["config_path"] = manifest.get("config_path")
    entry["config"] = manifest.get("config") or adapter_config.get("lem_config")
    entry["train_split"] = manifest.get("train_split") or adapter_config.get("train_split")
    entry["phases"] = []
    phase_dirs = adapter_config.get("phase_data", [])
    for index, phase in enumerate(log.get("phases", [])):
        val_losses = phase.get("val_losses") or []
        described = {
            "name": phase.get("name"),
            "data_dir": phase.get("data_dir") or (phase_dirs[index] if index < len(phase_dirs) else None),
            "train_examples": phase.get("train_examples"),
            "iters": phase.get("iters"),
            "seconds_per_iteration": phase.get("seconds_per_iteration"),
            "val_loss_first": val_losses[0][1] if val_losses else None,
            "val_loss_last": val_losses[-1][1] if val_losses else None,
        }
        distill_manifest = Path(described["data_dir"] or "") / DISTILL_MANIFEST
        if described["data_dir"] and distill_manifest.is_file():
            distilled = json.loads(distill_manifest.read_text())
            described["distillation"] = {
                key: distilled.get(key)
                for key in (
                    "kernel", "k", "threshold", "n_probes", "n_samples", "n_kept", "keep_rate", "mean_kept_score", "mean_score",
                    "n_train", "n_valid", "n_truncated", "n_kept_truncated", "drop_truncated",
                )
            }
            described["distillation"]["probe_ids"] = sorted({sample["probe_id"] for sample in distilled.get("samples", [])})
        entry["phases"].append(described)
    return entry


def _number(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


TRAINING_HEADER = ["model", "adapter", "config", "phase", "examples", "iterations", "s/iteration", "validation loss", "self-distillation"]


def config_cell(run: Mapping[str, Any]) -> str:
    config = run.get("config") or {}
    if not config:
        return ""
    lora = config.get("lora_parameters", {})
    name = Path(run["config_path"]).name if run.get("config_path") else "config"
    return (
        f"{name}: lr {config.get('learning_rate'):g}, batch {config.get('batch_size')}, "
        f"{config.get('num_layers')} layers, rank {lora.get('rank')}"
    )


def training_rows(runs: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for run in runs:
        for phase in run["phases"]:
            loss = "none: no validation split"
            if phase["val_loss_first"] is not None:
                loss = f"{phase['val_loss_first']:.3f} -> {phase['val_loss_last']:.3f}"
            distilled = phase.get("distillation")
            distill_cell = ""
            if distilled:
                distill_cell = (
                    f"kept {distilled['n_kept']}/{distilled['n_samples']} (rate {_number(distilled['keep_rate'], 2)}, "
                    f"mean kept {_number(distilled['mean_kept_score'], 2)}) under {distilled['kernel']}, "
                    f"k={distilled['k']}, threshold {distilled['threshold']}"
                )
                if distilled.get("n_truncated"):
                    distill_cell += f"; {distilled['n_truncated']} samples reached the token limit, {distilled['n_kept_truncated']} of them kept"
                overlap = distilled.get("scored_probes_distilled")
                if overlap:
                    distill_cell += f"; distilled from {overlap} of the scored probes (in-sample)"
            rows.append([
                run["model"], (run.get("key") or "")[:16], config_cell(run), phase["name"], phase["train_examples"], phase["iters"],
                _number(phase["seconds_per_iteration"], 2), loss, distill_cell,
            ])
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines


def summary_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for model, summary in summaries.items():
        for condition in summary["conditions"]:
            delta = condition.get("delta_vs_baseline")
            rows.append([
                model,
                condition["name"],
                f"{condition['avg_lek']:.2f}",
                "" if delta is None else f"{delta:+.2f}",
                condition["improved"],
                condition["regressed"],
                condition["unchanged"],
            ])
    return rows


def effect_rows(effects: Sequence[Effect]) -> list[list[Any]]:
    """Table rows of effects. An interval from fewer than two probes carries no information, so it shows as n/a."""
    rows = []
    for effect in effects:
        interval = f"[{effect.low:+.2f}, {effect.high:+.2f}]" if effect.n >= 2 else "n/a (one probe)"
        rows.append([effect.model, effect.label, effect.n, f"{effect.mean:+.2f}", interval])
    return rows


def category_rows(summaries: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    conditions: list[str] = []
    for summary in summaries.values():
        for condition in summary["conditions"]:
            if condition["name"] not in conditions:
                conditions.append(condition["name"])

    rows = []
    for model, summary in summaries.items():
        for category, values in summary["categories"].items():
            rows.append([model, category, *(("" if values.get(c) is None else f"{values[c]:.2f}") for c in conditions)])
    return ["model", "category", *conditions], rows


SUMMARY_HEADER = ["model", "condition", "avg lek", "delta", "improved", "regressed", "unchanged"]
EFFECT_HEADER = ["model", "effect", "probes", "mean", "95% CI"]


def markdown_report(
    summaries: Mapping[str, Mapping[str, Any]],
    effects: Sequence[Effect],
    trained: Sequence[Effect],
    settings: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]] = (),
) -> str:
    lines = ["# LEM benchmark run", ""]
    lines.append(f"Generation parameters: `{json.dumps(settings.get('params', {}), sort_keys=True)}`")
    lines.append("")
    lines += ["## Averages by model and condition", ""]
    lines += markdown_table(SUMMARY_HEADER, summary_rows(summaries))
    lines += ["", "Improved, regressed and unchanged count probes whose score moved by more than 0.5 against the baseline.", ""]

    if effects:
        lines += ["## Kernel effect (paired bootstrap, 95% CI)", ""]
        lines += markdown_table(EFFECT_HEADER, effect_rows(effects))
        lines.append("")

    if trained:
        lines += ["## Training effect (paired bootstrap, 95% CI)", ""]
        lines += markdown_table(EFFECT_HEADER, effect_rows(trained))
        lines.append("")

    if runs:
        lines += ["## Training runs", ""]
        lines += markdown_table(TRAINING_HEADER, training_rows(runs))
        lines.append("")

    header, rows = category_rows(summaries)
    lines += ["## Averages by category", ""]
    lines += markdown_table(header, rows)
    lines.append("")
    return "\n".join(lines)


def plot_scores(path: Path, summaries: Mapping[str, Mapping[str, Any]]) -> Path:
    """Bar chart of the average score of each model under each condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summaries)
    conditions: list[str] = []
    for summary in summaries.values():
        for condition in summary["conditions"]:
            if condition["name"] not in conditions:
                conditions.append(condition["name"])

    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(models) * max(1, len(conditions)) / 2), 4.0))
    width = 0.8 / max(1, len(conditions))
    for index, condition in enumerate(conditions):
        values = []
        for model in models:
            averages = {c["name"]: c["avg_lek"] for c in summaries[model]["conditions"]}
            values.append(averages.get(condition, 0.0))
        positions = [m + index * width for m in range(len(models))]
        bars = axes.bar(positions, values, width, label=condition)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)

    axes.set_xticks([m + width * (len(conditions) - 1) / 2 for m in range(len(models))], models, fontsize=8)
    axes.set_ylabel("mean v2 lek_score")
    axes.set_title("Scores by model and condition")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_deltas(path: Path, results: Sequence[Mapping[str, Any]]) -> Path:
    """Per-probe change of each kernel condition against the baseline, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = group_by_model(results)
    figure, axes_list = plt.subplots(len(grouped), 1, figsize=(10.0, 3.2 * len(grouped)), squeeze=False)
    for axes, (model, model_results) in zip(axes_list[:, 0], grouped.items()):
        table = scores_table(model_results)
        probes = [probe for probe in table if BASELINE in table[probe]]
        conditions = [c for c in condition_order(model_results) if c != BASELINE]
        width = 0.8 / max(1, len(conditions))
        for index, condition in enumerate(conditions):
            deltas = [table[p].get(condition, table[p][BASELINE]) - table[p][BASELINE] for p in probes]
            axes.bar([i + index * width for i in range(len(probes))], deltas, width, label=f"{condition} - {BASELINE}")
        axes.axhline(0.0, color="black", linewidth=0.6)
        axes.set_title(f"{model}: per-probe change against the baseline", fontsize=10)
        axes.set_ylabel("change in lek_score")
        axes.set_xticks(range(len(probes)), [p.split("_")[0] for p in probes], fontsize=6, rotation=90)
        if conditions:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def embedded_image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_report(
    summaries: Mapping[str, Mapping[str, Any]],
    effects: Sequence[Effect],
    trained: Sequence[Effect],
    settings: Mapping[str, Any],
    images: Sequence[tuple[Path, str]],
    runs: Sequence[Mapping[str, Any]] = (),
) -> str:
    """A self-contained page: tables and plots with the images embedded, no external resources."""
    sections = [
        "<h2>Averages by model and condition</h2>",
        html_table(SUMMARY_HEADER, summary_rows(summaries)),
    ]
    if effects:
        sections += ["<h2>Kernel effect (paired bootstrap, 95% CI)</h2>", html_table(EFFECT_HEADER, effect_rows(effects))]
    if trained:
        sections += ["<h2>Training effect (paired bootstrap, 95% CI)</h2>", html_table(EFFECT_HEADER, effect_rows(trained))]
    if runs:
        sections += ["<h2>Training runs</h2>", html_table(TRAINING_HEADER, training_rows(runs))]
    for path, alt in images:
        sections += [f"<h2>{html.escape(alt)}</h2>", embedded_image(path, alt)]
    header, rows = category_rows(summaries)
    sections += ["<h2>Averages by category</h2>", html_table(header, rows)]
    sections += ["<h2>Configuration</h2>", f"<pre>{html.escape(json.dumps(settings, indent=2, sort_keys=True))}</pre>"]

    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f0f0f0}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}"
        "pre{background:#f7f7f7;padding:1em;overflow:auto}"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>LEM benchmark run</title>"
        f"<style>{style}</style></head><body><h1>LEM benchmark run</h1>{''.join(sections)}</body></html>\n"
    )


def write_reports(
    run_dir: Path,
    results: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    duration_s: float,
) -> list[Path]:
    """Write every report of a run into run_dir and return their paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    max_tokens = settings.get("params", {}).get("max_tokens")

    summaries: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    for model, model_results in group_by_model(results).items():
        lines = probe_lines(model_results)
        conditions = condition_order(model_results)
        summary = summarize(lines, model=model, max_tokens=max_tokens, duration_s=duration_s, conditions=conditions)

        path = run_dir / f"ab-{safe_name(model)}.jsonl"
        with ABWriter(path, mode="w") as writer:
            for line in lines:
                writer.write_probe(line)
            writer.write_summary(summary)
        written.append(path)

        summaries[model] = summary
        models[model] = {"model_info": model_results[0].get("model_info", {}), "versions": model_results[0].get("versions", {})}

    effects = kernel_effects(results)
    trained = training_effects(results)
    runs = training_runs(results)

    markdown = run_dir / "summary.md"
    markdown.write_text(markdown_report(summaries, effects, trained, settings, runs), encoding="utf-8")
    written.append(markdown)

    images = [
        (plot_scores(run_dir / "scores.png", summaries), "Scores by model and condition"),
        (plot_deltas(run_dir / "deltas.png", results), "Per-probe change against the baseline"),
    ]
    written.extend(path for path, _ in images)

    run_log = {
        "settings": dict(settings),
        "models": models,
        "summaries": summaries,
        "training_runs": runs,
        "duration_s": round(duration_s, 1),
    }
    run_json = run_dir / "run.json"
    run_json.write_text(json.dumps(run_log, indent=2, sort_keys=True), encoding="utf-8")
    written.append(run_json)

    page = run_dir / "index.html"
    page.write_text(html_report(summaries, effects, trained, {"settings": dict(settings), "models": models}, images, runs), encoding="utf-8")
    written.append(page)

    logger.info("wrote %d report files to %s", len(written), run_dir)
    return written


def terminal_table(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines of the terminal summary: per model and condition, cases, mean score and change against the baseline."""
    lines = [f"{'model':<32} {'condition':<12} {'cases':>5} {'avg lek':>8} {'delta':>7}"]
    for model, model_results in group_by_model(results).items():
        means: dict[str, float] = {}
        for condition in condition_order(model_results):
            scores = [float(r["lek_score"]) for r in model_results if r["condition"] == condition]
            means[condition] = round(sum(scores) / len(scores), 2)
            delta = "" if condition == BASELINE or BASELINE not in means else f"{means[condition] - means[BASELINE]:+.2f}"
            lines.append(f"{model:<32} {condition:<12} {len(scores):>5} {means[condition]:>8.2f} {delta:>7}")
    return lines
