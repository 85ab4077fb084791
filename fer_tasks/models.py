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


def build_cnn(name: str = "cnn") -> keras.Model:
    """Build the CNN: three convolution blocks, one hidden Dense layer, a softmax.

    Each block is Conv2D, ReLU, Conv2D, ReLU, BatchNormalization, MaxPooling2D,
    Dropout, and halves the spatial size: 48 -> 24 -> 12 -> 6.
    """
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = inputs
    for block, filters in enumerate(CNN_FILTERS, start=1):
        x = layers.Conv2D(filters, 3, padding="same", name=f"block{block}_conv1")(x)
        x = layers.Activation("relu", name=f"block{block}_relu1")(x)
        x = layers.Conv2D(filters, 3, padding="same", name=f"block{block}_conv2")(x)
        x = layers.Activation("relu", name=f"block{block}_relu2")(x)
        x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"block{block}_norm")(x)
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


def build_model(model_name: str) -> keras.Model:
    """Build the untrained model for one of `MODEL_NAMES`."""
    if model_name in ("cnn", "cnn_aug"):
        return build_cnn(model_name)
    if model_name == "dnn":
        return build_dnn(model_name)
    raise ValueError(f"unknown model {model_name!r}; expected one of {list(MODEL_NAMES)}")


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
