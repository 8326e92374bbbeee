"""A procedural eye-image simulator in the spirit of UnityEyes (the paper's GD and OC case studies).

`sample_parameters` draws the scene parameters of many images at once; `render_eye` turns one row
of parameters into an RGB image and the 2D landmarks of that image. The geometry is a small 3D
model (an eyeball sphere with eyelids on its surface, an iris disc, a brow, optional glasses) that
is rotated by the head pose and projected orthographically; colours come from Lambert shading
under one directional light plus ambient light; blur and sensor noise come last.

Directions are in image coordinates, as seen by the viewer: ``gaze_h`` > 0 moves the iris to the
image right, ``gaze_v`` > 0 moves it up. Labels depend on the eye-in-head gaze angles only, so head
pose, lighting, occlusion and low eyelids make some images genuinely hard to read.
"""
import math

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from casestudies.designs import DEFAULT_DESIGN

# Labels ------------------------------------------------------------------------------------------
GAZE_SECTORS = ("MiddleRight", "TopRight", "TopCenter", "TopLeft",
                "MiddleLeft", "BottomLeft", "BottomCenter", "BottomRight")  # counter-clockwise from 0 deg
SECTOR_DEG = 360.0 / len(GAZE_SECTORS)
EYE_STATES = ("Closed", "Open")
CLOSED_BELOW = 0.3          # eyelid opening under which an eye is labelled Closed

# Parameter distributions (angles in degrees, sizes in units of the eye's half width) ----------------
MAX_GAZE_DEG = 40.0         # gaze angles are uniform over a disc of this radius: near-centre gazes are rare
HEAD_YAW_SD, HEAD_PITCH_SD, HEAD_ROLL_SD = 5.0, 4.0, 3.0
EXTREME_YAW_DEG, EXTREME_PITCH_DEG = (25.0, 45.0), (18.0, 32.0)
LOW_LIGHT, NORMAL_LIGHT = (0.1, 0.3), (0.6, 1.3)
HALF_CLOSED = (0.15, 0.42)

# Named conditions and their share per split, built as the paper's case studies were: the test set is
# the operational distribution; the training set under-represents every condition (4 times rarer), as
# a data set collected in ordinary conditions does; the improvement set is what an engineer asks the
# simulator for in HUDD's Step 3 (every condition 3 times as often as in the test set).
CONDITIONS = ("extreme_head_pose", "low_light", "half_closed_eyes", "heavy_blur", "heavy_noise", "glasses")
CONDITION_SHARES = {          # TrainingSet, TestSet, ImprovementSet
    "extreme_head_pose": (0.0175, 0.07, 0.21),     # |yaw| 25-45 deg or |pitch| 18-32 deg
    "low_light": (0.015, 0.06, 0.18),              # light intensity 0.1-0.3 (else 0.6-1.3), ambient 0.02-0.08
    "half_closed_eyes": (0.0175, 0.07, 0.21),      # gaze: eyelid opening 0.15-0.42 (else 0.45-1)
    "heavy_blur": (0.0125, 0.05, 0.15),            # blur sigma 1-1.8 px (else 0-0.6)
    "heavy_noise": (0.0125, 0.05, 0.15),           # sensor noise 10-22 levels (else 1-5)
    "glasses": (0.03, 0.12, 0.30),                 # glasses with reflections
}
SPLIT_COLUMN = {"TrainingSet": 0, "TestSet": 1, "ImprovementSet": 2}
# Split designs: how rare the conditions are in TrainingSet (TestSet and ImprovementSet keep their shares).
# "rarer" is the one above; "incomplete" leaves each condition at INCOMPLETE_SHARE of the training set,
# so that the DNN cannot learn it there (what HUDD's retraining is for); "oracle" trains with every
# condition at its test share, which measures whether a DNN can learn the condition at all.
INCOMPLETE_SHARE = 0.005    # 70 of 14,000 training images per condition: at most 1% within sampling error
CONDITION_COLUMN = "condition_{}"   # params.csv: one 0/1 column per named condition (designs other than rarer)
OC_CLOSED, OC_BORDERLINE = 0.3, 0.35  # openclosed: share of closed eyes and of the ambiguous band
OC_BAND = (0.18, 0.42)      # openclosed: the ambiguous band of eyelid openings around CLOSED_BELOW
OC_EYE_SCALE = (0.5, 0.95)  # openclosed: the eye is seen from further away, so the lid gap is a few pixels

