"""RQ1 and the clusters in words (-rq True): not cached steps, they take seconds and write into the
clusters' folder files the step cache leaves out."""
from common.errors import HUDDError
from pipeline.case import heatmap_layers, selected_clusters


def rq1(case):
    """RQ1 (-rq True) on the selected layer's clusters: CASE/RQ1.xlsx and RQ1.csv; the summary, or None
    without DataSets/params.csv. Not a cached step: it takes a moment, and clusters need not rerun for it."""
    import clusterModule

    layer, images, labels = selected_clusters(case)
    summary = clusterModule.write_rq1(case.dir, images, labels, layer=layer)
    if summary:
        print(clusterModule.format_rq1(summary))      # the report follows with the clusters in words (explain)
    return summary


def explain(case):
    """The clusters in words (-rq True; not a cached step, seconds): with DataSets/params.csv a rule per
    cluster over the parameters (rules.csv), and always a description (descriptions.csv: confusion, medoid).
    Returns one entry per cluster: {"cluster", "size", "text"} (its console line)."""
    import explainModule
    import report
    import pandas as pd

    from clusterModule import CLUSTER_ANALYSIS, read_params
    from common.tables import try_read_table
    from testModule import read_results

    layer, images, labels = selected_clusters(case)
    clusters = pd.DataFrame({"image": images, "cluster": labels})
    results = read_results(case.dir / "testResult.csv")
    info = try_read_table(case.t / CLUSTER_ANALYSIS / layer / "cluster_info.csv")
    medoids = dict(zip(info["cluster"], info["medoid"].astype(str))) if info is not None and \
        {"cluster", "medoid"} <= set(info.columns) else None
    neighbours = _nearest_training(case, layer, medoids) if medoids else None
    descriptions = explainModule.describe_clusters(clusters, results, medoids, neighbours)
    params_path = case.datasets / "params.csv"
    rules = None
    if params_path.is_file():
        try:
            rules = explainModule.cluster_rules(read_params(params_path), clusters, results)
        except HUDDError as exc:        # RQ1 has said what is wrong with params.csv; descriptions still help
            print(f"[explain] no rules over {params_path.name}: {exc}")
    explainModule.write_rules(case.t, layer, rules, descriptions)
    report.write_report(case.dir)
    table = rules if rules is not None else descriptions
    lines = explainModule.format_rules(rules).splitlines() if rules is not None else \
        [f"cluster {r.cluster} ({r.size} images): {r.confusion}" for r in descriptions.itertuples()]
    for line in lines:
        print(f"[explain] {line}")
    return [{"cluster": int(c), "size": int(n), "text": line}
            for c, n, line in zip(table["cluster"], table["size"], lines)]


def _nearest_training(case, layer, medoids):
    """{cluster: the training images nearest to its medoid by the selected layer's heatmaps} (one streamed pass)."""
    import numpy as np

    import assignModule
    import explainModule
    from common.data import ImageSet, ImageSpec

    heatmaps = np.load(case.t / "Heatmaps" / f"{layer}.npy", mmap_mode="r")
    row_of = {image: i for i, image in enumerate(heatmap_layers(case)[1])}
    centres = {c: np.asarray(heatmaps[row_of[m]], dtype=np.float32).ravel() for c, m in medoids.items()
               if m in row_of}
    model, meta = case.model
    train = case.splits["TrainingSet"]
    start = None
    if case.keypoints:
        from testModule import least_peaked_start as start
    batches = assignModule.improvement_heatmaps(model, ImageSet(case.datasets, train.images, ImageSpec.from_meta(meta)),
                                                layer, case.options.batch_size, case.device, rule=case.options.rule,
                                                workers=case.options.workers, progress=case.options.progress,
                                                start=start)
    return explainModule.nearest_training(centres, batches)
