"""Builds a keras-clip optimizer in each of two torch.distributed processes
(gloo); prints JSON of what each process saw.

Used by tests/test_backends.py:

    python backends_torch_two_processes.py INIT_FILE
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "torch"

import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, init_file, queue):
    import keras

    import keras_clip as kc

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        opt = kc.ClippedAdam(0.01, clipper="global_norm")
        try:
            opt.build(model.trainable_variables)
            queue.put((rank, None, None))
        except Exception as err:  # noqa: BLE001 (reported to the parent, which decides)
            queue.put((rank, type(err).__name__, str(err)))
        # A plain Keras optimizer still builds: the refusal is keras-clip's.
        keras.optimizers.Adam(0.01).build(model.trainable_variables)
    finally:
        dist.destroy_process_group()


def main():
    init_file = sys.argv[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(init_file, queue), nprocs=2, join=True)
    results = sorted(queue.get() for _ in range(2))
    json.dump([{"rank": r, "error": e, "message": m} for r, e, m in results], sys.stdout)


if __name__ == "__main__":
    main()
