"""The digits classifier: a small convolutional network written in Flax (linen),
trained on the real 8×8 digits. Its penultimate layer is the embedding.

Imported only by `aj.zoo.digits()` and the training script, so that importing
`adjoint_jax` never imports Flax.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pool2(h):
    # 2×2 average pooling (`nn.avg_pool` divides by an int, which strict dtype
    # promotion rejects).
    b, hh, ww, c = h.shape
    return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


class DigitsClassifier(nn.Module):
    """Logits and embedding of 8×8 images in [-1, 1].

    `__call__(x)` takes x of shape `(..., 8, 8)` and returns `(logits, embedding)` of
    shapes `(..., num_classes)` and `(..., embed_dim)`; it computes in float32.
    """

    num_classes: int = 10
    embed_dim: int = 64
    channels: tuple[int, int] = (32, 64)

    @nn.compact
    def __call__(self, x):
        batch = x.shape[:-2]
        h = jnp.asarray(x, jnp.float32).reshape((-1, 8, 8, 1))
        c1, c2 = self.channels
        h = jax.nn.silu(nn.Conv(c1, (3, 3), name="conv1a")(h))
        h = jax.nn.silu(nn.Conv(c1, (3, 3), name="conv1b")(h))
        h = _pool2(h)  # 4×4
        h = jax.nn.silu(nn.Conv(c2, (3, 3), name="conv2a")(h))
        h = jax.nn.silu(nn.Conv(c2, (3, 3), name="conv2b")(h))
        h = _pool2(h)  # 2×2
        h = h.reshape((h.shape[0], -1))
        emb = jax.nn.silu(nn.Dense(self.embed_dim, name="embed")(h))
        logits = nn.Dense(self.num_classes, name="head")(emb)
        return (
            logits.reshape(batch + (self.num_classes,)),
            emb.reshape(batch + (self.embed_dim,)),
        )
