"""The classifier head, trained on cached features, and the optional fine-tuning of the base's top.

Head candidates (each trained, the best validation accuracy wins; `--heads`, default linear):

    linear   Normalization (training-feature statistics) -> Dense(classes, softmax): a multinomial
             logistic regression fitted by full-batch L-BFGS (scipy) for each L2 strength of L2_GRID,
             warm-started from the stronger one; the best validation accuracy (ties: validation
             log-loss) is kept. About 1.5-2 s on 3150 x 2048 features (Keras' Adam needed ~10 s on 1280).
    mlp      Normalization -> Dense(256, relu), L2 -> Dropout(0.6) -> Dense(classes, softmax), L2 1e-3,
             trained by Keras (Adam), early stopping on validation accuracy (ties broken by validation
             loss), the best epoch's weights kept. From a sweep on the old 128 px flowers features.

Both Normalization layers hold the training features' mean and variance and are
saved with the model, so the joined `.keras` needs no outside statistics.

Fine-tuning trains the base's top layers (from a cut point, see
`bases.split_top`) together with the head, on cached feature maps at the cut
(the augmented views included), at a low learning rate; BatchNormalization
layers stay frozen, i.e. in inference mode (Keras runs a non-trainable
BatchNormalization with its moving statistics). The result is kept only when
it beats the head alone on validation accuracy.

`refit_linear` fits the linear head's chosen L2 strength again on training +
validation features (the pipeline's refit, once validation has made its choice).

`label_smoothing` > 0 trains against smoothed one-hot targets (the linear fit's
cross-entropy, Keras' CategoricalCrossentropy(label_smoothing=...) elsewhere).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from serve._optional import require
from serve.errors import MissingDependencyError

HEADS = ("linear", "mlp")
MIN_STEPS = 8  # the head batch shrinks so that an epoch has at least this many updates


@dataclass
class HeadResult:
    kind: str
    model: object  # keras.Model: features -> probabilities
    val_accuracy: float
    epochs: int
    best_epoch: int
    history: dict = field(default_factory=dict)
    seconds: float = 0.0
    options: dict = field(default_factory=dict)
    fit: LinearFit | None = None  # the linear head's L-BFGS fit (what refit_linear starts from)


def _keras():
    require("tensorflow", "training")
    return require("keras", "training")


def _progress_callback(keras, total: int, desc: str, enabled: bool):
    """A Keras callback driving a tqdm bar: one step per epoch, validation accuracy in the postfix."""
    from serve.console import progress as tqdm  # bar on a terminal, lines in logs

    class TqdmEpochs(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bar = tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr, disable=not enabled, leave=False)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            self.bar.update(1)
            if "val_accuracy" in logs:
                self.bar.set_postfix(loss=f"{logs.get('loss', 0):.3f}", val_acc=f"{logs['val_accuracy']:.3f}")

        def on_train_end(self, logs=None):
            self.bar.close()

    return TqdmEpochs()


def build_head(kind: str, dim: int, classes: int, *, train_features: np.ndarray | None = None,
               hidden: int = 256, dropout: float | None = None, l2: float = 1e-3, name: str = "head"):
    """A head taking (N, dim) features; `train_features` adapt its Normalization layer."""
    keras = _keras()
    regularizer = keras.regularizers.L2(l2) if l2 else None
    features = keras.Input(shape=(dim,), name="features")
    if train_features is not None:  # standardise with the training features' statistics (saved with the model)
        stats = np.asarray(train_features, np.float64)
        mean, variance = stats.mean(axis=0), np.maximum(stats.var(axis=0), 1e-6)
    else:
        mean, variance = np.zeros(dim), np.ones(dim)
    x = keras.layers.Normalization(mean=mean.astype(np.float32), variance=variance.astype(np.float32),
                                   name=f"{name}_normalize")(features)
    if kind == "linear":
        x = keras.layers.Dropout(0.5 if dropout is None else dropout, name=f"{name}_dropout")(x)
    elif kind == "mlp":
        x = keras.layers.Dense(hidden, activation="relu", kernel_regularizer=regularizer, name=f"{name}_hidden")(x)
        x = keras.layers.Dropout(0.6 if dropout is None else dropout, name=f"{name}_dropout")(x)
    else:
        raise ValueError(f"unknown head {kind!r}; expected one of {HEADS}")
    out = keras.layers.Dense(classes, activation="softmax", kernel_regularizer=regularizer, name=f"{name}_logits")(x)
    return keras.Model(features, out, name=name)


def class_weights(labels: np.ndarray, classes: int) -> dict[int, float]:
    """Balanced class weights: n / (classes * count), so each class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    return {i: float(len(labels) / (classes * c)) if c else 0.0 for i, c in enumerate(counts)}


