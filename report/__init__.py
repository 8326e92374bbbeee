"""T/report.html: the page an engineer opens first.

It shows what the case folder holds at the time it is written (so any step can call it): the
best layer, its root-cause clusters by size with their members (medoid first, input-layer
heatmap overlaid, expected and predicted labels), GIFs, the WICD curves of every layer, RQ1,
the unsafe set, retraining and RQ2 results, and links to every file. It reads only files of
the case folder and works offline from it: relative links, inline CSS, no network.
"""
import html
import os
import re
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from common.errors import HUDDError
from common.files import write_text
from common.tables import try_read_table

STYLE_FILE = Path(__file__).with_name("style.css")
MEMBERS_SHOWN = 12             # thumbnails per cluster; the folder link has them all
THUMB_SIDE = 112               # overlay thumbnails are scaled up to about this many pixels
TABLE_ROWS_SHOWN = 200
OVERLAY_ALPHA = 0.6            # heat colour weight at the hottest pixel
COLORMAP = "jet"
MEMBER_FOLDER = re.compile(r"^\d+$")
ASSETS = "report_assets"


def _e(text):
    return html.escape(str(text), quote=True)


def _href(path, base):
    return quote(os.path.relpath(path, base).replace(os.sep, "/"), safe="/")


def _table(frame, limit=TABLE_ROWS_SHOWN):
    if frame is None:
        return "<p class=note>unreadable CSV</p>"
    more = len(frame) - limit
    shown = frame.head(limit).to_html(index=False, classes="data", border=0, float_format=lambda v: f"{v:.4g}",
                                      na_rep="")
    return shown + (f"<p class=note>... and {more} more rows (open the CSV)</p>" if more > 0 else "")


# ---------------------------------------------------------------------------------------------- overlays

def _heat(relevance):
    """A (H, W) map in [0, 1] from one input-layer relevance row: sum of |relevance| over channels."""
    r = np.abs(np.asarray(relevance, dtype=np.float32))
    if r.ndim == 3:
        r = r.sum(axis=0) if r.shape[0] <= 4 else r.sum(axis=-1)
    if r.ndim != 2:
        return None
    peak = float(r.max())
    return r / peak if peak > 0 else r


