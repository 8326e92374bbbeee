"""Root-cause clusters in words: a rule over the simulator parameters per cluster, and a
description from what the tool knows when there are no parameters (real images).

A cluster's rule is the path to one node of a scikit-learn decision tree (depth `max_conditions`)
that separates the cluster's members from the test images the DNN gets right. Every node of the
tree but the root is a candidate (a leaf, or an inner node when its shorter path already says it);
the rule kept is the candidate with the highest F1 of the cluster's members among the test images
it matches, ties going to fewer conditions. Thresholds are rounded to the fewest significant digits
(3 or more) that keep the tree's split of the images it learned from, and every reported figure is
that of the printed, rounded rule applied to the test images with a params row.

A rule must describe the cluster, not two of its images: a candidate counts only when it passes the
floors below (support, interval width, recall, lift). When none does, the cluster has `no simple rule`
and rules.csv keeps the best rejected candidate and why it failed, so the engineer sees what was tried.
"""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from clustering import CLUSTER_ANALYSIS
from common.errors import HUDDError
from common.files import write_csv
from common.tables import MISSING, read_table

MAX_CONDITIONS = 3          # a rule an engineer reads at a glance: the tree's depth
MAX_CATEGORIES = 20         # a text parameter with more values is an identifier, not a condition: left out
MIN_DIGITS = 3              # significant digits of a printed threshold, at least ...
MAX_DIGITS = 15             # ... and at most (then the tree's own threshold is kept)
MAX_CONFUSION_PAIRS = 5     # expected -> predicted pairs listed per cluster; the rest is 'other'
MIN_SUPPORT = 5             # a rule matches at least this many test images ...
MIN_SUPPORT_SHARE = 0.2     # ... and at least this share of its cluster's size (the tree's minimum leaf too)
MIN_WIDTH_SHARE = 0.05      # no interval narrower than this share of the parameter's interquartile range
MIN_RECALL = 1 / 3          # a rule matching less of its cluster is not its description
MIN_LIFT = 3.0              # its recall at least this many times the share of the other test images it matches
HELD_OUT_SHARE = 0.5        # test images the tree does not learn from; recall and lift must hold on them too
REQUIRED_RULE_COLUMNS = ["cluster", "size", "rule", "conditions", "precision", "recall", "coverage", "matching"]
RULE_COLUMNS = REQUIRED_RULE_COLUMNS[:2] + ["found"] + REQUIRED_RULE_COLUMNS[2:] + \
    ["rejected", "rejected_recall", "rejected_reason"]
DESCRIPTION_COLUMNS = ["cluster", "size", "confusion", "medoid", "nearest_training"]
# read back as text even when all empty
TEXT_COLUMNS = ("rule", "conditions", "confusion", "nearest_training", "rejected", "rejected_reason")


# ----------------------------------------------------------------------------------------------
# inputs

def _require(frame, columns, what, fix):
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise HUDDError(f"{what} needs column{'s' if len(absent) > 1 else ''} "
                        f"{', '.join(repr(c) for c in absent)}; {fix}")


def _keyed(frame):
    return frame.assign(image=frame["image"].astype(str)).drop_duplicates("image").set_index("image")


