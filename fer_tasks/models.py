"""Keras model definitions: the CNN (trained with and without augmentation) and the DNN.

Both models take a batch of 48x48x1 images scaled to [0, 1] and return softmax
probabilities over the seven FER2013 classes. The DNN's width is chosen so that its
parameter count is within 1% of the CNN's, which makes the comparison about
architecture rather than capacity.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from fer_tasks.config import IMAGE_SIZE, MODEL_NAMES, NUM_CLASSES

INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
CNN_FILTERS = (32, 64, 128)
CNN_DENSE_UNITS = 213
DNN_UNITS = 291
DROPOUT_RATE = 0.3
BATCH_NORM_MOMENTUM = 0.9


class FusedBatchNormalization(layers.BatchNormalization):
    """BatchNormalization that trains with TensorFlow's fused kernel on 4-D channels-last input.

    Keras 3 (3.15) normalises with separate moment, subtract and scale ops and, under
    "mixed_bfloat16", casts the whole activation to float32 and back. TensorFlow's
    `FusedBatchNormV3` does the same arithmetic in one pass and
    accepts bfloat16 input with float32 statistics. The moving statistics follow
    the same update as the parent class: the batch variance is the biased one, as
    in Keras. Inference, masks, renormalisation, other ranks and other backends
    use the parent's code. The weights are the parent's, so `standard_copy` can
    move them into a plain Keras model for saving.
    """

    def call(self, inputs, training=None, mask=None):
        if not (
            training
            and self.trainable
            and mask is None
            and not self.renorm
            and self.center
            and self.scale
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and keras.backend.backend() == "tensorflow"
        ):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs,
            scale=tf.cast(self.gamma, tf.float32),
            offset=tf.cast(self.beta, tf.float32),
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=True,
        )
        # The fused kernel returns the unbiased batch variance; Keras tracks the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs


def build_cnn(name: str = "cnn", *, fused_batch_norm: bool = False) -> keras.Model:
    """Build the CNN: three convolution blocks, one hidden Dense layer, a softmax.

    Each block is Conv2D, ReLU, Conv2D, ReLU, BatchNormalization, MaxPooling2D,
    Dropout, and halves the spatial size: 48 -> 24 -> 12 -> 6. With
    `fused_batch_norm` the normalisation layers are `FusedBatchNormalization`,
    which trains faster and has the same weights.
    """
    normalization = FusedBatchNormalization if fused_batch_norm else layers.BatchNormalization
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = inputs
    for block, filters in enumerate(CNN_FILTERS, start=1):
        x = layers.Conv2D(filters, 3, padding="same", name=f"block{block}_conv1")(x)
        x = layers.Activation("relu", name=f"block{block}_relu1")(x)
        x = layers.Conv2D(filters, 3, padding="same", name=f"block{block}_conv2")(x)
        x = layers.Activation("relu", name=f"block{block}_relu2")(x)
        x = normalization(momentum=BATCH_NORM_MOMENTUM, name=f"block{block}_norm")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = layers.Dropout(DROPOUT_RATE, name=f"block{block}_dropout")(x)
    # (batch, 6, 6, 128) -> (batch, 4608)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(CNN_DENSE_UNITS, activation="relu", name="dense")(x)
    x = layers.Dropout(DROPOUT_RATE, name="dense_dropout")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def build_dnn(name: str = "dnn") -> keras.Model:
    """Build the DNN: four blocks of Dense, Dense, BatchNormalization, Dropout, a softmax."""
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    # (batch, 48, 48, 1) -> (batch, 2304)
    x = layers.Flatten(name="flatten")(inputs)
    for block in range(1, 5):
        x = layers.Dense(DNN_UNITS, activation="relu", name=f"block{block}_dense1")(x)
        x = layers.Dense(DNN_UNITS, activation="relu", name=f"block{block}_dense2")(x)
        x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"block{block}_norm")(x)
        x = layers.Dropout(DROPOUT_RATE, name=f"block{block}_dropout")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def build_model(model_name: str, *, fused_batch_norm: bool = False) -> keras.Model:
    """Build the untrained model for one of `MODEL_NAMES`.

    `fused_batch_norm` applies to the CNN only: the DNN normalises 2-D input, which
    the fused kernel does not take.
    """
    if model_name in ("cnn", "cnn_aug"):
        return build_cnn(model_name, fused_batch_norm=fused_batch_norm)
    if model_name == "dnn":
        return build_dnn(model_name)
    raise ValueError(f"unknown model {model_name!r}; expected one of {list(MODEL_NAMES)}")


def standard_copy(model: keras.Model) -> keras.Model:
    """Return the model rebuilt with plain Keras layers only, with the same weights and dtype policy.

    A model saved this way loads anywhere Keras does, without importing this module.
    """
    from fer_tasks.performance import dtype_policy

    with dtype_policy(model.dtype_policy.name):
        copy = build_model(model.name)
    copy.set_weights(model.get_weights())
    return copy


def conv_layer_names(model: keras.Model) -> list[str]:
    """Return the names of the model's Conv2D layers, input side first."""
    return [layer.name for layer in model.layers if isinstance(layer, layers.Conv2D)]


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Scale uint8 images (k, 48, 48) to the model's float32 input (k, 48, 48, 1) in [0, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"images must be uint8 of shape (k, {IMAGE_SIZE}, {IMAGE_SIZE}), "
            f"got {images.dtype} of shape {images.shape}"
        )
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]