# Geometry ------------------------------------------------------------------------------------------
LID_RADIUS = 1.15           # the eyelids lie on a sphere through the corners (x = +-1, z = 0)
LID_DEPTH = math.sqrt(LID_RADIUS ** 2 - 1.0)
EYEBALL_RADIUS = 1.0        # the iris turns on this sphere (an eyeball is ~0.8-1 of the eye's half width)
EYEBALL_DEPTH = EYEBALL_RADIUS - (LID_RADIUS - LID_DEPTH)   # its front meets the lids' apex
EYE_HALF_WIDTH = 0.4        # of the image side, at eye_scale 1
EYE_CENTRE = (0.5, 0.6)     # of the image side (x right, y down)
REFERENCE_SIZE = 48         # pixel widths of lines are given at this image size
SUPERSAMPLE = 4             # masks are drawn this much finer, then box-filtered (anti-aliasing)
LID_POINTS = 33
CONTOUR_POINTS = 32
LOWER_LID = 0.3             # lower lid depth below the corners' line at x = 0
LID_APERTURE = 0.95         # upper lid height above the lower lid at x = 0, eyelid opening 1
LID_FOLLOWS_GAZE = 0.3      # the upper lid rises when looking up, drops when looking down
CREASE_GAP = 0.25
CORNEA_BULGE = 0.6          # the glint moves this much of the eyeball radius with the light

SKIN_DARK, SKIN_LIGHT = np.array([0.30, 0.18, 0.12]), np.array([0.98, 0.80, 0.68])
SCLERA = np.array([1.0, 0.95, 0.92])
IRIS_COLOURS = np.array([[0.30, 0.17, 0.08], [0.16, 0.09, 0.05], [0.42, 0.32, 0.15],
                         [0.24, 0.38, 0.22], [0.30, 0.45, 0.62], [0.45, 0.47, 0.50]])
LASH, BROW, FRAME = np.array([0.05, 0.04, 0.04]), np.array([0.16, 0.11, 0.08]), np.array([0.08, 0.08, 0.09])

LANDMARK_COMPONENTS = {
    "corner": ["left_corner", "right_corner"],        # image left and right
    "upper_lid": [f"upper_lid_{i}" for i in range(1, 6)],
    "lower_lid": [f"lower_lid_{i}" for i in range(1, 6)],
    "iris_centre": ["iris_centre"],
    "iris": [f"iris_{i}" for i in range(1, 9)],
    "brow": [f"brow_{i}" for i in range(1, 7)],
}
LANDMARK_NAMES = [name for names in LANDMARK_COMPONENTS.values() for name in names]   # 27 keypoints
LID_LANDMARK_T = (-2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3)

PARAMETERS = ("gaze_h", "gaze_v", "gaze_direction", "gaze_magnitude", "eyelid_opening",
              "head_yaw", "head_pitch", "head_roll", "eye_scale", "eye_shift_x", "eye_shift_y", "lid_skew",
              "iris_size", "pupil_size", "iris_colour", "iris_brightness", "skin_brightness", "sclera_brightness",
              "brow_height", "brow_thickness", "lash_thickness", "light_azimuth", "light_elevation",
              "light_intensity", "ambient", "blur", "noise", "glasses", "glasses_reflection", "reflection_angle",
              "reflection_offset")
DECIMALS = 4                # parameters are rounded so that params.csv reproduces the images exactly


def gaze_labels(gaze_h, gaze_v):
    """The 8-direction label of each gaze: the 45-degree sector its direction falls in."""
    angle = np.degrees(np.arctan2(np.asarray(gaze_v, float), np.asarray(gaze_h, float))) % 360.0
    sector = np.floor((angle + SECTOR_DEG / 2) / SECTOR_DEG).astype(int) % len(GAZE_SECTORS)
    return np.array(GAZE_SECTORS)[sector]