def render_overlay(image_path, relevance, out):
    """A small PNG: the image in grey with its input-layer heatmap over it in colour."""
    import matplotlib
    from PIL import Image

    heat = _heat(relevance)
    with Image.open(image_path) as img:
        grey = img.convert("L")
        size = (heat.shape[1], heat.shape[0]) if heat is not None else grey.size
        grey = np.asarray(grey.resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
    base = np.repeat(grey[:, :, None], 3, axis=2)
    if heat is not None:
        colour = matplotlib.colormaps[COLORMAP](heat)[:, :, :3]
        alpha = OVERLAY_ALPHA * np.sqrt(heat)[:, :, None]
        base = base * (1 - alpha) + colour * alpha
    picture = Image.fromarray(np.clip(base * 255, 0, 255).astype(np.uint8))
    scale = max(1, THUMB_SIDE // max(picture.size))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    elif max(picture.size) > 2 * THUMB_SIDE:
        picture.thumbnail((2 * THUMB_SIDE, 2 * THUMB_SIDE))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    picture.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


class _Overlays:
    """Overlay PNGs in T/report_assets/overlays/, rendered once per heatmap file version."""

    def __init__(self, case):
        self.case = case
        self.heatmaps = None
        self.rows = {}
        layer0 = case / "T" / "Heatmaps" / "Layer0.npy"
        index = try_read_table(case / "T" / "Heatmaps" / "index.csv") if layer0.is_file() else None
        if index is not None and {"row", "image"} <= set(index.columns):
            try:
                self.heatmaps = np.load(layer0, mmap_mode="r")
            except (ValueError, OSError):
                self.heatmaps = None
            self.rows = dict(zip(index["image"].astype(str), index["row"].astype(int)))
            self.stamp = layer0.stat().st_mtime

    def get(self, image):
        """Path of the overlay for an image key, or the image itself when no heatmap exists."""
        source = self.case / "DataSets" / image
        row = self.rows.get(image)
        if self.heatmaps is None or row is None or row >= len(self.heatmaps) or not source.is_file():
            return source
        out = self.case / "T" / ASSETS / "overlays" / f"{row}.png"
        if not out.is_file() or out.stat().st_mtime < max(self.stamp, source.stat().st_mtime):
            try:
                render_overlay(source, self.heatmaps[row], out)
            except (OSError, ValueError):
                return source
        return out


# ---------------------------------------------------------------------------------------------- sections

def _labels(case):
    frame = try_read_table(case / "testResult.csv")
    if frame is None or not {"image", "expected", "predicted"} <= set(frame.columns):
        return {}, None
    labels = dict(zip(frame["image"].astype(str), zip(frame["expected"].astype(str), frame["predicted"].astype(str))))
    return labels, frame


def _member_order(t_dir, layer, rows, medoid_row):
    """Rows of a cluster, medoid first, then by distance to the medoid when the matrix exists."""
    others = [r for r in rows if r != medoid_row]
    path = t_dir / f"{layer}HMDistance.npy"
    if path.is_file() and medoid_row is not None:
        try:
            distances = np.load(path, mmap_mode="r")
            if distances.shape[0] > max(rows):
                d = np.asarray(distances[medoid_row])[others]
                others = [others[i] for i in np.argsort(d, kind="stable")]
        except (ValueError, OSError):
            pass
    return ([medoid_row] if medoid_row is not None else []) + others


def _words(t_dir, layer):
    """{cluster: html} of each cluster's rule (rules.csv) and description (descriptions.csv), when written."""
    folder = t_dir / "ClusterAnalysis" / layer
    words = {}
    descriptions = try_read_table(folder / "descriptions.csv", text=("confusion", "nearest_training"))
    if descriptions is not None and {"cluster", "confusion"} <= set(descriptions.columns):
        source = t_dir.parent / "DataSets"
        for row in descriptions.itertuples():
            lines = [f"confusion: {_e(row.confusion)}"] if str(row.confusion) else []
            near = [i for i in str(getattr(row, "nearest_training", "")).split(";") if i]
            if near:
                lines.append("nearest training images to the medoid: " + " ".join(
                    f"<a href=\"{_href(source / i, t_dir)}\"><img class=near src=\"{_href(source / i, t_dir)}\" "
                    f"alt=\"{_e(i)}\" title=\"{_e(i)}\"></a>" for i in near))
            if lines:
                words[int(row.cluster)] = lines
    rules = try_read_table(folder / "rules.csv", text=("rule", "conditions", "rejected", "rejected_reason"))
    if rules is not None and {"cluster", "rule", "precision", "recall", "coverage"} <= set(rules.columns):
        for row in rules.itertuples():
            if str(row.rule):
                words.setdefault(int(row.cluster), []).insert(0, (
                    f"<b>rule: {_e(row.rule)}</b> (precision {row.precision:.2f}, recall {row.recall:.2f}, "
                    f"{100 * row.coverage:.1f}% of the test set)"))
            elif "rejected_recall" in rules.columns and row.size > 1:
                from explain.rules import rule_line

                words.setdefault(int(row.cluster), []).insert(0, f"<b>rule:</b> {_e(rule_line(row))}")
    return words


def _cluster_section(case, t_dir, layer, labels, overlays, rq1, unsafe_counts):
    folder = t_dir / "ClusterAnalysis" / layer
    clusters = try_read_table(folder / "clusters.csv")
    if clusters is None or not {"image", "cluster"} <= set(clusters.columns):
        return "<p class=note>No clusters yet: run the clustering step.</p>"
    info = try_read_table(folder / "cluster_info.csv")
    medoids = dict(zip(info["cluster"].astype(int), info["medoid"].astype(str))) if info is not None and \
        {"cluster", "medoid"} <= set(info.columns) else {}
    images = clusters["image"].astype(str).tolist()
    row_of = {image: i for i, image in enumerate(images)}
    groups = clusters.groupby("cluster").indices
    words = _words(t_dir, layer)
    order = sorted(groups, key=lambda c: (-len(groups[c]), c))
    parts, singletons = [], []
    for c in order:
        rows = list(groups[c])
        medoid_row = row_of.get(medoids.get(int(c)), rows[0])
        ordered = _member_order(t_dir, layer, rows, medoid_row)
        if len(rows) == 1:
            singletons.append(_member(case, t_dir, images[rows[0]], labels, overlays, f"cluster {c}"))
            continue
        parts.append(_cluster_block(case, t_dir, folder, c, ordered, images, labels, overlays, rq1, unsafe_counts,
                                    words.get(int(c), [])))
    html_parts = ["\n".join(parts)]
    if singletons:
        html_parts.append(f"<section class=cluster><h3>Singleton clusters ({len(singletons)})</h3>"
                          f"<p class=note>one image each; inspect them like any other root cause</p>"
                          f"<div class=grid>{''.join(singletons)}</div></section>")
    return "\n".join(html_parts)


def _cluster_block(case, t_dir, folder, c, ordered, images, labels, overlays, rq1, unsafe_counts, words=()):
    size = len(ordered)
    links = []
    member_dir = folder / str(c)
    if member_dir.is_dir():
        links.append(f"<a href=\"{_href(member_dir, t_dir)}/\">all {size} images</a>")
    gif = folder / "AllClusters" / f"{c}.gif"
    notes = []
    if rq1 is not None and c in rq1.index:
        row = rq1.loc[c]
        verdict = "explained" if str(row.get("explained", "")).lower() == "true" else "not explained"
        means = ""
        if pd.notna(row.get("best_mean", np.nan)) and pd.notna(row.get("test_set_mean", np.nan)):
            means = f": mean {_e(_fmt(row['best_mean']))} here, {_e(_fmt(row['test_set_mean']))} over the test set"
        notes.append(f"<span class=\"badge {'ok' if verdict == 'explained' else 'no'}\">RQ1: {verdict}</span> "
                     f"lowest variance ratio {_e(_fmt(row.get('min_ratio')))} ({_e(row.get('best_parameter', ''))}"
                     f"{means})")
    if c in unsafe_counts:
        count, precision = unsafe_counts[c]
        share = f", {100 * precision:.0f}% of them errors of the DNN" if pd.notna(precision) else ""
        notes.append(f"unsafe set: {count} improvement images{share}")
    members = "".join(_member(case, t_dir, images[r], labels, overlays, "medoid" if i == 0 else "")
                      for i, r in enumerate(ordered[:MEMBERS_SHOWN]))
    more = f"<p class=note>... {size - MEMBERS_SHOWN} more in the folder</p>" if size > MEMBERS_SHOWN else ""
    gif_html = (f"<figure class=gif><a href=\"{_href(gif, t_dir)}\"><img src=\"{_href(gif, t_dir)}\" alt=\"cluster {c} "
                f"animation\"></a><figcaption>all members, 100 per minute</figcaption></figure>") if gif.is_file() else ""
    return (f"<section class=cluster id=\"cluster-{_e(c)}\"><h3>Cluster {_e(c)} <small>{size} images</small></h3>"
            f"<p>{' · '.join(links + notes)}</p>{''.join(f'<p class=words>{w}</p>' for w in words)}<div class=row>{gif_html}<div class=grid>{members}</div></div>"
            f"{more}</section>")


def _fmt(value):
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return str(value)


def _member(case, t_dir, image, labels, overlays, tag):
    picture = overlays.get(image)
    expected, predicted = labels.get(image, ("?", "?"))
    source = case / "DataSets" / image
    caption = f"<b>{_e(tag)}</b><br>" if tag else ""
    caption += f"expected {_e(expected)}<br>predicted {_e(predicted)}"
    return (f"<figure class=member><a href=\"{_href(source, t_dir)}\" title=\"{_e(image)}\">"
            f"<img src=\"{_href(picture, t_dir)}\" alt=\"{_e(image)}\"></a><figcaption>{caption}</figcaption></figure>")


def _layers_section(t_dir, summary):
    parts = [_table(summary)] if summary is not None else []
    curves = sorted((t_dir / "ClusterAnalysis").glob("*/WICD.png"), key=lambda p: _layer_key(p.parent.name))
    if curves:
        parts.append("<div class=curves>" + "".join(
            f"<figure><a href=\"{_href(p, t_dir)}\"><img src=\"{_href(p, t_dir)}\" alt=\"WICD of {_e(p.parent.name)}\">"
            f"</a><figcaption>{_e(p.parent.name)}</figcaption></figure>" for p in curves) + "</div>")
    return "".join(parts) or "<p class=note>No clustering results yet.</p>"


def _layer_key(name):
    match = re.fullmatch(r"Layer(\d+)", name)
    return (0, int(match.group(1)), name) if match else (1, 0, name)


def _files_section(case, t_dir):
    """Links to every file: member-image folders as one link each, everything else file by file."""
    items = []
    for path in sorted(case.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            items.append(_file_link(path, t_dir))
    for folder in ("DNNModels",):
        for path in sorted((case / folder).glob("*")) if (case / folder).is_dir() else []:
            items.append(_file_link(path, t_dir))
    if t_dir.is_dir():
        for dirpath, dirnames, filenames in os.walk(t_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != ASSETS)
            here = Path(dirpath)
            for d in list(dirnames):
                if MEMBER_FOLDER.match(d):
                    count = sum(1 for _ in (here / d).iterdir())
                    items.append(f"<li><a href=\"{_href(here / d, t_dir)}/\">{_e(os.path.relpath(here / d, case))}/</a>"
                                 f" <small>({count} files)</small></li>")
                    dirnames.remove(d)
            for name in sorted(filenames):
                if not name.startswith(".") and here / name != t_dir / "report.html":
                    items.append(_file_link(here / name, t_dir))
    return f"<details><summary>{len(items)} files and folders</summary><ul class=files>{''.join(items)}</ul></details>"


def _file_link(path, t_dir):
    case = t_dir.parent
    size = path.stat().st_size if path.is_file() else 0
    return (f"<li><a href=\"{_href(path, t_dir)}\">{_e(os.path.relpath(path, case))}</a> "
            f"<small>{_size(size)}</small></li>")


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _best_layer(summary):
    if summary is None or not {"layer", "selected"} <= set(summary.columns):
        return None
    chosen = summary[summary["selected"].astype(str).str.lower() == "true"]
    return str(chosen["layer"].iloc[0]) if len(chosen) else None


CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-images-loaded', ok);
  document.getElementById('image-check').textContent = ok === imgs.length
    ? 'All ' + imgs.length + ' images loaded.'
    : (imgs.length - ok) + ' of ' + imgs.length + ' images did not load: was the case folder moved or a step rerun? '
      + 'Regenerate the report (any step writes it).';
});
</script>"""


def _robustness_section(t_dir):
    """Accuracy per perturbation and amplitude level (-step robustness): a table, a plot per perturbation
    and one test image at every level."""
    folder = t_dir / "Robustness"
    curves = try_read_table(folder / "curves.csv")
    if curves is None or not {"perturbation", "level", "accuracy"} <= set(curves.columns):
        return ""
    order = list(dict.fromkeys(curves["perturbation"]))
    table = (100 * curves.pivot(index="perturbation", columns="level", values="accuracy")).round(2)
    table = table.reindex(order).add_prefix("level ").rename_axis(columns=None).reset_index()
    figures = [folder / f"{name}.png" for name in order if (folder / f"{name}.png").is_file()]
    html = ("<h2>Robustness</h2><p class=note>Accuracy (%) of the DNN on the clean test set under each perturbation, "
            "by amplitude level (0 = clean, the last = the strongest); the settings of every level are in "
            f"<a href=\"{_href(folder / 'curves.csv', t_dir)}\">T/Robustness/curves.csv</a>.</p>" + _table(table))
    html += "<div class=curves>" + "".join(f"<figure><img src=\"{_href(p, t_dir)}\" alt=\"{_e(p.stem)}\"></figure>"
                                           for p in figures) + "</div>"
    examples = folder / "examples.png"
    if examples.is_file():
        html += (f"<figure><img src=\"{_href(examples, t_dir)}\" alt=\"perturbation examples\"><figcaption>one test "
                 f"image at every perturbation and level</figcaption></figure>")
    return html


def _parameters_named(case, plural=False):
    """What RQ1's parameters are, in words: a simulator's (DataSets/params.csv) or the measured properties."""
    if (case / "DataSets" / "params.csv").is_file():
        return "simulator parameters" if plural else "simulator parameter"
    return "measured image properties" if plural else "measured image property"


def _facts(results, summary, best, rq1, unsafe, total, parameters="simulator parameter"):
    """The page's first list: accuracy, best layer, RQ1 and the unsafe set, as far as they exist."""
    facts = []
    if results is not None and "result" in results.columns:
        wrong = int((results["result"].astype(str) == "Wrong").sum())
        facts.append(f"{wrong} error images of {len(results)} test images "
                     f"(accuracy {100.0 * (len(results) - wrong) / max(len(results), 1):.2f}%)")
    if best is not None:
        row = summary[summary["layer"] == best].iloc[0]
        facts.append(f"best layer <b>{_e(best)}</b> (lowest WICD; input layer excluded): {_e(row['k'])} root-cause "
                     f"clusters, {_e(row.get('n_clusters_nonsingleton', '?'))} with two or more images")
    if rq1 is not None and "explained" in rq1.columns and len(rq1):
        explained = int((rq1["explained"].astype(str).str.lower() == "true").sum())
        facts.append(f"RQ1: {explained} of {len(rq1)} clusters ({100.0 * explained / len(rq1):.1f}%) explained by a "
                     f"{parameters}")
    if unsafe is not None and total is not None and len(total):
        facts.append(f"unsafe set: {len(unsafe)} improvement images, <b>{100 * total['precision'].iloc[0]:.1f}%</b> "
                     f"of them errors of the DNN (improvement set: {100 * total['base_error_rate'].iloc[0]:.1f}%, "
                     f"the expected share of a random draw such as BL1's and BL2's)")
    elif unsafe is not None:
        facts.append(f"unsafe set: {len(unsafe)} improvement images")
    return facts


def _unsafe_sections(unsafe, precision, total):
    if total is not None and len(total):
        return ["<h2>Unsafe set</h2><p class=note>Per cluster: improvement images selected, how many of them "
                "the DNN gets wrong (precision) and that share over the improvement set's error rate (lift).</p>"
                + _table(precision)]
    if unsafe is not None and "cluster" in unsafe.columns:
        counts = unsafe.groupby("cluster").size().rename("images").reset_index()
        return ["<h2>Unsafe set</h2>" + _table(counts)]
    return []


COVERAGE_SHOWN = ("n_labelled", "precision", "base_error_rate", "clusters_reached", "clusters", "top_cluster_share")


def coverage_table(tables):
    """What each mode's selection covers, the mean over its repetitions: labelled images, precision, clusters
    reached, the top cluster's share and each condition's share (None when no table has coverage columns).
    `tables`: {mode: its T/retrain_<mode>.csv}."""
    rows = []
    for mode, frame in tables.items():
        if frame is None or "clusters_reached" not in frame.columns:
            continue
        columns = [c for c in COVERAGE_SHOWN if c in frame.columns] + \
            [c for c in frame.columns if c.startswith(("share_", "base_share_"))]
        means = frame[columns].apply(pd.to_numeric, errors="coerce").mean()
        rows.append({"mode": mode, "reps": len(frame), **means.to_dict()})
    return pd.DataFrame(rows) if rows else None


def _retraining_sections(case, t_dir):
    """What each selection covers, a table and a curve per retraining mode, then RQ2's table and plots."""
    parts = []
    paths = sorted(p for p in t_dir.glob("retrain_*.csv") if not p.stem.endswith("_history"))
    covered = coverage_table({p.stem.removeprefix("retrain_"): try_read_table(p) for p in paths})
    if covered is not None:
        parts.append("<h2>What each selection covers</h2><p class=note>mean over the repetitions: images labelled, "
                     "the share of them the DNN got wrong (precision; base_error_rate: the improvement set's), the "
                     "root-cause clusters they are closest to, the share of the budget the most frequent cluster "
                     "takes, and each named condition's share (base_share_: in the improvement set)</p>"
                     + _table(covered))
    for path in paths:
        parts.append(f"<h2>Retraining: {_e(path.stem.removeprefix('retrain_'))}</h2>" + _table(try_read_table(path)))
        curve = path.with_name(f"{path.stem}_history.png")
        if curve.is_file():
            parts.append(f"<div class=curves><figure><img src=\"{_href(curve, t_dir)}\" alt=\"{_e(curve.name)}\">"
                         f"<figcaption>accuracy per retraining epoch</figcaption></figure></div>")
    if (case / "RQ2.csv").is_file():
        parts.append("<h2>RQ2</h2>" + _table(try_read_table(case / "RQ2.csv")))
    plots = sorted(case.glob("RQ2*.png"))
    if plots:
        if not (case / "RQ2.csv").is_file():
            parts.append("<h2>RQ2</h2>")
        parts.append("<div class=curves>" + "".join(f"<figure><img src=\"{_href(p, t_dir)}\" alt=\"{_e(p.name)}\">"
                                                    f"</figure>" for p in plots) + "</div>")
    return parts


def write_report(case_dir):
    """Write CASE/T/report.html from whatever the case folder holds now; returns its path."""
    case = Path(case_dir)
    if not case.is_dir():
        raise HUDDError(f"{case}: case folder not found; pass the folder given to -o")
    t_dir = case / "T"
    t_dir.mkdir(exist_ok=True)
    summary = try_read_table(t_dir / "ClusterAnalysis" / "summary.csv")
    best = _best_layer(summary)
    labels, results = _labels(case)
    overlays = _Overlays(case)
    rq1 = try_read_table(case / "RQ1.csv")
    rq1_index = rq1.set_index(rq1["cluster"].astype(int)) if rq1 is not None and "cluster" in rq1.columns else None
    unsafe = try_read_table(t_dir / "UnsafeSet" / "unsafe.csv")
    precision = try_read_table(t_dir / "UnsafeSet" / "precision.csv")
    share = dict(zip(precision["cluster"].astype(str), precision["precision"])) \
        if precision is not None and {"cluster", "precision"} <= set(precision.columns) else {}
    unsafe_counts = {int(c): (n, share.get(str(c), np.nan)) for c, n in unsafe.groupby("cluster").size().items()} \
        if unsafe is not None and "cluster" in unsafe.columns else {}
    body = [f"<h1>HUDD report <small>{_e(case.resolve().name)}</small></h1>",
            f"<p class=note>Written {_e(time.strftime('%Y-%m-%d %H:%M'))} from the files of {_e(case.resolve())}. "
            f"<span id=image-check></span></p>"]
    total = precision[precision["cluster"].astype(str) == "all"] if precision is not None and \
        {"cluster", "precision", "base_error_rate"} <= set(precision.columns) else None
    facts = _facts(results, summary, best, rq1, unsafe, total, _parameters_named(case))
    body.append("<ul class=facts>" + "".join(f"<li>{f}</li>" for f in facts) + "</ul>" if facts else
                "<p class=note>Nothing computed yet: run HUDD.py on this folder.</p>")
    if best is not None:
        body.append(f"<h2>Root-cause clusters of {_e(best)}</h2><p class=note>Largest first. Each thumbnail is the "
                    f"image in grey with its input-layer heatmap (relevance) in colour; the medoid comes first.</p>")
        body.append(_cluster_section(case, t_dir, best, labels, overlays, rq1_index, unsafe_counts))
    body.append("<h2>Layers and WICD curves</h2>" + _layers_section(t_dir, summary))
    if rq1 is not None:
        body.append(f"<h2>RQ1: variance of {_parameters_named(case, plural=True)} per cluster</h2><p class=note>ratio = variance in "
                    "the cluster / variance over all clustered errors; explained when a ratio is below 0.5.</p>"
                    + _table(rq1))
    body += _unsafe_sections(unsafe, precision, total) + _retraining_sections(case, t_dir)
    robustness = _robustness_section(t_dir)
    if robustness:
        body.append(robustness)
    body.append("<h2>Files</h2>" + _files_section(case, t_dir))
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>HUDD report: {_e(case.resolve().name)}"
            f"</title><style>{STYLE_FILE.read_text(encoding='utf-8')}</style></head><body>{''.join(body)}"
            f"{CHECK_SCRIPT}</body></html>")
    out = t_dir / "report.html"
    write_text(out, page)
    return out