def _category(value):
    """A categorical value as text, None when the cell is empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return None if text in MISSING else text


def _split_parameters(table):
    """Numeric parameters (as floats) and categorical ones (text, booleans) of the params table."""
    numeric, categorical = {}, {}
    for column in table.columns:
        values = table[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            numeric[column] = values.astype(float)
            continue
        text = values.map(_category)
        given = text.notna()
        numbers = pd.to_numeric(text, errors="coerce")
        if not pd.api.types.is_bool_dtype(values) and given.any() and numbers[given].notna().all():
            numeric[column] = numbers.astype(float)
        elif 0 < text.nunique() <= MAX_CATEGORIES:
            categorical[column] = text
    return numeric, categorical


def _test_images_with_params(params, clusters, results):
    """The test images that take part in the rules: params rows of the test images with a result."""
    _require(params, ["image"], "params.csv",
             "add a column 'image' with the path relative to DataSets/ (e.g. TestSet/<class>/<file>)")
    _require(clusters, ["image", "cluster"], "the clusters table", "rerun the clustering step (-step clusters)")
    _require(results, ["image", "result"], "testResult.csv", "rerun the test step (-step test)")
    table = _keyed(params)
    if table.columns.empty:
        raise HUDDError("params.csv has no parameter columns besides 'image'; add one column per simulator "
                        "parameter")
    results = _keyed(results)
    results = results[results["result"].isin(["Correct", "Wrong"])]
    if results.empty:
        raise HUDDError("testResult.csv has no test image marked Correct or Wrong; rerun the test step (-step test)")
    tested = results.index[results.index.isin(table.index)]
    if tested.empty:
        raise HUDDError(f"none of the {len(results)} test images (e.g. {results.index[0]}) "
                        f"has a row in params.csv (e.g. {table.index[0] if len(table) else '-'}); its column 'image' "
                        f"must be the path relative to DataSets/, as in testResult.csv")
    members = clusters["image"].astype(str)
    if members.empty:
        raise HUDDError("the clusters table has no images; rerun the clustering step (-step clusters)")
    if not members.isin(tested).any():
        raise HUDDError(f"none of the {len(members)} clustered error images (e.g. {members.iloc[0]}) "
                        f"is a test image with a row in params.csv; "
                        f"write params.csv rows keyed by the path relative to DataSets/ (e.g. TestSet/<class>/<file>) "
                        f"and rerun the clustering step if the clusters are of another test set")
    return table.loc[tested], results.loc[tested, "result"] == "Wrong"


# ----------------------------------------------------------------------------------------------
# rules

def rule_matches(params, conditions):
    """Which rows of `params` (one column per parameter) a rule's conditions match; empty cells match none."""
    conditions = json.loads(conditions) if isinstance(conditions, str) else conditions
    mask = pd.Series(True, index=params.index)
    for condition in conditions:
        column = params[condition["parameter"]]
        if "values" in condition:
            mask &= column.map(_category).isin(condition["values"])
            continue
        values = pd.to_numeric(column, errors="coerce")
        if condition.get("low") is not None:
            mask &= values > condition["low"]
        if condition.get("high") is not None:
            mask &= values <= condition["high"]
    return mask


def _number(value):
    text = f"{value:g}"
    return text if float(text) == value else repr(float(value))


def _condition_text(condition):
    name = condition["parameter"]
    if "values" in condition:
        values = condition["values"]
        return f"{name} = {values[0]}" if len(values) == 1 else f"{name} in {{{', '.join(values)}}}"
    low, high = condition.get("low"), condition.get("high")
    if low is None:
        return f"{name} <= {_number(high)}"
    if high is None:
        return f"{name} > {_number(low)}"
    return f"{_number(low)} < {name} <= {_number(high)}"


def rule_text(conditions):
    """A rule's conditions as the engineer reads them: `head_yaw > 28.1 and weather in {fog, rain}`."""
    return " and ".join(_condition_text(c) for c in conditions)


def _decimals(threshold, digits):
    """The numbers with `digits` significant digits on either side of the threshold, the nearest first."""
    if threshold == 0 or not np.isfinite(threshold):
        return [float(threshold)]
    scale = 10.0 ** (math.floor(math.log10(abs(threshold))) - digits + 1)
    sides = {float(f"{math.floor(threshold / scale) * scale:.{digits}g}"),
             float(f"{math.ceil(threshold / scale) * scale:.{digits}g}")}
    return sorted(sides, key=lambda v: abs(v - threshold))


def _rounded(threshold, values):
    """The threshold with the fewest significant digits (MIN_DIGITS or more) that splits `values` as it does,
    so `> 1995` for a threshold of 1995.5 on whole numbers and `> 0.5` for a 0/1 parameter."""
    side = values <= threshold
    for digits in range(MIN_DIGITS, MAX_DIGITS + 1):
        for candidate in _decimals(threshold, digits):
            if np.array_equal(side, values <= candidate):
                return candidate
    return float(threshold)


