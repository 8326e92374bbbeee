"""The summary printed at the end of every run: the lines a user looks for, on one screen.

Every line but the two paths fits WIDTH characters; of the clusters in words only the RULES_SHOWN
largest clusters are printed, and T/report.html and rules.csv hold them all.
"""
import textwrap
from pathlib import Path

WIDTH = 100                    # characters per line (paths are never shortened)
RULES_SHOWN = 3                # clusters in words printed, largest first
LABEL = 20                     # width of the label column
INDENT = " " * (2 + LABEL + 1)
ELLIPSIS = "..."


def _row(label, text):
    return f"  {label:<{LABEL}} {text}"


def fit(text, width=WIDTH - len(INDENT)):
    """`text` cut to `width` characters, at a word when one ends in its second half, with an ellipsis."""
    if len(text) <= width:
        return text
    cut = text[: width - len(ELLIPSIS) - 1]
    space = cut.rfind(" ")
    if space > width // 2:
        cut = cut[:space]
    return f"{cut.rstrip()} {ELLIPSIS}"


def _labelled(label, texts):
    """One row per text, the label on the first; each text fitted to the line."""
    return [_row(label if i == 0 else "", fit(text)) for i, text in enumerate(texts)]


def rule_lines(rules, shown=RULES_SHOWN):
    """The clusters in words of the `shown` largest clusters, then how many more the report holds."""
    largest = sorted(rules, key=lambda r: (-r["size"], r["cluster"]))
    lines = _labelled("clusters in words", [r["text"] for r in largest[:shown]])
    if len(largest) > shown:
        lines.append(_row("", f"{ELLIPSIS} {len(largest) - shown} more in T/report.html"))
    return lines


def _test_lines(test):
    lines = [_row("test accuracy", f"{100 * test['test_accuracy']:.2f}% ({test['test_errors']} errors in "
                                   f"{test['test_images']} test images)")]
    if test.get("mean_error") is not None:
        lines.append(_row("mean keypoint error", f"{test['mean_error']:.2f} px (accuracy = share of images within "
                                                 f"the threshold)"))
    return lines


def _cluster_lines(clusters):
    lines = [_row("best layer", f"{clusters['best_layer']}  ({clusters['clusters']} root-cause clusters)")]
    if clusters.get("rq1_explained") is not None:
        lines.append(_row("RQ1 explained", f"{clusters['rq1_explained']:.1f}% of clusters; "
                                           f"{clusters['rq1_inspected']:.2f}% of error images inspected at 5 per "
                                           f"cluster"))
    return lines + rule_lines(clusters.get("rules") or [])


def _assign_lines(assign):
    if assign.get("unsafe_precision") is None:
        return [_row("unsafe set", f"{assign['unsafe_images']} improvement images to label")]
    return [_row("unsafe set", f"{assign['unsafe_images']} images, {100 * assign['unsafe_precision']:.0f}% of them "
                               f"errors (improvement set: {100 * assign['base_error_rate']:.0f}%)")]


def _robustness_lines(robust):
    lines = _labelled("robustness", robust["curves"])
    if robust.get("improvement_images") is not None:
        lines.append(_row("improvement set", f"{robust['improvement_images']} perturbed training images in "
                                             f"DataSets/ImprovementSet (see params.csv)"))
    if robust.get("test_copies") is not None:
        lines.append(_row("test set", f"{robust['test_copies']} perturbed test copies added "
                                      f"(DataSets/TestSet/<class>/perturbed/)"))
    return lines


def _properties_lines(props):
    return [_row("properties", fit(f"{len(props['properties'])} measured for {props['images']} images in "
                                   f"T/properties.csv: {', '.join(props['properties'])}"))]


def _retrain_lines(retrain):
    """The mean gain and, with several repetitions, each one's (wrapped onto further lines when long)."""
    gains = retrain.get("gains") or []
    head = f"{100 * retrain['test_accuracy']:.2f}% ({retrain['mode']}, gain {retrain['gain']:+.2f} points"
    each = ", ".join(f"{g:+.2f}" for g in gains)
    line = _row("after retraining", f"{head}, mean of {len(gains)} repetitions: {each})" if len(gains) > 1
                else f"{head})")
    lines = [line]
    if len(line) > WIDTH:
        lines = [_row("after retraining", f"{head}, mean of {len(gains)} repetitions)")]
        lines += textwrap.wrap(f"repetitions' gains: {each}", WIDTH, initial_indent=INDENT, subsequent_indent=INDENT)
    if retrain.get("mean_error") is not None:
        lines.append(_row("mean keypoint error", f"{retrain['original_mean_error']:.2f} px before, "
                                                 f"{retrain['mean_error']:.2f} px after retraining"))
    return lines


SECTIONS = (("test", _test_lines), ("properties", _properties_lines), ("clusters", _cluster_lines), ("assign", _assign_lines),
            ("robustness", _robustness_lines), ("retrain", _retrain_lines))


def summary_text(case_dir, summaries):
    """The short summary printed at the end of every run, from the step summaries of Helper.run."""
    lines = ["", "HUDD summary"]
    for name, section in SECTIONS:
        if summaries.get(name):
            lines += section(summaries[name])
    report = Path(case_dir) / "T" / "report.html"
    if report.is_file():
        lines.append(_row("report", report.resolve()))
    lines.append(_row("results", Path(case_dir).resolve() / "T"))
    return "\n".join(lines)