def eye_state_labels(eyelid_opening):
    return np.where(np.asarray(eyelid_opening, float) < CLOSED_BELOW, EYE_STATES[0], EYE_STATES[1])


def condition_shares(split="TestSet", design=DEFAULT_DESIGN):
    """{condition: share of images} of a split in a split design (the test set's for an unknown split name)."""
    column = SPLIT_COLUMN.get(split, SPLIT_COLUMN["TestSet"])
    shares = {name: shares[column] for name, shares in CONDITION_SHARES.items()}
    if column == SPLIT_COLUMN["TrainingSet"] and design != DEFAULT_DESIGN:
        test = condition_shares("TestSet")
        shares = {name: INCOMPLETE_SHARE if design == "incomplete" else test[name] for name in shares}
    return shares


def condition_masks(params, task="gaze"):
    """{condition: boolean array} of which scenes of a parameter table are in each named condition."""
    p = params
    masks = {"extreme_head_pose": (np.abs(p["head_yaw"]) >= EXTREME_YAW_DEG[0])
                                  | (np.abs(p["head_pitch"]) >= EXTREME_PITCH_DEG[0]),
             "low_light": p["light_intensity"] <= LOW_LIGHT[1],
             "half_closed_eyes": (p["eyelid_opening"] >= HALF_CLOSED[0]) & (p["eyelid_opening"] <= HALF_CLOSED[1]),
             "heavy_blur": p["blur"] >= 1.0, "heavy_noise": p["noise"] >= 10.0, "glasses": p["glasses"] == 1}
    if task != "gaze":
        del masks["half_closed_eyes"]       # openclosed: half-open lids are its label's borderline band
    return {name: np.asarray(mask, bool) for name, mask in masks.items()}


def condition_columns(params, task="gaze"):
    """The named conditions of each scene as 0/1 columns (CONDITION_COLUMN), in CONDITIONS order."""
    return pd.DataFrame({CONDITION_COLUMN.format(name): mask.astype(int)
                         for name, mask in condition_masks(params, task).items()}, index=params.index)


