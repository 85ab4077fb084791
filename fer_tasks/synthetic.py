"""The built-in default data set: synthetic 48x48 grayscale faces, one expression each.

Each face is drawn with numpy from a few parametric parts (head, hair, eyes, brows,
nose, mouth) and then placed with a random position, scale and small rotation, lit
from a random side, blurred and given pixel noise. The class sets the expression:
mouth bend, width and opening, brow height and slant, eye openness. Every
expression is drawn at a random intensity between faint and strong, so faint
expressions look close to Neutral, and Fear and Surprise share raised brows and
wide eyes. The classes therefore overlap a little, as they do in FER2013.

The files follow the course format of FER2013: `train.csv` (`label,feature`),
`test.csv` (`id,feature`) and the test labels `test_labels.csv` (`id,label`).
`feature` is 2,304 space-separated pixel values in row-major order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fer_tasks.config import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES
from fer_tasks.files import write_text

logger = logging.getLogger(__name__)

TRAIN_FILE = "train.csv"
TEST_FILE = "test.csv"
TEST_LABELS_FILE = "test_labels.csv"
MANIFEST_FILE = "builtin_manifest.json"

# Bump when the drawing changes, so that files written by an older generator are
# replaced instead of reused.
GENERATOR_VERSION = 1

# Images are drawn in chunks to bound memory. The chunk size is part of the random
# stream (each chunk has its own noise generator), so changing it changes the images.
CHUNK_SIZE = 512


class Expression(NamedTuple):
    """Mean face parameters of one expression at full intensity.

    Lengths are in face units: the head is about 1.6 units wide and 2.1 units
    tall, and v points down, so a positive `mouth_bend` lifts the mouth corners.
    """

    mouth_bend: float  # how far the mouth corners rise above the mouth centre
    mouth_width: float  # half-width of the mouth
    mouth_open: float  # half-height of the open mouth at its centre
    mouth_open_probability: float  # chance that the mouth is open at all
    mouth_squareness: float  # exponent of the opening's outline: 2 is an ellipse
    mouth_tilt: float  # one corner up, the other down (side chosen at random)
    mouth_wave: float  # amplitude of an S-shaped wave along the lips
    teeth_probability: float  # chance that an open mouth shows its upper teeth
    brow_raise: float  # brows moved up from their resting height
    brow_slant: float  # inner brow ends moved down, outer ends up
    brow_asymmetry: float  # one brow (side chosen at random) lowered this much
    eye_openness: float  # eye height relative to a neutral eye


EXPRESSIONS: dict[str, Expression] = {
    "Angry": Expression(-0.04, 0.21, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, -0.05, 0.10, 0.0, 0.7),
    "Disgust": Expression(-0.02, 0.27, 0.035, 0.7, 2.0, 0.09, 0.035, 0.3, -0.03, 0.05, 0.06, 0.6),
    "Fear": Expression(-0.06, 0.38, 0.07, 1.0, 4.0, 0.0, 0.0, 0.5, 0.10, -0.06, 0.0, 1.45),
    "Happy": Expression(0.16, 0.38, 0.08, 0.6, 2.0, 0.0, 0.0, 0.7, 0.01, 0.0, 0.0, 0.65),
    "Sad": Expression(-0.13, 0.27, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.03, -0.09, 0.0, 0.8),
    "Surprise": Expression(0.0, 0.15, 0.17, 1.0, 2.0, 0.0, 0.0, 0.1, 0.13, 0.0, 0.0, 1.45),
    "Neutral": Expression(0.0, 0.29, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0),
}
if tuple(EXPRESSIONS) != CLASS_NAMES:
    raise RuntimeError(f"EXPRESSIONS must list {CLASS_NAMES} in order, got {tuple(EXPRESSIONS)}")

# Standard deviation of each parameter between faces of one class.
PARAMETER_SPREAD = Expression(0.03, 0.03, 0.015, 0.0, 0.4, 0.02, 0.01, 0.0, 0.025, 0.025, 0.015, 0.12)

# Expression intensity: 0 is the neutral face, 1 the prototype in `EXPRESSIONS`.
INTENSITY_RANGE = (0.6, 1.2)


def generate_faces(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw `count` synthetic faces with balanced classes.

    Labels go round-robin through the seven classes and are then shuffled, so class
    sizes differ by at most one. The same seed gives the same arrays.

    NOTE: NumPy allows `Generator` distributions to change between versions, so a
    NumPy upgrade may change the images drawn for a seed.

    Args:
        count: number of images, at least 0.
        seed: non-negative seed of the random stream.

    Returns:
        Images as uint8 of shape (count, 48, 48) and labels as int64 of shape (count,).
    """
    if count < 0:
        raise ValueError(f"count must be at least 0, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")

    parameter_stream, noise_stream = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(parameter_stream)
    labels = np.arange(count, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    face = _draw_face_parameters(labels, rng)

    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    chunk_count = -(-count // CHUNK_SIZE)
    for chunk, chunk_stream in enumerate(noise_stream.spawn(chunk_count)):
        rows = slice(chunk * CHUNK_SIZE, min(count, (chunk + 1) * CHUNK_SIZE))
        chunk_face = {name: values[rows] for name, values in face.items()}
        images[rows] = _render(chunk_face, np.random.default_rng(chunk_stream))
    return images, labels


def _draw_face_parameters(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw every per-image parameter: the expression, the identity and the photo."""
    count = len(labels)
    prototypes = np.array(list(EXPRESSIONS.values()), dtype=np.float64)  # (7, fields)
    neutral = np.array(EXPRESSIONS["Neutral"], dtype=np.float64)
    spread = np.array(PARAMETER_SPREAD, dtype=np.float64)

    # Each face lies on the line from the neutral face to its class prototype.
    intensity = rng.uniform(*INTENSITY_RANGE, size=(count, 1))
    values = neutral + intensity * (prototypes[labels] - neutral)
    values += spread * rng.standard_normal((count, len(neutral)))
    expression = {name: values[:, index] for index, name in enumerate(Expression._fields)}
    expression_probability = prototypes[labels]

    def coin(field: str) -> np.ndarray:
        index = Expression._fields.index(field)
        return rng.random(count) < expression_probability[:, index]

    mouth_open = np.clip(expression["mouth_open"], 0.0, None) * coin("mouth_open_probability")
    side = rng.choice([-1.0, 1.0], size=count)
    face = {
        "mouth_bend": expression["mouth_bend"],
        "mouth_width": np.clip(expression["mouth_width"], 0.1, None),
        "mouth_open": mouth_open,
        "mouth_squareness": np.clip(expression["mouth_squareness"], 1.5, None),
        "mouth_tilt": side * expression["mouth_tilt"],
        "mouth_wave": side * expression["mouth_wave"],
        "teeth": (coin("teeth_probability") & (mouth_open > 0.03)).astype(np.float64),
        "brow_raise": expression["brow_raise"],
        "brow_slant": expression["brow_slant"],
        "brow_asymmetry": side * np.abs(expression["brow_asymmetry"]),
        "eye_openness": np.clip(expression["eye_openness"], 0.3, 2.0),
    }
    face.update(_draw_identity(count, rng))
    face.update(_draw_photo(count, rng))
    return face


def _draw_identity(count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw the parts of a face that do not depend on the expression."""
    return {
        "head_width": rng.normal(0.80, 0.04, count),
        "head_height": rng.normal(1.05, 0.04, count),
        "eye_spacing": rng.normal(0.33, 0.025, count),
        "eye_level": rng.normal(-0.12, 0.03, count),
        "eye_width": rng.normal(0.17, 0.012, count),
        "gaze": rng.normal(0.0, 0.02, count),
        "brow_thickness": rng.uniform(0.08, 0.11, count),
        "brow_length": rng.normal(0.30, 0.03, count),
        "mouth_level": rng.normal(0.52, 0.04, count),
        "lip_thickness": rng.uniform(0.04, 0.06, count),
        "skin": rng.uniform(0.55, 0.85, count),
        "hair": rng.uniform(0.05, 0.5, count),
        "hairline": rng.normal(-0.72, 0.05, count),
    }


def _draw_photo(count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw the framing and the image quality: pose, light, background, blur, noise."""
    return {
        "center_x": rng.normal(IMAGE_SIZE / 2, 1.0, count),
        "center_y": rng.normal(IMAGE_SIZE / 2 + 1.0, 1.0, count),
        "scale": rng.uniform(20.0, 23.5, count),  # pixels per face unit
        "rotation": np.clip(rng.normal(0.0, np.radians(5.0), count), -0.2, 0.2),
        "light_angle": rng.uniform(0.0, 2 * np.pi, count),
        "light_strength": rng.uniform(0.0, 0.25, count),
        "background": rng.uniform(0.25, 0.75, count),
        "background_slope": rng.normal(0.0, 0.005, count),
        "contrast": rng.uniform(0.8, 1.15, count),
        "brightness": rng.normal(0.0, 0.04, count),
        "blur": rng.uniform(0.0, 0.5, count),
        "noise": rng.uniform(0.01, 0.03, count),
    }


def _render(parameters: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Draw one chunk of faces from their parameters as uint8 (n, 48, 48)."""
    # Each parameter becomes (n, 1, 1), so it broadcasts over the pixel grid.
    face = {name: values[:, None, None].astype(np.float32) for name, values in parameters.items()}
    count = len(parameters["scale"])

    # Face coordinates (u, v) of every pixel centre, each (n, 48, 48): the inverse
    # of rotating by `rotation`, scaling by `scale` and moving to the face centre.
    pixel_y, pixel_x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    dx = pixel_x[None] - face["center_x"]
    dy = pixel_y[None] - face["center_y"]
    cos, sin = np.cos(face["rotation"]), np.sin(face["rotation"])
    u = (cos * dx + sin * dy) / face["scale"]
    v = (-sin * dx + cos * dy) / face["scale"]
    pixel = 1.0 / face["scale"]  # one pixel in face units, (n, 1, 1)

    image = face["background"] + face["background_slope"] * (dx - dy)
    image = _draw_head(image, u, v, pixel, face)
    image = _draw_eyes(image, u, v, pixel, face)
    image = _draw_brows(image, u, v, pixel, face)
    image = _draw_nose(image, u, v, pixel, face)
    image = _draw_mouth(image, u, v, pixel, face)
    image = _degrade(image, face, rng, count)
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _coverage(distance: np.ndarray, pixel: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance: 1 inside, 0 outside, a 1-pixel ramp."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _blend(image: np.ndarray, colour: np.ndarray | float, alpha: np.ndarray) -> np.ndarray:
    return image + alpha * (colour - image)


def _ellipse_distance(u: np.ndarray, v: np.ndarray, width: np.ndarray, height: np.ndarray):
    """Approximate signed distance to an axis-aligned ellipse with these half-axes."""
    radius = np.sqrt((u / width) ** 2 + (v / height) ** 2)
    return (radius - 1.0) * np.minimum(width, height)


def _segment_distance(u, v, start_u, start_v, end_u, end_v):
    """Distance from each point to the line segment from start to end."""
    along_u, along_v = end_u - start_u, end_v - start_v
    fraction = ((u - start_u) * along_u + (v - start_v) * along_v) / (along_u**2 + along_v**2)
    fraction = np.clip(fraction, 0.0, 1.0)
    return np.hypot(u - start_u - fraction * along_u, v - start_v - fraction * along_v)


def _draw_head(image, u, v, pixel, face):
    """Draw the hair behind and above the head, then the lit, shaded skin."""
    width, height = face["head_width"], face["head_height"]
    hair_outline = _ellipse_distance(u, v + 0.05, width + 0.09, height + 0.07)
    image = _blend(image, face["hair"], _coverage(hair_outline, pixel))

    # Light falls from `light_angle`, and the skin darkens towards the head's edge.
    angle = face["light_angle"]
    light = 1.0 + face["light_strength"] * (np.cos(angle) * u + np.sin(angle) * v)
    edge_shade = 1.0 - 0.25 * ((u / width) ** 2 + (v / height) ** 2)
    skin = face["skin"] * light * edge_shade
    head = _coverage(_ellipse_distance(u, v, width, height), pixel)
    image = _blend(image, skin, head)

    # The fringe covers the forehead above a hairline that curves down at the temples.
    hairline = face["hairline"] + 0.25 * u**2
    fringe = _coverage(v - hairline, pixel) * head
    return _blend(image, face["hair"], fringe)


def _draw_eyes(image, u, v, pixel, face):
    """Draw two eyes: pale sclera, dark iris, dark upper lid line."""
    half_height = 0.085 * face["eye_openness"]
    for side in (-1.0, 1.0):
        eye_u = u - side * face["eye_spacing"]
        eye_v = v - face["eye_level"]
        outline = _ellipse_distance(eye_u, eye_v, face["eye_width"], half_height)
        inside = _coverage(outline, pixel)
        image = _blend(image, 0.9 * face["skin"] + 0.1, inside)

        iris = _coverage(np.hypot(eye_u - face["gaze"], eye_v) - 0.07, pixel) * inside
        image = _blend(image, 0.08, iris)

        upper_lid = (eye_v < 0) & (np.abs(eye_u) < face["eye_width"] + pixel)
        lid = _coverage(np.abs(outline) - 0.5 * pixel, pixel) * upper_lid
        image = _blend(image, 0.15, 0.8 * lid)
    return image


def _draw_brows(image, u, v, pixel, face):
    """Draw two straight brows. A positive `brow_slant` pulls the inner ends down (a frown)."""
    brow_v = face["eye_level"] - 0.2 - face["brow_raise"]
    inner_u = 0.1
    for side in (-1.0, 1.0):
        lowered = np.maximum(side * face["brow_asymmetry"], 0.0)
        inner_v = brow_v + face["brow_slant"] + lowered
        outer_v = brow_v - 0.6 * face["brow_slant"] + lowered
        distance = _segment_distance(
            u, v, side * inner_u, inner_v, side * (inner_u + face["brow_length"]), outer_v
        )
        brow = _coverage(distance - 0.5 * face["brow_thickness"], pixel)
        image = _blend(image, np.minimum(0.6 * face["hair"], 0.4 * face["skin"]), brow)
    return image


def _draw_nose(image, u, v, pixel, face):
    """Draw a faint nose: a shadow down one side and a line under the nostrils."""
    bridge = _segment_distance(u, v, 0.04, 0.0, 0.06, 0.22)
    base = _segment_distance(u, v, -0.07, 0.27, 0.07, 0.27)
    shadow = np.maximum(_coverage(bridge - 0.015, pixel), _coverage(base - 0.015, pixel))
    return _blend(image, 0.5 * face["skin"], 0.5 * shadow)


def _draw_mouth(image, u, v, pixel, face):
    """Draw the lips and, when open, the dark mouth with the upper teeth.

    The lips follow a centre line c(x) across the mouth, where x runs from -1 at
    one corner to 1 at the other: c = level - bend * x**2 + tilt * x + wave * sin(pi * x).
    The opening has half-height open * (1 - |x|**s) ** (1/s) around that line.
    """
    width = face["mouth_width"]
    across = np.clip(u / width, -1.0, 1.0)
    centre_line = (
        face["mouth_level"]
        - face["mouth_bend"] * across**2
        + face["mouth_tilt"] * across
        + face["mouth_wave"] * np.sin(np.pi * across)
    )
    power = face["mouth_squareness"]
    half_opening = face["mouth_open"] * (1.0 - np.abs(across) ** power) ** (1.0 / power)
    offset = v - centre_line

    # Negative inside the opening, zero on its outline, positive outside.
    outline = np.maximum(np.abs(offset) - half_opening, np.abs(u) - width)
    cavity = _coverage(outline, pixel)
    teeth = cavity * face["teeth"] * _coverage(offset + 0.35 * half_opening, pixel)
    lips = _coverage(np.abs(outline) - face["lip_thickness"], pixel)

    image = _blend(image, 0.06, cavity)
    image = _blend(image, 0.85, teeth)
    return _blend(image, 0.25 * face["skin"], lips)


def _degrade(image, face, rng, count):
    """Blur, change contrast and brightness, and add pixel noise, as a camera would."""
    # Mix in a 3x3 box blur with weight `blur`. Edge pixels repeat at the border.
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="edge")
    blurred = sum(
        padded[:, row : row + IMAGE_SIZE, column : column + IMAGE_SIZE]
        for row in range(3)
        for column in range(3)
    ) / 9.0
    image = _blend(image, blurred, face["blur"])

    image = (image - 0.5) * face["contrast"] + 0.5 + face["brightness"]
    noise = rng.standard_normal((count, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    return image + face["noise"] * noise


def write_builtin_dataset(
    directory: str | os.PathLike[str],
    *,
    train_rows: int = 3500,
    test_rows: int = 700,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write the built-in data set in course format, reusing identical existing files.

    Writes `train.csv`, `test.csv`, `test_labels.csv` and a manifest with the
    arguments and the files' SHA-256 digests. Each file is written atomically, the
    manifest last. When the manifest matches the arguments and every file still
    has its recorded digest, nothing is written. The test images come from a seed
    derived from `seed`, so they differ from the training images.

    Args:
        directory: folder for the files; created if missing.
        train_rows: number of training images, at least 1.
        test_rows: number of test images, at least 1.
        seed: non-negative seed of the random stream.

    Returns:
        The paths of `train.csv` and `test.csv`.
    """
    for name, value in (("train_rows", train_rows), ("test_rows", test_rows)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")

    directory = Path(directory)
    train_path, test_path = directory / TRAIN_FILE, directory / TEST_FILE
    arguments = {
        "generator_version": GENERATOR_VERSION,
        "train_rows": train_rows,
        "test_rows": test_rows,
        "seed": seed,
    }
    if _manifest_matches(directory, arguments):
        logger.info("Reusing the built-in data set in %s (%s)", directory, arguments)
        return train_path, test_path

    started = time.perf_counter()
    train_images, train_labels = generate_faces(train_rows, seed)
    test_images, test_labels = generate_faces(test_rows, _test_seed(seed))
    ids = np.arange(test_rows)
    contents = {
        TRAIN_FILE: _csv_text("label", train_labels, train_images),
        TEST_FILE: _csv_text("id", ids, test_images),
        TEST_LABELS_FILE: "id,label\n" + "".join(f"{i},{label}\n" for i, label in zip(ids, test_labels)),
    }

    digests = {}
    for file_name, text in contents.items():
        data = text.encode("ascii")
        write_text(directory / file_name, text)
        digests[file_name] = hashlib.sha256(data).hexdigest()
    manifest = {**arguments, "sha256": digests}
    write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info(
        "Wrote the built-in data set to %s: %d training and %d test images in %.1f s",
        directory,
        train_rows,
        test_rows,
        time.perf_counter() - started,
    )
    return train_path, test_path


def _test_seed(seed: int) -> int:
    """Hash `seed` into the test set's seed, so that it does not equal a nearby training seed."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def _csv_text(key_column: str, keys: np.ndarray, images: np.ndarray) -> str:
    """Format rows of `key,feature`, where feature is the space-separated pixels."""
    lines = [f"{key_column},feature\n"]
    for key, image in zip(keys.tolist(), images.reshape(len(images), -1).tolist()):
        lines.append(f"{key},{' '.join(map(str, image))}\n")
    return "".join(lines)


def _manifest_matches(directory: Path, arguments: dict[str, int]) -> bool:
    """Tell whether the manifest records `arguments` and every file has its digest."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if {key: manifest.get(key) for key in arguments} != arguments:
        return False

    recorded = manifest.get("sha256", {})
    for file_name in (TRAIN_FILE, TEST_FILE, TEST_LABELS_FILE):
        path = directory / file_name
        if not path.is_file() or recorded.get(file_name) != _file_sha256(path):
            return False
    return True


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
