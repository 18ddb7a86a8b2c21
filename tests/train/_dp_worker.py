"""One rank of the 2-process data-parallel test (run by tests/train/test_distributed.py through
``mlx.launch --backend ring -n 2``, or ``--backend nccl`` on GPUs).
Usage: python _dp_worker.py OUT_DIR [BACKEND]   (BACKEND: ring (default) | nccl | any)

Each rank starts from its *own* init (key = rank), takes rank 0's params with ``broadcast``,
computes the cross-entropy gradient on its half of a fixed global batch, averages it with
``average_gradients`` (bucketed, one call per leaf, and inside ``mx.compile``), takes one plain
SGD step, and writes everything to OUT_DIR/rank{r}.safetensors for the parent to compare with a
single process on the whole batch.
"""
import sys

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np

from alloy.ops.loss import cross_entropy
from alloy.params import flatten, save_safetensors, tree_map
from alloy.train import distributed as dist

MODEL = {
    "vocab_size": 64, "d_model": 32,
    "layer_types": ["mamba2", "attention"], "ffn_types": ["mlp", "none"],
    "mixers": {"mamba2": {"d_state": 8, "head_dim": 16, "chunk_size": 8}, "attention": {"n_heads": 2}},
    "ffns": {"mlp": {"d_ff": 48}},
}
GLOBAL_BATCH, SEQ, LR = 4, 13, 0.1


def global_tokens():
    return mx.array(np.random.default_rng(1234).integers(0, MODEL["vocab_size"], (GLOBAL_BATCH, SEQ)),
                    dtype=mx.int32)


def make_loss(model):
    def loss(params, tokens):
        logits, _ = model.apply(params, tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])
    return loss


def main(out_dir, backend="ring"):
    group = dist.init(backend=backend, strict=True)
    rank, size = dist.world(group)
    assert size == 2, size
    assert dist.is_main(group) == (rank == 0)

    model = alloy.build(MODEL)
    own = model.init(mx.random.key(rank))            # ranks disagree until the broadcast
    params = dist.broadcast(own, group)
    local = dist.shard({"tokens": global_tokens()}, rank, size)["tokens"]
    loss_fn = make_loss(model)

    loss, local_grads = mx.value_and_grad(loss_fn)(params, local)
    avg = dist.average_gradients(local_grads, group)                         # a few buckets
    per_leaf = dist.average_gradients(local_grads, group, bucket_bytes=0)    # one call per leaf
    small = dist.average_gradients(local_grads, group, bucket_bytes=4096)    # many buckets
    compiled = mx.compile(lambda p, t: dist.average_gradients(mx.grad(loss_fn)(p, t), group))(params, local)
    mean_loss = dist.all_mean({"loss": loss}, group)["loss"]
    # mixed dtypes with rank-dependent values: mean of (r + 1) * base over r = 0, 1 is 1.5 * base
    base = {"a": mx.arange(6, dtype=mx.float32).reshape(2, 3), "b": mx.arange(5, dtype=mx.bfloat16),
            "c": [{}, {"w": mx.full((3,), 2.0, dtype=mx.bfloat16)}]}
    mixed = dist.average_gradients(tree_map(lambda x: x * (rank + 1), base), group)
    assert mixed["c"][0] == {} and list(mixed) == ["a", "b", "c"]

    stepped = tree_map(lambda p, g: p - LR * g, params, avg)   # plain SGD, identical on every rank

    out = {}
    for name, tree in (("own", own), ("params", params), ("local", local_grads), ("avg", avg),
                       ("per_leaf", per_leaf), ("small", small), ("compiled", compiled),
                       ("stepped", stepped), ("mixed", mixed)):
        out.update({f"{name}.{k}": v for k, v in flatten(tree).items()})
    out["loss.local"], out["loss.mean"] = loss, mean_loss
    mx.eval(out)
    save_safetensors(f"{out_dir}/rank{rank}.safetensors", out)
    print(f"rank {rank}/{size} done on {mx.default_device()}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
