"""Write .keras files of composed and packed models with ensemblekit 0.1.0 (before the 0.2 layout).

tests/test_saved_files.py loads them with the current code and checks their outputs.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras
import numpy as np

import ensemblekit as ek

out = "tests/data/v0_1_0"
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)

def mlp(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.LayerNormalization(), keras.layers.Dense(3)], name=f"mlp_{seed}")

def cnn(seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((12, 2))
    h = keras.layers.Conv1D(4, 3, padding="same", activation="relu")(x)
    h = keras.layers.BatchNormalization()(h)
    r = keras.layers.Conv1D(4, 3, padding="same")(h)
    h = keras.layers.Add()([h, r])
    h = keras.layers.MaxPooling1D(2)(h)
    h = keras.layers.Flatten()(h)
    y = keras.layers.Dense(3, activation="softmax")(h)
    return keras.Model(x, y, name=f"cnn_{seed}")

mlps = [mlp(s) for s in range(3)]
cnns = [cnn(s) for s in range(2)]
x6 = rng.normal(size=(16, 6)).astype("float32")
y6 = rng.integers(0, 3, 16)
x12 = rng.normal(size=(8, 12, 2)).astype("float32")
models = {
    "ensemble_mean": (ek.ensemble(mlps, "mean"), x6),
    "ensemble_vote": (ek.ensemble(mlps, "vote"), x6),
    "ensemble_weighted": (ek.ensemble(mlps, "weighted", weights=[0.5, 0.3, 0.2]), x6),
    "ensemble_logit_mean": (ek.ensemble(mlps, "logit_mean"), x6),
    "calibrated": (ek.calibrate(ek.ensemble(mlps, "mean"), x6, y6), x6),
    "stack": (ek.stack(mlps, x6, y6, cv=2, epochs=2), x6),
    "fuse_gated": (ek.fuse(mlps, taps=-2, fusion="gated"), x6),
    "packed_mlp": (ek.pack(mlps, reduce="mean"), x6),
    "packed_cnn": (ek.pack(cnns, reduce="logit_mean"), x12),
    "packed_none": (ek.pack(mlps, reduce="none", lowering="loop"), x6),
}
arrays = {}
for name, (model, x) in models.items():
    model.save(f"{out}/{name}.keras")
    arrays[f"{name}_x"] = x
    arrays[f"{name}_y"] = np.asarray(model.predict(x, verbose=0))
np.savez(f"{out}/expected.npz", **arrays)
print(sorted(os.listdir(out)))