def balanced_sample_weights(labels: np.ndarray, classes: int) -> np.ndarray:
    """Each sample's balanced class weight (`class_weights`), for the linear fit's weighted loss."""
    weights = class_weights(labels, classes)
    return np.asarray([weights[int(c)] for c in labels])


def _fit(keras, model, x, y, val, *, epochs, lr, batch_size, patience, weights, desc, progress, seed,
         label_smoothing=0.0):
    if label_smoothing:  # smoothing needs one-hot targets; the metric keeps the name "accuracy"
        classes = int(model.outputs[0].shape[-1])
        y = keras.utils.to_categorical(y, classes)
        val = (val[0], keras.utils.to_categorical(val[1], classes))
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=float(label_smoothing))
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    else:
        loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, metrics=metrics, steps_per_execution=8)
    stop = _best_epoch_callback(keras, patience)
    history = model.fit(
        x, y, validation_data=val, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0,
        class_weight=weights, callbacks=[stop, _progress_callback(keras, epochs, desc, progress)],
    )
    hist = {k: [float(v) for v in values] for k, values in history.history.items()}
    val_acc = hist.get("val_accuracy", [0.0])
    best = stop.best_epoch
    return hist, float(val_acc[best]), best


def _best_epoch_callback(keras, patience: int):
    """Early stopping on validation accuracy, ties broken by validation loss; the best epoch's weights are kept.

    Keras' EarlyStopping on val_accuracy keeps the *first* epoch reaching the
    best accuracy: with a small validation set (40 few-shot photos) that is
    epoch 3 of a head still far from trained (0.88 test instead of 0.97).
    """

    class BestEpoch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.best, self.best_epoch, self.best_weights, self.wait = None, 0, None, 0

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            score = (float(logs.get("val_accuracy", 0.0)), -float(logs.get("val_loss", 0.0)))
            if self.best is None or score > self.best:
                self.best, self.best_epoch, self.wait = score, epoch, 0
                self.best_weights = self.model.get_weights()
            else:
                self.wait += 1
                if self.wait >= patience:
                    self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    return BestEpoch()


L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2)  # the linear head's L2 strengths, chosen on validation
MAX_ITERATIONS = 500  # L-BFGS iterations per L2 strength (warm-started from the next stronger one)


@dataclass
class LinearFit:
    """A multinomial logistic regression fitted by L-BFGS: logits = ((x - mean) / scale) @ kernel + bias."""

    kernel: np.ndarray  # (dim, classes)
    bias: np.ndarray  # (classes,)
    mean: np.ndarray  # (dim,)
    scale: np.ndarray  # (dim,) standard deviations (ones: raw features)
    l2: float
    val_accuracy: float
    val_loss: float
    iterations: int
    history: dict
    path: list  # [{"l2", "val_accuracy", "val_loss", "iterations"}] for every strength tried


def _softmax_loss(params, x, targets, sample_weight, l2, dim, classes):
    """Weighted mean cross-entropy + l2 * |kernel|^2 (Keras' L2 regularizer), and its gradient."""
    kernel = params[:dim * classes].reshape(dim, classes).astype(np.float32)
    bias = params[dim * classes:].astype(np.float32)
    logits = x @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = float(-(sample_weight[:, None] * targets * log_probs).sum() + l2 * np.square(kernel, dtype=np.float64).sum())
    delta = (np.exp(log_probs) - targets) * sample_weight[:, None]
    grad = np.concatenate([(x.T @ delta + 2 * l2 * kernel).ravel(), delta.sum(axis=0)]).astype(np.float64)
    return loss, grad


