"""An improvement set generated from the clusters' rules (SEDE's step, for the built-in eye simulator).

    python -m casestudies gaze --from-rules CASE -o NEW [--per-cluster N] [--seed S]

For every root-cause cluster of CASE with a rule (T/ClusterAnalysis/<selected layer>/rules.csv, written
by `-rq True`), scenes are drawn from the simulator's Step-3 distribution (the improvement set's,
casestudies/eyes.py) and kept when they satisfy the rule, until N per cluster: the parameters the
rule constrains land inside its intervals, the rest follow the usual distribution, and derived
parameters (gaze direction and magnitude) stay consistent with the angles they come from. Each
scene is rendered and labelled by the simulator. NEW gets the layout of a DataSets folder:

    NEW/ImprovementSet/<class>/rule<cluster>_<nnnnnn>.png
    NEW/params.csv                 image, every simulator parameter (for RQ1)
    NEW/rules_used.csv             image, cluster, rule

so that NEW/ImprovementSet replaces (or joins) CASE/DataSets/ImprovementSet and NEW/params.csv's rows
join CASE/DataSets/params.csv.
"""
import functools
from pathlib import Path

import numpy as np
import pandas as pd

from casestudies import eyecases, eyes
from casestudies.casefolder import read_marker, run_chunks
from common.errors import HUDDError
from common.files import write_csv

TASKS = ("gaze", "openclosed")
DRAW_BATCH = 200_000        # scenes drawn at a time (parameters only: cheap)
MAX_DRAWS = 5_000_000       # per cluster; a rule that rare gets fewer images, with a note
SPLIT_ID = 9                # random streams apart from the case study's own splits (1-3)


def scenes_in_rule(conditions, n, task, seed, max_draws=MAX_DRAWS):
    """Up to `n` scenes of the Step-3 distribution that satisfy a rule's conditions; (frame, draws made)."""
    from explainModule import rule_matches

    rng = np.random.default_rng(seed)
    kept, draws = [], 0
    while sum(len(k) for k in kept) < n and draws < max_draws:
        batch = eyes.sample_parameters(rng, DRAW_BATCH, task, "ImprovementSet")
        draws += DRAW_BATCH
        kept.append(batch[rule_matches(batch, conditions).to_numpy()])
    frame = pd.concat(kept, ignore_index=True).head(n) if kept else pd.DataFrame(columns=list(eyes.PARAMETERS))
    return frame, draws


def check_simulated(rules, source):
    """Refuse rules over anything but the simulator's own parameters: measured image properties (T/properties.csv,
    prop_* beside params.csv) or condition columns describe images, they cannot be fed to the renderer."""
    import json

    for row in rules.itertuples():
        conditions = json.loads(row.conditions) if isinstance(row.conditions, str) else row.conditions
        foreign = sorted({c["parameter"] for c in conditions} - set(eyes.PARAMETERS))
        if foreign:
            raise HUDDError(f"{source}: cluster {row.cluster}'s rule is on {', '.join(foreign)}, not a simulator "
                            f"parameter (a measured image property or a condition column) the renderer can be set "
                            f"to; use python HUDD.py -o CASE -step "
                            f"robustness --perturb-improvement N for an improvement set of such data")


def generate(case_dir, out_dir, per_cluster=100, seed=0, progress=True, task=None):
    """Write the improvement set of the rules of `case_dir` into `out_dir`; returns rules_used as a frame."""
    import clusterModule
    import explainModule

    case_dir, out_dir = Path(case_dir), Path(out_dir)
    marker = read_marker(case_dir / "DataSets") or {}
    task = task or marker.get("case_study")
    if task not in TASKS:
        raise HUDDError(f"{case_dir}: --from-rules renders eye images for the gaze and openclosed case studies "
                        f"(this case folder is {task or 'not a built-in case study'}); build one with "
                        f"python -m casestudies gaze -o CASE")
    if per_cluster < 1:
        raise HUDDError(f"--per-cluster {per_cluster}: use a positive number of images per cluster")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise HUDDError(f"{out_dir}: exists and is not empty; choose another -o folder")
    t_dir = case_dir / "T"
    layer = clusterModule.best_layer_from_summary(t_dir)
    rules = explainModule.read_rules(t_dir, layer)
    rules = rules[rules["rule"].astype(str) != ""]
    if rules.empty:
        raise HUDDError(f"{explainModule.rules_path(t_dir, layer)}: no cluster has a rule; run "
                        f"python HUDD.py -o {case_dir} -rq True with DataSets/params.csv first")
    check_simulated(rules, explainModule.rules_path(t_dir, layer))
    tables, used = [], []
    for row in rules.itertuples():
        scenes, draws = scenes_in_rule(row.conditions, per_cluster, task, [seed, SPLIT_ID, int(row.cluster)])
        if len(scenes) < per_cluster:
            print(f"[from-rules] cluster {row.cluster}: {len(scenes)} of {per_cluster} scenes in {draws:,} draws "
                  f"satisfy {row.rule}")
        labels = eyecases.labels_for(task, scenes)
        images = [f"ImprovementSet/{label}/rule{row.cluster}_{i:06d}.png" for i, label in enumerate(labels)]
        tables.append(pd.concat([pd.DataFrame({"image": images}), scenes.reset_index(drop=True)], axis=1))
        used.append(pd.DataFrame({"image": images, "cluster": int(row.cluster), "rule": row.rule}))
    params = pd.concat(tables, ignore_index=True)
    for label in (eyes.GAZE_SECTORS if task == "gaze" else eyes.EYE_STATES):
        (out_dir / "ImprovementSet" / label).mkdir(parents=True, exist_ok=True)
    jobs = list(zip(range(len(params)), params["image"], params.drop(columns="image").to_dict("records")))
    chunks = [jobs[i:i + eyecases.CHUNK] for i in range(0, len(jobs), eyecases.CHUNK)]
    work = functools.partial(eyecases._render_chunk, str(out_dir), (seed, SPLIT_ID, eyecases.TASK_IDS[task]))
    run_chunks(work, chunks, progress, f"{task} from rules", len(jobs))
    write_csv(out_dir / "params.csv", params)
    frame = pd.concat(used, ignore_index=True)
    write_csv(out_dir / "rules_used.csv", frame)
    return frame
