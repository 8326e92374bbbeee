"""The measured properties, RQ1 and the clusters in words (-step properties, -rq True): not cached steps
of the manifest. They take seconds (the properties keep their own fingerprint in T/properties.json) and
write files the step cache leaves out, so no step's cache key depends on them."""
from common.errors import HUDDError
from pipeline.case import heatmap_layers, selected_clusters


def properties(case, force=False):
    """T/properties.csv for every image of every split, measured as the DNN sees them (its input size),
    reused while its fingerprint matches unless `force`; prints its notes. Returns the step's summary."""
    from common.data import ImageSpec
    from explain.properties import properties_path, write_properties

    _, meta = case.model
    opts = case.options
    frame, notes = write_properties(case.dir, spec=ImageSpec.from_meta(meta), splits=case.splits,
                                    batch_size=opts.batch_size, workers=opts.workers, progress=opts.progress,
                                    force=force)
    for note in notes:
        print(f"[properties] {note}")
    names = [str(c) for c in frame.columns[1:]]
    print(f"[properties] {len(names)} properties of {len(frame)} images in "
          f"{properties_path(case.t).relative_to(case.dir)}")
    return {"images": int(len(frame)), "properties": names}


def parameters(case):
    """(table, source) that RQ1 and the rules read (explain.properties.parameter_table): the properties are
    measured first when DataSets/params.csv is absent, and refreshed when an earlier T/properties.csv
    may be stale (a case with both reads params.csv's columns and the properties as prop_*)."""
    from explain.properties import parameter_table, properties_path

    if not (case.datasets / "params.csv").is_file() or properties_path(case.t).is_file():
        properties(case)
    return parameter_table(case.dir)


def rq1(case, table=None, source=None):
    """RQ1 (-rq True) on the selected layer's clusters over `table` (parameters(case)'s; DataSets/params.csv
    when None): CASE/RQ1.xlsx and RQ1.csv; the summary, or None without parameters. Not a cached step: it
    takes a moment, and clusters need not rerun for it."""
    import clusterModule

    layer, images, labels = selected_clusters(case)
    summary = clusterModule.write_rq1(case.dir, images, labels, layer=layer, params=table, source=source)
    if summary:
        print(clusterModule.format_rq1(summary))      # the report follows with the clusters in words (explain)
    return summary


def explain(case, table=None, source=None):
    """The clusters in words (-rq True; not a cached step, seconds): with parameters (`table`, from
    parameters(case); DataSets/params.csv when None) a rule per cluster (rules.csv), and always a
    description (descriptions.csv: confusion, medoid). Returns one entry per cluster:
    {"cluster", "size", "text"} (its console line)."""
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
    if table is None and params_path.is_file():
        table, source = read_params(params_path), "params"
    rules = None
    if table is not None:
        try:
            rules = explainModule.cluster_rules(table, clusters, results)
        except HUDDError as exc:        # RQ1 has said what is wrong with the table; descriptions still help
            print(f"[explain] no rules over {SOURCE_FILES.get(source, source)}: {exc}")
    explainModule.write_rules(case.t, layer, rules, descriptions)
    report.write_report(case.dir)
    table = rules if rules is not None else descriptions
    lines = explainModule.format_rules(rules).splitlines() if rules is not None else \
        [f"cluster {r.cluster} ({r.size} images): {r.confusion}" for r in descriptions.itertuples()]
    for line in lines:
        print(f"[explain] {line}")
    return [{"cluster": int(c), "size": int(n), "text": line}
            for c, n, line in zip(table["cluster"], table["size"], lines)]


SOURCE_FILES = {"params": "params.csv", "properties": "the measured properties (T/properties.csv)",
                "params+properties": "params.csv and the measured properties"}


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