def sample_parameters(rng, n, task="gaze", split="TestSet", design=DEFAULT_DESIGN):
    """Draw `n` scenes of a split: a DataFrame with one column per entry of PARAMETERS (booleans as 0/1).

    The split and design set how often each named condition occurs (condition_shares); everything
    else is drawn alike in every split. The designs draw the same random numbers, so a scene differs
    between designs only where a condition's share moves it in or out of that condition.
    """
    u = lambda lo, hi: rng.uniform(lo, hi, n)
    rare = lambda share: rng.random(n) < share
    share = condition_shares(split, design)
    sign = lambda: rng.choice([-1.0, 1.0], n)
    p = {}
    radius, direction = MAX_GAZE_DEG * np.sqrt(rng.random(n)), u(0.0, 360.0)
    p["gaze_h"] = radius * np.cos(np.radians(direction))
    p["gaze_v"] = radius * np.sin(np.radians(direction))
    if task == "gaze":
        opening = np.clip(rng.normal(0.8, 0.1, n), 0.45, 1.0)
        p["eyelid_opening"] = np.where(rare(share["half_closed_eyes"]), u(*HALF_CLOSED), opening)
    else:
        kind = rng.random(n)
        opened = np.clip(rng.normal(0.78, 0.12, n), 0.42, 1.0)
        p["eyelid_opening"] = np.where(kind < OC_CLOSED, u(0.0, 0.18),
                                       np.where(kind < OC_CLOSED + OC_BORDERLINE, u(*OC_BAND), opened))
    extreme = rare(share["extreme_head_pose"])
    which = rng.random(n) < 0.6                  # extreme poses are mostly turned, some tilted up/down
    p["head_yaw"] = np.where(extreme & which, sign() * u(*EXTREME_YAW_DEG), rng.normal(0, HEAD_YAW_SD, n))
    p["head_pitch"] = np.where(extreme & ~which, sign() * u(*EXTREME_PITCH_DEG), rng.normal(0, HEAD_PITCH_SD, n))
    p["head_roll"] = rng.normal(0, HEAD_ROLL_SD, n)
    p["eye_scale"] = u(0.9, 1.1) if task == "gaze" else u(*OC_EYE_SCALE)
    p["eye_shift_x"], p["eye_shift_y"] = u(-0.05, 0.05), u(-0.04, 0.04)
    p["lid_skew"] = u(-0.2, 0.2)
    p["iris_size"] = u(0.34, 0.46)
    low_light = rare(share["low_light"])
    p["light_intensity"] = np.where(low_light, u(*LOW_LIGHT), u(*NORMAL_LIGHT))
    p["pupil_size"] = np.clip(u(0.25, 0.5) + 0.15 * (1.0 - p["light_intensity"]), 0.2, 0.7)  # dilates in the dark
    p["iris_colour"] = rng.integers(0, len(IRIS_COLOURS), n).astype(float)
    p["iris_brightness"] = u(0.6, 1.4)
    p["skin_brightness"] = u(0.15, 1.0)
    p["sclera_brightness"] = u(0.65, 1.0)
    p["brow_height"], p["brow_thickness"] = u(0.95, 1.25), u(0.12, 0.26)
    p["lash_thickness"] = u(0.6, 1.6)
    p["light_azimuth"], p["light_elevation"] = u(0.0, 360.0), u(25.0, 75.0)
    p["ambient"] = np.where(low_light, u(0.02, 0.08), u(0.15, 0.4))
    p["blur"] = np.where(rare(share["heavy_blur"]), u(1.0, 1.8), u(0.0, 0.6))
    p["noise"] = np.where(rare(share["heavy_noise"]), u(10.0, 22.0), u(1.0, 5.0))
    glasses = rare(share["glasses"])
    p["glasses"] = glasses.astype(float)
    p["glasses_reflection"] = np.where(glasses, u(0.0, 0.8), 0.0)
    p["reflection_angle"] = np.where(glasses, u(20.0, 70.0), 0.0)
    p["reflection_offset"] = np.where(glasses, u(-0.8, 0.8), 0.0)
    frame = pd.DataFrame({k: np.round(np.asarray(v, float), DECIMALS) for k, v in p.items()})
    frame["gaze_direction"] = np.round(np.degrees(np.arctan2(frame.gaze_v, frame.gaze_h)) % 360.0, DECIMALS)
    frame["gaze_magnitude"] = np.round(np.hypot(frame.gaze_h, frame.gaze_v), DECIMALS)
    frame["glasses"] = frame["glasses"].astype(int)
    return frame[list(PARAMETERS)]


# Geometry ------------------------------------------------------------------------------------------

def _rotation(yaw, pitch, roll):
    """Head rotation: yaw turns the face to the image right, pitch tilts it up, roll turns it anticlockwise."""
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _on_eyeball(x, y):
    """Lift head-frame (x, y) onto the eyeball's front surface (the corners' plane is z = 0)."""
    return np.stack([x, y, np.sqrt(np.maximum(LID_RADIUS ** 2 - x ** 2 - y ** 2, 0.0)) - LID_DEPTH], -1)


def _lids(p, t):
    shape = (1.0 - t ** 2) * (1.0 + p["lid_skew"] * t)
    sin_v = math.sin(math.radians(p["gaze_v"]))
    lower = -(LOWER_LID - 0.12 * sin_v) * shape
    aperture = max(p["eyelid_opening"] * LID_APERTURE * (1.0 + LID_FOLLOWS_GAZE * sin_v), 0.0)
    upper = lower + aperture * shape
    crease = lower + (max(aperture, 0.35) + CREASE_GAP) * shape
    return _on_eyeball(t, upper), _on_eyeball(t, lower), _on_eyeball(t, crease)


def _disc(p, radius, angles):
    """Points of a circle of `radius` on the eyeball around the gaze direction (the iris or pupil edge)."""
    h, v = math.radians(p["gaze_h"]), math.radians(p["gaze_v"])
    axis = np.array([math.sin(h) * math.cos(v), math.sin(v), math.cos(h) * math.cos(v)])
    e1 = np.array([math.cos(h), 0.0, -math.sin(h)])
    e2 = np.cross(axis, e1)
    centre = axis * math.sqrt(EYEBALL_RADIUS ** 2 - radius ** 2) - np.array([0, 0, EYEBALL_DEPTH])
    ring = centre + radius * (np.cos(angles)[:, None] * e1 + np.sin(angles)[:, None] * e2)
    return centre, ring


