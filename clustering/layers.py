"""Which layer's clusters the engineer inspects: the one whose clusters are tightest on raw distances."""
import re

import numpy as np

from common.errors import HUDDError

INPUT_LAYER = "Layer0"              # excluded from the best-layer choice


def layer_number(layer):
    match = re.fullmatch(r"Layer(\d+)", str(layer))
    return int(match.group(1)) if match else None


def layer_sort_key(layer):
    number = layer_number(layer)
    return (number is None, number if number is not None else 0, str(layer))


def select_best_layer(results):
    """The layer with the lowest WICD on raw distances; the input layer (Layer0) never wins.

    `results`: {layer: cluster_layer result or any mapping with a 'wicd' entry}. Ties go to the
    lower layer index.
    """
    candidates = [(float(r["wicd"]), layer_sort_key(layer), layer) for layer, r in results.items()
                  if layer != INPUT_LAYER and np.isfinite(float(r["wicd"]))]
    if not candidates:
        raise HUDDError(f"no layer to choose from: only {sorted(results) or 'no layers'} clustered; "
                        f"compute heatmaps of internal layers (-step heatmaps) and rerun -step clusters")
    return min(candidates)[2]
