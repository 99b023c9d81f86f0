"""Classification objectives and metrics: cross-entropy, accuracy, F1 (binary and macro).

F1 is computed from a confusion matrix so eval loops can sum matrices over batches first.

>>> logits = jnp.array([[2., 0.], [0., 2.], [2., 0.]]); labels = jnp.array([0, 1, 1])
>>> float(accuracy(logits, labels))
0.6666666865348816
>>> float(f1_score(confusion_matrix(logits.argmax(-1), labels, 2), average='binary'))
0.6666666865348816
"""
import jax
import jax.numpy as jnp


def _weights(labels, weights):
  return jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy; logits [N, C], integer labels [N], optional example weights [N]."""
  w = _weights(labels, weights)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * w) / jnp.maximum(w.sum(), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  w = _weights(labels, weights)
  return jnp.sum((logits.argmax(-1) == labels) * w) / jnp.maximum(w.sum(), 1.0)


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int,
                     weights: jax.Array | None = None) -> jax.Array:
  """[true class, predicted class] counts (float32), padding rows excluded via `weights`."""
  w = _weights(labels, weights)
  index = labels * num_classes + predictions
  return jnp.zeros(num_classes * num_classes, jnp.float32).at[index].add(w).reshape(num_classes, num_classes)


def f1_score(confusion: jax.Array, average: str = 'macro') -> jax.Array:
  """F1 from a confusion matrix: `binary` (class 1 positive) or `macro` (unweighted class mean;
  a class with no true and no predicted examples scores 0, as scikit-learn does)."""
  tp = jnp.diag(confusion)
  precision_den = confusion.sum(0)
  recall_den = confusion.sum(1)
  f1 = 2 * tp / jnp.maximum(precision_den + recall_den, 1e-12)
  if average == 'binary':
    return f1[1]
  if average == 'macro':
    return f1.mean()
  raise ValueError(f"f1 average {average!r}: expected 'binary' or 'macro'")