def _brow(p, x):
    y = p["brow_height"] + 0.22 * (1.0 - (x / 1.3) ** 2)
    z = np.full_like(x, 0.25)
    half = p["brow_thickness"] / 2 * (1.2 - 0.5 * np.abs(x - 0.2))
    return np.stack([x, y + half, z], -1), np.stack([x, y - half, z], -1), np.stack([x, y, z], -1)


def _glasses_rim(angles):
    c, s = np.cos(angles), np.sin(angles)
    superellipse = lambda w: np.sign(w) * np.abs(w) ** 0.5
    return np.stack([0.05 + 1.55 * superellipse(c), 0.1 + 1.05 * superellipse(s), np.full_like(c, 1.0)], -1)


def _inside(points, polygon):
    """Even-odd point-in-polygon test, vectorised over points."""
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = ((y0 > y) != (y1 > y)) & (x < (x1 - x0) * (y - y0) / np.where(y1 == y0, 1e-12, y1 - y0) + x0)
    return crosses.sum(1) % 2 == 1


# Rendering -----------------------------------------------------------------------------------------

def render_eye(p, size=REFERENCE_SIZE, rng=None):
    """Render one scene (a mapping with the PARAMETERS) as an RGB uint8 image of `size` x `size`.

    Returns (image, landmarks, visible): landmarks is (27, 2) float32 pixel coordinates (x right,
    y down) in LANDMARK_NAMES order; visible is False for a keypoint hidden by the eyelids or
    outside the image. `rng` draws the sensor noise (None: no noise).
    """
    view = _View(p, size)
    outline = _outlines(p, view)
    alpha = _masks(p, view, outline)
    img = _compose(p, view, alpha)
    if p["blur"] > 0:
        img = gaussian_filter(img, (p["blur"] * view.line, p["blur"] * view.line, 0))
    if rng is not None:
        img = img + rng.normal(0.0, p["noise"] / 255.0, img.shape)
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    landmarks, visible = _landmarks(p, view, outline)
    return image, landmarks, visible


class _View:
    """The camera of one image: head rotation, eye placement and scale, line width, pixel grid."""

    def __init__(self, p, size):
        self.size = size
        self.rot = _rotation(p["head_yaw"], p["head_pitch"], p["head_roll"])
        self.scale = size * EYE_HALF_WIDTH * p["eye_scale"]
        self.cx, self.cy = size * (EYE_CENTRE[0] + p["eye_shift_x"]), size * (EYE_CENTRE[1] + p["eye_shift_y"])
        self.line = size / REFERENCE_SIZE
        pix = (np.arange(size) + 0.5)
        self.gx, self.gy = np.meshgrid(pix, pix)

    def project(self, points):
        q = np.asarray(points, float) @ self.rot.T
        return np.stack([self.cx + self.scale * q[..., 0], self.cy - self.scale * q[..., 1]], -1)

    def mask(self, draw_fn):
        """An anti-aliased coverage mask in [0, 1]: drawn SUPERSAMPLE times finer, then box-filtered."""
        canvas = Image.new("L", (self.size * SUPERSAMPLE, self.size * SUPERSAMPLE), 0)
        draw_fn(ImageDraw.Draw(canvas))
        return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0

    @staticmethod
    def flat(pts):
        return [tuple(v) for v in (pts * SUPERSAMPLE).tolist()]


