"""The params.csv rows of perturbed images: their perturbation and amplitude as numeric columns for
RQ1, merged into the case's params.csv so that each image inherits its source image's parameters."""
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import write_csv


def params_rows(sources, perturbations, clean_images=()):
    """params.csv rows: perturbation (its name, 'none' for a clean image), amplitude, and one numeric
    column per perturbation (its amplitude, 0 when another or none is applied), for RQ1's variance ratios."""
    frame = pd.DataFrame({"image": list(sources["image"]) + list(clean_images),
                          "source": list(sources["source"]) + list(clean_images),
                          "perturbation": list(sources["perturbation"]) + ["none"] * len(clean_images),
                          "amplitude": list(sources["amplitude"]) + [0.0] * len(clean_images)})
    for name in perturbations:
        frame[f"perturb_{name}"] = np.where(frame["perturbation"] == name, frame["amplitude"], 0.0)
    return frame


def merge_params(params_path, rows, replace_prefixes, moved=None):
    """Write `rows` (with a column 'source') into DataSets/params.csv and return the table written.

    Rows of images under `replace_prefixes` (e.g. 'ImprovementSet/': the set just replaced) go, or, when
    `moved` maps such a prefix to another ('ImprovementSet/' -> 'ImprovementSet.before-perturb/'), follow
    their images there; every other row and column stays. A perturbed image inherits the parameters of
    its source image (a simulator's, when the case has them), so the conditions it was rendered in stay known.
    """
    from clusterModule import read_params

    params_path = Path(params_path)
    new = rows.drop(columns=["source"]).set_index("image")
    if not params_path.is_file():
        merged = new
    else:
        old = read_params(params_path)
        old = old.assign(image=old["image"].astype(str)).drop_duplicates("image")
        for before, after in (moved or {}).items():
            old["image"] = old["image"].where(~old["image"].str.startswith(before),
                                              after + old["image"].str.slice(len(before)))
        old = old[~old["image"].str.startswith(tuple(replace_prefixes))].set_index("image")
        known = old.index.intersection(rows["source"].astype(str))
        source_of = rows.set_index("image")["source"].astype(str)
        for column in old.columns:
            if column not in new.columns:
                values = old[column].reindex(source_of.where(source_of.isin(known)).to_numpy())
                new[column] = values.to_numpy()
        rest = old.drop(index=old.index.intersection(new.index))
        merged = pd.concat([rest, new], sort=False)
        merged = merged[list(old.columns) + [c for c in merged.columns if c not in old.columns]]
    merged = merged.rename_axis("image").reset_index()
    write_csv(params_path, merged)
    return merged