def _metrics(x, y, kernel, bias):
    logits = x @ kernel.astype(np.float32) + bias.astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float((log_probs.argmax(axis=1) == y).mean()), float(-log_probs[np.arange(len(y)), y].mean())


def _standardized(x_train, standardize: bool):
    dim = x_train.shape[1]
    if standardize:
        mean = x_train.mean(axis=0, dtype=np.float64)
        scale = np.sqrt(np.maximum(x_train.var(axis=0, dtype=np.float64), 1e-6))
    else:
        mean, scale = np.zeros(dim), np.ones(dim)
    return mean, scale


def _targets(y, classes: int, sample_weight, label_smoothing: float):
    targets = np.eye(classes, dtype=np.float32)[y]
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / classes
    weight = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    return targets, (weight / weight.sum()).astype(np.float32)


def _lbfgs(params, xs, targets, weight, l2, classes, max_iterations, callback=None):
    try:
        from scipy.optimize import minimize
    except ImportError as exc:
        raise MissingDependencyError("scipy", "train", "the linear head's L-BFGS fit") from exc
    return minimize(_softmax_loss, params, args=(xs, targets, weight, l2, xs.shape[1], classes), jac=True,
                    method="L-BFGS-B", callback=callback, options={"maxiter": max_iterations, "ftol": 1e-7})


def fit_linear(x_train, y_train, x_val, y_val, *, classes: int, sample_weight=None, label_smoothing: float = 0.0,
               l2_grid=L2_GRID, standardize: bool = True, max_iterations: int = MAX_ITERATIONS) -> LinearFit:
    """Fit the linear head for every L2 strength (strongest first, warm-started); keep the best on validation.

    Best = highest validation accuracy, ties broken by validation log-loss. Full-batch L-BFGS (scipy) on
    the cached features: a few hundred iterations of two (N, dim) x (dim, classes) products, 1.5-2 s
    for 3150 x 2048 features, where mini-batch Adam needed tens of epochs.
    """
    x_train = np.asarray(x_train, np.float32)
    x_val = np.asarray(x_val, np.float32)
    y_train, y_val = np.asarray(y_train, np.int64), np.asarray(y_val, np.int64)
    dim = x_train.shape[1]
    mean, scale = _standardized(x_train, standardize)
    xs = ((x_train - mean) / scale).astype(np.float32)
    xv = ((x_val - mean) / scale).astype(np.float32)
    targets, weight = _targets(y_train, classes, sample_weight, label_smoothing)
    params = np.zeros(dim * classes + classes)
    best, path = None, []
    for l2 in sorted(l2_grid, reverse=True):
        history = {"loss": [], "val_loss": [], "val_accuracy": []}

        def record(intermediate_result):  # per iteration: the training loss L-BFGS has, validation metrics
            p = intermediate_result.x
            val_acc, val_loss = _metrics(xv, y_val, p[:dim * classes].reshape(dim, classes), p[dim * classes:])
            for key, value in (("loss", float(intermediate_result.fun)), ("val_loss", val_loss),
                               ("val_accuracy", val_acc)):
                history[key].append(value)

        result = _lbfgs(params, xs, targets, weight, l2, classes, max_iterations, record)
        params = result.x
        kernel, bias = params[:dim * classes].reshape(dim, classes), params[dim * classes:]
        val_acc, val_loss = _metrics(xv, y_val, kernel, bias)
        path.append({"l2": l2, "val_accuracy": round(val_acc, 4), "val_loss": round(val_loss, 4),
                     "iterations": int(result.nit)})
        if best is None or (val_acc, -val_loss) > (best.val_accuracy, -best.val_loss):
            best = LinearFit(kernel=kernel.copy(), bias=bias.copy(), mean=mean, scale=scale, l2=l2,
                             val_accuracy=val_acc, val_loss=val_loss, iterations=int(result.nit), history=history,
                             path=path)
    return best


def rebased(fit: LinearFit, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) giving `fit`'s logits on features standardised by `mean` and `scale` instead of its own."""
    kernel = fit.kernel * (scale / fit.scale)[:, None]
    return kernel, fit.bias + ((mean - fit.mean) / fit.scale) @ fit.kernel