def _outlines(p, view):
    """The projected outlines of lids, lid opening, iris rings, pupil and brow (pixel coordinates)."""
    t = np.linspace(-1.0, 1.0, LID_POINTS)
    upper, lower, crease = (view.project(a) for a in _lids(p, t))
    angles = np.linspace(0, 2 * np.pi, CONTOUR_POINTS, endpoint=False)
    iris_r = p["iris_size"]
    iris_c3, iris3 = _disc(p, iris_r, angles)
    _, inner3 = _disc(p, iris_r * 0.72, angles)
    _, pupil3 = _disc(p, iris_r * p["pupil_size"], angles)
    brow_x = np.linspace(-1.3, 1.3, 17)
    brow_top, brow_bottom, _ = (view.project(a) for a in _brow(p, brow_x))
    return {"upper": upper, "lower": lower, "crease": crease, "opening": np.concatenate([upper, lower[::-1]]),
            "iris_centre3": iris_c3, "iris": view.project(iris3), "inner": view.project(inner3),
            "pupil": view.project(pupil3), "brow": np.concatenate([brow_top, brow_bottom[::-1]])}


def _masks(p, view, o):
    """Coverage of each part of the image; iris and pupil only where the lids are open."""
    mask, flat, line, ss = view.mask, view.flat, view.line, SUPERSAMPLE
    a_open = mask(lambda d: d.polygon(flat(o["opening"]), fill=255))
    return {
        "open": a_open,
        "iris": mask(lambda d: d.polygon(flat(o["iris"]), fill=255)) * a_open,
        "inner": mask(lambda d: d.polygon(flat(o["inner"]), fill=255)) * a_open,
        "pupil": mask(lambda d: d.polygon(flat(o["pupil"]), fill=255)) * a_open,
        "lash": mask(lambda d: (d.line(flat(o["upper"]), fill=255,
                                       width=max(1, round(p["lash_thickness"] * line * ss)), joint="curve"),
                                d.line(flat(o["lower"]), fill=90, width=max(1, round(0.6 * line * ss))))),
        "crease": mask(lambda d: d.line(flat(o["crease"][4:-4]), fill=255, width=max(1, round(0.8 * line * ss)))),
        "brow": mask(lambda d: d.polygon(flat(o["brow"]), fill=255)),
    }


def _shading(p, view):
    """Lambert shading of the skin (a height field of the face around the eye) and of the eyeball (a sphere).

    Returns (skin shade, eyeball shade, head-frame x of each pixel, light direction)."""
    inv = view.rot.T
    hx, hy = (view.gx - view.cx) / view.scale, -(view.gy - view.cy) / view.scale
    xr, yr = inv[0, 0] * hx + inv[0, 1] * hy, inv[1, 0] * hx + inv[1, 1] * hy
    height = (-0.35 * np.exp(-(xr / 1.5) ** 2 - ((yr - 0.05) / 0.9) ** 2)
              + 0.3 * np.exp(-((yr - p["brow_height"]) / 0.35) ** 2) / (1 + (xr / 1.6) ** 4)
              + 0.3 * np.exp(-((yr + 1.3) / 0.6) ** 2))
    dh_dy, dh_dx = np.gradient(height, 1.0 / view.scale)
    az, el = math.radians(p["light_azimuth"]), math.radians(p["light_elevation"])
    light = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    normal = np.stack([-dh_dx, dh_dy, np.ones_like(height)], -1)   # image rows run downwards
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    ambient, intensity = p["ambient"], p["light_intensity"]
    skin_shade = ambient + intensity * np.clip(normal @ light, 0, None)
    ball = np.stack([xr, yr, np.sqrt(np.clip(LID_RADIUS ** 2 - xr ** 2 - yr ** 2, 0.05, None))], -1)
    ball /= np.linalg.norm(ball, axis=-1, keepdims=True)
    eye_shade = ambient + intensity * np.clip(ball @ light, 0.15, None)
    return skin_shade, eye_shade, xr, light