def _category_ranks(values, positive):
    """Categories ordered by the cluster's share of their training images: a threshold on this rank is a set
    of categories, and for two classes the best set split is among these (Breiman et al., 1984)."""
    share = positive.groupby(values).mean()
    return {v: rank for rank, v in enumerate(sorted(share.index, key=lambda v: (share[v], v)))}


def _node_paths(tree):
    """(node, [(feature, is_upper_bound, threshold), ...]) for every node below the root, root first."""
    paths, stack = [], [(0, [])]
    while stack:
        node, path = stack.pop()
        if node:
            paths.append((node, path))
        left, right = tree.children_left[node], tree.children_right[node]
        if left != right:
            feature, threshold = int(tree.feature[node]), float(tree.threshold[node])
            stack.append((right, path + [(feature, False, threshold)]))
            stack.append((left, path + [(feature, True, threshold)]))
    return sorted(paths)


def _conditions(path, features, ranks, training):
    """One merged, rounded condition per parameter on a tree path (intervals low < x <= high; category sets)."""
    bounds = {}
    for feature, upper, threshold in path:
        low, high = bounds.get(feature, (None, None))
        if upper:
            high = threshold if high is None else min(high, threshold)
        else:
            low = threshold if low is None else max(low, threshold)
        bounds[feature] = (low, high)
    conditions = []
    for feature, (low, high) in bounds.items():
        name = features[feature]
        if name in ranks:
            inside = [v for v, r in ranks[name].items()
                      if (low is None or r > low) and (high is None or r <= high)]
            if len(inside) < len(ranks[name]):
                conditions.append({"parameter": name, "values": sorted(inside)})
            continue
        values = training[:, feature][~np.isnan(training[:, feature])]
        conditions.append({"parameter": name, "low": None if low is None else _rounded(low, values),
                           "high": None if high is None else _rounded(high, values)})
    return conditions


def _figures(matched, member, wrong):
    matching = int(matched.sum())
    return {"precision": float((matched & (member | wrong)).sum() / matching) if matching else float("nan"),
            "recall": float((matched & member).sum() / member.sum()),
            "coverage": float(matching / len(matched)), "matching": matching}


def _f1(matched, member):
    hits = int((matched & member).sum())
    return 2.0 * hits / (int(matched.sum()) + int(member.sum())) if hits else 0.0


def _spreads(numeric):
    """{parameter: (min, max, spread)} over the test images: spread = interquartile range, or the range when
    the IQR is 0 (a parameter that is mostly one value)."""
    spreads = {}
    for name, values in numeric.items():
        known = values.dropna().to_numpy(float)
        if not len(known):
            continue
        q1, q3 = np.percentile(known, [25, 75])
        low, high = float(known.min()), float(known.max())
        spreads[name] = (low, high, float(q3 - q1) or high - low)
    return spreads


def _rejection(conditions, matched, member, held_out, spreads, floors):
    """Why a candidate rule is no description of its cluster (the first floor it fails), or None. Recall and
    lift must also hold on the `held_out` test images, which the tree did not learn from: a chance rule on
    noise fits the images it was grown on, not the others."""
    support = max(floors["min_support"], floors["min_support_share"] * int(member.sum()))
    matching = int(matched.sum())
    if matching < support:
        return f"matches {matching} test images, under the floor {math.ceil(support)}"
    for condition in conditions:
        if "values" in condition or condition["parameter"] not in spreads:
            continue
        low, high, spread = spreads[condition["parameter"]]
        top = high if condition.get("high") is None else min(high, condition["high"])
        bottom = low if condition.get("low") is None else max(low, condition["low"])
        if spread > 0 and top - bottom < floors["min_width_share"] * spread:
            return (f"{condition['parameter']} spans {max(top - bottom, 0.0):.3g}, under "
                    f"{100 * floors['min_width_share']:g}% of its spread {spread:.3g}")
    for what, rows in (("", slice(None)), (" on the held-out test images", held_out)):
        hit, inside = matched[rows], member[rows]
        recall = float((hit & inside).sum() / inside.sum()) if inside.any() else 0.0
        if recall < floors["min_recall"]:
            return f"recall{what} {recall:.2f}, under {floors['min_recall']:.2f}"
        others = int((~inside).sum())
        elsewhere = float((hit & ~inside).sum() / others) if others else 0.0
        if recall < floors["min_lift"] * elsewhere:
            return (f"matches {100 * elsewhere:.0f}% of the other test images{what} for a recall of {recall:.2f} "
                    f"(under {floors['min_lift']:g} times that): it does not single the cluster out")
    return None