def refit_linear(chosen: LinearFit, x, y, *, classes: int, sample_weight=None, label_smoothing: float = 0.0,
                 standardize: bool = True, max_iterations: int = MAX_ITERATIONS) -> LinearFit:
    """`chosen`'s L2 strength fitted again on more photos (training + validation), its own standardisation.

    What scikit-learn's GridSearchCV(refit=True) does: validation chose the strength, the final weights use
    every labelled photo outside the test split. No photo is left to score the result, so the returned
    fit keeps `chosen`'s validation numbers and path (they describe the choice, not these weights).
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    dim = x.shape[1]
    mean, scale = _standardized(x, standardize)
    xs = ((x - mean) / scale).astype(np.float32)
    targets, weight = _targets(y, classes, sample_weight, label_smoothing)
    history = {"loss": []}

    def record(intermediate_result):  # scipy passes the OptimizeResult to a parameter of this name
        history["loss"].append(float(intermediate_result.fun))

    start_kernel, start_bias = rebased(chosen, mean, scale)  # warm start: the chosen head's function
    result = _lbfgs(np.concatenate([start_kernel.ravel(), start_bias]), xs, targets, weight, chosen.l2, classes,
                    max_iterations, record)
    kernel, bias = result.x[:dim * classes].reshape(dim, classes), result.x[dim * classes:]
    return LinearFit(kernel=kernel.copy(), bias=bias.copy(), mean=mean, scale=scale, l2=chosen.l2,
                     val_accuracy=chosen.val_accuracy, val_loss=chosen.val_loss, iterations=int(result.nit),
                     history=history, path=chosen.path)


def linear_head_model(fit: LinearFit, name: str = "head"):
    """The Keras head computing `fit`: Normalization (its mean and variance) -> Dense(softmax)."""
    keras = _keras()
    dim, classes = fit.kernel.shape
    features = keras.Input(shape=(dim,), name="features")
    x = keras.layers.Normalization(mean=fit.mean.astype(np.float32), variance=np.square(fit.scale).astype(np.float32),
                                   name=f"{name}_normalize")(features)
    dense = keras.layers.Dense(classes, activation="softmax", name=f"{name}_logits")
    model = keras.Model(features, dense(x), name=name)
    dense.set_weights([fit.kernel.astype(np.float32), fit.bias.astype(np.float32)])
    return model


class one_blas_thread:
    """numpy's BLAS on one thread: (N, 2048) x (2048, 5) products are too small to split (two threads made
    the fit 2.5x slower on an idle 2-core EPYC), and a second thread spinning on a shared 2-core machine
    doubles the CPU time of the fit (threadpoolctl, scikit-learn's)."""

    def __enter__(self):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # without it the fit is the same, only its BLAS may use more threads
            self._limits = None
            return self
        self._limits = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self._limits is not None:
            self._limits.restore_original_limits()


def train_heads(x_train, y_train, x_val, y_val, *, classes: int, kinds=HEADS, epochs: int = 40,
                batch_size: int = 256, lr: float = 2e-3, seed: int = 0, balance: bool = False,
                progress: bool = True, patience: int = 6, label_smoothing: float = 0.0) -> list[HeadResult]:
    """Train every head kind on the features; results sorted best validation accuracy first."""
    x_train = np.asarray(x_train, np.float32)
    x_val = np.asarray(x_val, np.float32)
    weights = class_weights(y_train, classes) if balance else None
    results = []
    for kind in kinds:
        started = time.perf_counter()
        if kind == "linear":  # full-batch L-BFGS on standardised features, L2 chosen on validation
            sample_weight = balanced_sample_weights(y_train, classes) if balance else None
            with one_blas_thread():
                fit = fit_linear(x_train, y_train, x_val, y_val, classes=classes, sample_weight=sample_weight,
                                 label_smoothing=label_smoothing)
            model = linear_head_model(fit)
            results.append(HeadResult(
                kind=kind, model=model, val_accuracy=fit.val_accuracy, epochs=fit.iterations,
                best_epoch=fit.iterations, history=fit.history, seconds=time.perf_counter() - started,
                options={"solver": "L-BFGS (full batch)", "standardized": True, "l2": fit.l2,
                         "l2_path": fit.path, "balanced_class_weights": balance,
                         "label_smoothing": label_smoothing}, fit=fit))
            continue
        keras = _keras()
        keras.utils.set_random_seed(seed)
        model = build_head(kind, x_train.shape[1], classes, train_features=x_train)
        # at least MIN_STEPS updates per epoch: 160 few-shot images in one 256-batch gave 13 updates in all
        batch = max(1, min(int(batch_size), len(x_train) // MIN_STEPS))
        hist, val_acc, best = _fit(keras, model, x_train, y_train, (x_val, y_val), epochs=epochs, lr=lr,
                                   batch_size=batch, patience=patience, weights=weights,
                                   desc=f"training {kind} head", progress=progress, seed=seed,
                                   label_smoothing=label_smoothing)
        results.append(HeadResult(kind=kind, model=model, val_accuracy=val_acc, epochs=len(hist["loss"]),
                                  best_epoch=best + 1, history=hist, seconds=time.perf_counter() - started,
                                  options={"lr": lr, "batch_size": batch, "balanced_class_weights": balance,
                                           "label_smoothing": label_smoothing}))
    # ties go to the simpler head (listed first)
    return sorted(results, key=lambda r: -r.val_accuracy)


@dataclass
class FineTuneResult:
    val_accuracy: float
    kept: bool
    layers: list[str]
    trainable_weights: int
    epochs: int
    best_epoch: int
    history: dict
    seconds: float


def fine_tune(top, head, x_train, y_train, x_val, y_val, *, baseline: float, epochs: int = 6, lr: float = 1e-4,
              batch_size: int = 32, seed: int = 0, balance: bool = False, progress: bool = True,
              patience: int = 3, label_smoothing: float = 0.0) -> FineTuneResult:
    """Train `top` (cut feature map -> base output) and `head` together; revert unless validation improves."""
    keras = _keras()
    classes = int(head.outputs[0].shape[-1])
    batchnorm = keras.layers.BatchNormalization
    for layer in top.layers:
        layer.trainable = not isinstance(layer, batchnorm)  # BatchNorm frozen: inference mode
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=tuple(x_train.shape[1:]), name="cut_features")
    x = keras.layers.GlobalAveragePooling2D(name="features")(top(inputs))
    model = keras.Model(inputs, head(x), name="fine_tune")
    before_top = [w.numpy() for w in top.weights]
    before_head = [w.numpy() for w in head.weights]
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    names = [layer.name for layer in top.layers if layer.trainable and layer.weights]
    started = time.perf_counter()
    weights = class_weights(y_train, classes) if balance else None
    hist, val_acc, best = _fit(keras, model, x_train, y_train, (x_val, y_val), epochs=epochs, lr=lr,
                               batch_size=batch_size, patience=patience, weights=weights,
                               desc="fine-tuning top layers", progress=progress, seed=seed,
                               label_smoothing=label_smoothing)
    kept = round(val_acc, 6) > round(baseline, 6)  # Keras' float32 accuracy vs the fit's float64: same counts tie
    if not kept:
        for w, value in zip(top.weights, before_top):
            w.assign(value)
        for w, value in zip(head.weights, before_head):
            w.assign(value)
    for layer in top.layers:
        layer.trainable = False
    return FineTuneResult(val_accuracy=val_acc, kept=kept, layers=names, trainable_weights=trainable,
                          epochs=len(hist["loss"]), best_epoch=best + 1, history=hist,
                          seconds=time.perf_counter() - started)


def predict(model, x, batch_size: int = 256) -> np.ndarray:
    """The model's outputs for `x`, in batches, called directly (inference mode).

    Not `model.predict`: a model compiled with steps_per_execution (the heads)
    and then reused inside another model mis-traces its predict function on
    small inputs, and direct calls avoid one trace per input shape.
    """
    x = np.asarray(x)
    outs = [np.asarray(model(x[i:i + batch_size].astype(np.float32), training=False))
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,) + tuple(model.outputs[0].shape[1:]), np.float32)