def _compose(p, view, a):
    """The lit image before blur and noise: skin, eyeball, iris, pupil, glint, lashes, crease, brow, glasses."""
    skin_shade, eye_shade, xr, light = _shading(p, view)
    intensity, line = p["light_intensity"], view.line
    skin = (SKIN_DARK + (SKIN_LIGHT - SKIN_DARK) * p["skin_brightness"]) * skin_shade[..., None]
    occlusion = gaussian_filter(a["open"], 1.2 * line)                   # lids shade the eyeball's edge
    corner_shadow = 1 - 0.3 * xr.clip(-1, 1) ** 2
    sclera = SCLERA * p["sclera_brightness"] * ((0.45 + 0.55 * occlusion) * corner_shadow)[..., None]
    iris_colour = np.clip(IRIS_COLOURS[int(p["iris_colour"])] * p["iris_brightness"], 0, 1)
    eye = sclera * eye_shade[..., None]
    ring = np.clip(a["iris"] - a["inner"], 0, 1)
    eye = _mix(eye, iris_colour * 0.55 * eye_shade[..., None], ring)
    eye = _mix(eye, iris_colour * eye_shade[..., None], a["inner"])
    eye = _mix(eye, np.full(3, 0.02), a["pupil"])
    glint = view.project([_glint_point(light, view.rot)])[0]
    spot = np.exp(-((view.gx - glint[0]) ** 2 + (view.gy - glint[1]) ** 2) / (2 * (0.7 * line) ** 2))
    eye = eye + (1.2 * intensity * spot * a["open"])[..., None]
    img = _mix(skin, eye, a["open"])
    img = _mix(img, LASH, 0.9 * a["lash"])
    img = _mix(img, skin * 0.6, 0.35 * a["crease"])
    img = _mix(img, BROW * (0.5 + skin_shade[..., None]), 0.9 * gaussian_filter(a["brow"], 0.5 * line))
    if p["glasses"]:
        img = _glasses(img, p, view)
    return img


def _landmarks(p, view, o):
    """The 27 landmarks in LANDMARK_NAMES order and which are visible (inside the image, not under a lid)."""
    size = view.size
    iris_centre = view.project([o["iris_centre3"]])
    iris_marks = view.project(_disc(p, p["iris_size"], np.radians(np.arange(0, 360, 45)))[1])
    corners = np.stack([o["upper"][0], o["upper"][-1]])
    lid_t = np.asarray(LID_LANDMARK_T)
    up_marks, low_marks, _ = (view.project(a) for a in _lids(p, lid_t))
    brow_marks = view.project(_brow(p, np.linspace(-1.1, 1.1, 6))[2])
    landmarks = np.concatenate([corners, up_marks, low_marks, iris_centre, iris_marks, brow_marks]).astype(np.float32)
    visible = np.all((landmarks >= 0) & (landmarks < size), axis=1)
    eye_points = slice(len(corners) + 2 * len(lid_t), len(corners) + 2 * len(lid_t) + 9)
    visible[eye_points] &= _inside(landmarks[eye_points], o["opening"]) if p["eyelid_opening"] > 0 else False
    return landmarks, visible


def _glint_point(light, rot):
    """Where the light's reflection sits on the cornea: the sphere point whose normal halves light and view."""
    half = light + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    return np.array([0.0, 0.0, -EYEBALL_DEPTH]) + rot.T @ (half * EYEBALL_RADIUS * CORNEA_BULGE)


def _glasses(img, p, view):
    mask, flat, gx, gy = view.mask, view.flat, view.gx, view.gy
    intensity, line, ss = p["light_intensity"], view.line, SUPERSAMPLE
    rim = view.project(_glasses_rim(np.linspace(0, 2 * np.pi, 48, endpoint=False)))
    a_lens = mask(lambda d: d.polygon(flat(rim), fill=255))
    a_rim = mask(lambda d: d.line(flat(np.concatenate([rim, rim[:1]])), fill=255,
                                  width=max(1, round(1.3 * line * ss)), joint="curve"))
    angle = math.radians(p["reflection_angle"])
    centre = rim.mean(0)
    across = (gx - centre[0]) * math.sin(angle) + (gy - centre[1]) * math.cos(angle)
    width = np.ptp(rim[:, 0]) / 2
    band = np.exp(-((across / width - p["reflection_offset"]) / 0.18) ** 2)
    img = img * (1 - 0.12 * a_lens[..., None])
    img = img + (p["glasses_reflection"] * (0.3 + intensity) * band * a_lens)[..., None]
    return _mix(img, FRAME, a_rim)


def _mix(base, top, alpha):
    alpha = alpha[..., None] if np.ndim(alpha) == 2 else alpha
    return base + (top - base) * alpha
