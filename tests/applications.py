"""Real architectures for tests: keras.applications families built with ``weights=None``.

Each family at the smallest input it accepts, 5 classes (softmax head), so tests
exercise what users fine-tune without downloading any weights.
"""

import keras

A = keras.applications
NUM_CLASSES = 5

# name -> (constructor, smallest input shape it accepts)
FAMILIES = {
    "MobileNet": (A.MobileNet, (32, 32, 3)),
    "MobileNetV2": (A.MobileNetV2, (32, 32, 3)),
    "MobileNetV3Small": (A.MobileNetV3Small, (32, 32, 3)),
    "MobileNetV3Large": (A.MobileNetV3Large, (32, 32, 3)),
    "EfficientNetB0": (A.EfficientNetB0, (32, 32, 3)),
    "EfficientNetV2B0": (A.EfficientNetV2B0, (32, 32, 3)),
    "ResNet50": (A.ResNet50, (32, 32, 3)),
    "ResNet50V2": (A.ResNet50V2, (32, 32, 3)),
    "DenseNet121": (A.DenseNet121, (32, 32, 3)),
    "VGG16": (A.VGG16, (32, 32, 3)),
    "Xception": (A.Xception, (71, 71, 3)),
    "InceptionV3": (A.InceptionV3, (75, 75, 3)),
    "NASNetMobile": (A.NASNetMobile, (32, 32, 3)),
    "ConvNeXtTiny": (A.ConvNeXtTiny, (32, 32, 3)),
}
# The cheapest families to build and run (seconds on 2 CPU cores): the fast test set.
FAST = ("MobileNetV2", "MobileNetV3Small", "EfficientNetB0")


def build(name, seed=0):
    """Family ``name`` with random weights (seeded), its smallest input, a 5-class softmax head."""
    constructor, shape = FAMILIES[name]
    keras.utils.set_random_seed(seed)
    return constructor(weights=None, input_shape=shape, classes=NUM_CLASSES)


def transfer_learning(name, seed=0):
    """The keras.io transfer-learning recipe: a base model called inside a new model, new head."""
    constructor, shape = FAMILIES[name]
    keras.utils.set_random_seed(seed)
    base = constructor(weights=None, input_shape=shape, include_top=False)
    inputs = keras.Input(shape)
    features = base(inputs, training=False)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(pooled), name=f"{name}_transfer_{seed}")


def sample(name, rows=2, seed=0):
    """A float32 batch of ``rows`` inputs for family ``name``."""
    import numpy as np

    shape = FAMILIES[name][1]
    return np.random.default_rng(seed).uniform(0, 255, size=(rows, *shape)).astype("float32")