def _held_out(member, seed):
    """HELD_OUT_SHARE of the cluster's members and of the other test images, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(member), dtype=bool)
    for group in (member.to_numpy(), ~member.to_numpy()):
        rows = np.flatnonzero(group)
        held[rng.permutation(rows)[:int(round(HELD_OUT_SHARE * len(rows)))]] = True
    return pd.Series(held, index=member.index)


def _cluster_rule(table, numeric, categorical, member, correct, max_conditions, seed, spreads, floors):
    """(passed, conditions, matched, reason) of the best candidate for one cluster (see the module docstring):
    the best that passes the floors, else the best rejected one with why; None when the tree finds no split."""
    from sklearn.tree import DecisionTreeClassifier

    held_out = _held_out(member, seed)
    learn = (member | correct) & ~held_out
    positive = member[learn]
    ranks = {name: _category_ranks(values[learn], positive) for name, values in categorical.items()}
    features = list(numeric) + list(categorical)
    columns = [numeric[name].to_numpy(float) for name in numeric]
    columns += [categorical[name].map(ranks[name]).astype(float).to_numpy() for name in categorical]
    training = np.column_stack(columns)[learn.to_numpy()]
    leaf = max(1, math.ceil(max(floors["min_support"], floors["min_support_share"] * int(positive.sum()))))
    tree = DecisionTreeClassifier(max_depth=max_conditions, class_weight="balanced", random_state=seed,
                                  min_samples_leaf=min(leaf, max(1, len(training) // 2)))
    tree.fit(training, positive.to_numpy())
    best = {}
    for _, path in _node_paths(tree.tree_):
        conditions = _conditions(path, features, ranks, training)
        if not conditions:
            continue
        matched = rule_matches(table, conditions)
        reason = _rejection(conditions, matched, member, held_out, spreads, floors)
        key = (_f1(matched, member), -len(conditions))
        passed = reason is None
        if passed not in best or key > best[passed][0]:
            best[passed] = (key, conditions, matched, reason)
    if not best:
        return None
    passed = True in best
    return (passed,) + best[passed][1:]


def cluster_rules(params, clusters, results, max_conditions=MAX_CONDITIONS, seed=0, min_support=MIN_SUPPORT,
                  min_support_share=MIN_SUPPORT_SHARE, min_width_share=MIN_WIDTH_SHARE, min_recall=MIN_RECALL,
                  min_lift=MIN_LIFT):
    """One rule per root-cause cluster over the simulator parameters, with the figures of the printed rule.

    `params`: image + one column per parameter (numbers; text or booleans are categories); `clusters`:
    image, cluster (test error images); `results`: testResult.csv. Only test images with a params row
    take part. precision = share of the matching test images that are members or errors of the DNN,
    recall = share of the members matched, coverage = share of the test images matched.

    A rule is kept (found = True) only when it matches at least max(min_support, min_support_share x the
    cluster's members) test images, none of its intervals is narrower than min_width_share of its
    parameter's interquartile range over the test images (the range when the IQR is 0), its recall is at
    least min_recall and at least min_lift times the share of the other test images it matches. Otherwise
    found = False, rule, conditions and figures are empty, and rejected / rejected_recall / rejected_reason
    give the best candidate that failed. A cluster of one image, or one whose members have no params row or that no split
    separates, has found = False and nothing rejected (describe_clusters describes it).
    """
    if int(max_conditions) < 1:
        raise HUDDError(f"max_conditions must be at least 1 (got {max_conditions})")
    floors = {"min_support": float(min_support), "min_support_share": float(min_support_share),
              "min_width_share": float(min_width_share), "min_recall": float(min_recall),
              "min_lift": float(min_lift)}
    negative = [name for name, value in floors.items() if not value >= 0]
    if negative:
        raise HUDDError(f"{negative[0]} must be a number of 0 or more (got {floors[negative[0]]})")
    table, wrong = _test_images_with_params(params, clusters, results)
    numeric, categorical = _split_parameters(table)
    if not numeric and not categorical:
        raise HUDDError("params.csv has no usable parameter column (numbers, or text with at most "
                        f"{MAX_CATEGORIES} values); add one column per simulator parameter")
    spreads = _spreads(numeric)
    correct = ~wrong
    clusters = clusters.assign(image=clusters["image"].astype(str))
    rows = []
    for cluster, group in clusters.groupby("cluster", sort=True):
        member = pd.Series(table.index.isin(group["image"]), index=table.index)
        found = (_cluster_rule(table, numeric, categorical, member, correct, int(max_conditions), seed, spreads,
                               floors)
                 if len(group) > 1 and member.any() else None)
        row = {"cluster": cluster, "size": len(group), "found": False, "rule": "", "conditions": "[]",
               "precision": np.nan, "recall": np.nan, "coverage": np.nan, "matching": pd.NA, "rejected": "",
               "rejected_recall": np.nan, "rejected_reason": ""}
        if found and found[0]:
            _, conditions, matched, _ = found
            row.update(found=True, rule=rule_text(conditions), conditions=json.dumps(conditions),
                       **_figures(matched, member, wrong))
        elif found:
            _, conditions, matched, reason = found
            row.update(rejected=rule_text(conditions), rejected_recall=_figures(matched, member, wrong)["recall"],
                       rejected_reason=reason)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=RULE_COLUMNS)
    frame["matching"] = frame["matching"].astype("Int64")
    return frame


# ----------------------------------------------------------------------------------------------
# descriptions (no parameters needed)

def _shares(labels):
    """'x 62%, y 25%, other 13%': the most frequent first, at most MAX_CONFUSION_PAIRS named."""
    counts = labels.value_counts()
    counts = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    total = int(counts.sum())
    parts = [f"{label} {100.0 * n / total:.0f}%" for label, n in counts.iloc[:MAX_CONFUSION_PAIRS].items()]
    rest = int(counts.iloc[MAX_CONFUSION_PAIRS:].sum())
    return ", ".join(parts + ([f"other {100.0 * rest / total:.0f}%"] if rest else []))


def _given(mapping, cluster):
    for key in (cluster, str(cluster)):
        if key in (mapping or {}):
            return mapping[key]
    return None


def describe_clusters(clusters, results, medoids=None, neighbours=None):
    """What the tool knows of each cluster without parameters: its confusion (expected -> predicted; for a
    keypoint DNN the worst keypoint), its medoid and the training images nearest to it.

    `medoids` {cluster: image} and `neighbours` {cluster: [image, ...]} come from the caller (they need the
    heatmap distances); a cluster without them gets empty cells.
    """
    _require(clusters, ["image", "cluster"], "the clusters table", "rerun the clustering step (-step clusters)")
    _require(results, ["image"], "testResult.csv", "rerun the test step (-step test)")
    results = _keyed(results)
    if {"expected", "predicted"} <= set(results.columns):
        confusion = results["expected"].astype(str) + " -> " + results["predicted"].astype(str)
    elif "worst_KP" in results.columns:
        confusion = "worst keypoint " + results["worst_KP"].astype(str)
    else:
        confusion = pd.Series(dtype=str)
    rows = []
    for cluster, group in clusters.assign(image=clusters["image"].astype(str)).groupby("cluster", sort=True):
        medoid = _given(medoids, cluster)
        if medoid is not None and str(medoid) not in set(group["image"]):
            raise HUDDError(f"medoid {medoid} of cluster {cluster} is not one of its images; pass the image key "
                            f"(path relative to DataSets/) of a member")
        known = confusion.reindex(group["image"]).dropna()
        rows.append({"cluster": cluster, "size": len(group), "confusion": _shares(known) if len(known) else "",
                     "medoid": "" if medoid is None else str(medoid),
                     "nearest_training": ";".join(str(i) for i in _given(neighbours, cluster) or [])})
    return pd.DataFrame(rows, columns=DESCRIPTION_COLUMNS)


# ----------------------------------------------------------------------------------------------
# files and console

def rules_path(t_dir, layer):
    return Path(t_dir) / CLUSTER_ANALYSIS / layer / "rules.csv"


def descriptions_path(t_dir, layer):
    return Path(t_dir) / CLUSTER_ANALYSIS / layer / "descriptions.csv"


def write_rules(t_dir, layer, rules, descriptions):
    """T/ClusterAnalysis/<layer>/rules.csv and descriptions.csv, each written atomically; either may be None
    (no params.csv: descriptions only). Returns the paths written."""
    written = []
    for frame, path in ((rules, rules_path(t_dir, layer)), (descriptions, descriptions_path(t_dir, layer))):
        if frame is not None:
            write_csv(path, frame)
            written.append(path)
    return written


def read_rules(t_dir, layer):
    """rules.csv; one written before the floors existed reads as found wherever it has a rule."""
    rules = read_table(rules_path(t_dir, layer), required=REQUIRED_RULE_COLUMNS, text=TEXT_COLUMNS,
                       missing_hint="rerun the explanation of the clusters")
    if "found" not in rules.columns:
        rules.insert(2, "found", rules["rule"].astype(str) != "")
    for column in ("rejected", "rejected_reason"):
        if column not in rules.columns:
            rules[column] = ""
    if "rejected_recall" not in rules.columns:
        rules["rejected_recall"] = np.nan
    return rules[RULE_COLUMNS + [c for c in rules.columns if c not in RULE_COLUMNS]]


def read_descriptions(t_dir, layer):
    return read_table(descriptions_path(t_dir, layer), required=DESCRIPTION_COLUMNS, text=TEXT_COLUMNS,
                      missing_hint="rerun the explanation of the clusters")


def rule_line(row):
    """A rules.csv row in words: its rule with how well it fits the test set, or `no simple rule (best: ...)`."""
    rejected = getattr(row, "rejected", "")
    if isinstance(row.rule, str) and row.rule:
        return (f"{row.rule} (precision {row.precision:.2f}, recall {row.recall:.2f}, "
                f"{100.0 * row.coverage:.1f}% of the test set)")
    if isinstance(rejected, str) and rejected:
        return f"no simple rule (best: {rejected}, recall {row.rejected_recall:.2f}; {row.rejected_reason})"
    if row.size == 1:
        return "no rule for a single image; see its description"
    return "no rule; the parameters do not separate it from the images the DNN gets right"


def format_rules(rules):
    """One console line per cluster: its rule and how well the printed rule fits the test set."""
    return "\n".join(f"cluster {row.cluster} ({row.size} image{'' if row.size == 1 else 's'}): {rule_line(row)}"
                     for row in rules.itertuples(index=False))


NEAREST_TRAINING = 3        # training images shown beside each cluster's medoid


def nearest_training(medoids, batches, k=NEAREST_TRAINING):
    """{cluster: the k training images whose heatmaps are closest (Euclidean) to the cluster's medoid's}.

    `medoids`: {cluster: the medoid's flattened heatmap}; `batches` yields (image keys, (B, D) heatmaps)
    of the training images at the same layer (assignModule.improvement_heatmaps does). Only the k best
    per cluster are kept while streaming, so memory does not grow with the training set.
    """
    import torch

    if not medoids:
        return {}
    clusters = list(medoids)
    centre = torch.as_tensor(np.stack([np.asarray(medoids[c], dtype=np.float32).ravel() for c in clusters]))
    best_d = torch.full((len(clusters), 0), float("inf"))
    best_keys = np.empty((len(clusters), 0), dtype=object)
    for keys, heatmaps in batches:
        d = torch.cdist(centre, torch.as_tensor(np.asarray(heatmaps, dtype=np.float32)))
        d = torch.cat([best_d, d], dim=1)
        names = np.concatenate([best_keys, np.tile(np.asarray(keys, dtype=object), (len(clusters), 1))], axis=1)
        order = torch.argsort(d, dim=1, stable=True)[:, :k]
        best_d = torch.gather(d, 1, order)
        best_keys = np.take_along_axis(names, order.numpy(), axis=1)
    return {c: [str(key) for key in best_keys[i]] for i, c in enumerate(clusters)}
