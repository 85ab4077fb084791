"""Image augmentation for `cnn_aug`: one geometric transform per image and batch.

A horizontal flip, a rotation and a shift, each drawn per image, are composed
into one projective transform matrix and applied in a single resampling pass
(`keras.ops.image.affine_transform`), instead of one pass per Keras layer.
"""

from __future__ import annotations

import math
from typing import Any

import keras

ROTATION_DEGREES = 10.0
SHIFT_FRACTION = 0.1


class RandomFlipRotateShift(keras.layers.Layer):
    """Preprocessing layer that flips, rotates and shifts each image of a batch at random.

    Per image, with `training=True`:

    - a horizontal flip (mirror across the vertical centre line) with probability 0.5;
    - a rotation about the image centre by an angle uniform in
      [-`rotation_degrees`, +`rotation_degrees`];
    - a shift by an amount uniform in [-`shift_fraction`, +`shift_fraction`] of the
      width horizontally and, drawn separately, of the height vertically.

    The flip is applied first, then the rotation, then the shift. Output pixels
    that map outside the input take the value of the nearest edge pixel
    (`fill_mode="nearest"`). `interpolation` is "nearest" (each output pixel
    copies one input pixel, so the values stay those of the input) or "bilinear".

    Input is a batch of channels-last images, (batch, height, width, channels), of
    any dtype that `tf.raw_ops.ImageProjectiveTransformV3` accepts, uint8 and
    float32 among them. The output has the input's shape and dtype. With `training=False`
    the layer returns its input unchanged. The layer does not autocast, so a mixed
    precision policy leaves the dtype of the images alone.
    """

    def __init__(
        self,
        rotation_degrees: float = ROTATION_DEGREES,
        shift_fraction: float = SHIFT_FRACTION,
        interpolation: str = "nearest",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if not 0.0 <= rotation_degrees <= 180.0:
            raise ValueError(f"rotation_degrees must be between 0 and 180, got {rotation_degrees!r}")
        if not 0.0 <= shift_fraction <= 1.0:
            raise ValueError(f"shift_fraction must be between 0 and 1, got {shift_fraction!r}")
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
        self.rotation_degrees = float(rotation_degrees)
        self.shift_fraction = float(shift_fraction)
        self.interpolation = interpolation
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def transform_matrices(self, batch_size: Any, height: Any, width: Any) -> Any:
        """Draw a flip, an angle and a shift per image; return their `compose_transforms` rows."""
        flip = keras.random.uniform((batch_size,), seed=self.seed_generator) < 0.5
        limit = math.radians(self.rotation_degrees)
        angle = keras.random.uniform((batch_size,), -limit, limit, seed=self.seed_generator)
        shift_x = keras.random.uniform((batch_size,), -1.0, 1.0, seed=self.seed_generator)
        shift_y = keras.random.uniform((batch_size,), -1.0, 1.0, seed=self.seed_generator)
        width = keras.ops.cast(width, "float32")
        height = keras.ops.cast(height, "float32")
        return compose_transforms(
            flip, angle, shift_x * self.shift_fraction * width, shift_y * self.shift_fraction * height, height, width
        )

    def call(self, images: Any, training: bool = False) -> Any:
        if not training:
            return images
        shape = keras.ops.shape(images)
        matrices = self.transform_matrices(shape[0], shape[1], shape[2])
        return keras.ops.image.affine_transform(
            images,
            matrices,
            interpolation=self.interpolation,
            fill_mode="nearest",
            data_format="channels_last",
        )

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "rotation_degrees": self.rotation_degrees,
            "shift_fraction": self.shift_fraction,
            "interpolation": self.interpolation,
            "seed": self.seed,
        }


def compose_transforms(flip: Any, angle: Any, shift_x: Any, shift_y: Any, height: Any, width: Any) -> Any:
    """Compose per-image flips, rotations and shifts into (batch, 8) float32 `affine_transform` rows.

    Each image is mirrored horizontally where `flip` is true, then rotated about
    its centre by `angle` radians (clockwise on screen, because y points down),
    then shifted by `shift_x` pixels to the right and `shift_y` pixels down.
    A row [a0, a1, a2, b0, b1, b2, c0, c1] maps an output pixel (x, y) to the
    input point (a0 x + a1 y + a2, b0 x + b1 y + b2). Coordinates are in pixels
    with pixel centres on whole numbers, as `keras.ops.image.affine_transform`
    expects.
    """
    ops = keras.ops
    angle = ops.cast(angle, "float32")
    sign = ops.where(flip, -1.0, 1.0)
    centre_x = (ops.cast(width, "float32") - 1.0) / 2.0
    centre_y = (ops.cast(height, "float32") - 1.0) / 2.0
    # Invert the forward mapping: undo the shift, rotate back by -angle about the
    # centre, then mirror x about the centre for flipped images.
    cos, sin = ops.cos(angle), ops.sin(angle)
    offset_x = -ops.cast(shift_x, "float32") - centre_x
    offset_y = -ops.cast(shift_y, "float32") - centre_y
    zeros = ops.zeros_like(angle)
    return ops.stack(
        [
            sign * cos,
            sign * sin,
            sign * (cos * offset_x + sin * offset_y) + centre_x,
            -sin,
            cos,
            -sin * offset_x + cos * offset_y + centre_y,
            zeros,
            zeros,
        ],
        axis=1,
    )
