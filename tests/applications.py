"""Real architectures for tests: keras.applications families built with ``weights=None``, and small
keras-hub image classifiers (``hub_*``) built from configs, never presets.

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


# keras-hub image classifiers from small configs (no preset download): the backbone is nested in the
# task model, built with preprocessor=None. keras-hub is imported here only, never by the library.
HUB_INPUT = (32, 32, 3)
HUB_CLASSES = 3


def hub_resnet(seed=0):
    """A small keras-hub ``ResNetImageClassifier`` (basic blocks; the first stack must have 64 filters)."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=HUB_INPUT)
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=HUB_CLASSES,
                                                  preprocessor=None, activation="softmax")


def hub_vit(seed=0, pooling="token"):
    """A tiny keras-hub ``ViTImageClassifier``: 2 blocks, 2 heads of 8, hidden 16, MLP 32."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ViTBackbone(image_shape=HUB_INPUT, patch_size=8, num_layers=2, num_heads=2,
                                            hidden_dim=16, mlp_dim=32)
    return keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=HUB_CLASSES, pooling=pooling,
                                               preprocessor=None, activation="softmax")


HUB_FAMILIES = {"ResNet": hub_resnet, "ViT": hub_vit}


def hub_member(name, seed=0):
    """keras-hub family ``name`` (seeded) with random per-channel vectors, so every vector carries units.

    Norm scales/offsets, BN statistics and biases are randomized (keras-hub initializes ViT's biases at
    ~1e-6 and BN at identity), so a misplaced unit changes the probabilities.
    """
    import numpy as np

    model = HUB_FAMILIES[name](seed)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        base = variable.path.rsplit("/", 1)[-1]
        if base in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, variable.shape)
        elif base in ("beta", "bias", "moving_mean"):
            value = rng.normal(0.0, 0.2, variable.shape)
        else:
            continue
        variable.assign(value.astype(variable.dtype))
    return model


def hub_sample(rows=4, seed=0):
    """A float32 batch of ``rows`` images in [0, 1] for the keras-hub families."""
    import numpy as np

    return np.random.default_rng(seed).uniform(0, 1, size=(rows, *HUB_INPUT)).astype("float32")


def shuffled_copy(member, seed=1):
    """``(shuffled, spec, weights)``: a copy of ``member`` with every permutation group shuffled.

    The copy computes the same function with its units in a known random order
    (what ``align`` must undo); ``weights`` are the member's own arrays.
    """
    import numpy as np

    from ensemblekit._graph import get_arrays, set_arrays
    from ensemblekit.merge.align import permute_arrays
    from ensemblekit.merge.permutation import permutation_spec

    spec = permutation_spec(member, nested=True)
    rng = np.random.default_rng(seed)
    perms = {group: rng.permutation(size) for group, size in spec.sizes.items()}
    weights = get_arrays(member)
    shuffled = keras.models.clone_model(member)
    set_arrays(shuffled, permute_arrays(weights, spec, perms))
    return shuffled, spec, weights
